//! Offers, sub-channels, open/close, rescind, MODIFYCHANNEL, unload and reconnect,
//! save/restore.

use super::*;

fn offer_event(relid: u32, class: Guid, inst: Guid, index: u16) -> ClientEvent {
    ClientEvent::Offer(OfferInfo::from_wire(
        &offer_msg(relid, class, inst, index),
        Version::Win10V5_3,
    ))
}

#[test]
fn offers_then_all_offers_delivered() {
    let mut c = connected(Version::Win10V5_3);
    c.request_offers().unwrap();
    let m = one_post(&mut c, HOST_MSG_CONN);
    assert_eq!(m.as_bytes(), &[3, 0, 0, 0, 0, 0, 0, 0], "REQUESTOFFERS");
    let mut o = offer_msg(1, class::HEARTBEAT, instance(1), 0);
    o.monitor_id = 5;
    o.set_monitor_allocated(true);
    o.chn_flags = offer_flags::NAMED_PIPE_MODE;
    o.set_pipe_mode(pipe_type::MESSAGE);
    o.mmio_megabytes = 3;
    c.handle_message(&host(ChannelMessage::OfferChannel(o)))
        .unwrap();
    c.handle_message(&offer(2, class::SCSI, instance(2), 0))
        .unwrap();
    c.handle_message(&all_offers()).unwrap();
    let ev = events(&mut c);
    assert_eq!(ev.len(), 3);
    let ClientEvent::Offer(info) = ev[0] else {
        panic!("{ev:?}")
    };
    assert_eq!(info.relid, 1);
    assert_eq!(info.class_id, class::HEARTBEAT);
    assert_eq!(info.instance_id, instance(1));
    assert_eq!(info.connection_id, 1 | 0x2000);
    assert_eq!((info.monitor_id, info.monitor_allocated), (5, true));
    assert!(info.dedicated_interrupt);
    assert_eq!(info.pipe_mode(), Some(pipe_type::MESSAGE));
    assert_eq!(info.mmio_megabytes, 3);
    assert!(!info.is_hvsock() && !info.is_subchannel());
    assert_eq!(ev[1], offer_event(2, class::SCSI, instance(2), 0));
    assert_eq!(ev[2], ClientEvent::AllOffersDelivered);
    let relids: Vec<u32> = c.offers().map(|o| o.relid).collect();
    assert_eq!(relids, [1, 2]);
    assert_eq!(c.channel_state(2), Some(ChannelState::Offered));
    assert_eq!(c.offer(2).unwrap().pipe_mode(), None);
}

#[test]
fn subchannels_attach_to_their_primary_and_duplicate_primaries_are_dropped() {
    let mut c = with_channel(10);
    // Sub-channels: same class + instance, index ≥ 1.
    c.handle_message(&offer(11, class::SCSI, instance(10), 1))
        .unwrap();
    c.handle_message(&offer(12, class::SCSI, instance(10), 2))
        .unwrap();
    assert_eq!(c.primary_of(11), Some(10));
    assert_eq!(c.primary_of(12), Some(10));
    assert_eq!(c.primary_of(10), None);
    assert_eq!(c.subchannels(10).collect::<Vec<_>>(), [11, 12]);
    // Same instance, other class: not a sub-channel of 10 (Linux matches both GUIDs).
    c.handle_message(&offer(13, class::NETWORK, instance(10), 1))
        .unwrap();
    assert_eq!(c.primary_of(13), None);
    // A second primary with a known instance GUID is dropped; its relid stays unknown.
    assert_eq!(
        refused(&mut c, |c| c.handle_message(&offer(
            14,
            class::SCSI,
            instance(10),
            0
        ))),
        ClientError::DuplicateOffer {
            msgtype: MessageType::OfferChannel,
            relid: 14,
            existing: 10,
            instance: instance(10)
        }
    );
    assert_eq!(c.channel_state(14), None);
    assert_eq!(events(&mut c).len(), 3);
}

#[test]
fn open_and_close_exact_bytes() {
    let mut c = with_channel(3);
    let h = created_gpadl(&mut c, 3, 16);
    let mut params = OpenParams::new(h, 8, 2);
    params.user_data[0] = 0xAB;
    params.user_data[119] = 0xCD;
    c.open_channel(3, params).unwrap();
    assert_eq!(c.channel_state(3), Some(ChannelState::Opening));
    let m = one_post(&mut c, HOST_MSG_CONN);
    let b = m.as_bytes();
    assert_eq!(b.len(), 0x94);
    assert_eq!(u32_at(b, 0x00), 5, "OPENCHANNEL");
    assert_eq!(u32_at(b, 0x08), 3, "relid");
    assert_eq!(u32_at(b, 0x0C), 3, "openid = relid");
    assert_eq!(u32_at(b, 0x10), h, "ring GPADL");
    assert_eq!(u32_at(b, 0x14), 2, "target VP");
    assert_eq!(u32_at(b, 0x18), 8, "downstream offset");
    assert_eq!(&b[0x1C..0x94], &params.user_data[..]);
    // Open twice is refused while opening; the ring GPADL cannot be torn down.
    refused(&mut c, |c| c.open_channel(3, params));
    assert_eq!(
        refused(&mut c, |c| c.teardown_gpadl(3, h)),
        ClientError::GpadlInUse {
            handle: h,
            relid: 3
        }
    );
    // A result with another openid is refused.
    assert_eq!(
        refused(&mut c, |c| c.handle_message(&open_result(3, 4, 0))),
        ClientError::OpenIdMismatch {
            msgtype: MessageType::OpenChannelResult,
            relid: 3,
            openid: 4
        }
    );
    c.handle_message(&open_result(3, 3, 0)).unwrap();
    assert_eq!(
        events(&mut c),
        [ClientEvent::OpenResult {
            relid: 3,
            status: 0
        }]
    );
    assert_eq!(c.channel_state(3), Some(ChannelState::Open));
    assert_eq!(c.channel(3).unwrap().ring_gpadl, Some(h));
    refused(&mut c, |c| c.handle_message(&open_result(3, 3, 0)));

    c.close_channel(3).unwrap();
    let m = one_post(&mut c, HOST_MSG_CONN);
    assert_eq!(
        m.as_bytes(),
        &[7, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0],
        "CLOSECHANNEL"
    );
    assert_eq!(c.channel_state(3), Some(ChannelState::Closed));
    refused(&mut c, |c| c.close_channel(3));
    // Linux tears the ring GPADL down after the close; then the channel can be opened again.
    c.teardown_gpadl(3, h).unwrap();
    posts(&mut c);
    c.handle_message(&gpadl_torndown(h)).unwrap();
    let h2 = created_gpadl(&mut c, 3, 4);
    c.open_channel(3, OpenParams::new(h2, 2, 0)).unwrap();
    assert_eq!(c.channel_state(3), Some(ChannelState::Opening));
    c.check_invariants().unwrap();
}

#[test]
fn open_is_validated() {
    let mut c = with_channel(3);
    c.handle_message(&offer(4, class::NETWORK, instance(4), 0))
        .unwrap();
    let h = created_gpadl(&mut c, 3, 4);
    let h4 = created_gpadl(&mut c, 4, 4);
    let pending = c.create_gpadl(3, &[1, 2]).unwrap();
    posts(&mut c);
    assert_eq!(
        refused(&mut c, |c| c.open_channel(9, OpenParams::new(h, 2, 0))),
        ClientError::UnknownRelid {
            msgtype: MessageType::OpenChannel,
            relid: 9
        }
    );
    assert!(matches!(
        refused(&mut c, |c| c.open_channel(3, OpenParams::new(h4, 2, 0))),
        ClientError::GpadlRelidMismatch { .. }
    ));
    assert!(matches!(
        refused(&mut c, |c| c
            .open_channel(3, OpenParams::new(pending, 1, 0))),
        ClientError::GpadlWrongState { .. }
    ));
    assert!(matches!(
        refused(&mut c, |c| c.open_channel(3, OpenParams::new(0x5555, 1, 0))),
        ClientError::UnknownGpadl { .. }
    ));
    for off in [0, 4, 100] {
        assert_eq!(
            refused(&mut c, |c| c.open_channel(3, OpenParams::new(h, off, 0))),
            ClientError::BadRingOffset {
                relid: 3,
                offset: off,
                pages: 4
            }
        );
    }
}

#[test]
fn failed_open_returns_to_offered() {
    let mut c = with_channel(3);
    let h = created_gpadl(&mut c, 3, 4);
    c.open_channel(3, OpenParams::new(h, 2, 0)).unwrap();
    c.handle_message(&open_result(3, 3, STATUS_UNSUCCESSFUL))
        .unwrap();
    assert_eq!(
        events(&mut c),
        [ClientEvent::OpenResult {
            relid: 3,
            status: STATUS_UNSUCCESSFUL
        }]
    );
    assert_eq!(c.channel_state(3), Some(ChannelState::Offered));
    assert_eq!(c.channel(3).unwrap().ring_gpadl, None);
    // The ring GPADL is free again (Linux tears it down on the error path).
    posts(&mut c);
    c.teardown_gpadl(3, h).unwrap();
}

#[test]
fn rescind_while_open_then_close_and_release() {
    let (mut c, h) = with_open_channel(5);
    let other = created_gpadl(&mut c, 5, 2);
    c.handle_message(&rescind(5)).unwrap();
    assert_eq!(events(&mut c), [ClientEvent::Rescinded { relid: 5 }]);
    assert_eq!(c.channel_state(5), Some(ChannelState::RescindedOpen));
    // A second rescind is refused; new GPADLs and opens are refused.
    refused(&mut c, |c| c.handle_message(&rescind(5)));
    refused(&mut c, |c| c.create_gpadl(5, &[1]).map(drop));
    // Release needs the close first.
    assert_eq!(
        refused(&mut c, |c| c.release_relid(5)),
        ClientError::ChannelWrongState {
            msgtype: MessageType::RelidReleased,
            relid: 5,
            state: ChannelState::RescindedOpen
        }
    );
    // Linux still sends CLOSECHANNEL for an open rescinded channel.
    c.close_channel(5).unwrap();
    let m = one_post(&mut c, HOST_MSG_CONN);
    assert_eq!(u32_at(&m, 0), 7);
    assert_eq!(c.channel_state(5), Some(ChannelState::Rescinded));
    // GPADL teardown on a rescinded channel sends nothing and completes at once.
    c.teardown_gpadl(5, h).unwrap();
    assert!(posts(&mut c).is_empty());
    assert_eq!(events(&mut c), [ClientEvent::GpadlTorndown { handle: h }]);
    assert_eq!(c.gpadl(h), None);
    // Release: RELID_RELEASED, the channel and its remaining GPADL are gone.
    c.release_relid(5).unwrap();
    let m = one_post(&mut c, HOST_MSG_CONN);
    assert_eq!(m.as_bytes(), &[13, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0]);
    assert_eq!(c.channel_state(5), None);
    assert_eq!(c.gpadl(other), None);
    // The host may now reuse the relid.
    c.handle_message(&offer(5, class::SCSI, instance(55), 0))
        .unwrap();
    c.check_invariants().unwrap();
}

#[test]
fn rescind_fails_pending_open_gpadl_and_modify() {
    let mut c = with_channel(6);
    let ring = created_gpadl(&mut c, 6, 4);
    let creating = c.create_gpadl(6, &[1]).unwrap();
    let tearing = created_gpadl(&mut c, 6, 1);
    c.teardown_gpadl(6, tearing).unwrap();
    c.open_channel(6, OpenParams::new(ring, 2, 0)).unwrap();
    posts(&mut c);
    c.handle_message(&rescind(6)).unwrap();
    assert_eq!(
        events(&mut c),
        [
            ClientEvent::OpenResult {
                relid: 6,
                status: STATUS_CHANNEL_RESCINDED
            },
            ClientEvent::GpadlCreated {
                relid: 6,
                handle: creating,
                status: STATUS_CHANNEL_RESCINDED
            },
            ClientEvent::GpadlTorndown { handle: tearing },
            ClientEvent::Rescinded { relid: 6 },
        ]
    );
    assert_eq!(c.channel_state(6), Some(ChannelState::Rescinded));
    // Late replies for the abandoned operations are refused.
    refused(&mut c, |c| c.handle_message(&open_result(6, 6, 0)));
    refused(&mut c, |c| c.handle_message(&gpadl_created(6, creating, 0)));
    refused(&mut c, |c| c.handle_message(&gpadl_torndown(tearing)));
    // The never-opened rescinded channel can be released directly (after a local teardown).
    c.teardown_gpadl(6, ring).unwrap();
    c.release_relid(6).unwrap();
    assert!(posts(&mut c).iter().all(|p| u32_at(&p.msg, 0) == 13));
}

#[test]
fn release_of_a_primary_orphans_its_subchannels() {
    let mut c = with_channel(20);
    c.handle_message(&offer(21, class::SCSI, instance(20), 1))
        .unwrap();
    c.handle_message(&rescind(20)).unwrap();
    c.release_relid(20).unwrap();
    assert_eq!(c.primary_of(21), None);
    assert_eq!(c.channel_state(21), Some(ChannelState::Offered));
    c.check_invariants().unwrap();
    // Releasing a channel that was not rescinded is refused.
    refused(&mut c, |c| c.release_relid(21));
}

#[test]
fn modify_channel_waits_for_the_response_from_5_3() {
    let (mut c, _) = with_open_channel(2);
    c.modify_channel(2, 7).unwrap();
    let m = one_post(&mut c, HOST_MSG_CONN);
    assert_eq!(
        m.as_bytes(),
        &[22, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 7, 0, 0, 0]
    );
    assert!(events(&mut c).is_empty());
    refused(&mut c, |c| c.modify_channel(2, 8));
    c.handle_message(&modify_response(2, 0)).unwrap();
    assert_eq!(
        events(&mut c),
        [ClientEvent::ModifyResult {
            relid: 2,
            status: 0
        }]
    );
    assert_eq!(c.channel(2).unwrap().target_vp, Some(7));
    assert!(matches!(
        refused(&mut c, |c| c.handle_message(&modify_response(2, 0))),
        ClientError::ModifyMismatch { .. }
    ));
    // A failed modify keeps the old VP; a rescind fails a pending one.
    c.modify_channel(2, 9).unwrap();
    c.handle_message(&modify_response(2, 1)).unwrap();
    assert_eq!(c.channel(2).unwrap().target_vp, Some(7));
    c.modify_channel(2, 9).unwrap();
    events(&mut c);
    c.handle_message(&rescind(2)).unwrap();
    assert_eq!(
        events(&mut c),
        [
            ClientEvent::ModifyResult {
                relid: 2,
                status: STATUS_CHANNEL_RESCINDED
            },
            ClientEvent::Rescinded { relid: 2 }
        ]
    );
}

#[test]
fn modify_channel_below_5_3_has_no_response_and_needs_4_1() {
    let mut c = connected(Version::Win10V4_1);
    c.handle_message(&offer(2, class::SCSI, instance(2), 0))
        .unwrap();
    let h = created_gpadl(&mut c, 2, 4);
    // Not open yet: refused.
    refused(&mut c, |c| c.modify_channel(2, 1));
    c.open_channel(2, OpenParams::new(h, 2, 0)).unwrap();
    c.handle_message(&open_result(2, 2, 0)).unwrap();
    posts(&mut c);
    events(&mut c);
    c.modify_channel(2, 1).unwrap();
    one_post(&mut c, 1);
    assert_eq!(
        events(&mut c),
        [ClientEvent::ModifyResult {
            relid: 2,
            status: 0
        }]
    );
    assert_eq!(c.channel(2).unwrap().target_vp, Some(1));
    refused(&mut c, |c| c.handle_message(&modify_response(2, 0)));

    let mut c = connected(Version::Win10);
    c.handle_message(&offer(2, class::SCSI, instance(2), 0))
        .unwrap();
    assert_eq!(
        refused(&mut c, |c| c.modify_channel(2, 1)),
        ClientError::VersionTooOld {
            op: "modify_channel",
            version: Version::Win10,
            required: Version::Win10V4_1
        }
    );
}

#[test]
fn unload_then_reconnect() {
    let (mut c, _) = with_open_channel(4);
    c.handle_message(&offer(9, class::KVP, instance(9), 0))
        .unwrap();
    c.create_gpadl(9, &[1]).unwrap();
    posts(&mut c);
    events(&mut c);
    c.unload().unwrap();
    let m = one_post(&mut c, HOST_MSG_CONN);
    assert_eq!(m.as_bytes(), &[16, 0, 0, 0, 0, 0, 0, 0], "UNLOAD");
    assert!(matches!(
        c.connection_state(),
        ConnectionState::Unloading { .. }
    ));
    // Guest operations wait; a reply still in flight is handled.
    refused(&mut c, |c| c.close_channel(4));
    refused(&mut c, |c| c.unload());
    c.handle_message(&gpadl_created(9, LINUX_FIRST_GPADL_HANDLE + 1, 0))
        .unwrap();
    events(&mut c);
    c.handle_message(&unload_response()).unwrap();
    assert_eq!(events(&mut c), [ClientEvent::Unloaded]);
    assert_eq!(c.connection_state(), ConnectionState::Disconnected);
    assert_eq!(c.offers().count(), 0);
    assert_eq!(c.gpadls().count(), 0);
    assert_eq!(c.version(), None);
    refused(&mut c, |c| c.handle_message(&unload_response()));
    refused(&mut c, |c| {
        c.handle_message(&offer(4, class::SCSI, instance(4), 0))
    });
    // Reconnect: negotiation from the top, offers again, handles keep counting (as Linux).
    c.connect().unwrap();
    assert_eq!(u32_at(&one_post(&mut c, 4), 8), Version::Win10V5_3.raw());
    c.handle_message(&version_response(true, 5)).unwrap();
    c.request_offers().unwrap();
    one_post(&mut c, 5);
    c.handle_message(&offer(4, class::SCSI, instance(4), 0))
        .unwrap();
    assert_eq!(c.channel_state(4), Some(ChannelState::Offered));
    assert_eq!(
        c.create_gpadl(4, &[1]).unwrap(),
        LINUX_FIRST_GPADL_HANDLE + 2
    );
    c.check_invariants().unwrap();
}

#[test]
fn save_and_restore_round_trip() {
    let (mut c, _) = with_open_channel(4);
    c.handle_message(&offer(5, class::SCSI, instance(4), 1))
        .unwrap();
    c.create_gpadl(5, &[1, 2, 3]).unwrap();
    c.modify_channel(4, 1).unwrap();
    let s = c.save();
    assert_eq!(s.channels.len(), 2);
    assert_eq!(s.gpadls.len(), 2);
    assert_eq!(s.pending_posts.len(), 2);
    assert_eq!(s.pending_events.len(), 1);
    let mut r = Client::restore(s.clone()).unwrap();
    assert_eq!(r.save(), s);
    // Both continue identically.
    for x in [&mut c, &mut r] {
        x.handle_message(&modify_response(4, 0)).unwrap();
        x.handle_message(&rescind(5)).unwrap();
    }
    assert_eq!(c.save(), r.save());

    // A broken snapshot is refused.
    let mut bad = s.clone();
    bad.channels[0].ring_gpadl = Some(0xDEAD);
    assert!(matches!(
        Client::restore(bad),
        Err(ClientError::InvalidSnapshot(_))
    ));
    let mut bad = s.clone();
    bad.gpadls[0].relid = 77;
    assert!(Client::restore(bad).is_err());
    let mut bad = s;
    bad.connection = ConnectionState::Disconnected;
    assert!(Client::restore(bad).is_err());
}
