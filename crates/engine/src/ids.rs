//! Identifiers and one-time secrets, all from the OS-seeded thread RNG.

use rand::RngExt;

fn hex_id<const N: usize>() -> String {
    let mut bytes = [0u8; N];
    rand::rng().fill(&mut bytes[..]);
    hex::encode(bytes)
}

/// A stream id: 24 lowercase hex characters, as agents expect.
pub fn stream_id() -> String {
    hex_id::<12>()
}

pub fn client_id() -> String {
    hex_id::<12>()
}

pub fn tunnel_id() -> String {
    hex_id::<12>()
}

/// An Engine API event id.
pub fn event_id() -> String {
    hex_id::<12>()
}

/// A one-time stream secret: 256 bits, hex.
pub fn stream_secret() -> String {
    hex_id::<32>()
}
