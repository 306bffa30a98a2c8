//! GPADL messages (exact header/body split and bytes, as Linux `create_gpadl_header`), handles,
//! limits, creation and teardown.

use super::*;

const RELID: u32 = 7;

fn pfns(n: u64) -> Vec<u64> {
    // Distinct, non-contiguous values so an order or offset mistake shows.
    (0..n).map(|i| 0x8_0000 + i * 3 + (i << 40)).collect()
}

/// Creates a GPADL of `n` pages and checks every message byte by byte. Returns the handle.
fn check_split(n: usize, header_pfns: usize, bodies: &[usize]) -> u32 {
    let mut c = with_channel(RELID);
    let pf = pfns(n as u64);
    let handle = c.create_gpadl(RELID, &pf).unwrap();
    assert_eq!(handle, LINUX_FIRST_GPADL_HANDLE);
    let p = posts(&mut c);
    assert_eq!(p.len(), 1 + bodies.len(), "{n} pages: message count");
    assert!(p.iter().all(|p| p.connection_id == HOST_MSG_CONN));

    let h = p[0].msg.as_bytes();
    assert_eq!(
        h.len(),
        0x14 + 8 + 8 * header_pfns,
        "{n} pages: header length"
    );
    assert_eq!(u32_at(h, 0x00), 8, "GPADL_HEADER msgtype");
    assert_eq!(u32_at(h, 0x04), 0, "padding");
    assert_eq!(u32_at(h, 0x08), RELID, "relid");
    assert_eq!(u32_at(h, 0x0C), handle, "handle");
    let range_buflen = u16::from_le_bytes([h[0x10], h[0x11]]);
    assert_eq!(usize::from(range_buflen), 8 + 8 * n, "range_buflen");
    assert_eq!(u16::from_le_bytes([h[0x12], h[0x13]]), 1, "rangecount");
    assert_eq!(u32_at(h, 0x14), (n * 4096) as u32, "byte_count");
    assert_eq!(u32_at(h, 0x18), 0, "byte_offset");
    let mut got = Vec::new();
    for i in 0..header_pfns {
        got.push(u64_at(h, 0x1C + 8 * i));
    }
    for (k, (post, want)) in p[1..].iter().zip(bodies).enumerate() {
        let b = post.msg.as_bytes();
        assert_eq!(b.len(), 0x10 + 8 * want, "{n} pages: body {k} length");
        assert_eq!(u32_at(b, 0x00), 9, "GPADL_BODY msgtype");
        assert_eq!(u32_at(b, 0x08), 0, "msgnumber");
        assert_eq!(u32_at(b, 0x0C), handle, "body handle");
        for i in 0..*want {
            got.push(u64_at(b, 0x10 + 8 * i));
        }
    }
    assert_eq!(got, pf, "{n} pages: PFNs in order");
    // The host's parser sees the same thing.
    match ChannelMessage::parse(h).unwrap() {
        ChannelMessage::GpadlHeader { msg, words } => {
            assert_eq!({ msg.range_buflen }, range_buflen);
            assert_eq!(words.len(), 1 + header_pfns);
        }
        other => panic!("not a header: {other:?}"),
    }
    assert_eq!(
        c.gpadl(handle),
        Some(&GpadlRecord {
            handle,
            relid: RELID,
            page_count: n as u32,
            state: GpadlState::Creating
        })
    );
    c.check_invariants().unwrap();
    handle
}

#[test]
fn one_page_is_a_header_only() {
    check_split(1, 1, &[]);
}

#[test]
fn twenty_six_pages_fill_the_header() {
    check_split(26, 26, &[]);
    assert_eq!(GPADL_HEADER_MAX_PFNS, 26);
    assert_eq!(GPADL_BODY_MAX_PFNS, 28);
}

#[test]
fn twenty_seven_pages_need_one_body() {
    check_split(27, 26, &[1]);
}

#[test]
fn fifty_four_pages_fill_one_body() {
    check_split(54, 26, &[28]);
}

#[test]
fn fifty_five_pages_need_two_bodies() {
    check_split(55, 26, &[28, 1]);
}

#[test]
fn sixteen_mib_receive_buffer_is_a_header_and_146_bodies() {
    let mut bodies = alloc::vec![28; 145];
    bodies.push(4096 - 26 - 145 * 28);
    assert_eq!(bodies[145], 10);
    check_split(4096, 26, &bodies);
}

#[test]
fn page_limits() {
    let mut c = with_channel(RELID);
    assert_eq!(
        refused(&mut c, |c| c.create_gpadl(RELID, &[]).map(drop)),
        ClientError::EmptyGpadl { relid: RELID }
    );
    assert_eq!(
        refused(&mut c, |c| c.create_gpadl(RELID, &pfns(8191)).map(drop)),
        ClientError::TooManyPfns {
            relid: RELID,
            count: 8191,
            max: 8190
        }
    );
    let h = c.create_gpadl(RELID, &pfns(8190)).unwrap();
    let p = posts(&mut c);
    assert_eq!(p.len(), 1 + (8190 - 26usize).div_ceil(28));
    let b = p[0].msg.as_bytes();
    assert_eq!(u16::from_le_bytes([b[0x10], b[0x11]]), 65528);
    assert_eq!(u32_at(b, 0x14), 8190 * 4096);
    assert_eq!(c.gpadl(h).unwrap().page_count, 8190);
}

#[test]
fn handles_count_up_and_skip_zero_and_handles_in_use() {
    let mut c = with_channel(RELID);
    let a = c.create_gpadl(RELID, &[1]).unwrap();
    let b = c.create_gpadl(RELID, &[2]).unwrap();
    assert_eq!((a, b), (0xE1E10, 0xE1E11));

    let mut c = Client::new(ClientConfig {
        first_gpadl_handle: u32::MAX,
        ..ClientConfig::default()
    });
    c.connect().unwrap();
    c.handle_message(&version_response(true, 4)).unwrap();
    c.handle_message(&offer(RELID, class::NETWORK, instance(1), 0))
        .unwrap();
    assert_eq!(c.create_gpadl(RELID, &[1]).unwrap(), u32::MAX);
    assert_eq!(c.create_gpadl(RELID, &[1]).unwrap(), 1, "0 is never used");
    // Restore a state whose next handle is in use: it is skipped.
    let mut s = c.save();
    s.next_gpadl_handle = 1;
    let mut c = Client::restore(s).unwrap();
    assert_eq!(c.create_gpadl(RELID, &[1]).unwrap(), 2);
}

#[test]
fn created_then_torn_down() {
    let mut c = with_channel(RELID);
    let h = c.create_gpadl(RELID, &pfns(3)).unwrap();
    posts(&mut c);
    // Teardown before GPADL_CREATED is refused.
    assert_eq!(
        refused(&mut c, |c| c.teardown_gpadl(RELID, h)),
        ClientError::GpadlWrongState {
            msgtype: MessageType::GpadlTeardown,
            handle: h,
            state: GpadlState::Creating
        }
    );
    c.handle_message(&gpadl_created(RELID, h, 0)).unwrap();
    assert_eq!(
        events(&mut c),
        [ClientEvent::GpadlCreated {
            relid: RELID,
            handle: h,
            status: 0
        }]
    );
    assert_eq!(c.gpadl(h).unwrap().state, GpadlState::Created);
    // A second GPADL_CREATED is refused.
    refused(&mut c, |c| c.handle_message(&gpadl_created(RELID, h, 0)));
    // Teardown naming another relid is refused.
    c.handle_message(&offer(8, class::NETWORK, instance(8), 0))
        .unwrap();
    assert_eq!(
        refused(&mut c, |c| c.teardown_gpadl(8, h)),
        ClientError::GpadlRelidMismatch {
            msgtype: MessageType::GpadlTeardown,
            handle: h,
            relid: 8,
            owner: RELID
        }
    );
    c.teardown_gpadl(RELID, h).unwrap();
    let m = one_post(&mut c, HOST_MSG_CONN);
    let mut want = Vec::new();
    want.extend_from_slice(&11u32.to_le_bytes());
    want.extend_from_slice(&0u32.to_le_bytes());
    want.extend_from_slice(&RELID.to_le_bytes());
    want.extend_from_slice(&h.to_le_bytes());
    assert_eq!(m.as_bytes(), &want[..], "GPADL_TEARDOWN bytes");
    assert_eq!(c.gpadl(h).unwrap().state, GpadlState::TearingDown);
    refused(&mut c, |c| c.teardown_gpadl(RELID, h));
    c.handle_message(&gpadl_torndown(h)).unwrap();
    assert_eq!(
        events(&mut c),
        [
            ClientEvent::Offer(OfferInfo::from_wire(
                &offer_msg(8, class::NETWORK, instance(8), 0),
                Version::Win10V5_3
            )),
            ClientEvent::GpadlTorndown { handle: h }
        ]
    );
    assert_eq!(c.gpadl(h), None);
    assert_eq!(
        refused(&mut c, |c| c.handle_message(&gpadl_torndown(h))),
        ClientError::UnknownGpadl {
            msgtype: MessageType::GpadlTorndown,
            handle: h
        }
    );
}

#[test]
fn failed_creation_forgets_the_handle() {
    let mut c = with_channel(RELID);
    let h = c.create_gpadl(RELID, &pfns(2)).unwrap();
    c.handle_message(&gpadl_created(RELID, h, STATUS_UNSUCCESSFUL))
        .unwrap();
    assert_eq!(
        events(&mut c),
        [ClientEvent::GpadlCreated {
            relid: RELID,
            handle: h,
            status: STATUS_UNSUCCESSFUL
        }]
    );
    assert_eq!(c.gpadl(h), None);
    assert_eq!(
        refused(&mut c, |c| c.teardown_gpadl(RELID, h)),
        ClientError::UnknownGpadl {
            msgtype: MessageType::GpadlTeardown,
            handle: h
        }
    );
}

#[test]
fn gpadl_created_must_match_relid_and_handle() {
    let mut c = with_channel(RELID);
    let h = c.create_gpadl(RELID, &pfns(2)).unwrap();
    assert_eq!(
        refused(&mut c, |c| c.handle_message(&gpadl_created(
            RELID + 1,
            h,
            0
        ))),
        ClientError::GpadlRelidMismatch {
            msgtype: MessageType::GpadlCreated,
            handle: h,
            relid: RELID + 1,
            owner: RELID
        }
    );
    assert_eq!(
        refused(&mut c, |c| c.handle_message(&gpadl_created(
            RELID,
            h + 1,
            0
        ))),
        ClientError::UnknownGpadl {
            msgtype: MessageType::GpadlCreated,
            handle: h + 1
        }
    );
    // GPADL_TORNDOWN for a GPADL nobody tears down.
    assert_eq!(
        refused(&mut c, |c| c.handle_message(&gpadl_torndown(h))),
        ClientError::GpadlWrongState {
            msgtype: MessageType::GpadlTorndown,
            handle: h,
            state: GpadlState::Creating
        }
    );
}

#[test]
fn gpadl_needs_a_known_channel_and_a_connection() {
    let mut c = with_channel(RELID);
    assert_eq!(
        refused(&mut c, |c| c.create_gpadl(99, &[1]).map(drop)),
        ClientError::UnknownRelid {
            msgtype: MessageType::GpadlHeader,
            relid: 99
        }
    );
    let mut c = Client::new(ClientConfig::default());
    assert!(matches!(
        refused(&mut c, |c| c.create_gpadl(RELID, &[1]).map(drop)),
        ClientError::WrongState {
            op: "create_gpadl",
            ..
        }
    ));
}
