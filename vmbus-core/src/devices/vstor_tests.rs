//! Sizes and offsets against the reference (§2.2–2.7) and Linux, parser behaviour, proptests.
#![allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use super::*;
use core::mem::offset_of;
use proptest::prelude::*;

#[test]
fn sizes_match_linux() {
    assert_eq!(size_of::<VstorHeader>(), 12);
    assert_eq!(size_of::<VmscsiRequest>(), 0x34);
    assert_eq!(size_of::<ChannelProperties>(), 24);
    assert_eq!(size_of::<ProtocolVersionBody>(), 4);
    assert_eq!(size_of::<FcWwnPacket>(), 36);
    assert_eq!(size_of::<VstorPacket>(), 64);
    assert_eq!(PRE_WIN8_PACKET_SIZE, 48);
    assert_eq!(PRE_WIN8_VMSCSI_REQUEST_SIZE, 0x24);
}

#[test]
fn vmscsi_request_offsets_match_reference() {
    // (offset inside the union, field) from reference §2.4; packet offset = 12 + this.
    let expect = [
        (0, offset_of!(VmscsiRequest, length)),
        (2, offset_of!(VmscsiRequest, srb_status)),
        (3, offset_of!(VmscsiRequest, scsi_status)),
        (4, offset_of!(VmscsiRequest, port_number)),
        (5, offset_of!(VmscsiRequest, path_id)),
        (6, offset_of!(VmscsiRequest, target_id)),
        (7, offset_of!(VmscsiRequest, lun)),
        (8, offset_of!(VmscsiRequest, cdb_length)),
        (9, offset_of!(VmscsiRequest, sense_info_length)),
        (10, offset_of!(VmscsiRequest, data_in)),
        (11, offset_of!(VmscsiRequest, reserved)),
        (12, offset_of!(VmscsiRequest, data_transfer_length)),
        (16, offset_of!(VmscsiRequest, cdb_or_sense)),
        (36, offset_of!(VmscsiRequest, reserve)),
        (38, offset_of!(VmscsiRequest, queue_tag)),
        (39, offset_of!(VmscsiRequest, queue_action)),
        (40, offset_of!(VmscsiRequest, srb_flags)),
        (44, offset_of!(VmscsiRequest, time_out_value)),
        (48, offset_of!(VmscsiRequest, queue_sort_key)),
    ];
    for (want, got) in expect {
        assert_eq!(want, got);
    }
    assert_eq!(offset_of!(VstorPacket, body), 12);
    assert_eq!(offset_of!(VstorHeader, status), 8);
}

#[test]
fn channel_properties_offsets_match_reference() {
    assert_eq!(offset_of!(ChannelProperties, max_channel_cnt), 4);
    assert_eq!(offset_of!(ChannelProperties, flags), 8);
    assert_eq!(offset_of!(ChannelProperties, max_transfer_bytes), 12);
    assert_eq!(offset_of!(ChannelProperties, reserved2), 16);
    assert_eq!(offset_of!(FcWwnPacket, primary_port_wwn), 4);
    assert_eq!(offset_of!(FcWwnPacket, secondary_node_wwn), 28);
}

#[test]
fn versions_sizes_and_orders() {
    use ProtocolVersion::*;
    for v in ProtocolVersion::ALL {
        assert_eq!(ProtocolVersion::from_wire(v.raw()), Some(v));
    }
    assert_eq!(ProtocolVersion::from_wire(0x0A00), None);
    assert_eq!(
        ProtocolVersion::LINUX_ORDER.map(|v| v.raw()),
        [0x0602, 0x0600, 0x0501]
    );
    let sizes: Vec<_> = ProtocolVersion::ALL
        .iter()
        .map(|v| {
            (
                v.packet_size(),
                v.request_size(),
                v.sense_buffer_size(),
                v.size_delta(),
            )
        })
        .collect();
    assert_eq!(
        sizes,
        [
            (48, 0x24, 18, 16),
            (48, 0x24, 18, 16),
            (64, 0x34, 20, 0),
            (64, 0x34, 20, 0),
            (64, 0x34, 20, 0)
        ]
    );
    assert!(!Win7.supports_multichannel() && Win8.supports_multichannel());
    assert_eq!(Win8_1.to_string(), "6.0");
    assert_eq!((Win10.major(), Win10.minor()), (6, 2));
}

#[test]
fn completion_sizes() {
    assert_eq!(completion_len(None, 64), 64);
    assert_eq!(completion_len(None, 48), 48);
    assert_eq!(completion_len(None, 200), 64);
    assert_eq!(completion_len(None, 4), 12);
    assert_eq!(completion_len(Some(ProtocolVersion::Win7), 64), 48);
    assert_eq!(completion_len(Some(ProtocolVersion::Win8_1), 48), 64);
}

/// A Linux 6.1 READ(10) request, byte for byte as `storvsc_queuecommand` builds it.
fn linux_read10() -> [u8; 64] {
    let mut b = [0u8; 64];
    b[0..4].copy_from_slice(&3u32.to_le_bytes()); // EXECUTE_SRB
    b[4..8].copy_from_slice(&1u32.to_le_bytes()); // REQUEST_COMPLETION_FLAG
    b[12..14].copy_from_slice(&0x34u16.to_le_bytes());
    b[16] = 2; // port
    b[17] = 0; // path
    b[18] = 1; // target
    b[19] = 3; // lun
    b[20] = 10; // cdb_length
    b[21] = 0x14;
    b[22] = 1; // READ_TYPE
    b[24..28].copy_from_slice(&4096u32.to_le_bytes());
    b[28..38].copy_from_slice(&[0x28, 0, 0, 0, 0, 8, 0, 0, 8, 0]);
    b[50] = 0xFF;
    b[51] = 0x20;
    b[52..56].copy_from_slice(&(0x8u32 | 0x2 | 0x100 | 0x40).to_le_bytes());
    b[56..60].copy_from_slice(&60u32.to_le_bytes());
    b
}

#[test]
fn parses_a_linux_srb() {
    let p = parse_guest_packet(&linux_read10()).unwrap();
    assert_eq!(p.operation, Operation::ExecuteSrb);
    assert_eq!(p.flags, FLAG_REQUEST_COMPLETION);
    let GuestRequest::ExecuteSrb(srb) = p.body else {
        panic!("{p:?}")
    };
    assert_eq!(
        (srb.port_number, srb.path_id, srb.target_id, srb.lun),
        (2, 0, 1, 3)
    );
    assert_eq!({ srb.data_transfer_length }, 4096);
    assert_eq!(srb.cdb()[..10], [0x28, 0, 0, 0, 0, 8, 0, 0, 8, 0]);
    assert_eq!(
        DataDirection::from_wire(srb.data_in),
        Some(DataDirection::Read)
    );
    assert_eq!({ srb.srb_flags }, 0x14A);
    assert_eq!((srb.queue_tag, srb.queue_action), (0xFF, 0x20));
    assert_eq!({ srb.time_out_value }, 60);
}

#[test]
fn short_packets_are_zero_filled() {
    // A pre-Win8 (48-byte) request: the extension reads as zero.
    let full = linux_read10();
    let p = parse_guest_packet(&full[..48]).unwrap();
    let GuestRequest::ExecuteSrb(srb) = p.body else {
        panic!()
    };
    assert_eq!(p.len, 48);
    assert_eq!({ srb.srb_flags }, 0);
    assert_eq!(srb.queue_tag, 0);
    assert_eq!({ srb.data_transfer_length }, 4096);
    // Header only: the SRB is all zero.
    let p = parse_guest_packet(&full[..12]).unwrap();
    assert_eq!(p.body, GuestRequest::ExecuteSrb(VmscsiRequest::default()));
    // A long packet: only the first 64 bytes count.
    let mut long = [0xAAu8; 100];
    long[..64].copy_from_slice(&full);
    assert_eq!(
        parse_guest_packet(&long).unwrap().body,
        parse_guest_packet(&full).unwrap().body
    );
}

#[test]
fn parser_errors() {
    assert_eq!(
        parse_guest_packet(&[3, 0, 0]),
        Err(VstorError::TooShort { len: 3 })
    );
    let mut b = [0u8; 64];
    b[0] = 15;
    assert_eq!(
        parse_guest_packet(&b),
        Err(VstorError::UnknownOperation { operation: 15 })
    );
    b[0] = 0;
    assert_eq!(
        parse_guest_packet(&b),
        Err(VstorError::UnknownOperation { operation: 0 })
    );
    for op in [1u8, 2, 11, 14] {
        b[0] = op;
        assert!(
            matches!(
                parse_guest_packet(&b),
                Err(VstorError::WrongDirection { .. })
            ),
            "{op}"
        );
    }
    b[0] = 13;
    b[12..14].copy_from_slice(&7u16.to_le_bytes());
    assert_eq!(
        parse_guest_packet(&b).unwrap().body,
        GuestRequest::CreateSubChannels { count: 7 }
    );
    b[0] = 9;
    b[12..16].copy_from_slice(&[0x02, 0x06, 0, 0]);
    assert_eq!(
        parse_guest_packet(&b).unwrap().body,
        GuestRequest::QueryProtocolVersion(ProtocolVersionBody {
            major_minor: 0x0602,
            revision: 0
        })
    );
    b[0] = 6;
    b[17] = 5;
    assert_eq!(
        parse_guest_packet(&b).unwrap().body,
        GuestRequest::ResetBus { path_id: 5 }
    );
}

#[test]
fn srb_completion_layout() {
    let GuestRequest::ExecuteSrb(req) = parse_guest_packet(&linux_read10()).unwrap().body else {
        panic!()
    };
    let sense = [0x70, 0, 5, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x21, 0, 0, 0, 0, 0];
    let c = srb_completion(&req, status::IO_DEVICE_ERROR, 0x84, 2, 0, &sense);
    let bytes = c.wire_bytes(64);
    assert_eq!(bytes.len(), 64);
    assert_eq!(&bytes[0..4], &1u32.to_le_bytes());
    assert_eq!(&bytes[4..8], &0u32.to_le_bytes());
    assert_eq!(&bytes[8..12], &0xC000_0185u32.to_le_bytes());
    assert_eq!(&bytes[12..14], &0x34u16.to_le_bytes());
    assert_eq!((bytes[14], bytes[15]), (0x84, 2));
    assert_eq!(&bytes[16..20], &[2, 0, 1, 3]);
    assert_eq!((bytes[20], bytes[21]), (16, 18));
    assert_eq!(&bytes[24..28], &[0; 4]);
    assert_eq!(&bytes[28..46], &sense);
    assert!(bytes[46..].iter().all(|&b| b == 0));
    assert_eq!(c.wire_bytes(48).len(), 48);
    // Guest side reads it back.
    let HostPacket::Completion(back) = parse_host_packet(bytes, 64).unwrap() else {
        panic!()
    };
    assert_eq!(back.srb().sense_info_length, 18);
    assert_eq!(
        parse_host_packet(&bytes[..48], 64),
        Err(VstorError::ShortCompletion { len: 48, min: 64 })
    );
    assert_eq!(
        parse_host_packet(&11u32.to_le_bytes(), 64),
        Ok(HostPacket::EnumerateBus)
    );
    assert_eq!(
        parse_host_packet(&2u32.to_le_bytes(), 64),
        Ok(HostPacket::RemoveDevice)
    );
    assert!(matches!(
        parse_host_packet(&3u32.to_le_bytes(), 64),
        Err(VstorError::WrongDirection { .. })
    ));
    assert_eq!(
        parse_host_packet(&[1, 0], 64),
        Err(VstorError::TooShort { len: 2 })
    );
}

#[test]
fn nt_status_mapping() {
    assert_eq!(nt_status_for_srb(srb_status::SUCCESS), status::SUCCESS);
    assert_eq!(
        nt_status_for_srb(srb_status::ERROR | srb_status::AUTOSENSE_VALID),
        status::IO_DEVICE_ERROR
    );
    assert_eq!(
        nt_status_for_srb(srb_status::INVALID_LUN),
        status::DEVICE_DOES_NOT_EXIST
    );
    assert_eq!(
        nt_status_for_srb(srb_status::DATA_OVERRUN),
        status::BUFFER_OVERFLOW
    );
    assert_eq!(nt_status_for_srb(srb_status::ABORTED), status::CANCELLED);
}

#[test]
fn properties_round_trip() {
    let mut p = VstorPacket::new(Operation::CompleteIo, 0, 0);
    p.set_properties(&ChannelProperties {
        max_channel_cnt: 3,
        flags: property_flags::SUPPORTS_MULTI_CHANNEL,
        max_transfer_bytes: 0x40000,
        ..Default::default()
    });
    let b = p.wire_bytes(64);
    assert_eq!(&b[16..18], &3u16.to_le_bytes());
    assert_eq!(&b[20..24], &1u32.to_le_bytes());
    assert_eq!(&b[24..28], &0x40000u32.to_le_bytes());
    assert_eq!({ p.properties().max_transfer_bytes }, 0x40000);
}

proptest! {
    #[test]
    fn guest_parser_is_total(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
        match parse_guest_packet(&bytes) {
            Ok(p) => {
                prop_assert!(bytes.len() >= HEADER_SIZE);
                prop_assert!(p.operation.is_guest_request());
                prop_assert_eq!(p.len, bytes.len());
                if let GuestRequest::ExecuteSrb(srb) = p.body {
                    // The SRB is the packet bytes 12.., zero-filled.
                    let mut want = [0u8; 52];
                    let n = bytes.len().min(64).saturating_sub(12);
                    want[..n].copy_from_slice(&bytes[12..12 + n]);
                    prop_assert_eq!(srb.as_bytes(), &want[..]);
                }
            }
            Err(VstorError::TooShort { len }) => prop_assert!(len < HEADER_SIZE),
            Err(VstorError::UnknownOperation { operation }) => {
                prop_assert!(Operation::from_wire(operation).is_none())
            }
            Err(VstorError::WrongDirection { operation }) => {
                prop_assert!(!operation.is_guest_request())
            }
            Err(e) => prop_assert!(false, "unexpected {e}"),
        }
    }

    #[test]
    fn host_parser_is_total(bytes in proptest::collection::vec(any::<u8>(), 0..128), min in 0usize..80) {
        let _ = parse_host_packet(&bytes, min);
    }

    #[test]
    fn srb_completion_round_trips(sense in proptest::collection::vec(any::<u8>(), 0..40), dtl: u32, s: u8, q: u8) {
        let c = srb_completion(&VmscsiRequest::default(), 0, s, q, dtl, &sense);
        let srb = c.srb();
        let n = sense.len().min(20);
        prop_assert_eq!(usize::from(srb.sense_info_length), n);
        prop_assert_eq!(&srb.cdb_or_sense[..n], &sense[..n]);
        prop_assert_eq!({ srb.data_transfer_length }, dtl);
        prop_assert_eq!((srb.srb_status, srb.scsi_status), (s, q));
    }
}
