"""The packaging: the Dockerfile, deploy/compose.yaml and the systemd unit
deploy/strait-engine.service, checked as far as this machine allows.

- Compose: the real `docker compose config` (the Compose v2 plugin that
  scripts/compose.sh builds) loads and validates deploy/compose.yaml; the
  resolved file is then checked against the rstream CE baseline, and the
  engine's own `check-config` runs on what the container would get (the
  image's entry point, the mounted engine.yaml, the Compose environment).
- Dockerfile: no Docker engine runs here, so nothing is built or run. It
  is parsed and checked statically (stages, what they copy, the non-root
  user, the entry point, the ports), and the binary it would ship is
  checked to need no library beyond the runtime image's glibc and libgcc.
- systemd: `systemd-analyze verify` and `systemd-analyze security
  --offline` on the unit (systemd is not PID 1 here, so it is never
  started); then the engine is started by hand as the unit says: its user
  (created for the test), its capabilities, its environment, its state and
  cache directories and configuration layout under a temporary root, on
  free ports (privileged ones where the test runs as root, to prove the
  ambient capability binds them).
"""

from __future__ import annotations

import json
import os
import pathlib
import pwd
import random
import re
import selectors
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile

import pytest

from conftest import BIN, PROCESS_DEADLINE, READY_DEADLINE, ROOT

DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "strait-engine.service"
DOCKER_CONFIG = ROOT / "target" / "tools" / "docker"

# The CE layout the container and the unit both use.
CONFIG_PATH = "/etc/rstream/engine.yaml"
ENTRYPOINT = ["/usr/local/bin/strait-engine", "--config", CONFIG_PATH]


def run(argv: list, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=PROCESS_DEADLINE, **kwargs
    )  # fmt: skip


def gen_certs(folder: pathlib.Path) -> None:
    done = run([BIN / "strait-engine", "gen-certs", "--host", "localhost", "--out", folder])
    assert done.returncode == 0, done.stderr


def secret() -> str:
    return os.urandom(32).hex()


# --- Compose -------------------------------------------------------------


def compose_config(project: pathlib.Path) -> subprocess.CompletedProcess:
    """`docker compose config` on PROJECT/deploy/compose.yaml."""
    plugin = DOCKER_CONFIG / "cli-plugins" / "docker-compose"
    # A missing plugin is a broken setup (scripts/test.sh builds it), never a skip.
    assert plugin.exists(), f"{plugin} is missing: run bash scripts/compose.sh"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_", "RSTREAM_"))}
    env["DOCKER_CONFIG"] = str(DOCKER_CONFIG)
    return run(
        ["docker", "compose", "-f", project / "deploy" / "compose.yaml", "config", "--format", "json"],
        cwd=project / "deploy", env=env,
    )  # fmt: skip


def compose_project(tmp: pathlib.Path, secrets: dict[str, str]) -> pathlib.Path:
    """A copy of the repository's packaging as a user lays it out: the
    Dockerfile at the root, deploy/ with engine.env filled in from the
    example and a tls/ folder."""
    project = tmp / "project"
    (project / "deploy" / "tls").mkdir(parents=True)
    shutil.copy(ROOT / "Dockerfile", project / "Dockerfile")
    for name in ("compose.yaml", "engine.yaml"):
        shutil.copy(DEPLOY / name, project / "deploy" / name)
    lines = []
    for line in (DEPLOY / "engine.env.example").read_text().splitlines():
        key = line.split("=", 1)[0]
        lines.append(f"{key}={secrets[key]}" if key in secrets else line)
    (project / "deploy" / "engine.env").write_text("\n".join(lines) + "\n")
    return project


def test_compose_file_is_the_ce_baseline(tmp_path):
    jwt_secret, metrics_token = secret(), secret()
    project = compose_project(
        tmp_path,
        {
            "RSTREAM_ENGINE_AUTH__JWT__TOKEN_JWT_SECRET": jwt_secret,
            "RSTREAM_ENGINE_METRICS__PROMETHEUS__BEARER_TOKEN": metrics_token,
        },
    )
    done = compose_config(project)
    assert done.returncode == 0, f"docker compose config refused deploy/compose.yaml:\n{done.stderr}"
    config = json.loads(done.stdout)
    assert list(config["services"]) == ["engine"], config["services"]
    engine = config["services"]["engine"]

    ports = {(p.get("host_ip"), p["published"], p["target"], p["protocol"]) for p in engine["ports"]}
    assert ports == {
        (None, "80", 80, "tcp"),
        (None, "443", 443, "tcp"),
        (None, "443", 443, "udp"),
        ("127.0.0.1", "9090", 9090, "tcp"),
    }, ports

    # The environment file reached the service.
    environment = engine["environment"]
    assert environment.get("RSTREAM_ENGINE_AUTH__JWT__TOKEN_JWT_SECRET") == jwt_secret
    assert environment.get("RSTREAM_ENGINE_METRICS__PROMETHEUS__BEARER_TOKEN") == metrics_token

    mounts = {v["target"]: v for v in engine["volumes"]}
    assert set(mounts) == {CONFIG_PATH, "/etc/rstream/tls"}, mounts
    assert all(v["read_only"] for v in mounts.values()), mounts
    assert mounts[CONFIG_PATH]["source"] == str(project / "deploy" / "engine.yaml")

    # Built from the Dockerfile at the root; its entry point and user stand.
    assert engine["build"]["context"] == str(project), engine["build"]
    assert (project / engine["build"]["dockerfile"]).read_text() == (ROOT / "Dockerfile").read_text()
    assert engine.get("entrypoint") is None and engine.get("command") is None, engine
    assert engine.get("user") in (None, ""), engine.get("user")
    assert engine.get("network_mode") in (None, ""), "host networking would bypass the port mappings"

    # What the container would run: the image's entry point, the mounted
    # engine.yaml, the Compose environment (certificate paths pointed at
    # a generated pair, the one rewrite). check-config follows the entry
    # point as `docker compose run --rm engine check-config` would.
    gen_certs(tmp_path)
    environment = environment | {
        "RSTREAM_ENGINE_ENGINE__HOST": "localhost",
        "RSTREAM_ENGINE_CERTS__STATIC__CERT_FILE": str(tmp_path / "cert.pem"),
        "RSTREAM_ENGINE_CERTS__STATIC__KEY_FILE": str(tmp_path / "key.pem"),
    }
    entrypoint = dockerfile_entrypoint()
    argv = [BIN / "strait-engine"] + [mounts[CONFIG_PATH]["source"] if a == CONFIG_PATH else a for a in entrypoint[1:]]
    check = run(argv + ["check-config"], env={"PATH": os.environ["PATH"]} | environment)
    assert check.returncode == 0, f"{shlex.join(map(str, argv))} check-config:\n{check.stdout}{check.stderr}"


def test_compose_config_refuses_what_compose_would(tmp_path):
    """The validator validates: a misspelt key and a missing environment
    file are refused, so a passing check above means something."""
    project = compose_project(tmp_path, {})
    compose = project / "deploy" / "compose.yaml"
    good = compose.read_text()
    compose.write_text(good.replace("    ports:\n", "    prots:\n", 1))
    done = compose_config(project)
    assert done.returncode != 0 and "prots" in done.stderr, done.stderr
    compose.write_text(good)
    (project / "deploy" / "engine.env").unlink()
    done = compose_config(project)
    assert done.returncode != 0 and "engine.env" in done.stderr, done.stderr


# --- Dockerfile (static) -------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; comments dropped, continuations joined."""
    text = (ROOT / "Dockerfile").read_text()
    logical, pending = [], ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    out = []
    for line in logical:
        word, _, rest = line.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def dockerfile_entrypoint() -> list[str]:
    entrypoints = [rest for word, rest in dockerfile_instructions() if word == "ENTRYPOINT"]
    assert entrypoints, "the Dockerfile has no ENTRYPOINT"
    return json.loads(entrypoints[-1])


def dockerfile_stages() -> list[dict]:
    stages: list[dict] = []
    for word, rest in dockerfile_instructions():
        if word == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append({"image": parts[0], "name": name, "steps": []})
        elif word not in ("ARG",) or stages:
            assert stages, f"{word} before the first FROM"
            stages[-1]["steps"].append((word, rest))
    return stages


def test_dockerfile_builds_in_one_stage_and_runs_non_root_in_another():
    stages = dockerfile_stages()
    assert len(stages) >= 2, "a multi-stage build"
    names = [s["name"] for s in stages]
    build, runtime = stages[0], stages[-1]
    # glibc of the build must not be newer than the runtime's: both Debian 12.
    assert "bookworm" in build["image"], build["image"]
    assert runtime["image"].startswith("gcr.io/distroless/cc-debian12"), runtime["image"]

    # The build stage compiles both binaries from the locked sources.
    runs = " ".join(rest for word, rest in build["steps"] if word == "RUN")
    for wanted in ("cargo build", "--release", "--locked", "-p strait-engine", "-p strait "):
        assert wanted in runs, f"{wanted!r} not in the build stage's RUN: {runs}"
    assert ("COPY", ". .") in build["steps"], build["steps"]
    assert (ROOT / "Cargo.lock").exists()

    # Every COPY --from names an earlier stage, and copies what it built.
    for i, stage in enumerate(stages):
        for word, rest in stage["steps"]:
            if word == "COPY" and rest.startswith("--from="):
                source = rest.split()[0].split("=", 1)[1]
                assert source in names[:i], f"COPY --from={source}: no earlier stage of that name ({names[:i]})"
    copied = [rest for word, rest in runtime["steps"] if word == "COPY"]
    assert any("/out/strait-engine" in c and "/out/strait " in c and c.endswith("/usr/local/bin/") for c in copied), copied
    assert "-t /out target/release/strait-engine target/release/strait" in runs, runs

    # Non-root at run time: the last USER of the runtime stage.
    users = [rest for word, rest in runtime["steps"] if word == "USER"]
    assert users, "the runtime stage sets no USER (distroless would run as root)"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0", ""), users[-1]

    # The CE entry point and ports.
    assert dockerfile_entrypoint() == ENTRYPOINT
    exposed = {p for word, rest in runtime["steps"] if word == "EXPOSE" for p in rest.split()}
    assert {"80/tcp", "443/tcp", "443/udp", "9090/tcp"} <= exposed, exposed


def test_dockerignore_keeps_what_the_build_needs():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for heavy in ("target", ".git", ".venv"):
        assert heavy in patterns, f"{heavy} would be sent to the Docker daemon"
    members = re.findall(r'"(crates/[^"]+)"', (ROOT / "Cargo.toml").read_text())
    needed = ["Cargo.toml", "Cargo.lock", *(f"{m}/Cargo.toml" for m in members), *(f"{m}/src" for m in members)]
    for path in needed:
        assert (ROOT / path).exists(), path
        for pattern in patterns:
            assert not pathlib.PurePath(path).is_relative_to(pattern.rstrip("/")), f"{pattern} excludes {path}"


def test_the_shipped_binary_needs_only_what_distroless_cc_has():
    """distroless/cc-debian12 has glibc (libc, libm, libpthread, libdl,
    librt) and libgcc_s; the engine links nothing else (rustls on ring, no
    OpenSSL). Checked on the binary built here, on Debian 12 like the
    Dockerfile's build stage."""
    allowed = {"linux-vdso.so.1", "libgcc_s.so.1", "libm.so.6", "libc.so.6", "libpthread.so.0", "libdl.so.2", "librt.so.1"}
    for name in ("strait-engine", "strait"):
        done = run(["ldd", BIN / name])
        assert done.returncode == 0, done.stderr
        libs = {line.split()[0] for line in done.stdout.splitlines() if line.strip()}
        extra = {lib for lib in libs - allowed if not lib.startswith("/lib64/ld-linux")}
        assert not extra, f"{name} links {extra}, which distroless/cc does not ship"


# --- systemd ---------------------------------------------------------------


def unit_service() -> dict[str, list[str]]:
    """The [Service] section: each key with all its values, in order."""
    section, values = None, {}
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        key, _, value = line.partition("=")
        if section == "[Service]":
            values.setdefault(key.strip(), []).append(value.strip())
    return values


def unit_for(binary: pathlib.Path, tmp: pathlib.Path, text: str | None = None) -> pathlib.Path:
    """A copy of the unit whose ExecStart runs BINARY (verify checks that
    the command exists and is executable)."""
    text = (text if text is not None else UNIT.read_text()).replace("/usr/local/bin/strait-engine", str(binary))
    path = tmp / UNIT.name
    path.write_text(text)
    return path


def verify(unit: pathlib.Path) -> str:
    """systemd-analyze verify's complaints; it exits 0 on unknown keys and
    bad values (it only says 'ignoring'), so any output is a failure."""
    done = run(["systemd-analyze", "verify", "--man=no", unit])
    return (done.stdout + done.stderr).strip() or ("" if done.returncode == 0 else f"exit {done.returncode}")


def test_the_unit_passes_systemd_analyze(tmp_path):
    unit = unit_for(BIN / "strait-engine", tmp_path)
    complaints = verify(unit)
    assert not complaints, complaints

    # The sandboxing as systemd scores it (0 to 10, lower is better; the
    # threshold is in tenths): the unit now scores 1.6 "OK".
    done = run(["systemd-analyze", "security", "--offline=yes", "--threshold=20", unit])
    overall = [line for line in done.stdout.splitlines() if "Overall exposure" in line]
    assert done.returncode == 0, f"exposure above 2.0: {overall}\n{done.stdout[-3000:]}"

    service = unit_service()
    assert service["User"] == ["strait"] and service["Group"] == ["strait"], service.get("User")
    assert service["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    assert service["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    assert service["ProtectSystem"] == ["strict"]
    assert service["NoNewPrivileges"] == ["yes"]
    assert service["StateDirectory"] == ["strait-engine"] and service["CacheDirectory"] == ["strait-engine"]
    assert service["ExecStart"] == [shlex.join(ENTRYPOINT)], "the same entry point as the image"
    assert service["EnvironmentFile"] == ["-/etc/rstream/engine.env"]

    # And verify does catch a slip: a misspelt key.
    typo = UNIT.read_text().replace("AmbientCapabilities=", "AmbientCapabilites=")
    broken = tmp_path / "broken"
    broken.mkdir()
    assert "AmbientCapabilites" in verify(unit_for(BIN / "strait-engine", broken, typo))


def free_port(privileged: bool) -> int:
    """A port free on 127.0.0.1 for TCP and UDP both (the QUIC listener
    takes the UDP side of the TLS port); below 1024 when PRIVILEGED."""
    candidates = random.sample(range(600, 1024), 424) if privileged else [0] * 50
    for candidate in candidates:
        tcp, udp = socket.socket(), socket.socket(type=socket.SOCK_DGRAM)
        try:
            tcp.bind(("127.0.0.1", candidate))
            port = tcp.getsockname()[1]
            udp.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
        finally:
            tcp.close()
            udp.close()
    raise RuntimeError("no free port")


def cap_names(values: list[str]) -> str:
    """CAP_NET_BIND_SERVICE ... -> +net_bind_service,... (setpriv's spelling)."""
    caps = [c for v in values for c in v.split()]
    return ",".join("+" + c.lower().removeprefix("cap_") for c in caps)


@pytest.fixture
def unit_user():
    """The unit's user, created for the test when missing (and removed
    after), or None when not root: then the engine runs as this user."""
    if os.geteuid() != 0:
        yield None
        return
    name = unit_service()["User"][0]
    created = False
    try:
        pwd.getpwnam(name)
    except KeyError:
        done = run(["useradd", "--system", "--user-group", "--no-create-home", "--shell", "/usr/sbin/nologin", name])
        assert done.returncode == 0, done.stderr
        created = True
    try:
        yield pwd.getpwnam(name)
    finally:
        if created:
            run(["userdel", name])


@pytest.mark.timeout(120)
def test_the_engine_runs_as_the_unit_says(unit_user):
    service = unit_service()
    root = pathlib.Path(tempfile.mkdtemp(prefix="strait-unit-"))
    root.chmod(0o755)  # the unit's user walks into it, as into /
    proc = None
    try:
        uid = unit_user.pw_uid if unit_user else os.geteuid()
        gid = unit_user.pw_gid if unit_user else os.getegid()

        def path(p: str) -> pathlib.Path:
            """A path of the unit, under the temporary root."""
            p = p.replace("%S", "/var/lib").replace("%C", "/var/cache")
            return root / p.lstrip("/")

        # What an operator installs (README.md, "Installing").
        binary = path("/usr/local/bin/strait-engine")
        binary.parent.mkdir(parents=True)
        shutil.copy(BIN / "strait-engine", binary)
        binary.chmod(0o755)
        tls = path("/etc/rstream/tls")
        tls.mkdir(parents=True)
        gen_certs(tls)
        os.chown(tls, 0 if unit_user else uid, gid)
        tls.chmod(0o750)
        os.chown(tls / "key.pem", 0 if unit_user else uid, gid)
        (tls / "key.pem").chmod(0o640)

        privileged = unit_user is not None
        tls_port, http_port = free_port(privileged), free_port(privileged)
        while http_port == tls_port:
            http_port = free_port(privileged)
        yaml = (DEPLOY / "engine.yaml").read_text()
        yaml = yaml.replace('":443"', f'"127.0.0.1:{tls_port}"').replace('":80"', f'"127.0.0.1:{http_port}"')
        yaml = yaml.replace('"127.0.0.1:9090"', '"127.0.0.1:0"').replace("/etc/rstream/", f"{root}/etc/rstream/")
        config = path(CONFIG_PATH)
        config.write_text(yaml)
        jwt_secret, metrics_token = secret(), secret()
        env_file = path(service["EnvironmentFile"][0].lstrip("-"))
        env_file.write_text(
            (DEPLOY / "engine.env.example").read_text()
            .replace("HOST=edge.example.com", "HOST=localhost")
            .replace("TOKEN_JWT_SECRET=\n", f"TOKEN_JWT_SECRET={jwt_secret}\n")
            .replace("BEARER_TOKEN=\n", f"BEARER_TOKEN={metrics_token}\n")
        )  # fmt: skip
        env_file.chmod(0o600)  # systemd reads it as root

        # StateDirectory= and CacheDirectory= as systemd makes them: owned
        # by the user, with their modes. A stale cache object the engine
        # must remove at start proves it uses the cache directory as that user.
        for key in ("StateDirectory", "CacheDirectory"):
            base = "/var/lib" if key == "StateDirectory" else "/var/cache"
            folder = path(f"{base}/{service[key][0]}")
            folder.mkdir(parents=True)
            os.chown(folder, uid, gid)
            folder.chmod(int(service.get(f"{key}Mode", ["0755"])[0], 8))
        stale = path(f"/var/cache/{service['CacheDirectory'][0]}/obj-stale")
        stale.write_bytes(b"left by an earlier run")
        os.chown(stale, uid, gid)

        # The process: the unit's environment (a clean one, as systemd's),
        # working directory, umask, user, capabilities and no_new_privs.
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
        for assignment in service.get("Environment", []):
            key, _, value = assignment.partition("=")
            env[key] = str(path(value)) if "%" in value else value
        for line in env_file.read_text().splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.partition("=")
                env[key] = value
        argv = shlex.split(service["ExecStart"][0])
        argv = [str(path(a)) if a.startswith(("/usr/local/bin/", "/etc/rstream/")) else a for a in argv]
        # The one addition: the ready line, so the test waits on the engine
        # rather than on a timer.
        argv.append("--print-ready")
        if unit_user:
            setpriv = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--init-groups"]
            if service.get("AmbientCapabilities"):
                caps = cap_names(service["AmbientCapabilities"])
                setpriv += [f"--inh-caps={caps}", f"--ambient-caps={caps}"]
            if service.get("CapabilityBoundingSet"):
                setpriv.append(f"--bounding-set=-all,{cap_names(service['CapabilityBoundingSet'])}")
            if service.get("NoNewPrivileges") == ["yes"]:
                setpriv.append("--no-new-privs")
            argv = setpriv + ["--"] + argv
        log = open(root / "engine.log", "wb")
        proc = subprocess.Popen(
            argv, cwd=path(service["WorkingDirectory"][0]), env=env, umask=int(service["UMask"][0], 8),
            stdout=subprocess.PIPE, stderr=log,
        )  # fmt: skip

        selector = selectors.DefaultSelector()
        selector.register(proc.stdout, selectors.EVENT_READ)
        ready_line = proc.stdout.readline() if selector.select(timeout=READY_DEADLINE) else b""
        log.flush()
        assert ready_line, f"no ready line (exit {proc.poll()}):\n{(root / 'engine.log').read_text()}"
        ready = json.loads(ready_line)
        assert ready["tls"] == f"127.0.0.1:{tls_port}" and ready["http"] == f"127.0.0.1:{http_port}", ready
        assert ready["quic"] == f"127.0.0.1:{tls_port}", ready

        status = pathlib.Path(f"/proc/{proc.pid}/status").read_text()
        fields = dict(line.split(":", 1) for line in status.splitlines())
        assert fields["Uid"].split() == [str(uid)] * 4, fields["Uid"]
        if unit_user:
            net_bind_service = 1 << 10
            assert int(fields["CapEff"], 16) == net_bind_service, fields["CapEff"]
            assert int(fields["CapBnd"], 16) == net_bind_service, fields["CapBnd"]
            assert fields["NoNewPrivs"].strip() == "1"
        assert os.readlink(f"/proc/{proc.pid}/cwd") == str(path(service["WorkingDirectory"][0]))
        assert not stale.exists(), "the engine did not clear the unit's cache directory"

        # It answers: readiness, the Engine API with a token minted as
        # README.md says, metrics with their bearer token, the redirect.
        ca = tls / "ca.pem"
        base = f"https://localhost:{tls_port}"
        done = run(["curl", "-fsS", "--max-time", "10", "--cacert", ca, f"{base}/readyz"])
        assert done.returncode == 0, done.stderr
        minted = run([BIN / "strait", "token", "--secret", jwt_secret, "--sub", "ops", "--ttl", "10m"])
        assert minted.returncode == 0, minted.stderr
        token = minted.stdout.strip()
        done = run(["curl", "-fsS", "--max-time", "10", "--cacert", ca, "-H", f"Authorization: Bearer {token}", f"{base}/api/tunnels"])  # fmt: skip
        assert done.returncode == 0 and json.loads(done.stdout) == [], done.stdout + done.stderr
        metrics = f"http://{ready['metrics']}/metrics"
        done = run(["curl", "-fsS", "--max-time", "10", "-H", f"Authorization: Bearer {metrics_token}", metrics])
        assert done.returncode == 0 and "strait_build_info" in done.stdout, done.stderr
        done = run(["curl", "-sS", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}", f"http://localhost:{http_port}/x"])  # fmt: skip
        assert done.stdout == "308", done.stdout + done.stderr

        # systemd stops it with SIGTERM and waits TimeoutStopSec.
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        assert code == 0, f"exit {code}:\n{(root / 'engine.log').read_text()}"
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=PROCESS_DEADLINE)
        shutil.rmtree(root, ignore_errors=True)


def test_readme_install_section_names_what_exists():
    """Every repository path the install section tells a user to use is there."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Installing\n", 1)[1].split("\n## ", 1)[0]
    paths = set(re.findall(r"(?<![\w/.])((?:deploy|crates|target/release)/[\w./-]*\w)", section))
    assert {"deploy/strait-engine.service", "deploy/compose.yaml", "deploy/engine.yaml"} <= paths, paths
    for path in paths - {"deploy/tls"}:
        if path.startswith("target/release/"):
            assert path.removeprefix("target/release/") in ("strait-engine", "strait"), path
        else:
            assert (ROOT / path).exists(), f"README.md's install section names {path}, which does not exist"
    # The unit the section installs is the one the tests verify and run.
    assert "deploy/strait-engine.service /etc/systemd/system/" in section
