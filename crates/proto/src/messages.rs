//! The protobuf messages of the rstream wire protocol, version 1.4.5.
//!
//! Written by hand with `prost` derives from the field tables in
//! `spec/agent-protocol.md` (package `rstream.io_rstrm.protobuf`), so the
//! build needs no `protoc`. Field numbers are the wire contract: never
//! renumber them.

use std::collections::HashMap;

/// `google.protobuf.StringValue`, `BoolValue` and `UInt32Value` decode as
/// plain optional scalars: prost maps the well-known wrappers to `Option<T>`.
pub type Timestamp = prost_types::Timestamp;

/// Error codes carried in [`Error::code`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum ErrorCode {
    Unspecified = 0,
    Unauthorized = 1000,
    InvalidRequest = 2000,
    ProtocolVersionMissing = 2010,
    ProtocolVersionInvalid = 2020,
    ProtocolVersionIncompatible = 2030,
    TunnelNotFound = 3000,
    InvalidStream = 4000,
    FeatureNotAvailable = 5000,
    ServiceUnavailable = 6000,
    CapacityExhausted = 7000,
    Internal = 9000,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Error {
    #[prost(enumeration = "ErrorCode", tag = "1")]
    pub code: i32,
    #[prost(message, optional, tag = "2")]
    pub message: Option<String>,
}

impl Error {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code: code as i32, message: Some(message.into()) }
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.code().name(), self.code, self.message.as_deref().unwrap_or(""))
    }
}

impl ErrorCode {
    /// The name the protocol documents (`TUNNEL_NOT_FOUND`), as SDKs print it.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::Unspecified => "UNSPECIFIED",
            ErrorCode::Unauthorized => "UNAUTHORIZED",
            ErrorCode::InvalidRequest => "INVALID_REQUEST",
            ErrorCode::ProtocolVersionMissing => "PROTOCOL_VERSION_MISSING",
            ErrorCode::ProtocolVersionInvalid => "PROTOCOL_VERSION_INVALID",
            ErrorCode::ProtocolVersionIncompatible => "PROTOCOL_VERSION_INCOMPATIBLE",
            ErrorCode::TunnelNotFound => "TUNNEL_NOT_FOUND",
            ErrorCode::InvalidStream => "INVALID_STREAM",
            ErrorCode::FeatureNotAvailable => "FEATURE_NOT_AVAILABLE",
            ErrorCode::ServiceUnavailable => "SERVICE_UNAVAILABLE",
            ErrorCode::CapacityExhausted => "CAPACITY_EXHAUSTED",
            ErrorCode::Internal => "INTERNAL",
        }
    }
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum IpAddress {
    #[prost(fixed32, tag = "1")]
    V4(u32),
    #[prost(bytes, tag = "2")]
    V6(Vec<u8>),
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct IpAddressMsg {
    #[prost(oneof = "IpAddress", tags = "1, 2")]
    pub addr: Option<IpAddress>,
}

impl IpAddressMsg {
    /// The address, if it is a well-formed IPv4 or IPv6 one.
    pub fn ip(&self) -> Option<std::net::IpAddr> {
        match self.addr.as_ref()? {
            IpAddress::V4(v4) => Some(std::net::Ipv4Addr::from(*v4).into()),
            IpAddress::V6(v6) => <[u8; 16]>::try_from(v6.as_slice()).ok().map(|o| std::net::Ipv6Addr::from(o).into()),
        }
    }
}

impl From<std::net::IpAddr> for IpAddressMsg {
    fn from(ip: std::net::IpAddr) -> Self {
        let addr = match ip {
            std::net::IpAddr::V4(v4) => IpAddress::V4(u32::from(v4)),
            std::net::IpAddr::V6(v6) => IpAddress::V6(v6.octets().to_vec()),
        };
        Self { addr: Some(addr) }
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ClientDetails {
    #[prost(message, optional, tag = "1")]
    pub agent: Option<String>,
    #[prost(message, optional, tag = "2")]
    pub channel: Option<String>,
    #[prost(message, optional, tag = "3")]
    pub version: Option<String>,
    #[prost(message, optional, tag = "4")]
    pub os: Option<String>,
    #[prost(message, optional, tag = "5")]
    pub arch: Option<String>,
    #[prost(message, optional, tag = "6")]
    pub token: Option<String>,
    #[prost(message, optional, tag = "7")]
    pub protocol_version: Option<String>,
    /// strait's extensions the agent speaks (see [`crate::features`]); a
    /// field rstream does not define, which its engines and SDKs skip.
    #[prost(string, repeated, tag = "1000")]
    pub strait_features: Vec<String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ServerDetails {
    #[prost(message, optional, tag = "1")]
    pub agent: Option<String>,
    #[prost(message, optional, tag = "2")]
    pub channel: Option<String>,
    #[prost(message, optional, tag = "3")]
    pub version: Option<String>,
    #[prost(message, optional, tag = "4")]
    pub plan: Option<String>,
    #[prost(message, optional, tag = "5")]
    pub provider: Option<String>,
    #[prost(message, optional, tag = "6")]
    pub region: Option<String>,
    #[prost(message, optional, tag = "7")]
    pub update: Option<String>,
    /// strait's extensions the engine speaks (see [`crate::features`]).
    #[prost(string, repeated, tag = "1000")]
    pub strait_features: Vec<String>,
    /// The largest QUIC datagram the engine takes (`quic.max_datagram_bytes`,
    /// the 12-byte channel id included), for an agent that spills larger
    /// packets.
    #[prost(uint32, optional, tag = "1001")]
    pub strait_max_datagram_bytes: Option<u32>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ControlChannelLiveness {
    #[prost(uint32, tag = "1")]
    pub heartbeat_interval_ms: u32,
    #[prost(uint32, tag = "2")]
    pub heartbeat_timeout_ms: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct TunnelProperties {
    #[prost(message, optional, tag = "1")]
    pub id: Option<String>,
    #[prost(message, optional, tag = "2")]
    pub creation_date: Option<Timestamp>,
    #[prost(message, optional, tag = "3")]
    pub name: Option<String>,
    #[prost(message, optional, tag = "4")]
    pub r#type: Option<String>,
    #[prost(message, optional, tag = "5")]
    pub publish: Option<bool>,
    #[prost(message, optional, tag = "6")]
    pub protocol: Option<String>,
    #[prost(map = "string, string", tag = "7")]
    pub labels: HashMap<String, String>,
    #[prost(string, repeated, tag = "8")]
    pub geoip: Vec<String>,
    #[prost(string, repeated, tag = "9")]
    pub trusted_ips: Vec<String>,
    /// Deprecated and engine-set: the served hostname, as `hostname`.
    #[prost(message, optional, tag = "10")]
    pub host: Option<String>,
    #[prost(message, optional, tag = "11")]
    pub tls_mode: Option<String>,
    #[prost(string, repeated, tag = "12")]
    pub tls_alpns: Vec<String>,
    #[prost(message, optional, tag = "13")]
    pub tls_min_version: Option<String>,
    #[prost(string, repeated, tag = "14")]
    pub tls_ciphers: Vec<String>,
    #[prost(message, optional, tag = "15")]
    pub mtls_auth: Option<bool>,
    #[prost(message, optional, tag = "16")]
    pub mtls_cacert_pem: Option<String>,
    #[prost(message, optional, tag = "17")]
    pub http_version: Option<String>,
    /// Deprecated alias of `upstream_tls`.
    #[prost(message, optional, tag = "18")]
    pub http_use_tls: Option<bool>,
    #[prost(message, optional, tag = "19")]
    pub token_auth: Option<bool>,
    #[prost(message, optional, tag = "20")]
    pub rstream_auth: Option<bool>,
    #[prost(message, optional, tag = "21")]
    pub challenge_mode: Option<bool>,
    #[prost(message, optional, tag = "22")]
    pub hostname: Option<String>,
    #[prost(message, optional, tag = "23")]
    pub port: Option<u32>,
    #[prost(message, optional, tag = "24")]
    pub upstream_tls: Option<bool>,
    #[prost(message, optional, tag = "25")]
    pub datagram_guaranteed_delivery: Option<bool>,
    #[prost(message, optional, tag = "26")]
    pub allow_cross_region_routing: Option<bool>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct OpenControlChannelReq {
    #[prost(message, optional, tag = "1")]
    pub client_details: Option<ClientDetails>,
    #[prost(message, optional, tag = "2")]
    pub liveness: Option<ControlChannelLiveness>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct OpenControlChannelOk {
    #[prost(string, tag = "1")]
    pub client_id: String,
    #[prost(message, optional, tag = "2")]
    pub server_details: Option<ServerDetails>,
    #[prost(message, optional, tag = "3")]
    pub liveness: Option<ControlChannelLiveness>,
}

// Built and read once per control channel: boxing the larger answer would
// save nothing that matters.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum OpenControlChannelResult {
    #[prost(message, tag = "1")]
    Ok(OpenControlChannelOk),
    #[prost(message, tag = "2")]
    Error(Error),
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct OpenControlChannelRsp {
    #[prost(oneof = "OpenControlChannelResult", tags = "1, 2")]
    pub payload: Option<OpenControlChannelResult>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct CloseControlChannelReq {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct CloseControlChannelRsp {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct OpenTunnelReq {
    #[prost(string, tag = "1")]
    pub request_id: String,
    #[prost(message, optional, tag = "2")]
    pub tunnel_properties: Option<TunnelProperties>,
}

// Boxing would not pay: one result per tunnel open.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum OpenTunnelResult {
    #[prost(message, tag = "2")]
    TunnelProperties(TunnelProperties),
    #[prost(message, tag = "3")]
    Error(Error),
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct OpenTunnelRsp {
    #[prost(string, tag = "1")]
    pub request_id: String,
    #[prost(oneof = "OpenTunnelResult", tags = "2, 3")]
    pub payload: Option<OpenTunnelResult>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct CloseTunnelReq {
    #[prost(string, tag = "1")]
    pub tunnel_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct CloseTunnelRsp {
    #[prost(string, tag = "1")]
    pub tunnel_id: String,
    /// Beyond the rstream protocol: why a close was refused (an unknown
    /// tunnel, or another client's). Agents that do not know the field see
    /// a plain reply and never wait for one.
    #[prost(message, optional, tag = "2")]
    pub error: Option<Error>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ProxyConnReq {
    #[prost(string, tag = "1")]
    pub tunnel_id: String,
    #[prost(string, tag = "2")]
    pub stream_id: String,
    #[prost(message, optional, tag = "3")]
    pub secret: Option<String>,
    #[prost(message, optional, tag = "4")]
    pub source_ip: Option<IpAddressMsg>,
    #[prost(message, optional, tag = "5")]
    pub proxy_endpoint: Option<String>,
    /// strait's extension: this asks for the spill stream of the live
    /// datagram channel `stream_id`, not for a new stream
    /// (`crate::features::DATAGRAM_SPILL`).
    #[prost(bool, tag = "1000")]
    pub strait_spill: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ProxyConnRsp {
    #[prost(string, tag = "1")]
    pub stream_id: String,
    #[prost(message, optional, tag = "2")]
    pub error: Option<Error>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ProxyReq {
    /// `client_details.token` carries the one-time stream secret.
    #[prost(message, optional, tag = "1")]
    pub client_details: Option<ClientDetails>,
    #[prost(string, tag = "2")]
    pub stream_id: String,
    #[prost(message, optional, tag = "3")]
    pub zero_rtt: Option<bool>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ProxyRsp {
    #[prost(message, optional, tag = "1")]
    pub error: Option<Error>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct StreamReq {
    /// `client_details.token` carries the dialer's JWT.
    #[prost(message, optional, tag = "1")]
    pub client_details: Option<ClientDetails>,
    #[prost(string, tag = "2")]
    pub tunnel_id_name: String,
    #[prost(message, optional, tag = "3")]
    pub zero_rtt: Option<bool>,
    #[prost(message, optional, tag = "4")]
    pub datagram_channel: Option<bool>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum StreamResult {
    #[prost(string, tag = "1")]
    StreamId(String),
    #[prost(message, tag = "2")]
    Error(Error),
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct StreamRsp {
    #[prost(oneof = "StreamResult", tags = "1, 2")]
    pub payload: Option<StreamResult>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct DatagramChannelClose {
    #[prost(string, tag = "1")]
    pub stream_id: String,
    #[prost(message, optional, tag = "2")]
    pub error: Option<Error>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Heartbeat {
    #[prost(uint64, tag = "1")]
    pub sequence: u64,
    #[prost(uint64, tag = "2")]
    pub acknowledgement: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ServerMessage {
    #[prost(string, tag = "1")]
    pub message: String,
}

/// The envelope: exactly one payload per frame.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Message {
    #[prost(oneof = "Payload", tags = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17")]
    pub payload: Option<Payload>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Payload {
    #[prost(message, tag = "1")]
    OpenControlChannelReq(OpenControlChannelReq),
    #[prost(message, tag = "2")]
    OpenControlChannelRsp(OpenControlChannelRsp),
    #[prost(message, tag = "3")]
    CloseControlChannelReq(CloseControlChannelReq),
    #[prost(message, tag = "4")]
    CloseControlChannelRsp(CloseControlChannelRsp),
    #[prost(message, tag = "5")]
    OpenTunnelReq(OpenTunnelReq),
    #[prost(message, tag = "6")]
    OpenTunnelRsp(OpenTunnelRsp),
    #[prost(message, tag = "7")]
    CloseTunnelReq(CloseTunnelReq),
    #[prost(message, tag = "8")]
    CloseTunnelRsp(CloseTunnelRsp),
    #[prost(message, tag = "9")]
    ProxyConnReq(ProxyConnReq),
    #[prost(message, tag = "10")]
    ProxyConnRsp(ProxyConnRsp),
    #[prost(message, tag = "11")]
    ProxyReq(ProxyReq),
    #[prost(message, tag = "12")]
    ProxyRsp(ProxyRsp),
    #[prost(message, tag = "13")]
    StreamReq(StreamReq),
    #[prost(message, tag = "14")]
    StreamRsp(StreamRsp),
    #[prost(message, tag = "15")]
    Heartbeat(Heartbeat),
    #[prost(message, tag = "16")]
    ServerMessage(ServerMessage),
    #[prost(message, tag = "17")]
    DatagramChannelClose(DatagramChannelClose),
}

impl Payload {
    /// The protobuf field name, for logs and error messages.
    pub fn name(&self) -> &'static str {
        match self {
            Payload::OpenControlChannelReq(_) => "open_control_channel_req",
            Payload::OpenControlChannelRsp(_) => "open_control_channel_rsp",
            Payload::CloseControlChannelReq(_) => "close_control_channel_req",
            Payload::CloseControlChannelRsp(_) => "close_control_channel_rsp",
            Payload::OpenTunnelReq(_) => "open_tunnel_req",
            Payload::OpenTunnelRsp(_) => "open_tunnel_rsp",
            Payload::CloseTunnelReq(_) => "close_tunnel_req",
            Payload::CloseTunnelRsp(_) => "close_tunnel_rsp",
            Payload::ProxyConnReq(_) => "proxy_conn_req",
            Payload::ProxyConnRsp(_) => "proxy_conn_rsp",
            Payload::ProxyReq(_) => "proxy_req",
            Payload::ProxyRsp(_) => "proxy_rsp",
            Payload::StreamReq(_) => "stream_req",
            Payload::StreamRsp(_) => "stream_rsp",
            Payload::Heartbeat(_) => "heartbeat",
            Payload::ServerMessage(_) => "server_message",
            Payload::DatagramChannelClose(_) => "datagram_channel_close",
        }
    }
}

impl From<Payload> for Message {
    fn from(payload: Payload) -> Self {
        Message { payload: Some(payload) }
    }
}
