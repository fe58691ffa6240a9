//! Never-panic properties of the frame codec and the messages, on generated
//! input: the checks the fuzz targets run (`strait_proto::fuzzing`), here
//! on a few hundred cases each so `cargo test` keeps them alive.

use proptest::prelude::*;
use strait_proto::fuzzing;
use strait_proto::*;

/// Messages of several kinds, with the fields that vary most, and one
/// without a payload (which the reader refuses).
fn message() -> impl Strategy<Value = Message> {
    let error = (any::<i32>(), any::<Option<String>>()).prop_map(|(code, message)| Error { code, message });
    prop_oneof![
        (any::<u64>(), any::<u64>())
            .prop_map(|(sequence, acknowledgement)| Payload::Heartbeat(Heartbeat { sequence, acknowledgement })),
        ".{0,40}".prop_map(|message| Payload::ServerMessage(ServerMessage { message })),
        (".{0,20}", any::<Option<bool>>()).prop_map(|(tunnel_id_name, zero_rtt)| {
            Payload::StreamReq(StreamReq { tunnel_id_name, zero_rtt, ..StreamReq::default() })
        }),
        ("[a-z0-9]{0,12}", prop::option::of(error))
            .prop_map(|(stream_id, error)| Payload::ProxyConnRsp(ProxyConnRsp { stream_id, error })),
        (".{0,12}", any::<Option<bool>>(), prop::collection::hash_map(".{0,6}", ".{0,6}", 0..4)).prop_map(
            |(request_id, publish, labels)| {
                let tunnel_properties = Some(TunnelProperties { publish, labels, ..TunnelProperties::default() });
                Payload::OpenTunnelReq(OpenTunnelReq { request_id, tunnel_properties })
            }
        ),
        Just(Payload::CloseControlChannelReq(CloseControlChannelReq {})),
    ]
    .prop_map(Message::from)
    .boxed()
    .prop_union(Just(Message { payload: None }).boxed())
}

/// A stream of frames, some real, some arbitrary bytes.
fn stream() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        3 => message().prop_map(|m| encode(&m).expect("small messages encode")),
        1 => prop::collection::vec(any::<u8>(), 0..12),
    ];
    prop::collection::vec(piece, 0..6).prop_map(|pieces| pieces.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn frames_read_the_same_in_any_pieces(
        max in prop_oneof![Just(MAX_FRAME_LEN as u16), any::<u16>()],
        pattern in any::<u8>(),
        switch_after in 0u8..4,
        already in any::<u16>(),
        stream in stream(),
    ) {
        let mut input = max.to_be_bytes().to_vec();
        input.extend([pattern, switch_after]);
        input.extend((already % 64).to_be_bytes());
        input.extend(stream);
        fuzzing::frames(&input);
    }

    #[test]
    fn arbitrary_bytes_never_break_the_reader(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        fuzzing::frames(&bytes);
    }

    #[test]
    fn messages_decode_and_re_encode(
        message in message(),
        flip in any::<(usize, u8)>(),
    ) {
        let mut bytes = prost::Message::encode_to_vec(&message);
        fuzzing::messages(&bytes);
        if !bytes.is_empty() {
            let at = flip.0 % bytes.len();
            bytes[at] ^= flip.1;
            fuzzing::messages(&bytes);
        }
    }

    #[test]
    fn arbitrary_bytes_decode_or_are_refused(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        fuzzing::messages(&bytes);
    }
}
