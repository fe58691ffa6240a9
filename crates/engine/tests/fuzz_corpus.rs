//! The fuzz targets' kept corpus (`fuzz/corpus/<target>/`).
//!
//! - `kept_corpus_passes_every_check`: every kept input, seeds and merged
//!   finds and any crash kept as a regression, runs through its target's
//!   checks in `cargo test`;
//! - `write_seeds` (ignored): writes the seeds, real inputs of each kind,
//!   as `seed-<name>`. Run it after a format change:
//!   `cargo test -p strait-engine --test fuzz_corpus -- --ignored`.

use std::path::PathBuf;
use std::sync::Arc;

use prost::Message as _;
use rustls::pki_types::ServerName;
use strait_engine::fuzzing::{self, HOST, SECRET};
use strait_proto::*;

type Check = fn(&[u8]);
/// Named inputs of one target.
type Seeds = Vec<(String, Vec<u8>)>;

const TARGETS: &[(&str, Check)] = &[
    ("frame", strait_proto::fuzzing::frames),
    ("messages", strait_proto::fuzzing::messages),
    ("client_hello", fuzzing::client_hello),
    ("relay_request", fuzzing::relay_request),
    ("relay_response", fuzzing::relay_response),
    ("chunked", fuzzing::chunked),
    ("jwt", fuzzing::jwt),
    ("tunnel", fuzzing::tunnel),
    ("hostname", fuzzing::hostname),
    ("config", fuzzing::config),
];

fn corpus(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus").join(target)
}

#[test]
fn kept_corpus_passes_every_check() {
    for (target, check) in TARGETS {
        let entries = std::fs::read_dir(corpus(target)).unwrap_or_else(|e| panic!("fuzz/corpus/{target}: {e}"));
        let mut seeds = 0;
        for entry in entries {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            let outcome = std::panic::catch_unwind(|| check(&bytes));
            assert!(outcome.is_ok(), "{} fails its checks", path.display());
            seeds += path.file_name().unwrap().to_string_lossy().starts_with("seed-") as usize;
        }
        assert!(seeds > 0, "fuzz/corpus/{target} has no seed");
    }
}

#[test]
#[ignore = "writes fuzz/corpus; run after a format change"]
fn write_seeds() {
    let seeds: [(&str, Seeds); 10] = [
        ("frame", frame_seeds()),
        ("messages", messages().into_iter().map(|(n, m)| (n, m.encode_to_vec())).collect()),
        ("client_hello", client_hellos()),
        ("relay_request", prefixed(0x80, REQUESTS, "")),
        ("relay_response", [prefixed(0, RESPONSES, ""), prefixed(1, &RESPONSES[..2], "-head")].concat()),
        ("chunked", chunked_seeds()),
        ("jwt", jwt_seeds()),
        ("tunnel", tunnel_seeds()),
        ("hostname", [prefixed(0, HOSTNAMES, ""), prefixed(1, &HOSTNAMES[..2], "-as-host")].concat()),
        ("config", config_seeds()),
    ];
    for (target, seeds) in seeds {
        let dir = corpus(target);
        std::fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in seeds {
            let check = TARGETS.iter().find(|(t, _)| *t == target).unwrap().1;
            check(&bytes);
            std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
        }
    }
}

/// Named inputs behind one leading control byte.
fn prefixed(byte: u8, items: &[(&str, &str)], tag: &str) -> Seeds {
    items.iter().map(|(name, text)| (format!("{name}{tag}"), [&[byte][..], text.as_bytes()].concat())).collect()
}

/// One message of every kind, filled as agents and engines fill them.
fn messages() -> Vec<(String, Message)> {
    let details = ClientDetails {
        agent: Some("strait".into()),
        version: Some("0.1.0".into()),
        os: Some("linux".into()),
        arch: Some("x86_64".into()),
        token: Some("eyJhbGciOiJIUzI1NiJ9.e30.sig".into()),
        protocol_version: Some(PROTOCOL_VERSION.into()),
        ..ClientDetails::default()
    };
    let liveness = ControlChannelLiveness { heartbeat_interval_ms: 10_000, heartbeat_timeout_ms: 30_000 };
    let properties = TunnelProperties {
        name: Some("web".into()),
        publish: Some(true),
        protocol: Some("http".into()),
        labels: [("team".to_string(), "web".to_string())].into(),
        trusted_ips: vec!["10.0.0.0/8".into()],
        hostname: Some("app.t.edge.example.com".into()),
        http_version: Some("http/1.1".into()),
        token_auth: Some(false),
        port: Some(443),
        creation_date: Some(Timestamp { seconds: 1_700_000_000, nanos: 5 }),
        ..TunnelProperties::default()
    };
    let error = Error::new(ErrorCode::TunnelNotFound, "no tunnel web");
    let payloads = vec![
        Payload::OpenControlChannelReq(OpenControlChannelReq {
            client_details: Some(details.clone()),
            liveness: Some(liveness.clone()),
        }),
        Payload::OpenControlChannelRsp(OpenControlChannelRsp {
            payload: Some(OpenControlChannelResult::Ok(OpenControlChannelOk {
                client_id: "c0ffee".into(),
                server_details: Some(ServerDetails { agent: Some("strait-engine".into()), ..ServerDetails::default() }),
                liveness: Some(liveness),
            })),
        }),
        Payload::CloseControlChannelReq(CloseControlChannelReq {}),
        Payload::CloseControlChannelRsp(CloseControlChannelRsp {}),
        Payload::OpenTunnelReq(OpenTunnelReq { request_id: "1".into(), tunnel_properties: Some(properties.clone()) }),
        Payload::OpenTunnelRsp(OpenTunnelRsp {
            request_id: "1".into(),
            payload: Some(OpenTunnelResult::TunnelProperties(properties)),
        }),
        Payload::CloseTunnelReq(CloseTunnelReq { tunnel_id: "t1".into() }),
        Payload::CloseTunnelRsp(CloseTunnelRsp { tunnel_id: "t1".into(), error: None }),
        Payload::ProxyConnReq(ProxyConnReq {
            tunnel_id: "t1".into(),
            stream_id: "s1".into(),
            secret: Some("one-time".into()),
            source_ip: Some(std::net::IpAddr::from([203, 0, 113, 7]).into()),
            proxy_endpoint: Some("edge.example.com:443".into()),
            strait_spill: false,
        }),
        Payload::ProxyConnRsp(ProxyConnRsp { stream_id: "s1".into(), error: Some(error.clone()) }),
        Payload::ProxyReq(ProxyReq {
            client_details: Some(details.clone()),
            stream_id: "s1".into(),
            zero_rtt: Some(true),
        }),
        Payload::ProxyRsp(ProxyRsp { error: None }),
        Payload::StreamReq(StreamReq {
            client_details: Some(details),
            tunnel_id_name: "db".into(),
            zero_rtt: Some(false),
            datagram_channel: Some(false),
        }),
        Payload::StreamRsp(StreamRsp { payload: Some(StreamResult::Error(error.clone())) }),
        Payload::Heartbeat(Heartbeat { sequence: 7, acknowledgement: 6 }),
        Payload::ServerMessage(ServerMessage { message: "maintenance at 02:00".into() }),
        Payload::DatagramChannelClose(DatagramChannelClose {
            stream_id: "s2".into(),
            error: Some(Error { code: 12345, message: None }),
        }),
    ];
    let mut named: Vec<(String, Message)> = payloads.into_iter().map(|p| (p.name().to_string(), p.into())).collect();
    let v6 = ProxyConnReq {
        source_ip: Some(std::net::IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, 1]).into()),
        ..ProxyConnReq::default()
    };
    named.push(("proxy_conn_req_v6".into(), Payload::ProxyConnReq(v6).into()));
    named
}

/// Frame reader control bytes (limit, pieces, frames before the switch,
/// bytes already read), then frames.
fn frame_input(max: u16, pattern: u8, switch_after: u8, already: u16, stream: &[u8]) -> Vec<u8> {
    let mut input = max.to_be_bytes().to_vec();
    input.extend([pattern, switch_after]);
    input.extend(already.to_be_bytes());
    input.extend_from_slice(stream);
    input
}

fn frame_seeds() -> Seeds {
    let frames: Vec<(String, Vec<u8>)> = messages().into_iter().map(|(n, m)| (n, encode(&m).unwrap())).collect();
    let mut seeds: Vec<(String, Vec<u8>)> =
        frames.iter().map(|(n, f)| (n.clone(), frame_input(65_535, 7, 1, 0, f))).collect();
    let control: Vec<u8> = frames.iter().take(6).flat_map(|(_, f)| f.clone()).collect();
    seeds.push(("six-frames-in-pieces".into(), frame_input(65_535, 3, 6, 10, &control)));
    let mut raw_after = frames[10].1.clone();
    raw_after.extend_from_slice(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n");
    seeds.push(("proxy-req-then-raw-bytes".into(), frame_input(65_535, 1, 1, 0, &raw_after)));
    seeds.push(("over-the-limit".into(), frame_input(1024, 0, 0, 0, &[0, 0, 0x10, 0, 1, 2, 3])));
    seeds.push(("truncated".into(), frame_input(65_535, 2, 0, 0, &frames[0].1[..9])));
    seeds.push(("empty-message".into(), frame_input(65_535, 0, 0, 0, &[0, 0, 0, 0])));
    seeds
}

/// ClientHellos as rustls sends them: the agent, the API, a published
/// tunnel, no SNI, TLS 1.2 and TLS 1.3 only.
fn client_hellos() -> Seeds {
    let hello = |name: &str, host: &str, alpns: &[&[u8]], versions: &[&'static rustls::SupportedProtocolVersion]| {
        let mut config = rustls::ClientConfig::builder_with_provider(strait_engine::crypto_provider())
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        config.alpn_protocols = alpns.iter().map(|a| a.to_vec()).collect();
        let server = ServerName::try_from(host.to_string()).unwrap();
        let mut connection = rustls::ClientConnection::new(Arc::new(config), server).unwrap();
        let mut bytes = vec![0x05];
        connection.write_tls(&mut bytes).unwrap();
        (name.to_string(), bytes)
    };
    let both = rustls::ALL_VERSIONS;
    vec![
        hello("agent", HOST, &[ALPN], both),
        hello("api", HOST, &[b"h2", b"http/1.1"], both),
        hello("tunnel", "app.t.edge.example.com", &[b"h2", b"http/1.1"], both),
        hello("tunnel-agent-alpn", "App.t.edge.example.com", &[ALPN], both),
        hello("no-sni", "127.0.0.1", &[], both),
        hello("tls12-only", "tls.t.edge.example.com", &[b"http/1.1"], &[&rustls::version::TLS12]),
        hello("tls13-only", HOST, &[ALPN], &[&rustls::version::TLS13]),
    ]
}

const REQUESTS: &[(&str, &str)] = &[
    ("get", "GET / HTTP/1.1\r\nHost: app.t.edge.example.com\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n"),
    (
        "get-keep-alive-pipelined",
        "GET /a?b=c HTTP/1.1\r\nHost: open.t.edge.example.com\r\nCookie: a=1\r\nCookie: b=2\r\n\r\nGET /next HTTP/1.1\r\n",
    ),
    ("head", "HEAD /index.html HTTP/1.1\r\nhost: APP.t.edge.example.com.\r\nConnection: close\r\n\r\n"),
    (
        "forwarded-chain",
        "GET / HTTP/1.1\r\nX-Forwarded-For: 10.0.0.1\r\nHost: app.t.edge.example.com\r\nx-forwarded-for: 10.0.0.2 \r\n\
         X-Forwarded-Proto: http\r\nX-Forwarded-Host: evil.example\r\n\r\n",
    ),
    (
        "connection-named-headers",
        "DELETE /item/7 HTTP/1.1\r\nHost: app.t.edge.example.com:443\r\nConnection: keep-alive, X-Private\r\n\
         X-Private: secret\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nContent-Length: 0\r\n\r\n",
    ),
    ("host-by-sni", "GET / HTTP/1.1\r\nHost: www.example.org\r\n\r\n"),
    ("token-auth-tunnel", "GET / HTTP/1.1\r\nHost: auth.t.edge.example.com\r\n\r\n"),
    ("h2c-tunnel", "GET / HTTP/1.1\r\nHost: h2c.t.edge.example.com\r\n\r\n"),
    ("untrusted-source", "GET / HTTP/1.1\r\nHost: ips.t.edge.example.com\r\n\r\n"),
    ("tls-tunnel", "GET / HTTP/1.1\r\nHost: tls.t.edge.example.com\r\n\r\n"),
    ("unknown-tunnel", "GET / HTTP/1.1\r\nHost: nope.t.edge.example.com\r\n\r\n"),
    ("post-with-body", "POST /form HTTP/1.1\r\nHost: app.t.edge.example.com\r\nContent-Length: 5\r\n\r\nhello"),
    (
        "chunked-body",
        "PUT /up HTTP/1.1\r\nHost: app.t.edge.example.com\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ),
    (
        "websocket",
        "GET /ws HTTP/1.1\r\nHost: app.t.edge.example.com\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    ),
    ("expect", "PUT /x HTTP/1.1\r\nHost: app.t.edge.example.com\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n"),
    ("absolute-form", "GET https://app.t.edge.example.com/ HTTP/1.1\r\nHost: app.t.edge.example.com\r\n\r\n"),
    ("two-hosts", "GET / HTTP/1.1\r\nHost: app.t.edge.example.com\r\nHost: open.t.edge.example.com\r\n\r\n"),
    ("no-host", "GET / HTTP/1.1\r\nAccept: */*\r\n\r\n"),
    ("http10", "GET / HTTP/1.0\r\nHost: app.t.edge.example.com\r\n\r\n"),
    ("connect", "CONNECT app.t.edge.example.com:443 HTTP/1.1\r\nHost: app.t.edge.example.com\r\n\r\n"),
    ("bare-newlines", "GET / HTTP/1.1\nHost: app.t.edge.example.com\n\n"),
    ("partial", "GET / HTTP/1.1\r\nHost: app.t.edge"),
];

const RESPONSES: &[(&str, &str)] = &[
    ("length", "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"),
    ("chunked", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
    ("gzip-then-chunked", "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
    ("chunked-not-last", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n"),
    ("until-close-http10", "HTTP/1.0 200 OK\r\nX-A: 1\r\n\r\nbody"),
    ("keep-alive-http10", "HTTP/1.0 304 Not Modified\r\nConnection: keep-alive\r\nETag: \"x\"\r\n\r\n"),
    ("no-content", "HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n"),
    ("early-hints", "HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\n"),
    ("connection-named", "HTTP/1.1 404 \r\nConnection: x-private\r\nX-Private: 1\r\nContent-Length: 0\r\n\r\n"),
    ("repeated-length", "HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\nContent-Length: 5\r\n\r\n"),
    ("conflicting-length", "HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\n"),
    ("switching-protocols", "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"),
    ("close", "HTTP/1.1 500 Internal Server Error\r\nConnection: close\r\nContent-Length: 2\r\n\r\nno"),
    (
        "set-cookies",
        "HTTP/1.1 302 Found\r\nLocation: /\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\nContent-Length: 0\r\n\r\n",
    ),
];

fn chunked_seeds() -> Seeds {
    let bodies: &[(&str, &[u8])] = &[
        ("two-chunks", b"5\r\nhello\r\n1a;ext=1\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\n\r\nGET / HTTP/1.1"),
        ("trailers", b"0\r\nX-Sum: 1\r\nX-B: 2\r\n\r\n"),
        ("spaced-size", b"A \r\n0123456789\r\n0\r\n\r\n"),
        ("incomplete", b"5\r\nhel"),
        ("bad-size", b"x\r\n"),
        ("overflow", b"fffffffffffffffff\r\n"),
    ];
    let mut seeds: Vec<(String, Vec<u8>)> =
        bodies.iter().map(|(n, b)| (n.to_string(), [&[0u8, 7][..], b].concat())).collect();
    // Recipes for valid bodies: chunk count, sizes, styles, trailers.
    seeds.push(("valid-recipe".into(), vec![1, 5, 3, 0, 40, 9, 4, 0, 3, 12, 0, 2, 5, 10, 11, 12, b'x', b'y']));
    seeds.push(("valid-recipe-bytewise".into(), vec![1, 1, 1, 0, 3, 8, 6, 1, 2, 3, 4, 5, 6, 0, b'z']));
    seeds
}

fn jwt_seeds() -> Seeds {
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let token = |alg, claims: serde_json::Value| {
        encode(&Header::new(alg), &claims, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap()
    };
    let raw = |name: &str, text: String| (name.to_string(), [&[0u8][..], text.as_bytes()].concat());
    let b64 = |v: serde_json::Value| {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    vec![
        raw("valid", token(Algorithm::HS256, serde_json::json!({"sub": "alice", "iat": now}))),
        raw("valid-user-id", token(Algorithm::HS256, serde_json::json!({"userId": "u1", "exp": 4_000_000_000u64}))),
        raw("expired", token(Algorithm::HS256, serde_json::json!({"sub": "a", "exp": 1_000_000_000}))),
        raw("hs512", token(Algorithm::HS512, serde_json::json!({"sub": "a"}))),
        raw(
            "alg-none",
            format!("{}.{}.", b64(serde_json::json!({"alg": "none"})), b64(serde_json::json!({"sub": "a"}))),
        ),
        raw("not-a-jwt", "not.a.jwt".into()),
        ("minted-sub-exp".into(), [&[1u8, 0x42][..], b"carol\0", &[10, 0]].concat()),
        ("minted-all-nbf".into(), [&[1u8, 0xbf][..], b"s\0u\0c\0", &[0xf0, 2, 3]].concat()),
        (
            "signed-json".into(),
            [&[2u8][..], br#"{"alg":"HS256","typ":"JWT"}"#, b"\0", br#"{"sub":"dave","exp":4000000000}"#].concat(),
        ),
        (
            "signed-json-odd-claims".into(),
            [&[2u8][..], br#"{"alg":"HS256"}"#, b"\0", br#"{"sub":7,"nbf":"soon"}"#].concat(),
        ),
    ]
}

fn tunnel_seeds() -> Seeds {
    let base = TunnelProperties::default;
    let s = |v: &str| Some(v.to_string());
    let props = [
        ("private", TunnelProperties { name: s("db"), ..base() }),
        ("published-http", TunnelProperties { publish: Some(true), ..base() }),
        (
            "published-hostname-h2c-auth",
            TunnelProperties {
                publish: Some(true),
                hostname: s("Shop.t.edge.example.com"),
                http_version: s("h2c"),
                token_auth: Some(true),
                trusted_ips: vec!["10.0.0.0/8".into(), "::1".into()],
                labels: [("rstream.managed-by".to_string(), "run".to_string())].into(),
                ..base()
            },
        ),
        (
            "go-cli-hostname",
            TunnelProperties { publish: Some(true), host: s("r0a1b2c3d-edge.t.example.com"), ..base() },
        ),
        (
            "tls-terminated",
            TunnelProperties {
                publish: Some(true),
                protocol: s("TLS"),
                tls_min_version: s("TLS1.3"),
                tls_ciphers: vec!["TLS13_AES_128_GCM_SHA256".into()],
                tls_alpns: vec!["h2".into()],
                http_use_tls: Some(true),
                ..base()
            },
        ),
        (
            "tls-passthrough",
            TunnelProperties { publish: Some(true), protocol: s("tls"), tls_mode: s("passthrough"), ..base() },
        ),
        ("datagram", TunnelProperties { r#type: s("datagram"), protocol: s("quic"), ..base() }),
        (
            "refused-published-tcp",
            TunnelProperties { publish: Some(true), protocol: s("tcp"), port: Some(5432), ..base() },
        ),
        ("refused-features", TunnelProperties { mtls_auth: Some(true), geoip: vec!["FR".into()], ..base() }),
    ];
    props.into_iter().map(|(n, p)| (n.to_string(), p.encode_to_vec())).collect()
}

const HOSTNAMES: &[(&str, &str)] = &[
    ("under-namespace", "edge.example.com\nApp.t.edge.example.com"),
    ("go-cli-derived", "edge.example.com\nr0a1b2c3d-edge.t.example.com."),
    ("bare-label", "localhost\nshop"),
    ("two-labels-under", "Edge.Example.com.\na.b.t.edge.example.com"),
    ("bad-label", "edge.example.com\nbad_label.t.edge.example.com"),
    ("bad-engine-host", "https://edge:443\n-x-.t.edge.example.com"),
];

fn config_seeds() -> Seeds {
    let readme = "# engine.yaml: the rstream CE format\n\
        engine: {host: edge.example.com, log_level: info}\n\
        tls: {enabled: true, listen_addr: \":443\"}\n\
        certs: {static: {enabled: true, cert_file: /etc/rstream/tls/cert.pem, key_file: /etc/rstream/tls/key.pem}}\n\
        auth: {jwt: {enabled: true, token_jwt_secret: \"<secret>\"}}\n";
    let full = "engine:\n  host: Edge.Example.com.\n  log_level: warning\n  log_format: json\n\
        http:\n  enabled: true\n  listen_addr: \"[::]:80\"\n\
        tls:\n  enabled: true\n  listen_addr: 127.0.0.1:8443\n  public_port: 443\n\
        certs:\n  static:\n    enabled: yes\n    cert_file: /c.pem\n    key_file: /k.pem\n\
        auth:\n  jwt:\n    enabled: \"true\"\n    token_jwt_secret: s3cret-value-that-is-long-enough-xx\n\
        metrics:\n  prometheus:\n    enabled: true\n    listen_addr: 0.0.0.0:9090\n    path: metrics/\n    bearer_token: scrape\n\
        timeouts:\n  stream_request_seconds: 5\n  http_idle_seconds: 90\n  shutdown_drain_seconds: 0\n\
        limits:\n  max_frame_bytes: 1024\n  first_frame_seconds: 10\n  handshake_seconds: 10\n  tunnels_per_client: 256\n  \
        pending_streams_per_client: 512\n  control_idle_seconds: 60\n  max_connections: 50\n";
    let bad = "engine: {host: \"https://edge.example.com:443\", log_level: loud}\n\
        tls: {enabled: false, listen_addr: \"nope\"}\ntimeouts: {stream_request_seconds: -3, http_idle_seconds: lots}\n\
        limits: {max_frame_bytes: 100}\nmetrics: {prometheus: {enabled: true, listen_addr: \"0.0.0.0:9090\"}}\n";
    let env = "RSTREAM_ENGINE_AUTH__JWT__TOKEN_JWT_SECRET=from-env\nRSTREAM_ENGINE_TLS__LISTEN_ADDR=127.0.0.1:8443\n\
        RSTREAM_ENGINE_TIMEOUTS__STREAM_REQUEST_SECONDS=5\nRSTREAM_ENGINE_CONFIG=/ignored.yaml\nUNRELATED=x\n";
    let env_only = "RSTREAM_ENGINE_ENGINE__HOST=edge.example.com\nRSTREAM_ENGINE_ENGINE__LOG_LEVEL=debug\n\
        RSTREAM_ENGINE_TLS__ENABLED=true\nRSTREAM_ENGINE_CERTS__STATIC__ENABLED=true\n\
        RSTREAM_ENGINE_CERTS__STATIC__CERT_FILE=/c.pem\nRSTREAM_ENGINE_CERTS__STATIC__KEY_FILE=/k.pem\n\
        RSTREAM_ENGINE_AUTH__JWT__ENABLED=true\nRSTREAM_ENGINE_AUTH__JWT__TOKEN_JWT_SECRET=12345\n";
    let anchors = "base: &b {enabled: true}\ntls: *b\nengine: {host: localhost, log_level: debug}\n";
    let item = |name: &str, yaml: &str, env: &str| (name.to_string(), format!("{yaml}\0{env}").into_bytes());
    vec![
        item("readme", readme, ""),
        item("every-key", full, ""),
        item("every-problem", bad, ""),
        item("readme-with-env", readme, env),
        item("env-only", "", env_only),
        item(
            "unknown-keys",
            &format!("{readme}engine_typo: 1\ntls_extra: {{a: 1}}\n"),
            "RSTREAM_ENGINE_TLS__LISTEN_ADRR=:1\n",
        ),
        item("anchors", anchors, "RSTREAM_ENGINE_TLS=scalar\n"),
        item("broken-yaml", "engine: [", ""),
        item("not-a-mapping", "- a\n- b\n", ""),
    ]
}
