//! Never-panic properties of the engine's parsers, on generated input: the
//! checks the fuzz targets run (`strait_engine::fuzzing`), here on a few
//! hundred cases each so `cargo test` keeps them alive. The generators
//! stay close to real input (heads, hostnames, configuration keys) so each
//! case reaches past the first refusal.

use proptest::prelude::*;
use prost::Message as _;
use strait_engine::fuzzing;
use strait_proto::TunnelProperties;

/// Words that matter to the parsers, or arbitrary text.
fn word(words: &'static [&'static str], other: &'static str) -> BoxedStrategy<String> {
    prop_oneof![3 => prop::sample::select(words).prop_map(String::from), 1 => other.prop_map(String::from)].boxed()
}

fn hosts() -> BoxedStrategy<String> {
    word(
        &[
            "app.t.edge.example.com",
            "APP.t.edge.example.com.",
            "open.t.edge.example.com:443",
            "auth.t.edge.example.com",
            "h2c.t.edge.example.com",
            "ips.t.edge.example.com",
            "tls.t.edge.example.com",
            "nope.t.edge.example.com",
            "edge.example.com",
            "[::1]:8080",
            "",
            "bad_label.t.edge.example.com",
            "Shop",
            ".t.edge.example.com",
        ],
        "[a-zA-Z0-9._:\\[\\]-]{0,24}",
    )
}

/// An HTTP/1.1 request head, sometimes with bytes behind it.
fn request_head() -> impl Strategy<Value = Vec<u8>> {
    let method = word(&["GET", "HEAD", "POST", "OPTIONS", "CONNECT", "DELETE"], "[A-Z]{1,8}");
    let target = prop_oneof![
        6 => prop::sample::select(&["/", "/a/b?c=d", "/%20x"][..]).prop_map(String::from),
        1 => prop::sample::select(&["*", "https://app.t.edge.example.com/"][..]).prop_map(String::from),
        1 => "/[!-~]{0,16}",
    ];
    let version =
        prop_oneof![8 => Just("HTTP/1.1".to_string()), 1 => Just("HTTP/1.0".into()), 1 => "HTTP/[0-9. ]{0,4}"];
    let field = |names: &'static [&'static str], values: BoxedStrategy<String>| {
        (prop::sample::select(names), values).prop_map(|(n, v)| format!("{n}: {v}")).boxed()
    };
    // Weighted towards what the relay takes, so most cases reach the
    // rewrite; the headers that send a request to hyper stay rare.
    let header = prop_oneof![
        3 => field(&["Connection", "connection"], word(&["close", "keep-alive, X-Private", "x-private, TE", "Upgrade", "host"], "[ -~]{0,12}")),
        4 => field(&["X-Private", "x-private", "Keep-Alive", "TE", "Cookie", "Accept"], "[ -~]{0,12}".boxed()),
        3 => field(&["X-Forwarded-For", "x-forwarded-for", "X-Forwarded-Proto", "X-Forwarded-Host"], word(&["10.0.0.1", " 10.0.0.2 , ::1", ""], "[ -~]{0,12}")),
        1 => field(&["Content-Length", "content-length"], word(&["0", " 0 ", "00", "12"], "[ -~]{0,4}")),
        1 => field(&["Transfer-Encoding", "Upgrade", "Expect"], word(&["chunked", "websocket", "100-continue"], "[ -~]{0,8}")),
        1 => ("[!-9;-~]{1,12}", prop::collection::vec(any::<u8>(), 0..6))
            .prop_map(|(n, v)| format!("{n}: {}", String::from_utf8_lossy(&v))),
    ];
    // Most heads name a tunnel, so the rest of the head decides.
    let relayable = prop::sample::select(
        &["app.t.edge.example.com", "APP.t.edge.example.com.", "open.t.edge.example.com:443", "www.example.org"][..],
    );
    let host = prop_oneof![3 => relayable.prop_map(String::from), 1 => hosts()];
    let host = prop::option::weighted(0.9, host.prop_map(|h| format!("Host: {h}")));
    let newline = prop::sample::select(&["\r\n", "\n"][..]);
    let headers = (host, prop::collection::vec(header, 0..6)).prop_map(|(host, mut headers)| {
        headers.splice(0..0, host);
        headers
    });
    (method, target, version, headers, newline, prop::collection::vec(any::<u8>(), 0..8)).prop_map(
        |(method, target, version, headers, newline, rest)| {
            let mut head = format!("{method} {target} {version}{newline}");
            for header in headers {
                head.push_str(&header);
                head.push_str(newline);
            }
            head.push_str(newline);
            let mut bytes = head.into_bytes();
            bytes.extend(rest);
            bytes
        },
    )
}

/// An HTTP/1.x response head.
fn response_head() -> impl Strategy<Value = Vec<u8>> {
    let status = prop_oneof![prop::sample::select(&[100u16, 101, 103, 200, 204, 304, 404, 502][..]), 0u16..1000];
    let name = word(
        &["Content-Length", "Transfer-Encoding", "Connection", "Keep-Alive", "X-A", "Set-Cookie"],
        "[a-zA-Z-]{1,10}",
    );
    let value = word(
        &["5", "5, 5", "5, 6", "-1", "chunked", "gzip, chunked", "chunked, gzip", "close", "keep-alive", "X-A"],
        "[ -~]{0,12}",
    );
    let reason = word(&["OK", "", "Not Found"], "[ -~]{0,10}");
    (
        prop::sample::select(&["HTTP/1.1", "HTTP/1.0"][..]),
        status,
        reason,
        prop::collection::vec((name, value), 0..6),
        prop::collection::vec(any::<u8>(), 0..6),
    )
        .prop_map(|(version, status, reason, headers, rest)| {
            let mut head = format!("{version} {status:03} {reason}\r\n");
            for (name, value) in headers {
                head.push_str(&format!("{name}: {value}\r\n"));
            }
            head.push_str("\r\n");
            let mut bytes = head.into_bytes();
            bytes.extend(rest);
            bytes
        })
}

/// Tunnel properties as an agent might ask for them, on the wire.
fn properties() -> impl Strategy<Value = Vec<u8>> {
    let maybe = |words: &'static [&'static str]| prop::option::of(word(words, "[a-zA-Z0-9./_ -]{0,10}"));
    (
        (
            maybe(&["bytestream", "datagram", "DataGram"]),
            any::<Option<bool>>(),
            maybe(&["http", "tls", "tcp", "TLS", "quic"]),
        ),
        (
            maybe(&["app", "App.t.edge.example.com", "r0a1-x.t.example.com", "-bad", "a.b.t.edge.example.com"]),
            maybe(&["http/1.1", "h2c", "h2", "h3"]),
            any::<Option<bool>>(),
        ),
        (
            maybe(&["terminated", "passthrough"]),
            maybe(&["1.2", "TLS1.3", "v1_3", "1.1"]),
            prop::collection::vec(
                word(&["TLS13_AES_128_GCM_SHA256", "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"], "[A-Z0-9_]{0,12}"),
                0..3,
            ),
        ),
        (
            prop::collection::vec(
                word(&["10.0.0.0/8", "::1", "192.168.1.1", "10.0.0.0/33"], "[0-9a-f.:/]{0,12}"),
                0..3,
            ),
            any::<Option<bool>>(),
            any::<Option<bool>>(),
            prop::option::of(0u32..70_000),
        ),
    )
        .prop_map(
            |(
                (kind, publish, protocol),
                (hostname, http_version, token_auth),
                (tls_mode, tls_min_version, tls_ciphers),
                (trusted_ips, upstream_tls, http_use_tls, port),
            )| {
                TunnelProperties {
                    r#type: kind,
                    publish,
                    protocol,
                    hostname,
                    http_version,
                    token_auth,
                    tls_mode,
                    tls_min_version,
                    tls_ciphers,
                    trusted_ips,
                    upstream_tls,
                    http_use_tls,
                    port,
                    ..TunnelProperties::default()
                }
                .encode_to_vec()
            },
        )
}

/// YAML-ish text over the configuration's keys, then environment lines.
fn configuration() -> impl Strategy<Value = Vec<u8>> {
    let key = word(
        &[
            "engine",
            "host",
            "log_level",
            "log_format",
            "tls",
            "enabled",
            "listen_addr",
            "public_port",
            "certs",
            "static",
            "cert_file",
            "key_file",
            "auth",
            "jwt",
            "token_jwt_secret",
            "metrics",
            "prometheus",
            "path",
            "bearer_token",
            "timeouts",
            "http_idle_seconds",
            "limits",
            "max_frame_bytes",
            "http",
        ],
        "[a-z_]{1,8}",
    );
    let value = word(
        &[
            "",
            "edge.example.com",
            "info",
            "json",
            "true",
            "no",
            "\":443\"",
            "127.0.0.1:0",
            "0.0.0.0:9090",
            "/m/",
            "65535",
            "100",
            "-3",
            "{",
            "[",
            "{a: 1}",
            "&a x",
            "*a",
            "|",
            "\"\\u0000\"",
            "~",
        ],
        "[ -~]{0,12}",
    );
    let line = (0usize..3, key, value).prop_map(|(indent, k, v)| format!("{}{k}: {v}\n", "  ".repeat(indent)));
    let env = (
        word(
            &[
                "ENGINE__HOST",
                "TLS__LISTEN_ADDR",
                "AUTH__JWT__TOKEN_JWT_SECRET",
                "LIMITS__MAX_FRAME_BYTES",
                "CONFIG",
                "TLS",
                "A__B__C",
            ],
            "[A-Z_]{0,10}",
        ),
        word(&["edge.example.com", ":8443", "x", "70000", ""], "[ -~]{0,10}"),
    )
        .prop_map(|(k, v)| format!("RSTREAM_ENGINE_{k}={v}\n"));
    (any::<bool>(), prop::collection::vec(line, 0..12), prop::collection::vec(env, 0..4)).prop_map(
        |(valid, lines, env)| {
            let lines = lines.concat();
            let mut bytes = if valid { after_a_valid_file(&lines) } else { lines }.into_bytes();
            bytes.push(0);
            bytes.extend(env.concat().into_bytes());
            bytes
        },
    )
}

/// `lines` after a valid file, so they decide what is accepted.
fn after_a_valid_file(lines: &str) -> String {
    format!(
        "engine: {{host: edge.example.com, log_level: info}}\ntls: {{enabled: true}}\n\
         certs: {{static: {{enabled: true, cert_file: /c.pem, key_file: /k.pem}}}}\n\
         auth: {{jwt: {{enabled: true, token_jwt_secret: s3cret-s3cret}}}}\n{lines}"
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn chunked_scanner_agrees_in_any_pieces(mode in any::<u8>(), pattern in any::<u8>(), body in prop::collection::vec(any::<u8>(), 0..200)) {
        fuzzing::chunked(&[&[mode, pattern][..], &body].concat());
    }

    #[test]
    fn chunked_scanner_on_chunked_text(pattern in any::<u8>(), body in "([0-9a-fA-F]{1,3}(;[ -~]{0,4})?\r\n[a-z]{0,20}\r\n){0,3}0\r\n([a-z-]{1,6}: [a-z]{0,4}\r\n)?\r\n?x?") {
        fuzzing::chunked(&[&[0, pattern][..], body.as_bytes()].concat());
    }

    #[test]
    fn relay_request_heads(cut in any::<u8>(), head in request_head()) {
        fuzzing::relay_request(&[&[cut][..], &head].concat());
    }

    #[test]
    fn relay_response_heads(head_only in any::<bool>(), head in response_head()) {
        fuzzing::relay_response(&[&[u8::from(head_only)][..], &head].concat());
    }

    #[test]
    fn tunnel_properties_normalise(bytes in properties()) {
        fuzzing::tunnel(&bytes);
    }

    #[test]
    fn published_hostnames(flags in any::<u8>(), engine_host in word(&["edge.example.com", "EDGE.example.com.", "localhost", "x_y", ""], "[a-z0-9.-]{0,12}"),
                           requested in hosts()) {
        fuzzing::hostname(format!("{}{engine_host}\n{requested}", flags as char).as_bytes());
    }

    #[test]
    fn configuration_text(bytes in configuration()) {
        fuzzing::config(&bytes);
    }

    #[test]
    fn sni_routing(name in prop_oneof![hosts(), "[a-zA-Z0-9.-]{0,6}(\\.t\\.)?(edge\\.example\\.com)?\\.?"]) {
        fuzzing::client_hello(&[&[0][..], name.as_bytes()].concat());
    }

    #[test]
    fn tokens(mode in 0u8..3, bytes in prop::collection::vec(any::<u8>(), 0..64)) {
        fuzzing::jwt(&[&[mode][..], &bytes].concat());
    }
}
