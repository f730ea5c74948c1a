use super::*;
use crate::message::*;
use proptest::prelude::*;

fn host_msg() -> impl Strategy<Value = HostMsg> {
    let id = any::<u32>();
    let s = ".{0,40}";
    let data = proptest::collection::vec(any::<u8>(), 0..2048);
    prop_oneof![
        id.prop_map(|id| HostMsg::Ping { id }),
        (
            id,
            proptest::collection::vec(s, 0..5),
            proptest::collection::vec((s, s), 0..4),
            proptest::option::of(s),
            any::<bool>()
        )
            .prop_map(|(id, argv, env, cwd, stdin)| HostMsg::Exec(ExecRequest {
                id,
                argv,
                env,
                cwd,
                stdin
            })),
        (id, data.clone()).prop_map(|(id, data)| HostMsg::Stdin { id, data }),
        id.prop_map(|id| HostMsg::StdinEof { id }),
        (id, any::<i32>()).prop_map(|(id, signal)| HostMsg::Signal { id, signal }),
        (
            id,
            s,
            any::<u32>(),
            any::<u64>(),
            data.clone(),
            any::<bool>()
        )
            .prop_map(|(id, path, mode, offset, data, last)| HostMsg::WriteFile {
                id,
                path,
                mode,
                offset,
                data,
                last
            }),
        (id, s).prop_map(|(id, path)| HostMsg::ReadFile { id, path }),
        id.prop_map(|id| HostMsg::Poweroff { id }),
        (
            id,
            s,
            proptest::collection::vec(any::<u8>(), 0..64),
            any::<u64>(),
            s
        )
            .prop_map(
                |(id, token, entropy, unix_time_ns, hostname)| HostMsg::Rekey(Rekey {
                    id,
                    token,
                    entropy,
                    unix_time_ns,
                    hostname
                })
            ),
        (id, any::<u32>()).prop_map(|(id, credit)| HostMsg::Credit { id, credit }),
        id.prop_map(|id| HostMsg::Discard { id }),
        (id, any::<u16>()).prop_map(|(id, port)| HostMsg::TcpAccept { id, port }),
        (id, any::<u16>()).prop_map(|(id, port)| HostMsg::TcpConnect { id, port }),
        (id, data.clone()).prop_map(|(id, data)| HostMsg::TcpData { id, data }),
        id.prop_map(|id| HostMsg::TcpEof { id }),
    ]
}

fn guest_msg() -> impl Strategy<Value = GuestMsg> {
    let id = any::<u32>();
    let data = proptest::collection::vec(any::<u8>(), 0..2048);
    prop_oneof![
        (
            any::<u16>(),
            ".{0,20}",
            any::<u64>(),
            ".{0,20}",
            any::<u64>()
        )
            .prop_map(|(protocol_version, agent_version, caps, token, boot_ns)| {
                GuestMsg::Hello(Hello {
                    protocol_version,
                    agent_version,
                    capabilities: Capabilities(caps),
                    token,
                    boot_ns,
                })
            }),
        id.prop_map(|id| GuestMsg::Pong { id }),
        (id, any::<u32>()).prop_map(|(id, pid)| GuestMsg::Started { id, pid }),
        (id, data.clone()).prop_map(|(id, data)| GuestMsg::Stdout { id, data }),
        (id, data.clone()).prop_map(|(id, data)| GuestMsg::Stderr { id, data }),
        (id, any::<i32>()).prop_map(|(id, c)| GuestMsg::Exited {
            id,
            status: ExitStatus::Code(c)
        }),
        (id, any::<i32>()).prop_map(|(id, s)| GuestMsg::Exited {
            id,
            status: ExitStatus::Signal(s)
        }),
        id.prop_map(|id| GuestMsg::Done { id }),
        (id, ".{0,40}").prop_map(|(id, message)| GuestMsg::Failed {
            id,
            kind: FailureKind::NotFound,
            message
        }),
        (id, data.clone(), any::<bool>()).prop_map(|(id, data, eof)| GuestMsg::FileData {
            id,
            data,
            eof
        }),
        (id, any::<u32>()).prop_map(|(id, credit)| GuestMsg::StdinCredit { id, credit }),
        id.prop_map(|id| GuestMsg::Connected { id }),
        (id, data).prop_map(|(id, data)| GuestMsg::TcpData { id, data }),
        id.prop_map(|id| GuestMsg::TcpEof { id }),
    ]
}

proptest! {
    #[test]
    fn host_messages_round_trip(msgs in proptest::collection::vec(host_msg(), 1..8)) {
        let mut buf = Vec::new();
        for m in &msgs {
            encode_into(m, &mut buf).unwrap();
        }
        let mut at = 0;
        for m in &msgs {
            let (got, used) = decode::<HostMsg>(&buf[at..]).unwrap().unwrap();
            prop_assert_eq!(&got, m);
            at += used;
        }
        prop_assert_eq!(at, buf.len());
    }

    #[test]
    fn guest_messages_round_trip_blocking(msgs in proptest::collection::vec(guest_msg(), 1..8)) {
        let mut buf = Vec::new();
        for m in &msgs {
            write_msg(&mut buf, m).unwrap();
        }
        let mut r = &buf[..];
        let mut scratch = Vec::new();
        for m in &msgs {
            let got: GuestMsg = read_msg(&mut r, &mut scratch).unwrap().unwrap();
            prop_assert_eq!(&got, m);
        }
        prop_assert!(read_msg::<GuestMsg, _>(&mut r, &mut scratch).unwrap().is_none());
    }

    #[test]
    fn any_bytes_decode_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let _ = decode::<HostMsg>(&bytes);
        let _ = decode::<GuestMsg>(&bytes);
        let mut scratch = Vec::new();
        let _ = read_msg::<GuestMsg, _>(&mut &bytes[..], &mut scratch);
    }

    #[test]
    fn valid_header_random_payload_is_error_or_message(payload in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut frame = (payload.len() as u32).to_le_bytes().to_vec();
        frame.push(FRAME_VERSION);
        frame.extend_from_slice(&payload);
        match decode::<HostMsg>(&frame) {
            Ok(Some((_, used))) => prop_assert_eq!(used, frame.len()),
            Ok(None) => prop_assert!(false, "whole frame reported incomplete"),
            Err(_) => {}
        }
    }

    #[test]
    fn every_prefix_is_incomplete(msg in guest_msg()) {
        let frame = encode(&msg).unwrap();
        for cut in 0..frame.len() {
            prop_assert!(decode::<GuestMsg>(&frame[..cut]).unwrap().is_none());
        }
    }
}

#[test]
fn oversized_length_is_rejected_before_allocation() {
    let mut frame = u32::MAX.to_le_bytes().to_vec();
    frame.push(FRAME_VERSION);
    assert!(matches!(
        decode::<HostMsg>(&frame),
        Err(ProtoError::FrameTooLarge { .. })
    ));
    let mut scratch = Vec::new();
    assert!(matches!(
        read_msg::<HostMsg, _>(&mut &frame[..], &mut scratch),
        Err(ProtoError::FrameTooLarge { .. })
    ));
    assert!(scratch.capacity() < 1024);
}

#[test]
fn wrong_version_is_rejected() {
    let mut frame = encode(&HostMsg::Ping { id: 1 }).unwrap();
    frame[4] = 9;
    assert!(matches!(
        decode::<HostMsg>(&frame),
        Err(ProtoError::UnsupportedVersion(9))
    ));
}

#[test]
fn trailing_bytes_are_rejected() {
    let mut frame = encode(&HostMsg::Ping { id: 1 }).unwrap();
    frame.push(0);
    let len = (frame.len() - HEADER_LEN) as u32;
    frame[..4].copy_from_slice(&len.to_le_bytes());
    assert!(matches!(
        decode::<HostMsg>(&frame),
        Err(ProtoError::TrailingBytes(1))
    ));
}

#[test]
fn too_large_message_is_not_encoded() {
    let msg = HostMsg::Stdin {
        id: 1,
        data: vec![0; MAX_PAYLOAD + 1],
    };
    let mut out = vec![7u8];
    assert!(matches!(
        encode_into(&msg, &mut out),
        Err(ProtoError::FrameTooLarge { .. })
    ));
    assert_eq!(out, vec![7u8]);
}

#[test]
fn truncated_stream_is_an_error() {
    let frame = encode(&HostMsg::Ping { id: 5 }).unwrap();
    let mut scratch = Vec::new();
    let cut = &frame[..frame.len() - 1];
    assert!(matches!(
        read_msg::<HostMsg, _>(&mut &cut[..], &mut scratch),
        Err(ProtoError::Truncated)
    ));
    let cut = &frame[..2];
    assert!(matches!(
        read_msg::<HostMsg, _>(&mut &cut[..], &mut scratch),
        Err(ProtoError::Truncated)
    ));
}

#[test]
fn capabilities_bits() {
    let c = Capabilities(Capabilities::EXEC | Capabilities::FILES);
    assert!(c.has(Capabilities::EXEC));
    assert!(c.has(Capabilities::EXEC | Capabilities::FILES));
    assert!(!c.has(Capabilities::POWEROFF));
}

#[test]
fn rekey_debug_hides_its_secrets() {
    let r = Rekey {
        id: 7,
        token: "sekrit-token".into(),
        entropy: vec![0xAB; 32],
        unix_time_ns: 1,
        hostname: "vmcp-abc".into(),
    };
    let text = format!("{:?}", HostMsg::Rekey(r));
    assert!(!text.contains("sekrit") && !text.contains("171"), "{text}");
    assert!(
        text.contains("<32 bytes>") && text.contains("vmcp-abc"),
        "{text}"
    );
}

#[test]
fn flow_control_accounting() {
    assert_eq!(credit_cost(0), MSG_COST);
    assert_eq!(credit_cost(CHUNK_SIZE), CHUNK_SIZE as u32 + MSG_COST);
    assert_eq!(credit_cost(usize::MAX), u32::MAX);
    // A full window holds at least a few full chunks.
    assert!(STREAM_WINDOW / credit_cost(CHUNK_SIZE) >= 8);
    let out = GuestMsg::Stdout {
        id: 3,
        data: vec![0; 10],
    };
    assert_eq!(
        (out.request_id(), out.window_cost()),
        (Some(3), 10 + MSG_COST)
    );
    let file = GuestMsg::FileData {
        id: 4,
        data: vec![],
        eof: true,
    };
    assert_eq!(file.window_cost(), MSG_COST);
    assert_eq!(
        GuestMsg::Exited {
            id: 5,
            status: ExitStatus::Code(0)
        }
        .window_cost(),
        0
    );
    assert_eq!(
        GuestMsg::StdinCredit { id: 6, credit: 9 }.request_id(),
        Some(6)
    );
    let tcp = GuestMsg::TcpData {
        id: 7,
        data: vec![0; 5],
    };
    assert_eq!(
        (tcp.request_id(), tcp.window_cost()),
        (Some(7), 5 + MSG_COST)
    );
    for control in [GuestMsg::Connected { id: 8 }, GuestMsg::TcpEof { id: 8 }] {
        assert_eq!((control.request_id(), control.window_cost()), (Some(8), 0));
    }
    let hello = GuestMsg::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_version: String::new(),
        capabilities: Capabilities(0),
        token: String::new(),
        boot_ns: 0,
    });
    assert_eq!((hello.request_id(), hello.window_cost()), (None, 0));
}

/// The hello of protocol 1 and of this version have the same layout, so a host can always
/// read the version of the agent it meets and refuse it with a clear message.
#[test]
fn hello_layout_is_stable_across_versions() {
    let old = GuestMsg::Hello(Hello {
        protocol_version: 1,
        agent_version: "0.1.0".into(),
        capabilities: Capabilities(15),
        token: "t".into(),
        boot_ns: 7,
    });
    // Bytes a protocol-1 agent sent (variant 0, fields in order, varints).
    let v1_frame: &[u8] = &[
        12, 0, 0, 0, 1, 0, 1, 5, b'0', b'.', b'1', b'.', b'0', 15, 1, b't', 7,
    ];
    assert_eq!(encode(&old).unwrap(), v1_frame);
    let (back, _) = decode::<GuestMsg>(v1_frame).unwrap().unwrap();
    assert_eq!(back, old);
}
