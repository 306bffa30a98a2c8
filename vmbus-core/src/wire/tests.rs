//! Layout tests against Linux `include/linux/hyperv.h` / reference §3.3, parse and serialize
//! round trips, rejection cases and property tests.

use core::mem::{offset_of, size_of};

use proptest::prelude::*;
use zerocopy::{FromBytes, IntoBytes};

use super::*;

/// Asserts a struct's size and the absolute offset of each named field.
macro_rules! assert_layout {
    ($t:ty, $size:expr, { $($field:ident : $off:expr),* $(,)? }) => {{
        assert_eq!(size_of::<$t>(), $size, "size of {}", stringify!($t));
        $( assert_eq!(offset_of!($t, $field), $off, "{}.{}", stringify!($t), stringify!($field)); )*
    }};
}

#[test]
fn header_layout() {
    assert_layout!(MessageHeader, 8, { msgtype: 0, padding: 4 });
    assert_eq!(HEADER_SIZE, 8);
    assert_eq!(MAX_MESSAGE_SIZE, 240);
}

#[test]
fn offer_layout() {
    // Reference §3.3 OFFERCHANNEL table; Linux struct vmbus_channel_offer_channel (0x08 + offer offsets).
    assert_layout!(OfferChannel, 0xC4, {
        header: 0x00,
        if_type: 0x08,
        if_instance: 0x18,
        reserved1: 0x28,
        reserved2: 0x30,
        chn_flags: 0x38,
        mmio_megabytes: 0x3A,
        user_defined: 0x3C,
        sub_channel_index: 0xB4,
        reserved3: 0xB6,
        child_relid: 0xB8,
        monitor_id: 0xBC,
        monitor_flags: 0xBD,
        interrupt_flags: 0xBE,
        connection_id: 0xC0,
    });
    // Linux's embedded struct vmbus_channel_offer is 0xB0 bytes: 0x08..0xB8.
    assert_eq!(
        offset_of!(OfferChannel, child_relid) - offset_of!(OfferChannel, if_type),
        0xB0
    );
}

#[test]
fn small_message_layouts() {
    assert_layout!(RescindChannelOffer, 0x0C, { child_relid: 0x08 });
    assert_layout!(RequestOffers, 0x08, { header: 0 });
    assert_layout!(AllOffersDelivered, 0x08, { header: 0 });
    assert_layout!(OpenChannel, 0x94, {
        child_relid: 0x08,
        openid: 0x0C,
        ringbuffer_gpadlhandle: 0x10,
        target_vp: 0x14,
        downstream_ringbuffer_pageoffset: 0x18,
        userdata: 0x1C,
    });
    // 6.0 extension at 0x94: connection id 0x94, event flag 0x98, flags 0x9A, total 0x9C.
    assert_layout!(OpenChannelExt, 8, { connection_id: 0, event_flag: 4, flags: 6 });
    assert_eq!(OpenChannel::SIZE + size_of::<OpenChannelExt>(), 0x9C);
    assert_layout!(OpenChannelResult, 0x14, { child_relid: 0x08, openid: 0x0C, status: 0x10 });
    assert_layout!(CloseChannel, 0x0C, { child_relid: 0x08 });
    assert_layout!(GpadlHeader, 0x14, { child_relid: 0x08, gpadl: 0x0C, range_buflen: 0x10, rangecount: 0x12 });
    assert_layout!(GpaRange, 8, { byte_count: 0, byte_offset: 4 });
    assert_layout!(GpadlBody, 0x10, { msgnumber: 0x08, gpadl: 0x0C });
    assert_layout!(GpadlCreated, 0x14, { child_relid: 0x08, gpadl: 0x0C, creation_status: 0x10 });
    assert_layout!(GpadlTeardown, 0x10, { child_relid: 0x08, gpadl: 0x0C });
    assert_layout!(GpadlTorndown, 0x0C, { gpadl: 0x08 });
    assert_layout!(RelidReleased, 0x0C, { child_relid: 0x08 });
    assert_layout!(InitiateContact, 0x28, {
        vmbus_version_requested: 0x08,
        target_vcpu: 0x0C,
        msg_sint: 0x10,
        msg_vtl: 0x11,
        reserved: 0x12,
        feature_flags: 0x14,
        monitor_page1: 0x18,
        monitor_page2: 0x20,
    });
    assert_eq!(
        InitiateContact::SIZE + size_of::<Guid>(),
        0x38,
        "6.0 with client id"
    );
    assert_layout!(VersionResponse, 0x10, {
        version_supported: 0x08,
        connection_state: 0x09,
        padding: 0x0A,
        msg_conn_id: 0x0C,
    });
    // 6.0: supported_features at 0x10 (0x14 bytes); monitor pages: pad 0x14, 0x18, 0x20 (0x28 bytes).
    assert_layout!(ServerMonitorPages, 0x14, {
        padding: 0,
        parent_to_child_monitor_page_gpa: 0x04,
        child_to_parent_monitor_page_gpa: 0x0C,
    });
    assert_eq!(
        VersionResponse::SIZE + 4 + size_of::<ServerMonitorPages>(),
        0x28
    );
    assert_layout!(Unload, 0x08, { header: 0 });
    assert_layout!(UnloadResponse, 0x08, { header: 0 });
    assert_layout!(TlConnectRequest, 0x28, { guest_endpoint_id: 0x08, host_service_id: 0x18 });
    assert_layout!(ModifyChannel, 0x10, { child_relid: 0x08, target_vp: 0x0C });
    assert_layout!(TlConnectResult, 0x2C, { endpoint_id: 0x08, service_id: 0x18, status: 0x28 });
    assert_layout!(ModifyChannelResponse, 0x10, { child_relid: 0x08, status: 0x0C });
    assert_layout!(Guid, 16, { data1: 0, data2: 4, data3: 6, data4: 8 });
}

#[test]
fn field_tables_are_contiguous_and_complete() {
    for t in MessageType::ALL {
        let fields = t.fields();
        let mut end = 0;
        for f in fields {
            assert_eq!(f.offset, end, "{t} field {} starts after a gap", f.name);
            end += f.size;
        }
        assert_eq!(end, t.struct_size(), "{t} fields cover the struct");
        assert!(t.min_len() <= MAX_MESSAGE_SIZE);
        assert!(t.struct_size() <= MAX_MESSAGE_SIZE);
    }
}

#[test]
fn message_type_numbers_and_linux_minimums() {
    let numbers: [(MessageType, u32); 21] = [
        (MessageType::OfferChannel, 1),
        (MessageType::RescindChannelOffer, 2),
        (MessageType::RequestOffers, 3),
        (MessageType::AllOffersDelivered, 4),
        (MessageType::OpenChannel, 5),
        (MessageType::OpenChannelResult, 6),
        (MessageType::CloseChannel, 7),
        (MessageType::GpadlHeader, 8),
        (MessageType::GpadlBody, 9),
        (MessageType::GpadlCreated, 10),
        (MessageType::GpadlTeardown, 11),
        (MessageType::GpadlTorndown, 12),
        (MessageType::RelidReleased, 13),
        (MessageType::InitiateContact, 14),
        (MessageType::VersionResponse, 15),
        (MessageType::Unload, 16),
        (MessageType::UnloadResponse, 17),
        (MessageType::TlConnectRequest, 21),
        (MessageType::ModifyChannel, 22),
        (MessageType::TlConnectResult, 23),
        (MessageType::ModifyChannelResponse, 24),
    ];
    for (t, n) in numbers {
        assert_eq!(t.raw(), n);
        assert_eq!(MessageType::from_raw(n), Some(t));
    }
    for n in [0, 18, 19, 20, 25, 29, u32::MAX] {
        assert_eq!(MessageType::from_raw(n), None);
    }
    // drivers/hv/channel_mgmt.c channel_message_table[].min_payload_len
    let linux = [
        (MessageType::OfferChannel, Some(0xC4)),
        (MessageType::RescindChannelOffer, Some(0x0C)),
        (MessageType::AllOffersDelivered, Some(0)),
        (MessageType::OpenChannelResult, Some(0x14)),
        (MessageType::GpadlCreated, Some(0x14)),
        (MessageType::GpadlTorndown, Some(0x0C)),
        (MessageType::VersionResponse, Some(0x10)),
        (MessageType::UnloadResponse, Some(0)),
        (MessageType::ModifyChannelResponse, Some(0x10)),
        (MessageType::TlConnectResult, None),
        (MessageType::OpenChannel, None),
    ];
    for (t, min) in linux {
        assert_eq!(t.linux_min_payload_len(), min, "{t}");
    }
    assert_eq!(MessageType::AllOffersDelivered.min_len(), 4);
    assert_eq!(MessageType::GpadlHeader.min_len(), 0x14);
    assert_eq!(MessageType::InitiateContact.min_len(), 0x28);
    for t in MessageType::ALL {
        // Linux has a handler (and a minimum) for every host→guest message but TL_CONNECT_RESULT.
        let handled = t.direction() == Direction::HostToGuest && t != MessageType::TlConnectResult;
        assert_eq!(t.linux_min_payload_len().is_some(), handled, "{t}");
    }
    assert_eq!(
        MessageType::ModifyChannelResponse.min_version(),
        Version::Win10V5_3
    );
    assert_eq!(
        MessageType::OpenChannel.to_string(),
        "CHANNELMSG_OPENCHANNEL"
    );
}

fn storvsc_offer() -> OfferChannel {
    let mut o = OfferChannel {
        if_type: class::SCSI,
        if_instance: crate::guid!("12345678-9abc-def0-1234-56789abcdef0"),
        child_relid: 14,
        monitor_id: MONITOR_ID_NONE,
        connection_id: 14 | 0x2000,
        ..Default::default()
    };
    o.set_dedicated_interrupt(true);
    o
}

#[test]
fn offer_bytes_and_round_trip() {
    let msg = ChannelMessage::OfferChannel(storvsc_offer());
    let buf = msg.to_bytes().expect("serialize");
    let b = buf.as_bytes();
    assert_eq!(b.len(), 0xC4);
    assert_eq!(&b[0..8], &[1, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(&b[0x08..0x18], &class::SCSI.to_wire_bytes());
    assert_eq!(&b[0x08..0x0C], &[0xd9, 0x63, 0x61, 0xba]);
    assert_eq!(&b[0xB8..0xBC], &14u32.to_le_bytes());
    assert_eq!(b[0xBC], 0xFF);
    assert_eq!(b[0xBD], 0);
    assert_eq!(&b[0xBE..0xC0], &[1, 0]);
    assert_eq!(&b[0xC0..0xC4], &0x200Eu32.to_le_bytes());
    assert_eq!(ChannelMessage::parse(b), Ok(msg));
    // Offers padded to 240 bytes parse to the same offer.
    let mut padded = [0xAAu8; 240];
    padded[..0xC4].copy_from_slice(b);
    assert_eq!(ChannelMessage::parse(&padded), Ok(msg));
}

#[test]
fn offer_accessors() {
    let mut o = storvsc_offer();
    assert!(
        o.dedicated_interrupt() && !o.monitor_allocated() && !o.is_hvsock() && !o.is_sub_channel()
    );
    o.set_monitor_allocated(true);
    o.monitor_flags |= 0x80;
    o.set_monitor_allocated(false);
    assert_eq!(o.monitor_flags, 0x80, "reserved bits kept");
    o.chn_flags = offer_flags::TLNPI_PROVIDER_OFFER | offer_flags::NAMED_PIPE_MODE;
    o.set_pipe_mode(pipe_type::MESSAGE);
    assert!(o.is_hvsock());
    assert_eq!(o.pipe_mode(), 4);
    assert_eq!(&o.as_bytes()[0x3C..0x40], &[4, 0, 0, 0]);
    o.user_defined[4] = 9;
    assert_eq!(o.pipe_user_defined()[0], 9);
}

/// A Linux-style GPADL_HEADER for a buffer of `pages` pages: one range, offset 0.
fn linux_gpadl_words(pages: u64) -> alloc::vec::Vec<u64> {
    let mut w = alloc::vec![
        GpaRange {
            byte_count: (pages * 4096) as u32,
            byte_offset: 0
        }
        .to_word()
    ];
    w.extend((0..pages).map(|i| 0x10_0000 + i));
    w
}

#[test]
fn gpadl_header_like_linux() {
    let words = linux_gpadl_words(8);
    let msg = ChannelMessage::GpadlHeader {
        msg: GpadlHeader {
            child_relid: 3,
            gpadl: 0xE1E10,
            range_buflen: 8 + 8 * 8,
            rangecount: 1,
            ..Default::default()
        },
        words: GpadlWords::from_u64s(&words),
    };
    let buf = msg.to_bytes().expect("serialize");
    assert_eq!(buf.len(), 0x14 + 9 * 8);
    assert_eq!(&buf[0x14..0x1C], &(8u64 * 4096).to_le_bytes());
    let ChannelMessage::GpadlHeader {
        msg: h,
        words: parsed,
    } = ChannelMessage::parse(&buf).expect("parse")
    else {
        panic!("wrong variant")
    };
    assert_eq!({ h.gpadl }, 0xE1E10);
    assert_eq!(parsed.len(), 9);
    let range = GpaRange::from_word(parsed.get(0).expect("range word"));
    assert_eq!(range.pfn_count(), 8);
    assert_eq!(
        parsed.iter().skip(1).collect::<alloc::vec::Vec<_>>(),
        words[1..]
    );
    assert_eq!(parsed.get(9), None);
}

#[test]
fn gpadl_header_words_clamped_and_padding_ignored() {
    // 2 pages declared (3 words), guest pads the message to 240 bytes.
    let words = linux_gpadl_words(2);
    let mut b = [0x55u8; 240];
    let h = GpadlHeader {
        range_buflen: 24,
        rangecount: 1,
        ..Default::default()
    };
    b[..0x14].copy_from_slice(h.as_bytes());
    b[0x14..0x14 + 24].copy_from_slice(words.as_bytes());
    let ChannelMessage::GpadlHeader { words: w, .. } = ChannelMessage::parse(&b).expect("parse")
    else {
        panic!()
    };
    assert_eq!(w.to_vec(), words);
    // A GPADL longer than one message: all whole words in this one, trailing partial word dropped.
    let h = GpadlHeader {
        range_buflen: 8 + 64 * 8,
        rangecount: 1,
        ..Default::default()
    };
    b[..0x14].copy_from_slice(h.as_bytes());
    let ChannelMessage::GpadlHeader { words: w, .. } = ChannelMessage::parse(&b).expect("parse")
    else {
        panic!()
    };
    assert_eq!(
        w.len(),
        27,
        "(240 - 0x14) / 8 whole words; reference: range header + 26 PFNs"
    );
    // Header without any words (Linux never sends it, but it is structurally complete).
    let ChannelMessage::GpadlHeader { words: w, .. } =
        ChannelMessage::parse(&b[..0x14]).expect("parse")
    else {
        panic!()
    };
    assert!(w.is_empty());
}

#[test]
fn gpadl_body_capacity() {
    let pfns: alloc::vec::Vec<u64> = (0..28).collect();
    let msg = ChannelMessage::GpadlBody {
        msg: GpadlBody {
            gpadl: 7,
            ..Default::default()
        },
        words: GpadlWords::from_u64s(&pfns),
    };
    let buf = msg.to_bytes().expect("28 PFNs fill a body exactly");
    assert_eq!(buf.len(), 240);
    assert_eq!(ChannelMessage::parse(&buf), Ok(msg));
    let pfns: alloc::vec::Vec<u64> = (0..29).collect();
    let msg = ChannelMessage::GpadlBody {
        msg: GpadlBody::default(),
        words: GpadlWords::from_u64s(&pfns),
    };
    assert_eq!(
        msg.to_bytes(),
        Err(WireError::TooManyWords {
            msgtype: MessageType::GpadlBody,
            field: "pfn",
            count: 29,
            needed: 248,
            max: 240
        })
    );
    let words: alloc::vec::Vec<u64> = (0..28).collect();
    let msg = ChannelMessage::GpadlHeader {
        msg: GpadlHeader::default(),
        words: GpadlWords::from_u64s(&words),
    };
    assert!(matches!(
        msg.to_bytes(),
        Err(WireError::TooManyWords {
            count: 28,
            needed: 244,
            ..
        })
    ));
}

#[test]
fn initiate_contact_like_linux() {
    // Linux 5.3 INITIATE_CONTACT: msg_sint 2, vtl 0, both monitor pages.
    let mut m = InitiateContact {
        vmbus_version_requested: Version::Win10V5_3.raw(),
        target_vcpu: 0,
        msg_sint: MESSAGE_SINT,
        monitor_page1: 0x1234_5000,
        monitor_page2: 0x1234_6000,
        ..Default::default()
    };
    let msg = ChannelMessage::InitiateContact {
        msg: m,
        client_id: None,
    };
    let buf = msg.to_bytes().expect("serialize");
    assert_eq!(buf.len(), 0x28);
    assert_eq!(&buf[0x08..0x0C], &0x0005_0003u32.to_le_bytes());
    assert_eq!(buf[0x10], 2);
    assert_eq!(&buf[0x18..0x20], &0x1234_5000u64.to_le_bytes());
    assert_eq!(ChannelMessage::parse(&buf), Ok(msg));
    assert_eq!(m.version(), Some(Version::Win10V5_3));
    // Pre-5.0: the same 8 bytes are the interrupt page.
    m.set_interrupt_page(0x0000_0001_2345_6000);
    assert_eq!(m.interrupt_page(), 0x0000_0001_2345_6000);
    assert_eq!(
        &m.as_bytes()[0x10..0x18],
        &0x0000_0001_2345_6000u64.to_le_bytes()
    );
    assert_eq!({ m.feature_flags }, 1);
    // 6.0 with client id.
    let id = class::NETWORK;
    let msg = ChannelMessage::InitiateContact {
        msg: m,
        client_id: Some(id),
    };
    let buf = msg.to_bytes().expect("serialize");
    assert_eq!(buf.len(), 0x38);
    assert_eq!(&buf[0x28..0x38], &id.to_wire_bytes());
    assert_eq!(ChannelMessage::parse(&buf), Ok(msg));
}

#[test]
fn version_response_variants() {
    let base = VersionResponse {
        version_supported: 1,
        msg_conn_id: MESSAGE_CONNECTION_ID,
        ..Default::default()
    };
    let plain = ChannelMessage::VersionResponse {
        msg: base,
        supported_features: None,
        monitor_pages: None,
    };
    assert_eq!(
        plain.to_bytes().expect("ser").as_bytes(),
        &[15, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0]
    );
    let v2 = ChannelMessage::VersionResponse {
        msg: base,
        supported_features: Some(FeatureFlags::CLIENT_ID),
        monitor_pages: None,
    };
    let b2 = v2.to_bytes().expect("ser");
    assert_eq!(b2.len(), 0x14);
    assert_eq!(ChannelMessage::parse(&b2), Ok(v2));
    let pages = ServerMonitorPages {
        parent_to_child_monitor_page_gpa: 0x321000,
        child_to_parent_monitor_page_gpa: 0x123000,
        ..Default::default()
    };
    let v3 = ChannelMessage::VersionResponse {
        msg: base,
        supported_features: Some(FeatureFlags::SERVER_SPECIFIED_MONITOR_PAGES),
        monitor_pages: Some(pages),
    };
    let b3 = v3.to_bytes().expect("ser");
    assert_eq!(b3.len(), 0x28);
    assert_eq!(&b3[0x18..0x20], &0x321000u64.to_le_bytes());
    assert_eq!(ChannelMessage::parse(&b3), Ok(v3));
    // Pages without features: features written as 0.
    let odd = ChannelMessage::VersionResponse {
        msg: base,
        supported_features: None,
        monitor_pages: Some(pages),
    };
    assert_eq!(odd.encoded_len(), 0x28);
    let ChannelMessage::VersionResponse {
        supported_features, ..
    } = ChannelMessage::parse(&odd.to_bytes().expect("ser")).expect("parse")
    else {
        panic!()
    };
    assert_eq!(supported_features, Some(FeatureFlags::NONE));
}

#[test]
fn header_only_messages_accept_linux_lengths() {
    // Linux min_payload_len 0 for ALLOFFERS_DELIVERED / UNLOAD_RESPONSE: msgtype is enough.
    assert_eq!(
        ChannelMessage::parse(&[4, 0, 0, 0]),
        Ok(ChannelMessage::AllOffersDelivered(
            AllOffersDelivered::default()
        ))
    );
    assert_eq!(
        ChannelMessage::parse(&[17, 0, 0, 0, 0xEE]),
        Ok(ChannelMessage::UnloadResponse(UnloadResponse {
            header: MessageHeader {
                msgtype: 17,
                padding: 0xEE
            }
        }))
    );
    assert!(matches!(
        ChannelMessage::parse(&[16, 0, 0, 0]),
        Err(WireError::Truncated {
            msgtype: MessageType::Unload,
            field: "header",
            len: 4,
            min: 8
        })
    ));
    // Non-zero padding is ignored but kept.
    let m = ChannelMessage::parse(&[3, 0, 0, 0, 9, 9, 9, 9]).expect("parse");
    assert_eq!(m.to_vec().expect("ser"), [3, 0, 0, 0, 9, 9, 9, 9]);
}

#[test]
fn rejects_truncated_oversized_unknown() {
    assert_eq!(
        ChannelMessage::parse(&[]),
        Err(WireError::NoMessageType { len: 0 })
    );
    assert_eq!(
        ChannelMessage::parse(&[1, 0, 0]),
        Err(WireError::NoMessageType { len: 3 })
    );
    for t in [0u32, 18, 19, 20, 25, 26, 29, 0x8000_0010, u32::MAX] {
        let mut b = [0u8; 0xC4];
        b[..4].copy_from_slice(&t.to_le_bytes());
        assert_eq!(
            ChannelMessage::parse(&b),
            Err(WireError::UnknownMessageType { msgtype: t })
        );
    }
    let mut big = [0u8; 241];
    big[0] = 3;
    assert_eq!(
        ChannelMessage::parse(&big),
        Err(WireError::TooLong { len: 241, max: 240 })
    );
    let mut b = [0u8; 0xC4];
    b[0] = 1;
    assert_eq!(
        ChannelMessage::parse(&b[..0xC3]),
        Err(WireError::Truncated {
            msgtype: MessageType::OfferChannel,
            field: "connection_id",
            len: 0xC3,
            min: 0xC4
        })
    );
    b[0] = 5;
    let err = ChannelMessage::parse(&b[..0x40]).expect_err("short open");
    assert_eq!(
        err,
        WireError::Truncated {
            msgtype: MessageType::OpenChannel,
            field: "userdata",
            len: 0x40,
            min: 0x94
        }
    );
    assert_eq!(
        err.to_string(),
        "CHANNELMSG_OPENCHANNEL truncated at field `userdata`: 64 bytes, need at least 148"
    );
    b[0] = 15;
    assert!(matches!(
        ChannelMessage::parse(&b[..0x0F]),
        Err(WireError::Truncated {
            field: "msg_conn_id",
            min: 0x10,
            ..
        })
    ));
    // Every type: one byte short of its minimum is rejected, the minimum is accepted.
    for t in MessageType::ALL {
        let mut b = [0u8; 240];
        b[..4].copy_from_slice(&t.raw().to_le_bytes());
        let min = t.min_len();
        assert!(ChannelMessage::parse(&b[..min]).is_ok(), "{t} at min");
        assert!(
            matches!(
                ChannelMessage::parse(&b[..min - 1]),
                Err(WireError::Truncated { .. } | WireError::NoMessageType { .. })
            ),
            "{t}"
        );
        assert!(ChannelMessage::parse(&b).is_ok(), "{t} padded to 240");
    }
}

#[test]
fn write_to_small_buffer() {
    let msg = ChannelMessage::CloseChannel(CloseChannel {
        child_relid: 5,
        ..Default::default()
    });
    let mut out = [0u8; 11];
    assert_eq!(
        msg.write_to(&mut out),
        Err(WireError::BufferTooSmall {
            msgtype: MessageType::CloseChannel,
            need: 12,
            have: 11
        })
    );
    let mut out = [0u8; 12];
    assert_eq!(msg.write_to(&mut out), Ok(12));
    assert_eq!(out, [7, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0]);
}

#[test]
fn serializer_writes_variant_msgtype() {
    // A struct whose header names another type is still written as its variant's type.
    let mut m = RelidReleased {
        child_relid: 9,
        ..Default::default()
    };
    m.header.msgtype = 99;
    let b = ChannelMessage::RelidReleased(m).to_bytes().expect("ser");
    assert_eq!(&b[..4], &13u32.to_le_bytes());
}

/// Builds a message of type `t` from random bytes: fixed structs read from `bytes` (msgtype
/// forced), GPADL words from `words`, optional tails chosen by `tails`.
fn build<'a>(
    t: MessageType,
    bytes: &[u8; 240],
    words: &'a [u64],
    tails: u8,
    buflen: u16,
) -> ChannelMessage<'a> {
    fn fixed<T: WireMessage>(bytes: &[u8; 240]) -> T {
        let mut b = *bytes;
        b[..4].copy_from_slice(&T::TYPE.raw().to_le_bytes());
        T::read_from_prefix(&b)
            .expect("240 bytes hold any struct")
            .0
    }
    let guid = Guid::read_from_prefix(&bytes[200..]).expect("16 bytes").0;
    let ext = OpenChannelExt::read_from_prefix(&bytes[216..])
        .expect("8 bytes")
        .0;
    let pages = ServerMonitorPages::read_from_prefix(&bytes[220..])
        .expect("20 bytes")
        .0;
    let some = |bit: u8| tails & (1 << bit) != 0;
    match t {
        MessageType::OfferChannel => ChannelMessage::OfferChannel(fixed(bytes)),
        MessageType::RescindChannelOffer => ChannelMessage::RescindChannelOffer(fixed(bytes)),
        MessageType::RequestOffers => ChannelMessage::RequestOffers(fixed(bytes)),
        MessageType::AllOffersDelivered => ChannelMessage::AllOffersDelivered(fixed(bytes)),
        MessageType::OpenChannel => ChannelMessage::OpenChannel {
            msg: fixed(bytes),
            ext: some(0).then_some(ext),
        },
        MessageType::OpenChannelResult => ChannelMessage::OpenChannelResult(fixed(bytes)),
        MessageType::CloseChannel => ChannelMessage::CloseChannel(fixed(bytes)),
        MessageType::GpadlHeader => {
            let mut msg: GpadlHeader = fixed(bytes);
            msg.range_buflen = buflen.max((words.len() * 8) as u16);
            ChannelMessage::GpadlHeader {
                msg,
                words: GpadlWords::from_u64s(words),
            }
        }
        MessageType::GpadlBody => ChannelMessage::GpadlBody {
            msg: fixed(bytes),
            words: GpadlWords::from_u64s(words),
        },
        MessageType::GpadlCreated => ChannelMessage::GpadlCreated(fixed(bytes)),
        MessageType::GpadlTeardown => ChannelMessage::GpadlTeardown(fixed(bytes)),
        MessageType::GpadlTorndown => ChannelMessage::GpadlTorndown(fixed(bytes)),
        MessageType::RelidReleased => ChannelMessage::RelidReleased(fixed(bytes)),
        MessageType::InitiateContact => ChannelMessage::InitiateContact {
            msg: fixed(bytes),
            client_id: some(1).then_some(guid),
        },
        MessageType::VersionResponse => {
            let features =
                FeatureFlags(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]));
            let with_pages = some(3);
            ChannelMessage::VersionResponse {
                msg: fixed(bytes),
                supported_features: (some(2) || with_pages).then_some(features),
                monitor_pages: with_pages.then_some(pages),
            }
        }
        MessageType::Unload => ChannelMessage::Unload(fixed(bytes)),
        MessageType::UnloadResponse => ChannelMessage::UnloadResponse(fixed(bytes)),
        MessageType::TlConnectRequest => ChannelMessage::TlConnectRequest {
            msg: fixed(bytes),
            silo_id: some(4).then_some(guid),
        },
        MessageType::ModifyChannel => ChannelMessage::ModifyChannel(fixed(bytes)),
        MessageType::TlConnectResult => ChannelMessage::TlConnectResult(fixed(bytes)),
        MessageType::ModifyChannelResponse => ChannelMessage::ModifyChannelResponse(fixed(bytes)),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    /// Arbitrary bytes never panic; whatever parses re-serializes to the same bytes (a prefix of
    /// the input: trailing padding is dropped) and parses back to the same message.
    #[test]
    fn parse_is_total_and_canonical(bytes in proptest::collection::vec(any::<u8>(), 0..=256)) {
        if let Ok(m) = ChannelMessage::parse(&bytes) {
            prop_assert!(bytes.len() <= MAX_MESSAGE_SIZE);
            let out = m.to_bytes().expect("a parsed message always serializes");
            if out.len() <= bytes.len() {
                prop_assert_eq!(out.as_bytes(), &bytes[..out.len()]);
            }
            prop_assert_eq!(ChannelMessage::parse(&out), Ok(m));
        }
    }

    /// Same, biased towards known types and plausible lengths.
    #[test]
    fn parse_known_types(idx in 0usize..21, len in 0usize..=256, fill in any::<[u8; 32]>()) {
        let t = MessageType::ALL[idx];
        let mut bytes = alloc::vec::Vec::with_capacity(len);
        bytes.extend((0..len).map(|i| fill[i % 32]));
        if len >= 4 {
            bytes[..4].copy_from_slice(&t.raw().to_le_bytes());
        }
        match ChannelMessage::parse(&bytes) {
            Ok(m) => {
                prop_assert!(len >= t.min_len() && len <= MAX_MESSAGE_SIZE);
                prop_assert_eq!(m.msgtype(), t);
                let out = m.to_bytes().expect("serialize");
                prop_assert_eq!(ChannelMessage::parse(&out), Ok(m));
            }
            Err(WireError::TooLong { .. }) => prop_assert!(len > MAX_MESSAGE_SIZE),
            Err(WireError::NoMessageType { .. }) => prop_assert!(len < 4),
            Err(WireError::Truncated { min, .. }) => prop_assert!(len < min),
            Err(e) => prop_assert!(false, "unexpected {e:?}"),
        }
    }

    /// Generated messages survive serialize → parse unchanged.
    #[test]
    fn generated_messages_round_trip(
        idx in 0usize..21,
        bytes in any::<[u8; 240]>(),
        words in proptest::collection::vec(any::<u64>(), 0..=30),
        tails in any::<u8>(),
        buflen in any::<u16>(),
    ) {
        let t = MessageType::ALL[idx];
        let m = build(t, &bytes, &words, tails, buflen);
        match m.to_bytes() {
            Ok(out) => {
                prop_assert_eq!(out.len(), m.encoded_len());
                prop_assert_eq!(ChannelMessage::parse(&out), Ok(m));
            }
            Err(WireError::TooManyWords { .. }) => {
                prop_assert!(matches!(t, MessageType::GpadlHeader | MessageType::GpadlBody));
                prop_assert!(m.encoded_len() > MAX_MESSAGE_SIZE);
            }
            Err(e) => prop_assert!(false, "unexpected {e:?}"),
        }
    }
}
