//! What the fuzz targets (`fuzz/`) and the property tests check in the
//! engine: one function per target, taking arbitrary bytes and panicking
//! when a property fails. Not part of the engine's API.
//!
//! - [`client_hello`]: the listener's ClientHello read fed in one piece and
//!   in pieces, then the SNI router and the handshake that follows;
//! - [`relay_request`], [`relay_response`]: the HTTP/1.1 relay's head
//!   parsers and the heads they write;
//! - [`chunked`]: the chunked-body scanner, whole against piecewise, and on
//!   bodies built to be valid;
//! - [`jwt`]: token verification on arbitrary text, on minted tokens with
//!   a known answer, and on arbitrary JSON signed with the right key;
//! - [`tunnel`], [`hostname`]: tunnel property normalisation and the
//!   published hostnames it serves;
//! - [`config`]: the YAML and `RSTREAM_ENGINE_` reader.
//!
//! The relay needs an engine: [`harness`] starts one per process (on
//! 127.0.0.1:0, never driven) with a tunnel of each kind the relay tells
//! apart.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey};
use prost::Message as _;
use rustls::server::Accepted;
use serde_json::{Value, json};
use strait_proto::fuzzing::{Input, Pieces, block_on};
use strait_proto::{ErrorCode, TunnelProperties};

use crate::auth::{AuthError, Verifier};
use crate::config::{Config, ENV_PREFIX, LogFormat, Secret};
use crate::edge::chunked::Scanner;
use crate::edge::headers;
use crate::edge::http::Edge;
use crate::edge::relay::Framing;
use crate::edge::relay::fuzzing::{Request, Response, request, response};
use crate::net::tls::{self as listener, Route};
use crate::registry::{Client, ClientInfo, Tunnel};
use crate::tunnel::{Namespace, normalize};
use crate::{Engine, dev};

/// The engine host of every target.
pub const HOST: &str = "edge.example.com";
/// The JWT secret of the harness engine.
pub const SECRET: &str = "fuzzing-secret-fuzzing-secret-0123";
const NS: Namespace<'static> = Namespace::hostnames(HOST, 443);
/// The public peer of the harness edge.
const PEER: &str = "127.0.0.1:40000";

/// The harness tunnels: label and what makes each one special. Only the
/// first two may be relayed; the others need hyper or refuse this peer.
const TUNNELS: &[(&str, &str)] = &[
    ("app", "{}"),
    ("open", r#"{"trusted_ips": ["127.0.0.0/8"]}"#),
    ("auth", r#"{"token_auth": true}"#),
    ("h2c", r#"{"http_version": "h2c"}"#),
    ("h2", r#"{"http_version": "h2"}"#),
    ("ips", r#"{"trusted_ips": ["10.0.0.0/8", "::1"]}"#),
    ("tls", r#"{"protocol": "tls"}"#),
];
const RELAYABLE: &[&str] = &["app", "open"];
/// Headers per head the relay parses (`edge::relay`), as hyper allows.
const MAX_HEADERS: usize = 100;

/// One engine per fuzzing process, and an edge for a connection whose SNI
/// names the `app` tunnel.
pub struct Harness {
    pub engine: Engine,
    pub edge: Edge,
    _runtime: tokio::runtime::Runtime,
}

pub fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        crate::install_crypto_provider();
        let dir = std::env::temp_dir().join(format!("strait-fuzzing-{}", std::process::id()));
        let files = dev::generate_certs(HOST, &dir).expect("certificates generate");
        let yaml = format!(
            "engine: {{host: {HOST}, log_level: error}}\n\
             tls: {{enabled: true, listen_addr: \"127.0.0.1:0\"}}\n\
             certs: {{static: {{enabled: true, cert_file: \"{}\", key_file: \"{}\"}}}}\n\
             auth: {{jwt: {{enabled: true, token_jwt_secret: \"{SECRET}\"}}}}\n",
            files.cert.display(),
            files.key.display(),
        );
        let config = Config::from_yaml_str(&yaml, Vec::new()).expect("the harness configuration is valid").config;
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
        let engine = runtime.block_on(Engine::start(config)).expect("the harness engine starts");
        // Loaded: a reload attempt on a missing file keeps serving them.
        let _ = std::fs::remove_dir_all(&dir);

        let registry = &engine.shared.registry;
        let (outbox, _) = tokio::sync::mpsc::channel(1);
        let info = ClientInfo { id: "fuzz-client".into(), principal: "fuzz".into(), ..ClientInfo::default() };
        registry.add_client(Arc::new(Client::new(info, outbox, None))).expect("the harness client registers");
        for (label, extra) in TUNNELS {
            let mut fields: Value = serde_json::from_str(extra).expect("valid JSON");
            fields["hostname"] = json!(format!("{label}{}", NS.suffix()));
            let requested = TunnelProperties {
                publish: Some(true),
                hostname: fields["hostname"].as_str().map(String::from),
                protocol: fields["protocol"].as_str().map(String::from),
                http_version: fields["http_version"].as_str().map(String::from),
                token_auth: fields["token_auth"].as_bool(),
                trusted_ips: fields["trusted_ips"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|v| v.as_str().map(String::from)).collect())
                    .unwrap_or_default(),
                ..TunnelProperties::default()
            };
            let properties = normalize(requested, &NS).expect("harness tunnels are valid");
            let tunnel = Tunnel::new(format!("tunnel-{label}"), "fuzz-client".into(), "fuzz".into(), properties);
            registry.add_tunnel(tunnel).expect("harness tunnels register");
        }
        let edge =
            Edge::detached(engine.shared.clone(), format!("app{}", NS.suffix()), PEER.parse().expect("an address"));
        Harness { engine, edge, _runtime: runtime }
    })
}

// ---------------------------------------------------------------------------
// ClientHello and SNI routing

/// What a ClientHello offers, comparable.
fn offers(accepted: &Accepted) -> (Option<String>, Option<Vec<Vec<u8>>>, Vec<u16>) {
    let hello = accepted.client_hello();
    (
        hello.server_name().map(String::from),
        hello.alpn().map(|alpns| alpns.map(<[u8]>::to_vec).collect()),
        hello.cipher_suites().iter().map(|s| u16::from(*s)).collect(),
    )
}

/// The router sends exactly the names under `.t.<engine.host>` to the
/// edge, as `tunnel::Namespace` reads them.
fn check_route(sni: Option<&str>, offers_rstrm: bool) -> Route {
    let route = listener::route(HOST, sni, offers_rstrm);
    let lower = sni.map(str::to_ascii_lowercase);
    match lower.as_deref().filter(|s| NS.label_of(s).is_some()) {
        Some(name) => assert_eq!(route, Route::Tunnel(name.to_string()), "{sni:?}"),
        None => assert_eq!(route, if offers_rstrm { Route::Agent } else { Route::Api }, "{sni:?}"),
    }
    route
}

/// Input: a piece pattern, then the bytes a client sends on the TLS port.
pub fn client_hello(data: &[u8]) {
    let mut input = Input(data);
    let pattern = input.byte();
    let sent = input.rest();

    let mut reads = Vec::new();
    for pattern in [0, pattern.max(1)] {
        let mut reader = Pieces::new(sent, pattern);
        let result = block_on(listener::read_client_hello(&mut reader));
        if let Ok((_, raw)) = &result {
            // The raw bytes kept for a passthrough replay are exactly the
            // bytes read.
            assert_eq!(&raw[..], &sent[..sent.len() - reader.unread().len()]);
        }
        reads.push(result);
    }
    let split = reads.pop().expect("two reads");
    if let (Ok((whole, _)), Ok((piecewise, _))) = (&reads[0], &split) {
        assert_eq!(offers(whole), offers(piecewise), "the same hello read whole and in pieces");
    }

    // The router on any name, not only those rustls lets through.
    if let Ok(text) = std::str::from_utf8(sent) {
        check_route(Some(text), pattern & 1 == 0);
    }

    let Ok((accepted, _)) = split else { return };
    let (sni, alpns, _) = offers(&accepted);
    let offers_rstrm = alpns.is_some_and(|a| a.iter().any(|a| a == strait_proto::ALPN));
    let route = check_route(sni.as_deref(), offers_rstrm);
    // The handshake the route starts: the engine's configuration and its
    // certificate resolver on this hello.
    let tls = &harness().engine.shared.tls;
    let config = if route == Route::Agent { tls.agent.clone() } else { tls.api.clone() };
    if let Ok(mut connection) = accepted.into_connection(config) {
        let mut reply = Vec::new();
        while connection.wants_write() {
            connection.write_tls(&mut reply).expect("writing to memory");
        }
        assert!(!reply.is_empty(), "a handshake in progress answers the hello");
    }
}

// ---------------------------------------------------------------------------
// HTTP/1.1 relay heads

/// A parsed head's headers as (name, value) pairs.
fn pairs(headers: &[httparse::Header<'_>]) -> Vec<(String, Vec<u8>)> {
    headers.iter().map(|h| (h.name.to_string(), h.value.to_vec())).collect()
}

fn forwarded(name: &str) -> Option<usize> {
    [headers::X_FORWARDED_FOR, headers::X_FORWARDED_PROTO, headers::X_FORWARDED_HOST]
        .iter()
        .position(|h| name.eq_ignore_ascii_case(h.as_str()))
}

/// Input: a byte choosing where to cut the head for the prefix check, then
/// the bytes a public client sends.
pub fn relay_request(data: &[u8]) {
    let mut input = Input(data);
    let cut = input.byte();
    let bytes = input.rest();
    let harness = harness();
    let client = headers::client_ip(PEER.parse::<SocketAddr>().expect("an address").ip()).to_string();
    let mut out = Vec::new();
    let decision = request(&harness.edge, &client, bytes, &mut out);
    let Request::Relay { tunnel_id, host, len, head_only, close } = &decision else { return };
    assert!(*len <= bytes.len());

    // What the client sent.
    let mut sent_headers = [httparse::EMPTY_HEADER; 128];
    let mut sent = httparse::Request::new(&mut sent_headers);
    assert_eq!(sent.parse(bytes), Ok(httparse::Status::Complete(*len)), "the relay and httparse agree");
    let sent_pairs = pairs(sent.headers);
    let value = |name: &str| -> Vec<&[u8]> {
        sent_pairs.iter().filter(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_slice()).collect()
    };
    let utf8 = |v: &[u8]| std::str::from_utf8(v).map(String::from);

    // Policy: only the plain tunnels, and never a chunked body, an upgrade
    // or an expectation.
    let tunnel = harness.engine.shared.registry.tunnel(tunnel_id).expect("a registered tunnel");
    let label = NS.label_of(tunnel.hostname().expect("published")).expect("in the namespace");
    assert!(RELAYABLE.contains(&label), "relayed to the {label} tunnel");
    assert_eq!(host, tunnel.hostname().expect("published"));
    for name in ["transfer-encoding", "upgrade", "expect"] {
        assert!(value(name).is_empty(), "relayed with {name}");
    }
    // A body only with one plain Content-Length.
    let lengths = value("content-length");
    assert!(lengths.len() <= 1, "relayed with {} Content-Lengths", lengths.len());
    for length in lengths {
        let length = std::str::from_utf8(length).map(str::trim).expect("a UTF-8 Content-Length");
        assert!(
            length.parse::<u64>().is_ok() && length.bytes().all(|b| b.is_ascii_digit()),
            "Content-Length {length:?}"
        );
    }
    let given_host = value("host");
    assert_eq!(given_host.len(), 1, "relayed without exactly one Host");
    let given_host = utf8(given_host[0]).expect("relayed with a non-UTF-8 Host");
    // Routed by the Host when it names a published name, else by the SNI.
    let named = given_host
        .parse::<http::uri::Authority>()
        .map(|a| a.host().to_string())
        .unwrap_or_else(|_| given_host.clone())
        .trim_end_matches('.')
        .to_ascii_lowercase();
    let expected = if NS.label_of(&named).is_some() { named } else { format!("app{}", NS.suffix()) };
    assert_eq!(host, &expected, "routed for Host {given_host:?}");
    assert_eq!(*head_only, sent.method == Some("HEAD"));
    let connection: Vec<String> = value("connection").into_iter().filter_map(|v| utf8(v).ok()).collect();
    assert_eq!(*close, headers::lists_token(connection.iter().map(String::as_str), "close"));

    // The head the service receives.
    let mut up_headers = [httparse::EMPTY_HEADER; 128];
    let mut up = httparse::Request::new(&mut up_headers);
    assert_eq!(up.parse(&out), Ok(httparse::Status::Complete(out.len())), "the rewritten head parses whole");
    assert_eq!((up.method, up.path, up.version), (sent.method, sent.path, Some(1)));
    let up_pairs = pairs(up.headers);
    // End-to-end headers pass byte for byte and in order; this hop's go.
    let end_to_end = |pairs: &[(String, Vec<u8>)]| -> Vec<(String, Vec<u8>)> {
        pairs
            .iter()
            .filter(|(n, _)| forwarded(n).is_none() && !headers::is_hop_by_hop(n))
            .filter(|(n, _)| !headers::lists_token(connection.iter().map(String::as_str), n))
            .cloned()
            .collect()
    };
    assert_eq!(end_to_end(&up_pairs), end_to_end(&sent_pairs));
    assert_eq!(end_to_end(&up_pairs).len(), up_pairs.len() - 3, "three X-Forwarded-* and no hop-by-hop header");
    let mut chain: Vec<String> =
        value("x-forwarded-for").iter().map(|v| utf8(v).expect("UTF-8").trim().to_string()).collect();
    chain.push(client.clone());
    let expected_forwarded = [chain.join(", ").into_bytes(), b"https".to_vec(), given_host.into_bytes()];
    for (slot, expected) in expected_forwarded.iter().enumerate() {
        let got: Vec<&Vec<u8>> = up_pairs.iter().filter(|(n, _)| forwarded(n) == Some(slot)).map(|(_, v)| v).collect();
        assert_eq!(got, [expected], "X-Forwarded-* slot {slot}");
    }

    // Bytes past the head change nothing; a head cut short is never relayed.
    let mut again = Vec::new();
    assert_eq!(request(&harness.edge, &client, &bytes[..*len], &mut again), decision);
    assert_eq!(again, out);
    let short = usize::from(cut) * *len / 256;
    assert!(!matches!(request(&harness.edge, &client, &bytes[..short], &mut again), Request::Relay { .. }));
    // The rewritten head relays again, as through a second engine (unless
    // the client's Connection header named its Host, which then goes, or the
    // three X-Forwarded-* took it past the relay's 100-header limit).
    if headers::lists_token(connection.iter().map(String::as_str), "host") || up_pairs.len() > MAX_HEADERS {
        return;
    }
    let relayed = request(&harness.edge, &client, &out, &mut again);
    assert!(matches!(relayed, Request::Relay { len, .. } if len == out.len()), "{relayed:?}");
}

/// Input: a byte whose low bit says the request was a HEAD, then the bytes
/// a service answers with.
pub fn relay_response(data: &[u8]) {
    let mut input = Input(data);
    let head_only = input.byte() & 1 == 1;
    let bytes = input.rest();
    let mut out = Vec::new();
    let Ok(Some(answer)) = response(bytes, head_only, &mut out) else { return };
    let Response { len, status, framing, reusable } = answer;
    assert!(len <= bytes.len());

    let mut sent_headers = [httparse::EMPTY_HEADER; 128];
    let mut sent = httparse::Response::new(&mut sent_headers);
    assert_eq!(sent.parse(bytes), Ok(httparse::Status::Complete(len)), "the relay and httparse agree");
    assert_eq!(sent.code, Some(status));

    let mut down_headers = [httparse::EMPTY_HEADER; 128];
    let mut down = httparse::Response::new(&mut down_headers);
    assert_eq!(down.parse(&out), Ok(httparse::Status::Complete(out.len())), "the rewritten head parses whole");
    assert_eq!((down.version, down.code), (Some(1), Some(status)));
    let down_pairs = pairs(down.headers);
    let named = |name: &str| -> Vec<&[u8]> {
        down_pairs.iter().filter(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_slice()).collect()
    };
    match framing {
        Framing::Empty => {
            assert!(head_only || (100..200).contains(&status) || status == 204 || status == 304, "{status}")
        }
        Framing::Length(n) => {
            assert!(named("transfer-encoding").is_empty());
            for value in named("content-length") {
                let value = std::str::from_utf8(value).expect("a parsed length");
                assert!(value.split(',').all(|v| v.trim().parse() == Ok(n)), "{value:?} for {n}");
            }
        }
        Framing::Chunked => {
            assert!(named("content-length").is_empty());
            let codings = named("transfer-encoding");
            let last = std::str::from_utf8(codings.last().expect("framed by its coding")).expect("UTF-8");
            assert!(last.rsplit(',').next().unwrap_or_default().trim().eq_ignore_ascii_case("chunked"));
        }
        Framing::UntilClose => {
            assert!(!reusable);
            assert_eq!(named("connection"), [&b"close"[..]]);
        }
    }
    for (name, _) in &down_pairs {
        let allowed = name.eq_ignore_ascii_case("transfer-encoding") || name == "connection";
        assert!(allowed || !headers::is_hop_by_hop(name), "{name} passed on");
    }

    // Bytes past the head change nothing; a head cut short is not complete.
    let mut again = Vec::new();
    assert_eq!(response(&bytes[..len], head_only, &mut again), Ok(Some(Response { len, status, framing, reusable })));
    assert!(!matches!(response(&bytes[..len - 1], head_only, &mut again), Ok(Some(_))));

    // The rewritten head reads back the same and rewrites to itself, but
    // for a header named `close`: the `connection: close` the relay adds
    // names it, so the next hop drops it (RFC 9110, 7.6.1). A head at the
    // relay's 100-header limit may leave with 101.
    if down_pairs.len() > MAX_HEADERS {
        return;
    }
    let reread = response(&out, head_only, &mut again).expect("the rewritten head is accepted").expect("whole");
    assert_eq!((reread.len, reread.status, reread.framing), (out.len(), status, framing));
    if framing != Framing::UntilClose || named("close").is_empty() {
        assert_eq!(String::from_utf8_lossy(&again), String::from_utf8_lossy(&out));
    }
}

// ---------------------------------------------------------------------------
// Chunked bodies

/// Scans `body` in the pieces `pattern` makes, as the relay does with each
/// read; returns what one scan of the whole body would.
fn scan_in_pieces(body: &[u8], pattern: u8) -> Result<(usize, bool), crate::edge::chunked::Malformed> {
    let mut scanner = Scanner::new();
    let mut pieces = Pieces::new(body, pattern);
    let mut used = 0;
    loop {
        let piece = pieces.next_piece(usize::MAX);
        if piece.is_empty() {
            return Ok((used, false));
        }
        let (n, done) = scanner.scan(piece)?;
        assert!(n <= piece.len());
        used += n;
        if done {
            assert_eq!(scanner.scan(b"more"), Ok((0, true)), "a finished scanner takes nothing more");
            return Ok((used, true));
        }
        assert_eq!(n, piece.len(), "an unfinished body takes the whole piece");
    }
}

/// Input: a mode byte (low bit: arbitrary body, or one built from the
/// input to be valid), a piece pattern, then the body or its recipe.
pub fn chunked(data: &[u8]) {
    let mut input = Input(data);
    let mode = input.byte();
    let pattern = input.byte();
    let (body, end) = if mode & 1 == 0 { (input.rest().to_vec(), None) } else { valid_chunked(input) };
    let whole = Scanner::new().scan(&body);
    assert_eq!(scan_in_pieces(&body, 1), whole, "byte by byte");
    assert_eq!(scan_in_pieces(&body, pattern), whole, "in pieces of pattern {pattern}");
    match whole {
        Ok((n, true)) => {
            // The end is the last byte of the body, not earlier.
            assert_eq!(Scanner::new().scan(&body[..n]), Ok((n, true)));
            assert_eq!(Scanner::new().scan(&body[..n - 1]), Ok((n - 1, false)));
        }
        Ok((n, false)) => assert_eq!(n, body.len()),
        Err(_) => {}
    }
    if let Some(end) = end {
        assert_eq!(whole, Ok((end, true)), "a valid body of {end} bytes: {:?}", String::from_utf8_lossy(&body));
    }
}

/// A valid chunked body from the input, then bytes past it; returns the
/// body and where it ends.
fn valid_chunked(mut input: Input<'_>) -> (Vec<u8>, Option<usize>) {
    let token = |input: &mut Input<'_>, max: u8| -> Vec<u8> {
        let n = input.byte() % max;
        (0..n).map(|_| b"abcdefghijklmnopqrstuvwxyz0123456789-=\"; \t"[usize::from(input.byte() % 42)]).collect()
    };
    let mut body = Vec::new();
    let chunks = input.byte() % 8;
    for last in (0..=chunks).map(|i| i == chunks) {
        let size = if last { 0 } else { usize::from(input.u16() % 2048) + 1 };
        let style = input.byte();
        // Leading zeros and either case of hex digits are all one size.
        body.extend(std::iter::repeat_n(b'0', usize::from(style % 4)));
        let digits = if style & 4 == 0 { format!("{size:x}") } else { format!("{size:X}") };
        body.extend_from_slice(digits.as_bytes());
        if style & 8 != 0 {
            body.push(b';');
            body.extend(token(&mut input, 32));
        }
        body.extend_from_slice(b"\r\n");
        if !last {
            body.extend((0..size).map(|i| input.0.get(i % input.0.len().max(1)).copied().unwrap_or(b'x')));
            body.extend_from_slice(b"\r\n");
        }
    }
    for _ in 0..input.byte() % 4 {
        body.extend_from_slice(b"x-t");
        body.extend(token(&mut input, 64));
        body.extend_from_slice(b": v\r\n");
    }
    body.extend_from_slice(b"\r\n");
    let end = body.len();
    body.extend_from_slice(input.rest());
    (body, Some(end))
}

// ---------------------------------------------------------------------------
// JWT verification

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// `header.claims` signed with HS256 under `secret`.
fn signed(header: &[u8], claims: &[u8], secret: &[u8]) -> String {
    let message = format!("{}.{}", b64(header), b64(claims));
    let signature = jsonwebtoken::crypto::sign(message.as_bytes(), &EncodingKey::from_secret(secret), Algorithm::HS256)
        .expect("HS256 signs");
    format!("{message}.{signature}")
}

/// The principal `claims` name, as the engine reads them.
fn principal_of(claims: &Value) -> Option<String> {
    ["sub", "userId", "clientId"]
        .iter()
        .filter_map(|k| claims.get(k).and_then(Value::as_str))
        .find(|p| !p.is_empty())
        .map(String::from)
}

/// Input: a mode byte, then a token's text (mode 0), a recipe for a token
/// with a known verdict (mode 1), or a header and claims as JSON text,
/// split by a NUL, signed with the right key (mode 2).
pub fn jwt(data: &[u8]) {
    let verifier = Verifier::new(SECRET.as_bytes());
    let mut input = Input(data);
    match input.byte() % 3 {
        0 => {
            let text = String::from_utf8_lossy(input.rest());
            let verdict = verifier.verify(Some(&text));
            if let Ok(principal) = &verdict {
                assert!(!principal.id.is_empty());
            }
            assert_eq!(verifier.verify(Some(&format!(" {text}\n"))), verdict, "surrounding blanks");
        }
        1 => minted(&verifier, input),
        _ => {
            let header = input.until(0);
            let claims = input.rest();
            let token = signed(header, claims, SECRET.as_bytes());
            let verdict = verifier.verify(Some(&token));
            // Checked where serde_json reads the text whole: it skips the
            // fields a struct ignores without checking them, so an accepted
            // token may carry invalid UTF-8 or out-of-range numbers where
            // nothing reads them.
            let json = |text: &[u8]| serde_json::from_str::<Value>(&String::from_utf8_lossy(text)).ok();
            if let (Ok(principal), Some(header), Some(claims)) = (verdict, json(header), json(claims)) {
                assert_eq!(header["alg"], "HS256");
                assert_eq!(principal_of(&claims), Some(principal.id));
            }
            assert_eq!(
                Verifier::new(b"another secret").verify(Some(&token)).map_err(|_| ()),
                Err(()),
                "verified under another secret"
            );
        }
    }
}

/// A token minted from the input, whose verdict is known beforehand.
fn minted(verifier: &Verifier, mut input: Input<'_>) {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let flags = input.byte();
    let mut claims = serde_json::Map::new();
    for (i, key) in ["sub", "userId", "clientId"].into_iter().enumerate() {
        match (flags >> (2 * i)) & 3 {
            0 => {}
            1 => _ = claims.insert(key.into(), json!("")),
            _ => _ = claims.insert(key.into(), json!(String::from_utf8_lossy(input.until(0)))),
        }
    }
    // Minutes away from now, never within the leeway.
    let mut minutes = |claims: &mut serde_json::Map<String, Value>, key: &str| -> Option<i64> {
        let offset = i64::from(input.byte() as i8);
        (offset != 0).then(|| {
            claims.insert(key.into(), json!(now + offset * 60));
            offset
        })
    };
    let exp = if flags & 0x40 != 0 { minutes(&mut claims, "exp") } else { None };
    let nbf = if flags & 0x80 != 0 { minutes(&mut claims, "nbf") } else { None };
    let algorithm = [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512][usize::from(input.byte() % 3)];
    let claims = Value::Object(claims);
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(algorithm),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("HMAC signs");

    let verdict = verifier.verify(Some(&token));
    let expected = if algorithm != Algorithm::HS256 {
        Err(AuthError::WrongAlgorithm)
    } else if exp.is_some_and(|m| m < 0) {
        Err(AuthError::Expired)
    } else if nbf.is_some_and(|m| m > 0) {
        Err(AuthError::NotYetValid)
    } else {
        principal_of(&claims).map(crate::auth::Principal::new).ok_or(AuthError::NoPrincipal)
    };
    assert_eq!(verdict, expected, "{claims}");
    // Any other key, or a changed byte, and the token is refused.
    assert!(Verifier::new(b"0123456789abcdef0123456789abcdef").verify(Some(&token)).is_err());
    let mut tampered = token.into_bytes();
    let at = usize::from(input.byte()) % tampered.len();
    tampered[at] = if tampered[at] == b'A' { b'B' } else { b'A' };
    if let Ok(tampered) = String::from_utf8(tampered) {
        assert!(verifier.verify(Some(&tampered)).is_err(), "{tampered}");
    }
}

// ---------------------------------------------------------------------------
// Tunnel properties and published hostnames

fn valid_label(label: &str) -> bool {
    (1..=63).contains(&label.len())
        && label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !label.starts_with('-')
        && !label.ends_with('-')
}

/// What every normalised property set holds, whatever was asked.
fn check_normalised(p: &TunnelProperties, ns: &Namespace<'_>) {
    let kind = p.r#type.as_deref().expect("a type");
    assert!(kind == "bytestream" || kind == "datagram", "{kind}");
    let protocol = p.protocol.as_deref().expect("a protocol");
    assert!(["http", "tls", "tcp", "udp", "dtls", "quic", "webtty"].contains(&protocol), "{protocol}");
    assert_ne!(p.mtls_auth, Some(true));
    assert_ne!(p.rstream_auth, Some(true));
    assert_ne!(p.challenge_mode, Some(true));
    assert!(p.geoip.is_empty() && p.mtls_cacert_pem.is_none() && p.http_use_tls.is_none());
    for entry in &p.trusted_ips {
        assert!(entry.parse::<std::net::IpAddr>().is_ok() || entry.parse::<ipnet::IpNet>().is_ok(), "{entry}");
    }
    let on_own_port = p.publish == Some(true) && (protocol == "tcp" || protocol == "udp");
    if on_own_port {
        // The engine sets the port when it binds one; the range is the
        // configuration's.
        let ports = if protocol == "tcp" { ns.tcp } else { ns.udp }.expect("that kind is enabled");
        assert_eq!(kind == "datagram", protocol == "udp");
        let host = ports.public_host.as_deref().unwrap_or(ns.engine_host);
        assert_eq!((p.hostname.as_deref(), p.host.as_deref()), (Some(host), Some(host)));
        if let Some(port) = p.port {
            assert!(u16::try_from(port).is_ok_and(|port| ports.contains(port)), "{port}");
        }
        assert!(p.upstream_tls.is_none() && p.tls_alpns.is_empty() && p.tls_min_version.is_none());
    } else if p.publish.expect("publish is set") {
        assert!(protocol == "http" || protocol == "tls", "published {protocol}");
        assert_eq!(kind, "bytestream");
        let hostname = p.hostname.as_deref().expect("a published tunnel has a hostname");
        assert_eq!(p.host.as_deref(), Some(hostname));
        let label = ns.label_of(hostname).expect("served under the namespace");
        assert!(valid_label(label), "{hostname:?}");
        assert_eq!(p.port, Some(u32::from(ns.public_port)));
        // The listener sends the served name to the edge.
        let route = listener::route(ns.engine_host, Some(hostname), true);
        assert_eq!(route, Route::Tunnel(hostname.to_string()));
    } else {
        assert!(p.hostname.is_none() && p.host.is_none() && p.port.is_none());
    }
    if protocol == "http" {
        assert!(["http/1.1", "h2c", "h2"].contains(&p.http_version.as_deref().expect("a version")));
        assert!(p.token_auth.is_some());
    } else {
        assert!(p.http_version.is_none() && p.token_auth != Some(true));
    }
    match protocol {
        "tls" => assert!(matches!(p.tls_mode.as_deref(), Some("terminated" | "passthrough"))),
        _ => assert!(p.tls_mode.is_none()),
    }
    assert!(matches!(p.tls_min_version.as_deref(), None | Some("1.2" | "1.3")));
}

/// Normalises `requested`; what is served is normalised already (a fixed
/// point, but for the port the engine sets), the same every time for the
/// same request, and refusals carry the codes CE uses.
fn check_normalize(requested: &TunnelProperties, ns: &Namespace<'_>) -> Option<TunnelProperties> {
    match normalize(requested.clone(), ns) {
        Ok(served) => {
            check_normalised(&served, ns);
            let mut again = served.clone();
            // A hostname tunnel's port is the TLS port, set by the engine;
            // a tunnel on a port of its own asks for its port again.
            if !matches!(served.protocol.as_deref(), Some("tcp" | "udp")) || served.publish != Some(true) {
                again.port = None;
            }
            assert_eq!(normalize(again, ns).as_ref(), Ok(&served), "normalising the served properties again");
            if requested.hostname.is_some() || requested.host.is_some() || served.publish != Some(true) {
                assert_eq!(normalize(requested.clone(), ns).as_ref(), Ok(&served), "the same request again");
            }
            Some(served)
        }
        Err(error) => {
            let code = error.code();
            assert!(code == ErrorCode::InvalidRequest || code == ErrorCode::FeatureNotAvailable, "{error}");
            assert!(error.message.as_deref().is_some_and(|m| !m.is_empty()));
            None
        }
    }
}

/// Input: the protobuf bytes of the tunnel properties an agent asks for,
/// checked against an engine without and one with published ports.
pub fn tunnel(data: &[u8]) {
    static WITH_PORTS: OnceLock<Config> = OnceLock::new();
    let config = WITH_PORTS.get_or_init(|| {
        let mut env = minimal_env(HOST);
        env.extend([
            ("RSTREAM_ENGINE_TCP__ENABLED".to_string(), "true".to_string()),
            ("RSTREAM_ENGINE_UDP__ENABLED".to_string(), "true".to_string()),
            ("RSTREAM_ENGINE_UDP__PUBLIC_HOST".to_string(), "udp.example.com".to_string()),
        ]);
        Config::from_env(env).expect("a valid configuration").config
    });
    if let Ok(requested) = TunnelProperties::decode(data) {
        check_normalize(&requested, &NS);
        check_normalize(&requested, &Namespace::of(config, 443));
    }
}

/// Input: an engine host, a newline, then a requested hostname.
pub fn hostname(data: &[u8]) {
    let mut input = Input(data);
    let flags = input.byte();
    let engine_host = String::from_utf8_lossy(input.until(b'\n')).into_owned();
    let requested = String::from_utf8_lossy(input.rest()).into_owned();
    // The engine host as the configuration accepts it, else the default.
    let env = minimal_env(&engine_host);
    let engine_host = Config::from_env(env).map_or(HOST.to_string(), |l| l.config.engine.host);
    let ns = Namespace::hostnames(&engine_host, 443);
    let ask = |name: &str| {
        let name = Some(name.to_string());
        let (hostname, host) = if flags & 1 == 0 { (name, None) } else { (None, name) };
        TunnelProperties { publish: Some(true), hostname, host, ..TunnelProperties::default() }
    };
    let Some(served) = check_normalize(&ask(&requested), &ns) else { return };
    let served = served.hostname.expect("published");
    // Case and a trailing dot do not make another name.
    let upper = check_normalize(&ask(&requested.to_ascii_uppercase()), &ns);
    assert_eq!(upper.and_then(|p| p.hostname).as_ref(), Some(&served), "upper case");
    if requested.trim() == requested {
        let dotted = check_normalize(&ask(&format!("{requested}.")), &ns);
        assert_eq!(dotted.and_then(|p| p.hostname).as_ref(), Some(&served), "a trailing dot");
    }
}

// ---------------------------------------------------------------------------
// Configuration

/// The environment of a minimal valid configuration for `host`.
fn minimal_env(host: &str) -> Vec<(String, String)> {
    [
        ("ENGINE__HOST", host),
        ("ENGINE__LOG_LEVEL", "info"),
        ("TLS__ENABLED", "true"),
        ("CERTS__STATIC__ENABLED", "true"),
        ("CERTS__STATIC__CERT_FILE", "/c.pem"),
        ("CERTS__STATIC__KEY_FILE", "/k.pem"),
        ("AUTH__JWT__ENABLED", "true"),
        ("AUTH__JWT__TOKEN_JWT_SECRET", SECRET),
    ]
    .into_iter()
    .map(|(k, v)| (format!("{ENV_PREFIX}{k}"), v.to_string()))
    .collect()
}

/// A configuration as `RSTREAM_ENGINE_` variables: read back, the same
/// configuration.
fn to_env(c: &Config) -> Vec<(String, String)> {
    let path = |p: &std::path::Path| p.to_str().expect("paths come from UTF-8 text").to_string();
    let mut env = vec![
        ("ENGINE__HOST", c.engine.host.clone()),
        ("ENGINE__LOG_LEVEL", c.engine.log_level.as_str().to_string()),
        ("ENGINE__LOG_FORMAT", if c.engine.log_format == LogFormat::Json { "json" } else { "text" }.to_string()),
        ("HTTP__ENABLED", c.http.enabled.to_string()),
        ("HTTP__LISTEN_ADDR", c.http.listen_addr.to_string()),
        ("TLS__ENABLED", c.tls.enabled.to_string()),
        ("TLS__LISTEN_ADDR", c.tls.listen_addr.to_string()),
        ("CERTS__STATIC__ENABLED", c.certs.r#static.enabled.to_string()),
        ("CERTS__STATIC__CERT_FILE", path(&c.certs.r#static.cert_file)),
        ("CERTS__STATIC__KEY_FILE", path(&c.certs.r#static.key_file)),
        ("AUTH__JWT__ENABLED", c.auth.jwt.enabled.to_string()),
        ("AUTH__JWT__TOKEN_JWT_SECRET", c.auth.jwt.token_jwt_secret.expose().to_string()),
        ("METRICS__PROMETHEUS__ENABLED", c.metrics.prometheus.enabled.to_string()),
        ("METRICS__PROMETHEUS__PATH", c.metrics.prometheus.path.clone()),
        ("TIMEOUTS__STREAM_REQUEST_SECONDS", c.timeouts.stream_request_seconds.to_string()),
        ("TIMEOUTS__HTTP_IDLE_SECONDS", c.timeouts.http_idle_seconds.to_string()),
        ("TIMEOUTS__SHUTDOWN_DRAIN_SECONDS", c.timeouts.shutdown_drain_seconds.to_string()),
        ("LIMITS__MAX_FRAME_BYTES", c.limits.max_frame_bytes.to_string()),
        ("LIMITS__FIRST_FRAME_SECONDS", c.limits.first_frame_seconds.to_string()),
        ("LIMITS__HANDSHAKE_SECONDS", c.limits.handshake_seconds.to_string()),
        ("LIMITS__TUNNELS_PER_CLIENT", c.limits.tunnels_per_client.to_string()),
        ("LIMITS__PENDING_STREAMS_PER_CLIENT", c.limits.pending_streams_per_client.to_string()),
        ("LIMITS__CONTROL_IDLE_SECONDS", c.limits.control_idle_seconds.to_string()),
        ("LIMITS__MAX_CONNECTIONS", c.limits.max_connections.to_string()),
        ("QUIC__ENABLED", c.quic.enabled.to_string()),
        ("QUIC__MAX_STREAMS_PER_CONNECTION", c.quic.max_streams_per_connection.to_string()),
        ("QUIC__IDLE_TIMEOUT_SECONDS", c.quic.idle_timeout_seconds.to_string()),
        ("QUIC__MAX_DATAGRAM_BYTES", c.quic.max_datagram_bytes.to_string()),
    ];
    if let Some(addr) = c.quic.listen_addr {
        env.push(("QUIC__LISTEN_ADDR", addr.to_string()));
    }
    if let Some(port) = c.tls.public_port {
        env.push(("TLS__PUBLIC_PORT", port.to_string()));
    }
    if let Some(addr) = c.metrics.prometheus.listen_addr {
        env.push(("METRICS__PROMETHEUS__LISTEN_ADDR", addr.to_string()));
    }
    if let Some(token) = &c.metrics.prometheus.bearer_token {
        env.push(("METRICS__PROMETHEUS__BEARER_TOKEN", token.expose().to_string()));
    }
    env.into_iter().map(|(k, v)| (format!("{ENV_PREFIX}{k}"), v)).collect()
}

/// What `Debug` shows, and the secrets it must not show.
fn seen(c: &Config) -> (String, String, Option<String>) {
    let bearer = c.metrics.prometheus.bearer_token.as_ref().map(|t| t.expose().to_string());
    (format!("{c:?}"), c.auth.jwt.token_jwt_secret.expose().to_string(), bearer)
}

/// Input: YAML text, a NUL, then `NAME=value` lines of environment.
pub fn config(data: &[u8]) {
    let mut input = Input(data);
    let yaml = String::from_utf8_lossy(input.until(0)).into_owned();
    let env: Vec<(String, String)> = String::from_utf8_lossy(input.rest())
        .lines()
        .map(|line| line.split_once('=').unwrap_or((line, "")))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let loaded = match Config::from_yaml_str(&yaml, env.clone()) {
        Ok(loaded) => loaded,
        Err(error) => {
            assert!(!error.problems.is_empty());
            assert!(error.problems.iter().all(|p| !p.field.is_empty() && !p.message.is_empty()), "{error}");
            return;
        }
    };
    let c = &loaded.config;
    let again = Config::from_yaml_str(&yaml, env).expect("the same input again");
    assert_eq!(seen(&again.config), seen(c));
    assert_eq!(again.warnings, loaded.warnings);

    // Values in their documented ranges and forms.
    let host = &c.engine.host;
    assert!(!host.is_empty() && host.len() <= 253 && *host == host.to_ascii_lowercase(), "{host:?}");
    assert!(!host.contains([':', '/']) && !host.ends_with('.'), "{host:?}");
    assert!(c.metrics.prometheus.path.starts_with('/') && !c.metrics.prometheus.path.ends_with('/'));
    assert!((1024..=65_535).contains(&c.limits.max_frame_bytes));
    assert!((1..=3600).contains(&c.timeouts.stream_request_seconds));
    assert!(c.timeouts.shutdown_drain_seconds <= 3600);
    assert!(c.limits.max_connections >= 1 && c.limits.handshake_seconds >= 1);
    assert!(c.quic.max_streams_per_connection >= 1 && (1..=3600).contains(&c.quic.idle_timeout_seconds));
    assert!((64..=65_527).contains(&c.quic.max_datagram_bytes));
    assert!(!c.auth.jwt.token_jwt_secret.expose().trim().is_empty());

    // Secrets never print: Debug is the same whatever they are.
    let mut other = c.clone();
    other.auth.jwt.token_jwt_secret = Secret::new("another");
    other.metrics.prometheus.bearer_token = other.metrics.prometheus.bearer_token.map(|_| Secret::new("another"));
    assert_eq!(format!("{other:?}"), format!("{c:?}"));

    // Written out as environment and read back: the same configuration.
    let back = Config::from_env(to_env(c)).expect("a configuration written out reads back");
    assert!(back.warnings.is_empty(), "{:?}", back.warnings);
    assert_eq!(seen(&back.config), seen(c));
}
