"""The rstream Python SDK as strait's agent, for the benchmark.

Opens one tunnel per NAME=PORT argument (private, or with --publish
published as b-NAME.t.localhost: an `http` tunnel for NAME "http", a `tls`
one otherwise) and forwards each to 127.0.0.1:PORT with the SDK's own
`forward_to`, prints one JSON line once every tunnel is open, and runs until
stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

import rstream
from rstream.config import TLSOptions


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--publish", action="store_true")
    parser.add_argument("tunnels", nargs="+", metavar="NAME=PORT")
    args = parser.parse_args()
    client = rstream.Client(
        engine=args.engine, token=args.token, tls=TLSOptions(ca_file=args.ca), read_config_file=False
    )
    async with client:
        control = await client.connect()
        forwards = []
        for spec in args.tunnels:
            name, port = spec.split("=", 1)
            if args.publish:
                protocol = "http" if name == "http" else "tls"
                tunnel = await control.create_tunnel(
                    name=name, publish=True, protocol=protocol, hostname=f"b-{name}.t.localhost"
                )
            else:
                tunnel = await control.create_tunnel(name=name, publish=False)
            forwards.append(asyncio.create_task(tunnel.forward_to("127.0.0.1", int(port))))
        print(json.dumps({"tunnels": [t.split("=", 1)[0] for t in args.tunnels]}), flush=True)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sys.stdin.read)
        for forward in forwards:
            forward.cancel()
        await control.close()


if __name__ == "__main__":
    asyncio.run(main())
