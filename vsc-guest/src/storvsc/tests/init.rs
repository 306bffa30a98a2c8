//! The init handshake, byte-checked against reference §2.6 / §0.1.

use super::*;

#[test]
fn init_sequence_bytes_match_linux() {
    let mut drv = Storvsc::new(StorvscConfig::default());
    let sent = handshake(&mut drv, &[ProtocolVersion::Win8_1], props(0, 0, 0x40000));
    // BEGIN, WIN10 (refused), WIN8.1 (accepted), QUERY_PROPERTIES, END.
    assert_eq!(sent.len(), 5);
    let mut expect_ops = vec![];
    for p in &sent {
        let bytes = p.wire_bytes();
        // Descriptor: in-band, offset8 2, len8 10 (16 + 64 bytes), completion requested, init id.
        assert_eq!(
            &bytes[..16],
            &[
                6, 0, 2, 0, 10, 0, 1, 0, 0xFD, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF
            ]
        );
        assert_eq!(bytes.len(), 80);
        // vstor header: operation, flags = REQUEST_COMPLETION, status 0.
        assert_eq!(&bytes[20..28], &[1, 0, 0, 0, 0, 0, 0, 0]);
        expect_ops.push(u32::from_le_bytes(bytes[16..20].try_into().unwrap()));
        let body = &bytes[28..];
        match expect_ops.last() {
            Some(9) => {
                assert_eq!(&body[2..], &[0u8; 50]);
            }
            _ => assert_eq!(body, &[0u8; 52]),
        }
    }
    assert_eq!(expect_ops, [7, 9, 9, 10, 8]);
    assert_eq!(&sent[1].wire_bytes()[28..32], &[0x02, 0x06, 0, 0]);
    assert_eq!(&sent[2].wire_bytes()[28..32], &[0x00, 0x06, 0, 0]);
    let Some(StorvscEvent::Ready(n)) = drv.poll_event() else {
        panic!()
    };
    assert_eq!(n.version, ProtocolVersion::Win8_1);
    assert_eq!((n.max_transfer_bytes, n.subchannels), (0x40000, 0));
    assert_eq!(drv.state(), DriverState::Ready);
}

#[test]
fn version_walk_with_refusals() {
    for (accepted, want) in [
        (vec![ProtocolVersion::Win10], Some(ProtocolVersion::Win10)),
        (vec![ProtocolVersion::Win8_1], Some(ProtocolVersion::Win8_1)),
        (
            vec![ProtocolVersion::Win8, ProtocolVersion::Win7],
            Some(ProtocolVersion::Win8),
        ),
        (vec![ProtocolVersion::Win7, ProtocolVersion::Win6], None),
        (vec![], None),
    ] {
        let mut drv = Storvsc::new(StorvscConfig::default());
        let sent = handshake(&mut drv, &accepted, props(0, 0, 0x1000));
        let queried: Vec<u16> = sent
            .iter()
            .filter(|p| p.vstor().header.operation == 9)
            .map(|p| p.vstor().version().major_minor)
            .collect();
        match want {
            Some(v) => {
                assert_eq!(drv.state(), DriverState::Ready);
                assert_eq!(queried.last(), Some(&v.raw()));
                assert_eq!(drv.negotiated().unwrap().version, v);
            }
            None => {
                assert_eq!(
                    queried,
                    [0x0602, 0x0600, 0x0501],
                    "Linux gives up after WIN8"
                );
                assert_eq!(drv.state(), DriverState::Failed);
                assert_eq!(
                    drv.poll_event(),
                    Some(StorvscEvent::InitFailed(InitError::NoVersion {
                        status: vstor::status::REVISION_MISMATCH
                    }))
                );
            }
        }
    }
}

#[test]
fn legacy_versions_use_48_byte_srbs() {
    let mut drv = Storvsc::new(StorvscConfig {
        versions: ProtocolVersion::LEGACY_ORDER.to_vec(),
        ..StorvscConfig::default()
    });
    handshake(&mut drv, &[ProtocolVersion::Win7], props(0, 0, 0x20000));
    assert_eq!(drv.negotiated().unwrap().version, ProtocolVersion::Win7);
    let id = drv
        .submit(&ScsiRequest {
            addr: ScsiAddress::default(),
            cdb: cdb::test_unit_ready(),
            data: None,
            tagged: false,
            tag: 0,
        })
        .unwrap();
    let p = one(&mut drv);
    assert_eq!(p.payload().len(), 48);
    let srb = p.vstor().srb();
    assert_eq!(({ srb.length }, srb.sense_info_length), (0x24, 0x12));
    // A 48-byte completion is enough at WIN7.
    let done = srb_done(&p, 1, 0, 0, &[]);
    assert_eq!(
        drv.handle_packet(0, PacketType::Completion, id, &done.as_bytes()[..48]),
        Ok(Handled::Completion)
    );
}

#[test]
fn each_init_failure_is_reported() {
    // Refusal at each step (other than versions) fails the controller, as Linux fails the probe.
    for fail_op in [7u32, 10, 8] {
        let mut drv = Storvsc::new(StorvscConfig::default());
        drv.start().unwrap();
        loop {
            let pkt = one(&mut drv);
            let op = pkt.vstor().header.operation;
            let mut r = complete_io(if op == fail_op { 0xC000_0001 } else { 0 });
            if op == 10 {
                r.set_properties(&props(0, 0, 0x40000));
            }
            reply(&mut drv, 0, pkt.trans_id, &r).unwrap();
            if op == fail_op {
                break;
            }
        }
        assert_eq!(drv.state(), DriverState::Failed, "op {fail_op}");
        assert!(matches!(
            drv.poll_event(),
            Some(StorvscEvent::InitFailed(InitError::Refused {
                status: 0xC000_0001,
                ..
            }))
        ));
    }
    // A non-COMPLETE_IO answer fails too; zero max_transfer_bytes is refused.
    let mut drv = Storvsc::new(StorvscConfig::default());
    drv.start().unwrap();
    let p = one(&mut drv);
    let r = VstorPacket::new(Operation::EnumerateBus, 0, 0);
    reply(&mut drv, 0, p.trans_id, &r).unwrap();
    assert!(matches!(
        drv.poll_event(),
        Some(StorvscEvent::InitFailed(InitError::NotCompleteIo {
            operation: 11,
            ..
        }))
    ));
    let mut drv = Storvsc::new(StorvscConfig::default());
    handshake(&mut drv, &[ProtocolVersion::Win10], props(0, 0, 0));
    assert_eq!(
        drv.poll_event(),
        Some(StorvscEvent::InitFailed(InitError::MaxTransfer(0)))
    );
    // Nothing to try at all.
    let mut drv = Storvsc::new(StorvscConfig {
        versions: vec![],
        ..StorvscConfig::default()
    });
    assert_eq!(
        drv.start(),
        Err(StorvscError::Init(InitError::NoVersionsConfigured))
    );
}

#[test]
fn sub_channels_requested_after_end_initialization() {
    let mut drv = Storvsc::new(StorvscConfig {
        subchannels: 7,
        ..StorvscConfig::default()
    });
    let sent = handshake(
        &mut drv,
        &[ProtocolVersion::Win10],
        props(3, property_flags::SUPPORTS_MULTI_CHANNEL, 0x40000),
    );
    let last = sent.last().unwrap().wire_bytes();
    assert_eq!(u32::from_le_bytes(last[16..20].try_into().unwrap()), 13);
    // min(wanted 7, host max 3) at packet offset 12.
    assert_eq!(&last[28..31], &[3, 0, 0]);
    let Some(StorvscEvent::Ready(n)) = drv.poll_event() else {
        panic!()
    };
    assert_eq!(n.subchannels, 3);
    assert_eq!(drv.add_channel(), Ok(1));
    assert_eq!(drv.add_channel(), Ok(2));
    assert_eq!(drv.add_channel(), Ok(3));
    assert_eq!(drv.add_channel(), Err(StorvscError::TooManyChannels(3)));

    // No multi-channel flag: never asked; refusal: single channel, still ready.
    let mut drv = Storvsc::new(StorvscConfig {
        subchannels: 7,
        ..StorvscConfig::default()
    });
    let sent = handshake(&mut drv, &[ProtocolVersion::Win10], props(3, 0, 0x40000));
    assert!(sent.iter().all(|p| p.vstor().header.operation != 13));
    let mut drv = Storvsc::new(StorvscConfig {
        subchannels: 2,
        ..StorvscConfig::default()
    });
    drv.start().unwrap();
    loop {
        let pkt = one(&mut drv);
        let op = pkt.vstor().header.operation;
        let mut r = complete_io(if op == 13 {
            vstor::status::INVALID_PARAMETER
        } else {
            0
        });
        if op == 10 {
            r.set_properties(&props(4, 1, 0x40000));
        }
        reply(&mut drv, 0, pkt.trans_id, &r).unwrap();
        if op == 13 {
            break;
        }
    }
    assert_eq!(drv.state(), DriverState::Ready);
    assert_eq!(drv.negotiated().unwrap().subchannels, 0);
}

#[test]
fn init_completions_out_of_place_are_counted_not_obeyed() {
    let mut drv = ready();
    let stale = complete_io(0);
    assert_eq!(
        reply(&mut drv, 0, INIT_TRANS_ID, &stale),
        Ok(Handled::Duplicate)
    );
    assert_eq!(drv.stats().duplicates, 1);
    assert_eq!(drv.start(), Err(StorvscError::AlreadyStarted));
    // I/O before ready is refused.
    let mut fresh = Storvsc::new(StorvscConfig::default());
    let req = ScsiRequest {
        addr: ScsiAddress::default(),
        cdb: cdb::test_unit_ready(),
        data: None,
        tagged: false,
        tag: 0,
    };
    assert_eq!(
        fresh.submit(&req),
        Err(StorvscError::NotReady(DriverState::Created))
    );
    // An init completion on a sub-channel index that does not exist.
    fresh.start().unwrap();
    assert_eq!(
        reply(&mut fresh, 5, INIT_TRANS_ID, &stale),
        Err(StorvscError::NoSuchChannel(5))
    );
}
