//! The vstor handshake driven as Linux drives it, out-of-order and hostile control requests.

use super::protocol::*;
use vmbus_core::devices::vstor::{
    self, GuestPacket, Operation, ProtocolVersion, VstorPacket, parse_guest_packet, property_flags,
    status,
};

fn packet(op: Operation, body: &[u8]) -> GuestPacket {
    let mut p = VstorPacket::new(op, vstor::FLAG_REQUEST_COMPLETION, 0);
    let mut b = [0u8; vstor::UNION_SIZE];
    b[..body.len()].copy_from_slice(body);
    p.body = b;
    parse_guest_packet(p.wire_bytes(64)).unwrap()
}

fn version(v: u16) -> GuestPacket {
    packet(Operation::QueryProtocolVersion, &v.to_le_bytes())
}

fn status_of(d: &Decision) -> u32 {
    match d {
        Decision::Reply(p) | Decision::ReplyAndOffer { reply: p, .. } => {
            assert_eq!({ p.header.operation }, Operation::CompleteIo.raw());
            p.header.status
        }
        other => panic!("expected a reply, got {other:?}"),
    }
}

fn config(max_sub: u16, versions: &[ProtocolVersion]) -> ProtocolConfig {
    ProtocolConfig {
        versions: versions.to_vec(),
        max_subchannels: max_sub,
        ..ProtocolConfig::default()
    }
}

/// Runs Linux 6.1's `storvsc_channel_init` against the state machine; returns the accepted version
/// and the properties.
fn linux_init(
    ch: &mut ChannelProtocol,
    shared: &SharedProtocol,
    cfg: &ProtocolConfig,
    order: &[ProtocolVersion],
) -> Option<(ProtocolVersion, vstor::ChannelProperties)> {
    assert_eq!(
        status_of(&ch.handle(&packet(Operation::BeginInitialization, &[]), shared, cfg)),
        0
    );
    let mut accepted = None;
    for v in order {
        let d = ch.handle(&version(v.raw()), shared, cfg);
        match status_of(&d) {
            0 => {
                accepted = Some(*v);
                break;
            }
            s => assert_eq!(s, status::REVISION_MISMATCH),
        }
    }
    let v = accepted?;
    let Decision::Reply(p) = ch.handle(&packet(Operation::QueryProperties, &[]), shared, cfg)
    else {
        panic!("properties")
    };
    assert_eq!({ p.header.status }, 0);
    let props = p.properties();
    assert_eq!(
        status_of(&ch.handle(&packet(Operation::EndInitialization, &[]), shared, cfg)),
        0
    );
    Some((v, props))
}

#[test]
fn linux_6_1_negotiates_win10_when_offered() {
    let shared = SharedProtocol::default();
    let cfg = config(3, &ProtocolVersion::ALL);
    let mut ch = ChannelProtocol::new(true);
    let (v, props) = linux_init(&mut ch, &shared, &cfg, &ProtocolVersion::LINUX_ORDER).unwrap();
    assert_eq!(v, ProtocolVersion::Win10);
    assert_eq!(shared.version(), Some(ProtocolVersion::Win10));
    assert!(shared.ready());
    assert_eq!({ props.max_channel_cnt }, 3);
    assert_eq!({ props.flags }, property_flags::SUPPORTS_MULTI_CHANNEL);
    assert_eq!({ props.max_transfer_bytes }, 0x40000);
    assert_eq!(ch.state(), InitState::Ready);
    // Linux then asks for min(CPUs - 1, max) sub-channels.
    let d = ch.handle(
        &packet(Operation::CreateSubChannels, &2u16.to_le_bytes()),
        &shared,
        &cfg,
    );
    assert_eq!(
        d,
        Decision::ReplyAndOffer {
            reply: VstorPacket::new(Operation::CompleteIo, 0, 0),
            count: 2
        }
    );
}

#[test]
fn linux_falls_back_like_against_openvmm() {
    // A host without WIN10 (OpenVMM): Linux's first query is refused, the second accepted.
    let shared = SharedProtocol::default();
    let cfg = config(0, &ProtocolVersion::ALL[..4]);
    let mut ch = ChannelProtocol::new(true);
    let (v, props) = linux_init(&mut ch, &shared, &cfg, &ProtocolVersion::LINUX_ORDER).unwrap();
    assert_eq!(v, ProtocolVersion::Win8_1);
    assert_eq!(({ props.max_channel_cnt }, { props.flags }), (0, 0));
    // A host offering only WIN7: Linux 6.1 gives up ("Obsolete Hyper-V version") ...
    let cfg7 = config(4, &[ProtocolVersion::Win7]);
    let shared = SharedProtocol::default();
    let mut ch = ChannelProtocol::new(true);
    assert!(linux_init(&mut ch, &shared, &cfg7, &ProtocolVersion::LINUX_ORDER).is_none());
    assert_eq!(
        ch.state(),
        InitState::AwaitVersion,
        "still waiting for a version"
    );
    // ... older guests get there, without multi-channel.
    let shared = SharedProtocol::default();
    let mut ch = ChannelProtocol::new(true);
    let (v, props) = linux_init(&mut ch, &shared, &cfg7, &ProtocolVersion::LEGACY_ORDER).unwrap();
    assert_eq!(v, ProtocolVersion::Win7);
    assert_eq!(({ props.max_channel_cnt }, { props.flags }), (0, 0));
    assert_eq!(v.packet_size(), 48);
}

#[test]
fn every_version_is_answered() {
    for v in ProtocolVersion::ALL {
        let shared = SharedProtocol::default();
        let cfg = config(0, &[v]);
        let mut ch = ChannelProtocol::new(true);
        ch.handle(&packet(Operation::BeginInitialization, &[]), &shared, &cfg);
        for other in ProtocolVersion::ALL.iter().filter(|o| **o != v) {
            assert_eq!(
                status_of(&ch.handle(&version(other.raw()), &shared, &cfg)),
                status::REVISION_MISMATCH
            );
        }
        for junk in [0u16, 0x0100, 0x0A00, 0xFFFF] {
            assert_eq!(
                status_of(&ch.handle(&version(junk), &shared, &cfg)),
                status::REVISION_MISMATCH
            );
        }
        let d = ch.handle(&version(v.raw()), &shared, &cfg);
        assert_eq!(status_of(&d), 0);
        let Decision::Reply(p) = d else { panic!() };
        assert_eq!({ p.version().major_minor }, v.raw());
    }
}

#[test]
fn out_of_order_requests_keep_the_state() {
    let shared = SharedProtocol::default();
    let cfg = config(2, &ProtocolVersion::ALL);
    let mut ch = ChannelProtocol::new(true);
    let srb = packet(Operation::ExecuteSrb, &[]);
    let bad = status::INVALID_DEVICE_STATE;
    // Before BEGIN: everything but BEGIN is refused.
    for p in [
        srb,
        version(0x0602),
        packet(Operation::QueryProperties, &[]),
        packet(Operation::EndInitialization, &[]),
        packet(Operation::CreateSubChannels, &1u16.to_le_bytes()),
        packet(Operation::ResetBus, &[]),
    ] {
        assert_eq!(status_of(&ch.handle(&p, &shared, &cfg)), bad, "{p:?}");
    }
    assert_eq!(ch.state(), InitState::AwaitBegin);
    ch.handle(&packet(Operation::BeginInitialization, &[]), &shared, &cfg);
    assert_eq!(
        status_of(&ch.handle(&packet(Operation::BeginInitialization, &[]), &shared, &cfg)),
        bad
    );
    assert_eq!(status_of(&ch.handle(&srb, &shared, &cfg)), bad);
    ch.handle(&version(0x0600), &shared, &cfg);
    // Versions queried twice.
    assert_eq!(status_of(&ch.handle(&version(0x0600), &shared, &cfg)), bad);
    assert_eq!(status_of(&ch.handle(&srb, &shared, &cfg)), bad);
    ch.handle(&packet(Operation::QueryProperties, &[]), &shared, &cfg);
    // CREATE_SUB_CHANNELS before END is allowed (other guests send it there).
    let d = ch.handle(
        &packet(Operation::CreateSubChannels, &1u16.to_le_bytes()),
        &shared,
        &cfg,
    );
    assert!(matches!(d, Decision::ReplyAndOffer { count: 1, .. }));
    assert_eq!(status_of(&ch.handle(&srb, &shared, &cfg)), bad);
    assert!(!shared.ready());
    ch.handle(&packet(Operation::EndInitialization, &[]), &shared, &cfg);
    assert!(matches!(
        ch.handle(&srb, &shared, &cfg),
        Decision::Execute(_)
    ));
    assert_eq!(
        ch.handle(&packet(Operation::ResetBus, &[]), &shared, &cfg),
        Decision::ResetAfterDrain
    );
    // BEGIN after init, FC data on a SCSI controller.
    assert_eq!(
        status_of(&ch.handle(&packet(Operation::BeginInitialization, &[]), &shared, &cfg)),
        bad
    );
    assert_eq!(
        status_of(&ch.handle(&packet(Operation::FcHbaData, &[]), &shared, &cfg)),
        status::INVALID_DEVICE_REQUEST
    );
}

#[test]
fn sub_channel_requests_are_bounded_and_idempotent() {
    let shared = SharedProtocol::default();
    let cfg = config(4, &ProtocolVersion::ALL);
    let mut ch = ChannelProtocol::new(true);
    linux_init(&mut ch, &shared, &cfg, &ProtocolVersion::LINUX_ORDER).unwrap();
    let ask = |ch: &mut ChannelProtocol, n: u16| {
        ch.handle(
            &packet(Operation::CreateSubChannels, &n.to_le_bytes()),
            &shared,
            &cfg,
        )
    };
    assert_eq!(status_of(&ask(&mut ch, 0)), status::INVALID_PARAMETER);
    assert_eq!(status_of(&ask(&mut ch, 5)), status::INVALID_PARAMETER);
    assert!(matches!(
        ask(&mut ch, 2),
        Decision::ReplyAndOffer { count: 2, .. }
    ));
    assert!(
        matches!(ask(&mut ch, 2), Decision::Reply(_)),
        "repeat offers nothing"
    );
    assert!(matches!(ask(&mut ch, 1), Decision::Reply(_)));
    assert!(matches!(
        ask(&mut ch, 4),
        Decision::ReplyAndOffer { count: 2, .. }
    ));
    assert_eq!(shared.subchannels(), 4);
    // On a sub-channel: refused; its SRBs run once the primary is ready.
    let mut sub = ChannelProtocol::new(false);
    assert_eq!(status_of(&ask(&mut sub, 1)), status::INVALID_DEVICE_STATE);
    assert_eq!(
        status_of(&sub.handle(&packet(Operation::BeginInitialization, &[]), &shared, &cfg)),
        status::INVALID_DEVICE_STATE
    );
    assert!(matches!(
        sub.handle(&packet(Operation::ExecuteSrb, &[]), &shared, &cfg),
        Decision::Execute(_)
    ));
    shared.reset();
    assert_eq!(
        status_of(&sub.handle(&packet(Operation::ExecuteSrb, &[]), &shared, &cfg)),
        status::INVALID_DEVICE_STATE
    );
    // Pre-Win8 versions have no sub-channels; nor does an IDE controller.
    let shared = SharedProtocol::default();
    let mut ch = ChannelProtocol::new(true);
    linux_init(&mut ch, &shared, &cfg, &ProtocolVersion::LEGACY_ORDER[3..]).unwrap();
    assert_eq!(shared.version(), Some(ProtocolVersion::Win7));
    let d = ch.handle(
        &packet(Operation::CreateSubChannels, &1u16.to_le_bytes()),
        &shared,
        &cfg,
    );
    assert_eq!(status_of(&d), status::INVALID_DEVICE_REQUEST);
    let ide = ProtocolConfig {
        ide: true,
        ..cfg.clone()
    };
    let props = properties(Some(ProtocolVersion::Win10), &ide);
    assert_eq!(({ props.max_channel_cnt }, { props.flags }), (0, 0));
}
