//! Hostile or broken host messages: each is refused with an error naming the message and id,
//! and leaves the client unchanged.

use super::*;

#[test]
fn unknown_relids_are_named() {
    let (mut c, _) = with_open_channel(3);
    let cases: [(MessageBuf, MessageType); 3] = [
        (rescind(99), MessageType::RescindChannelOffer),
        (open_result(99, 99, 0), MessageType::OpenChannelResult),
        (modify_response(99, 0), MessageType::ModifyChannelResponse),
    ];
    for (m, msgtype) in cases {
        assert_eq!(
            refused(&mut c, |c| c.handle_message(&m)),
            ClientError::UnknownRelid { msgtype, relid: 99 }
        );
    }
    assert_eq!(
        refused(&mut c, |c| c.handle_message(&gpadl_created(3, 0x4242, 0))),
        ClientError::UnknownGpadl {
            msgtype: MessageType::GpadlCreated,
            handle: 0x4242
        }
    );
    assert_eq!(
        refused(&mut c, |c| c.handle_message(&gpadl_torndown(0))),
        ClientError::UnknownGpadl {
            msgtype: MessageType::GpadlTorndown,
            handle: 0
        }
    );
    // Guest operations on unknown relids too.
    assert!(matches!(
        refused(&mut c, |c| c.close_channel(99)),
        ClientError::UnknownRelid { relid: 99, .. }
    ));
    assert!(matches!(
        refused(&mut c, |c| c.release_relid(99)),
        ClientError::UnknownRelid { relid: 99, .. }
    ));
    assert!(matches!(
        refused(&mut c, |c| c.modify_channel(99, 0)),
        ClientError::UnknownRelid { relid: 99, .. }
    ));
}

#[test]
fn messages_in_the_wrong_state() {
    // Disconnected: only nothing.
    let mut c = Client::new(ClientConfig::default());
    for m in [
        offer(1, class::SCSI, instance(1), 0),
        rescind(1),
        all_offers(),
        version_response(true, 4),
        unload_response(),
        gpadl_torndown(1),
    ] {
        assert!(matches!(
            refused(&mut c, |c| c.handle_message(&m)),
            ClientError::UnexpectedMessage {
                state: "disconnected",
                ..
            }
        ));
    }
    // Connecting: only VERSION_RESPONSE.
    c.connect().unwrap();
    for m in [offer(1, class::SCSI, instance(1), 0), unload_response()] {
        assert!(matches!(
            refused(&mut c, |c| c.handle_message(&m)),
            ClientError::UnexpectedMessage {
                state: "connecting",
                ..
            }
        ));
    }
    // Connected: no UNLOAD_RESPONSE without UNLOAD; no OPENCHANNEL_RESULT without an open.
    let mut c = with_channel(1);
    assert_eq!(
        refused(&mut c, |c| c.handle_message(&unload_response())),
        ClientError::UnexpectedMessage {
            msgtype: MessageType::UnloadResponse,
            state: "connected"
        }
    );
    assert_eq!(
        refused(&mut c, |c| c.handle_message(&open_result(1, 1, 0))),
        ClientError::ChannelWrongState {
            msgtype: MessageType::OpenChannelResult,
            relid: 1,
            state: ChannelState::Offered
        }
    );
}

#[test]
fn guest_to_host_messages_from_the_host_are_refused() {
    let mut c = with_channel(1);
    let msgs = [
        host(ChannelMessage::OpenChannel {
            msg: OpenChannel {
                child_relid: 1,
                ..OpenChannel::default()
            },
            ext: None,
        }),
        host(ChannelMessage::RequestOffers(RequestOffers::default())),
        host(ChannelMessage::Unload(Unload::default())),
        host(ChannelMessage::InitiateContact {
            msg: InitiateContact::default(),
            client_id: None,
        }),
    ];
    for m in msgs {
        let err = refused(&mut c, |c| c.handle_message(&m));
        assert!(
            matches!(err, ClientError::UnexpectedMessage { .. }),
            "{err}"
        );
    }
}

#[test]
fn truncated_unknown_and_oversized_messages() {
    let mut c = with_channel(1);
    let full = offer(2, class::SCSI, instance(2), 0);
    let err = refused(&mut c, |c| c.handle_message(&full[..0xC3]));
    assert!(
        matches!(
            err,
            ClientError::Wire(WireError::Truncated {
                msgtype: MessageType::OfferChannel,
                ..
            })
        ),
        "{err}"
    );
    for t in [0u32, 18, 19, 20, 25, 0xFFFF_FFFF] {
        let mut b = [0u8; 16];
        b[..4].copy_from_slice(&t.to_le_bytes());
        assert_eq!(
            refused(&mut c, |c| c.handle_message(&b)),
            ClientError::Wire(WireError::UnknownMessageType { msgtype: t })
        );
    }
    refused(&mut c, |c| c.handle_message(&[]));
    refused(&mut c, |c| c.handle_message(&[1, 0]));
    refused(&mut c, |c| c.handle_message(&[0u8; 241]));
    let short_rescind = rescind(1);
    refused(&mut c, |c| c.handle_message(&short_rescind[..0x0B]));
    // Longer than needed is fine (padding to 240 bytes, as some guests/hosts do).
    let mut padded = [0u8; 240];
    padded[..full.len()].copy_from_slice(&full);
    c.handle_message(&padded).unwrap();
    assert_eq!(c.channel_state(2), Some(ChannelState::Offered));
}

#[test]
fn bad_offers() {
    let mut c = with_channel(1);
    assert_eq!(
        refused(&mut c, |c| c.handle_message(&offer(
            2048,
            class::SCSI,
            instance(9),
            0
        ))),
        ClientError::RelidOutOfRange {
            msgtype: MessageType::OfferChannel,
            relid: 2048,
            max: 2048
        }
    );
    refused(&mut c, |c| {
        c.handle_message(&offer(u32::MAX, class::SCSI, instance(9), 0))
    });
    assert_eq!(
        refused(&mut c, |c| c.handle_message(&offer(
            1,
            class::NETWORK,
            instance(9),
            0
        ))),
        ClientError::DuplicateRelid {
            msgtype: MessageType::OfferChannel,
            relid: 1
        }
    );
    // Relid 2047 is the last one Linux can map.
    c.handle_message(&offer(2047, class::SCSI, instance(9), 0))
        .unwrap();
}

#[test]
fn relids_are_capped() {
    let mut c = connected(Version::Win10V5_3);
    for r in 0..MAX_RELIDS {
        c.handle_message(&offer(r, class::SCSI, instance(r), 0))
            .unwrap();
        if r % 1000 == 0 {
            events(&mut c);
        }
    }
    events(&mut c);
    assert_eq!(c.offers().count(), 2048);
    refused(&mut c, |c| {
        c.handle_message(&offer(5000, class::SCSI, instance(5000), 0))
    });
    c.check_invariants().unwrap();
}

#[test]
fn event_queue_is_bounded() {
    let mut c = connected(Version::Win10V5_3);
    for _ in 0..MAX_PENDING_EVENTS {
        c.handle_message(&all_offers()).unwrap();
    }
    assert_eq!(
        refused(&mut c, |c| c.handle_message(&all_offers())),
        ClientError::EventQueueFull {
            msgtype: MessageType::AllOffersDelivered,
            pending: MAX_PENDING_EVENTS
        }
    );
    c.poll_event().unwrap();
    c.handle_message(&all_offers()).unwrap();
    assert_eq!(c.pending_events(), MAX_PENDING_EVENTS);
}

#[test]
fn tl_connect_result_is_ignored_like_linux() {
    let mut c = Client::new(ClientConfig::default());
    let m = host(ChannelMessage::TlConnectResult(TlConnectResult::default()));
    let before = c.save();
    c.handle_message(&m).unwrap();
    assert_eq!(c.save(), before);
}

#[test]
fn errors_name_message_and_id() {
    use alloc::string::ToString;
    let e = ClientError::UnknownRelid {
        msgtype: MessageType::RescindChannelOffer,
        relid: 42,
    };
    assert_eq!(
        e.to_string(),
        "CHANNELMSG_RESCIND_CHANNELOFFER: unknown relid 42"
    );
    let e = ClientError::UnknownGpadl {
        msgtype: MessageType::GpadlTorndown,
        handle: 0xE1E10,
    };
    assert_eq!(
        e.to_string(),
        "CHANNELMSG_GPADL_TORNDOWN: unknown GPADL handle 0xe1e10"
    );
}
