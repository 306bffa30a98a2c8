#![allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use super::*;
use core::mem::offset_of;
use proptest::prelude::*;

#[test]
fn sizes_and_offsets_match_linux() {
    // Body sizes (hyperv_net.h, all __packed); offsets below count from the message start, as
    // in reference §3.2 (body offset + 4).
    assert_eq!(size_of::<MessageHeader>(), 4);
    assert_eq!(size_of::<Init>(), 8);
    assert_eq!(size_of::<InitComplete>(), 12);
    assert_eq!(4 + offset_of!(InitComplete, max_mdl_chain_length), 8);
    assert_eq!(4 + offset_of!(InitComplete, status), 12);
    assert_eq!(size_of::<SendNdisVersion>(), 8);
    assert_eq!(size_of::<SendBuffer>(), 6);
    assert_eq!(4 + offset_of!(SendBuffer, id), 8);
    assert_eq!(size_of::<ReceiveBufferSection>(), 16);
    assert_eq!(size_of::<SendReceiveBufferComplete>(), 24);
    assert_eq!(4 + offset_of!(SendReceiveBufferComplete, num_sections), 8);
    assert_eq!(4 + offset_of!(SendReceiveBufferComplete, section), 12);
    assert_eq!(size_of::<RevokeBuffer>(), 2);
    assert_eq!(size_of::<SendSendBufferComplete>(), 8);
    assert_eq!(size_of::<SendRndisPacket>(), 12);
    assert_eq!(
        4 + offset_of!(SendRndisPacket, send_buffer_section_index),
        8
    );
    assert_eq!(
        4 + offset_of!(SendRndisPacket, send_buffer_section_size),
        12
    );
    assert_eq!(size_of::<SendRndisPacketComplete>(), 4);
    assert_eq!(size_of::<SendNdisConfig>(), 16);
    assert_eq!(4 + offset_of!(SendNdisConfig, capabilities), 12);
    assert_eq!(size_of::<SendVfAssociation>(), 8);
    assert_eq!(size_of::<SwitchDataPath>(), 4);
    assert_eq!(size_of::<SubchannelRequest>(), 8);
    assert_eq!(size_of::<SubchannelComplete>(), 8);
    assert_eq!(size_of::<SendIndirectionTable>(), 8);
    // The largest v1..v5 body is SEND_RECV_BUF_COMPLETE: 4 + 24 = 28; v6 adds the PD union (36).
    assert_eq!(4 + size_of::<SendReceiveBufferComplete>(), MESSAGE_SIZE_V1);
    assert_eq!(message_size(version::V6), 28);
    assert_eq!(message_size(version::V61), 40);
    assert_eq!(message_size(version::V1), 28);
}

#[test]
fn versions_and_types_match_the_reference() {
    assert_eq!(
        version::ALL,
        [0x2, 0x30002, 0x40000, 0x50000, 0x60000, 0x60001]
    );
    assert_eq!(msg_type::SEND_NDIS_CONFIG, 125);
    assert_eq!(msg_type::SEND_VF_ASSOCIATION, 128);
    assert_eq!(msg_type::SUBCHANNEL, 133);
    assert_eq!(msg_type::SEND_INDIRECTION_TABLE, 134);
    assert_eq!(
        capability::IEEE8021Q | capability::SRIOV | capability::TEAMING | capability::RSC,
        0xAC
    );
    assert_eq!(min_version(msg_type::SEND_NDIS_CONFIG), Some(version::V2));
    assert_eq!(min_version(msg_type::SUBCHANNEL), Some(version::V5));
    assert_eq!(min_version(115), None);
    assert!(check_version(msg_type::SUBCHANNEL, version::V4).is_err());
    assert!(check_version(msg_type::SUBCHANNEL, version::V61).is_ok());
    assert_eq!(
        check_version(120, version::V61),
        Err(NvspError::Unsupported(120))
    );
}

#[test]
fn linux_messages_parse() {
    // INIT v6.1 as Linux sends it: 40 bytes, min = max.
    let mut m = [0u8; 40];
    m[0] = 1;
    m[4..8].copy_from_slice(&0x60001u32.to_le_bytes());
    m[8..12].copy_from_slice(&0x60001u32.to_le_bytes());
    let p = NvspMessage::parse(&m, Direction::GuestToHost).unwrap();
    assert_eq!(
        p,
        NvspMessage::Init(Init {
            min_protocol_version: 0x60001,
            max_protocol_version: 0x60001
        })
    );
    // SEND_RECV_BUF with gpadl 0x1234 and id 0xCAFE.
    let mut m = [0u8; 40];
    m[0] = 101;
    m[4..8].copy_from_slice(&0x1234u32.to_le_bytes());
    m[8..10].copy_from_slice(&0xCAFEu16.to_le_bytes());
    assert_eq!(
        NvspMessage::parse(&m, Direction::GuestToHost).unwrap(),
        NvspMessage::SendReceiveBuffer(SendBuffer {
            gpadl_handle: 0x1234,
            id: 0xCAFE
        })
    );
    // The same type in the wrong direction is refused.
    assert!(matches!(
        NvspMessage::parse(&m, Direction::HostToGuest),
        Err(NvspError::WrongDirection { msg_type: 101, .. })
    ));
    // Truncated body.
    assert_eq!(
        NvspMessage::parse(&m[..9], Direction::GuestToHost),
        Err(NvspError::TooShort {
            msg_type: 101,
            needed: 10,
            len: 9
        })
    );
    assert_eq!(
        NvspMessage::parse(&m[..3], Direction::GuestToHost),
        Err(NvspError::NoHeader { len: 3 })
    );
    m[0] = 116; // SEND_CHIMNEY_PKT
    assert_eq!(
        NvspMessage::parse(&m, Direction::GuestToHost),
        Err(NvspError::Unsupported(116))
    );
    m[0] = 99;
    assert_eq!(
        NvspMessage::parse(&m, Direction::GuestToHost),
        Err(NvspError::UnknownType(99))
    );
}

#[test]
fn replies_serialize_byte_exact() {
    let m = NvspMessage::SendReceiveBufferComplete(SendReceiveBufferComplete {
        status: status::SUCCESS,
        num_sections: 1,
        section: ReceiveBufferSection {
            offset: 0,
            sub_allocation_size: 1806,
            num_sub_allocations: 9289,
            end_offset: 1806 * 9289,
        },
    })
    .to_bytes(MESSAGE_SIZE_V61);
    let mut want = [0u8; 40];
    for (i, v) in [102u32, 1, 1, 0, 1806, 9289, 1806 * 9289]
        .iter()
        .enumerate()
    {
        want[i * 4..i * 4 + 4].copy_from_slice(&v.to_le_bytes());
    }
    assert_eq!(m, want);
    let t = indirection_table_message(&core::array::from_fn(|i| (i % 3) as u32));
    assert_eq!(t.len(), 76);
    assert_eq!(&t[..12], &[134, 0, 0, 0, 16, 0, 0, 0, 12, 0, 0, 0]);
    let back = indirection_table(&t, version::V61).unwrap();
    assert_eq!(back[5], 2);
    // Linux's v<=6 fix-up only applies to messages of >= 104 bytes; ours is 76.
    assert_eq!(indirection_table(&t, version::V5).unwrap(), back);
    let mut long = t.clone();
    long.resize(104, 0);
    long[40..44].copy_from_slice(&7u32.to_le_bytes());
    assert_eq!(indirection_table(&long, version::V6).unwrap()[0], 7);
    assert!(indirection_table(&t[..70], version::V61).is_err());
}

proptest! {
    #[test]
    fn parse_is_total(bytes in proptest::collection::vec(any::<u8>(), 0..64), g2h in any::<bool>()) {
        let dir = if g2h { Direction::GuestToHost } else { Direction::HostToGuest };
        let _ = indirection_table(&bytes, version::V5);
        if let Ok(m) = NvspMessage::parse(&bytes, dir) {
            // What parses re-serializes to the same leading bytes and parses back equal.
            let out = m.to_bytes(0);
            prop_assert_eq!(&bytes[..out.len()], &out[..]);
            prop_assert_eq!(NvspMessage::parse(&out, dir), Ok(m));
        }
    }

    #[test]
    fn parse_of_known_types_roundtrips(ty in prop::sample::select(vec![1u32, 2, 100, 101, 102, 103, 104, 105, 106, 107, 108, 125, 128, 129, 133, 134]),
                                       body in proptest::collection::vec(any::<u8>(), 36)) {
        let mut bytes = ty.to_le_bytes().to_vec();
        bytes.extend_from_slice(&body);
        for dir in [Direction::GuestToHost, Direction::HostToGuest] {
            if let Ok(m) = NvspMessage::parse(&bytes, dir) {
                prop_assert_eq!(m.msg_type(), ty);
                let out = m.to_bytes(40);
                prop_assert_eq!(out.len(), 40);
                prop_assert_eq!(NvspMessage::parse(&out, dir), Ok(m));
            }
        }
    }
}
