//! Datagram tunnels: packets as QUIC DATAGRAM frames where both ends are on
//! QUIC, framed in streams where one is not (or the tunnel guarantees
//! delivery), bridged by the engine in every mix; and what it does with
//! datagrams it cannot place.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use strait_agent::{PacketConn, TransportMode, TunnelProperties};
use strait_proto::packet::{read_packet, write_packet};

const WAIT: Duration = Duration::from_secs(20);

/// Packets a sender may have out before it waits for echoes: loopback
/// loses nothing at this pace, so every packet must come back.
const WINDOW: usize = 32;

fn datagram_tunnel(name: &str, guaranteed: bool) -> TunnelProperties {
    TunnelProperties {
        name: Some(name.into()),
        r#type: Some("datagram".into()),
        datagram_guaranteed_delivery: guaranteed.then_some(true),
        ..Default::default()
    }
}

/// Opens a datagram tunnel whose agent echoes every packet.
async fn echo_agent(
    engine: &TestEngine,
    transport: TransportMode,
    name: &str,
    guaranteed: bool,
) -> strait_agent::ControlChannel {
    let control = tokio::time::timeout(WAIT, engine.client_over("alice", transport).connect()).await.unwrap().unwrap();
    let mut tunnel = control.open_tunnel(datagram_tunnel(name, guaranteed)).await.unwrap();
    tokio::spawn(async move {
        while let Some(mut stream) = tunnel.accept().await {
            tokio::spawn(async move {
                while let Ok(Some(packet)) = read_packet(&mut stream).await {
                    if write_packet(&mut stream, &packet).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    control
}

fn packet(seq: usize, size: usize) -> Vec<u8> {
    let mut p = (seq as u32).to_be_bytes().to_vec();
    p.extend((0..size.saturating_sub(4)).map(|i| (seq + i) as u8));
    p
}

/// Sends `count` packets of `size` bytes, at most [`WINDOW`] unanswered,
/// and checks every echo; returns how many came back intact.
async fn echo_packets(conn: &mut PacketConn, count: usize, size: usize) -> usize {
    let mut back = HashSet::new();
    let mut next = 0;
    while back.len() < count {
        while next < count && next - back.len() < WINDOW {
            conn.send(&packet(next, size)).await.unwrap();
            next += 1;
        }
        match tokio::time::timeout(Duration::from_secs(3), conn.recv()).await {
            Ok(Ok(Some(p))) => {
                let seq = u32::from_be_bytes(p[..4].try_into().unwrap()) as usize;
                assert_eq!(p[..], packet(seq, size)[..], "packet {seq} came back changed");
                assert!(back.insert(seq), "packet {seq} came back twice");
            }
            Ok(other) => panic!("the channel ended after {} packets: {other:?}", back.len()),
            Err(_) => break,
        }
    }
    back.len()
}

#[tokio::test]
async fn ten_thousand_packets_each_way_over_quic_datagrams() {
    let engine = TestEngine::start().await;
    let _agent = echo_agent(&engine, TransportMode::Quic, "game", false).await;
    let client = engine.client_over("bob", TransportMode::Quic);
    // Bob cannot see Alice's tunnel; Alice's own dialer can.
    assert!(client.dial_packets("game").await.is_err());
    let client = engine.client_over("alice", TransportMode::Quic);
    let mut conn = tokio::time::timeout(WAIT, client.dial_packets("game")).await.unwrap().unwrap();
    assert_eq!(conn.mode(), "datagrams");
    assert_eq!(echo_packets(&mut conn, 10_000, 1000).await, 10_000);
    // Both legs are datagram channels: the dialer's and the agent's.
    assert_eq!(engine.engine.shared.datagrams.len(), 2);
    let metrics = &engine.engine.shared.metrics;
    let text = metrics.encode();
    let relayed: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("strait_datagrams_relayed_total "))
        .map_or(0, |n| n.trim().parse().unwrap());
    // Counted when the channel ends: close it and wait for the count.
    conn.close().await.unwrap();
    let counted = async {
        loop {
            let text = metrics.encode();
            let now: u64 = text
                .lines()
                .find_map(|l| l.strip_prefix("strait_datagrams_relayed_total "))
                .map_or(0, |n| n.trim().parse().unwrap());
            if now >= 20_000 {
                return now;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let now = tokio::time::timeout(WAIT, counted).await.expect("the channel's packets are counted when it ends");
    assert!(now >= relayed + 20_000);
}

#[tokio::test]
async fn every_mix_of_legs_carries_packets() {
    let engine = TestEngine::start().await;
    let cases = [
        // (agent, dialer, guaranteed delivery, the dialer's leg, QUIC legs)
        (TransportMode::Quic, TransportMode::Tls, false, "framed", 1),
        (TransportMode::Tls, TransportMode::Quic, false, "datagrams", 1),
        (TransportMode::Tls, TransportMode::Tls, false, "framed", 0),
        (TransportMode::Quic, TransportMode::Quic, true, "framed", 0),
    ];
    for (i, (agent, dialer, guaranteed, mode, quic_legs)) in cases.into_iter().enumerate() {
        let name = format!("mix{i}");
        let _agent = echo_agent(&engine, agent, &name, guaranteed).await;
        let client = engine.client_over("alice", dialer);
        let mut conn = tokio::time::timeout(WAIT, client.dial_packets(&name)).await.unwrap().unwrap();
        assert_eq!(conn.mode(), mode, "{agent} agent, {dialer} dialer, guaranteed {guaranteed}");
        assert_eq!(echo_packets(&mut conn, 1000, 700).await, 1000, "{agent} agent, {dialer} dialer");
        assert_eq!(engine.engine.shared.datagrams.len(), quic_legs, "{agent} agent, {dialer} dialer");
        conn.close().await.unwrap();
        let settled = async {
            while !engine.engine.shared.datagrams.is_empty() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(WAIT, settled).await.expect("the channel's legs are gone once it is closed");
    }
}

#[tokio::test]
async fn either_side_closes_the_channel() {
    let engine = TestEngine::start().await;
    let control = engine.client_over("alice", TransportMode::Quic).connect().await.unwrap();
    let mut tunnel = control.open_tunnel(datagram_tunnel("closing", false)).await.unwrap();
    let client = engine.client_over("alice", TransportMode::Quic);

    // The dialer closes: the agent's side ends.
    let mut conn = client.dial_packets("closing").await.unwrap();
    conn.send(b"hello").await.unwrap();
    let mut stream = tokio::time::timeout(WAIT, tunnel.accept()).await.unwrap().unwrap();
    assert_eq!(tokio::time::timeout(WAIT, read_packet(&mut stream)).await.unwrap().unwrap().unwrap(), &b"hello"[..]);
    conn.close().await.unwrap();
    let end = tokio::time::timeout(WAIT, read_packet(&mut stream)).await.expect("the agent hears of the close");
    assert!(matches!(end, Ok(None)), "{end:?}");
    drop(stream);

    // The agent lets go: the dialer's side ends.
    let mut conn = client.dial_packets("closing").await.unwrap();
    conn.send(b"again").await.unwrap();
    let mut stream = tokio::time::timeout(WAIT, tunnel.accept()).await.unwrap().unwrap();
    assert_eq!(tokio::time::timeout(WAIT, read_packet(&mut stream)).await.unwrap().unwrap().unwrap(), &b"again"[..]);
    drop(stream);
    let end = tokio::time::timeout(WAIT, conn.recv()).await.expect("the dialer hears of the close");
    assert!(matches!(end, Ok(None)), "{end:?}");
    let settled = async {
        while !engine.engine.shared.datagrams.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(WAIT, settled).await.expect("the engine forgets closed channels");
}

#[tokio::test]
async fn datagrams_it_cannot_place_are_dropped_and_counted() {
    let engine = TestEngine::start_with("quic: {max_datagram_bytes: 200}\n").await;
    let conn = engine.quic_connect().await;
    // A control channel, so the connection is an agent's.
    let _control = engine.raw_quic_control(&conn, "alice").await;

    let metrics = &engine.engine.shared.metrics;
    conn.send_datagram(bytes::Bytes::from_static(b"short")).unwrap();
    conn.send_datagram(bytes::Bytes::from(vec![7u8; 40])).unwrap();
    conn.send_datagram(bytes::Bytes::from(vec![7u8; 500])).unwrap();
    let counted = async {
        while metrics.datagrams_dropped("short") < 1
            || metrics.datagrams_dropped("unknown_channel") < 1
            || metrics.datagrams_dropped("oversized") < 1
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(WAIT, counted).await.expect("each dropped datagram is counted by its reason");
    // The connection and its control channel are still up.
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    strait_proto::write_message(&mut send, &control_req(engine.token("alice")).into()).await.unwrap();
    assert!(conn.close_reason().is_none());
}
