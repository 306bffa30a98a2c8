//! Host state-machine tests: guest messages built with the wire structs, replies parsed back.

use super::*;
use crate::gpadl::RamRanges;
use crate::wire::*;
use alloc::vec::Vec;

const RAM_PAGES: u64 = 0x10000;

struct Harness {
    server: Server,
}

fn desc(n: u8) -> DeviceDescription {
    let mut d = DeviceDescription::new(class::SCSI, Guid::from_u128(0x1000 + u128::from(n)));
    d.max_subchannels = 4;
    d
}

impl Harness {
    fn new(vp_count: u32) -> Self {
        let config = ServerConfig {
            vp_count,
            ..ServerConfig::default()
        };
        Harness {
            server: Server::new(config, RamRanges(alloc::vec![(0, RAM_PAGES)])),
        }
    }

    fn post(&mut self, conn: u32, msg: ChannelMessage<'_>) -> Result<(), HostError> {
        let bytes = msg.to_bytes().unwrap();
        self.server.handle_message(conn, &bytes)
    }

    fn actions(&mut self) -> Vec<HostAction> {
        core::iter::from_fn(|| self.server.poll_action()).collect()
    }

    /// Messages sent to the guest, as `(vp, sint, bytes)`.
    fn sent(&mut self) -> Vec<(u32, u8, Vec<u8>)> {
        self.actions()
            .into_iter()
            .filter_map(|a| match a {
                HostAction::Send { vp, sint, msg } => Some((vp, sint, msg.to_vec())),
                _ => None,
            })
            .collect()
    }

    fn contact(&mut self, v: Version, vp: u32) -> Result<(), HostError> {
        let mut m = InitiateContact {
            vmbus_version_requested: v.raw(),
            target_vcpu: vp,
            ..Default::default()
        };
        if v.has_msg_sint() {
            m.msg_sint = MESSAGE_SINT;
        }
        self.post(
            v.initiate_contact_connection_id(),
            ChannelMessage::InitiateContact {
                msg: m,
                client_id: None,
            },
        )
    }

    fn connect(&mut self) {
        self.contact(Version::Win10V5_3, 0).unwrap();
        self.post(1, ChannelMessage::RequestOffers(RequestOffers::default()))
            .unwrap();
        self.actions();
    }

    /// Creates a one-range ring GPADL of `pages` pages the way Linux sends it.
    fn gpadl(
        &mut self,
        relid: u32,
        handle: u32,
        first_pfn: u64,
        pages: u64,
    ) -> Result<(), HostError> {
        let mut words = alloc::vec![
            GpaRange {
                byte_count: (pages * 4096) as u32,
                byte_offset: 0
            }
            .to_word()
        ];
        words.extend(first_pfn..first_pfn + pages);
        let header_words = words.len().min(27);
        let buflen = (words.len() * 8) as u16;
        let mut r = self.post(
            1,
            ChannelMessage::GpadlHeader {
                msg: GpadlHeader {
                    child_relid: relid,
                    gpadl: handle,
                    range_buflen: buflen,
                    rangecount: 1,
                    ..Default::default()
                },
                words: GpadlWords::from_u64s(&words[..header_words]),
            },
        );
        for chunk in words[header_words..].chunks(28) {
            r = r.and(self.post(
                1,
                ChannelMessage::GpadlBody {
                    msg: GpadlBody {
                        gpadl: handle,
                        ..Default::default()
                    },
                    words: GpadlWords::from_u64s(chunk),
                },
            ));
        }
        r
    }

    fn open(&mut self, relid: u32, handle: u32, offset: u32, vp: u32) -> Result<(), HostError> {
        self.post(
            1,
            ChannelMessage::OpenChannel {
                msg: OpenChannel {
                    child_relid: relid,
                    openid: relid,
                    ringbuffer_gpadlhandle: handle,
                    target_vp: vp,
                    downstream_ringbuffer_pageoffset: offset,
                    ..Default::default()
                },
                ext: None,
            },
        )
    }
}

fn parse(bytes: &[u8]) -> ChannelMessage<'_> {
    ChannelMessage::parse(bytes).unwrap()
}

#[test]
fn every_supported_version_connects_with_linux_parameters() {
    for v in ServerConfig::default().versions {
        let mut h = Harness::new(4);
        h.contact(v, 3).unwrap();
        let sent = h.sent();
        assert_eq!(sent.len(), 1, "{v}");
        let (vp, sint, bytes) = &sent[0];
        // Target VP honoured from 3.0, always SINT 2.
        assert_eq!(*vp, if v >= Version::Win8_1 { 3 } else { 0 }, "{v}");
        assert_eq!(*sint, 2);
        let ChannelMessage::VersionResponse { msg, .. } = parse(bytes) else {
            panic!()
        };
        assert_eq!(msg.version_supported, 1, "{v}");
        if v >= Version::Win10V5 {
            assert_eq!({ msg.msg_conn_id }, 1);
        }
        assert_eq!(h.server.version(), Some(v));
    }
}

#[test]
fn linux_negotiation_walk_lands_on_the_newest_supported() {
    let mut h = Harness::new(1);
    h.server.config.versions = alloc::vec![Version::Win8_1, Version::Win10];
    let mut connected = None;
    for v in Version::LINUX_NEGOTIATION_ORDER {
        let r = h.contact(v, 0);
        let sent = h.sent();
        let ChannelMessage::VersionResponse { msg, .. } = parse(&sent[0].2) else {
            panic!()
        };
        assert_eq!(msg.version_supported == 1, r.is_ok());
        if r.is_ok() {
            connected = Some(v);
            break;
        }
    }
    assert_eq!(connected, Some(Version::Win10));
}

#[test]
fn refused_contacts() {
    let mut h = Harness::new(2);
    // 6.0 is not in the default set; 0.13 neither.
    assert!(matches!(
        h.contact(Version::Win10V6_0, 0),
        Err(HostError::ContactRefused(_))
    ));
    assert!(matches!(
        h.contact(Version::Ws2008, 0),
        Err(HostError::ContactRefused(_))
    ));
    // 5.x on connection id 1.
    let m = InitiateContact {
        vmbus_version_requested: Version::Win10V5_3.raw(),
        msg_sint: 2,
        ..Default::default()
    };
    let r = h.post(
        1,
        ChannelMessage::InitiateContact {
            msg: m,
            client_id: None,
        },
    );
    assert!(matches!(r, Err(HostError::WrongConnectionId { .. })));
    // Target VP that does not exist; bad SINT; half the monitor pages.
    assert!(matches!(
        h.contact(Version::Win10V5_3, 2),
        Err(HostError::BadVp { .. })
    ));
    let mut m = m;
    m.msg_sint = 5;
    assert!(
        h.post(
            4,
            ChannelMessage::InitiateContact {
                msg: m,
                client_id: None
            }
        )
        .is_err()
    );
    m.msg_sint = 2;
    m.monitor_page1 = 0x1000;
    assert!(
        h.post(
            4,
            ChannelMessage::InitiateContact {
                msg: m,
                client_id: None
            }
        )
        .is_err()
    );
    // Every refusal was answered with version_supported = 0 on VP 0, SINT 2.
    let sent = h.sent();
    assert_eq!(sent.len(), 6);
    for (vp, sint, bytes) in sent {
        assert_eq!((vp, sint), (0, 2));
        let ChannelMessage::VersionResponse { msg, .. } = parse(&bytes) else {
            panic!()
        };
        assert_eq!(msg.version_supported, 0);
    }
    assert_eq!(h.server.version(), None);
    // Nothing but INITIATE_CONTACT is accepted while disconnected.
    let r = h.post(1, ChannelMessage::RequestOffers(RequestOffers::default()));
    assert!(matches!(r, Err(HostError::WrongState { .. })));
}

#[test]
fn offers_then_all_offers_delivered_once() {
    let mut h = Harness::new(1);
    let a = h.server.add_device(desc(1)).unwrap();
    let b = h.server.add_device(desc(2)).unwrap();
    assert_eq!((a, b), (1, 2));
    h.contact(Version::Win10V5_3, 0).unwrap();
    h.sent();
    h.post(1, ChannelMessage::RequestOffers(RequestOffers::default()))
        .unwrap();
    let sent = h.sent();
    assert_eq!(sent.len(), 3);
    for (i, relid) in [a, b].into_iter().enumerate() {
        let ChannelMessage::OfferChannel(o) = parse(&sent[i].2) else {
            panic!()
        };
        assert_eq!({ o.child_relid }, relid);
        assert_eq!({ o.if_type }, class::SCSI);
        assert_eq!({ o.if_instance }, Guid::from_u128(0x1000 + relid as u128));
        assert_eq!({ o.sub_channel_index }, 0);
        assert_eq!({ o.connection_id }, relid | 2 << 12);
        assert_eq!({ o.monitor_id }, MONITOR_ID_NONE);
        assert!(o.dedicated_interrupt() && !o.monitor_allocated());
    }
    assert!(matches!(
        parse(&sent[2].2),
        ChannelMessage::AllOffersDelivered(_)
    ));
    assert!(
        h.post(1, ChannelMessage::RequestOffers(RequestOffers::default()))
            .is_err()
    );
    assert!(h.sent().is_empty());
    // Hot add: offered at once.
    let c = h.server.add_device(desc(3)).unwrap();
    let sent = h.sent();
    assert!(matches!(parse(&sent[0].2), ChannelMessage::OfferChannel(o) if o.child_relid == c));
}

fn created_status(sent: &[(u32, u8, Vec<u8>)]) -> Vec<(u32, u32)> {
    sent.iter()
        .filter_map(|(_, _, b)| match parse(b) {
            ChannelMessage::GpadlCreated(g) => Some((g.gpadl, g.creation_status)),
            _ => None,
        })
        .collect()
}

#[test]
fn gpadls_single_page_multi_body_and_refused() {
    let mut h = Harness::new(1);
    let relid = h.server.add_device(desc(1)).unwrap();
    h.connect();
    h.gpadl(relid, 0xE1E10, 100, 1).unwrap();
    // 1 MiB ring: header + 9 bodies; a 4096-page buffer: header + 146 bodies.
    h.gpadl(relid, 0xE1E11, 1000, 256).unwrap();
    h.gpadl(relid, 0xE1E12, 5000, 4096).unwrap();
    assert_eq!(
        created_status(&h.sent()),
        [(0xE1E10, 0), (0xE1E11, 0), (0xE1E12, 0)]
    );
    assert_eq!(h.server.gpadl(0xE1E12).unwrap().pfns.len(), 4096);
    assert_eq!(h.server.gpadl(0xE1E11).unwrap().pfns[255], 1255);
    // A PFN past the end of RAM, a duplicate handle, an unknown relid: failure status.
    assert!(h.gpadl(relid, 0xE1E13, RAM_PAGES - 2, 4).is_err());
    assert!(h.gpadl(relid, 0xE1E10, 100, 1).is_err());
    assert!(h.gpadl(77, 0xE1E14, 100, 1).is_err());
    assert_eq!(
        created_status(&h.sent()),
        [
            (0xE1E13, FAILURE_STATUS),
            (0xE1E10, FAILURE_STATUS),
            (0xE1E14, FAILURE_STATUS)
        ]
    );
    // The refused duplicate did not disturb the original.
    assert!(h.server.gpadl(0xE1E10).is_some());
    // A body for a handle nobody started: dropped, no answer.
    let r = h.post(
        1,
        ChannelMessage::GpadlBody {
            msg: GpadlBody {
                gpadl: 0x999,
                ..Default::default()
            },
            words: GpadlWords::from_u64s(&[1, 2]),
        },
    );
    assert!(matches!(
        r,
        Err(HostError::Gpadl(crate::gpadl::GpadlError::UnknownHandle(
            0x999
        )))
    ));
    assert!(h.sent().is_empty());
}

fn open_result(sent: &[(u32, u8, Vec<u8>)]) -> Option<(u32, u32)> {
    sent.iter().find_map(|(_, _, b)| match parse(b) {
        ChannelMessage::OpenChannelResult(r) => Some((r.child_relid, r.status)),
        _ => None,
    })
}

#[test]
fn open_teardown_close_sequence() {
    let mut h = Harness::new(2);
    let relid = h.server.add_device(desc(1)).unwrap();
    h.connect();
    h.gpadl(relid, 0xE1E10, 100, 64).unwrap();
    h.sent();
    h.open(relid, 0xE1E10, 32, 1).unwrap();
    let actions = h.actions();
    let [HostAction::Open(info)] = &actions[..] else {
        panic!("{actions:?}")
    };
    assert_eq!(
        (info.relid, info.downstream_offset, info.target_vp),
        (relid, 32, 1)
    );
    assert_eq!(info.ring_pages, (100..164).collect::<Vec<_>>());
    h.server.complete_open(relid, true).unwrap();
    assert_eq!(open_result(&h.sent()), Some((relid, 0)));
    assert_eq!(h.server.open_info(relid).as_ref(), Some(info));
    // Second open of an open channel: failure status.
    assert!(h.open(relid, 0xE1E10, 32, 0).is_err());
    assert_eq!(open_result(&h.sent()), Some((relid, FAILURE_STATUS)));
    // Retarget (5.3: with a response).
    h.post(
        1,
        ChannelMessage::ModifyChannel(ModifyChannel {
            child_relid: relid,
            target_vp: 0,
            ..Default::default()
        }),
    )
    .unwrap();
    let actions = h.actions();
    assert_eq!(
        actions[0],
        HostAction::Retarget {
            relid,
            target_vp: 0
        }
    );
    // Teardown of the ring GPADL while open: deferred until close.
    h.post(
        1,
        ChannelMessage::GpadlTeardown(GpadlTeardown {
            child_relid: relid,
            gpadl: 0xE1E10,
            ..Default::default()
        }),
    )
    .unwrap();
    assert!(h.sent().is_empty());
    h.post(
        1,
        ChannelMessage::CloseChannel(CloseChannel {
            child_relid: relid,
            ..Default::default()
        }),
    )
    .unwrap();
    let actions = h.actions();
    assert_eq!(actions[0], HostAction::Close { relid });
    let HostAction::Send { msg, .. } = &actions[1] else {
        panic!()
    };
    assert!(matches!(parse(msg), ChannelMessage::GpadlTorndown(t) if t.gpadl == 0xE1E10));
    assert!(h.server.gpadl(0xE1E10).is_none());
    assert_eq!(h.server.channel_state(relid), Some(ChannelState::Offered));
}

#[test]
fn bad_opens_get_failure_results() {
    let mut h = Harness::new(1);
    let a = h.server.add_device(desc(1)).unwrap();
    let b = h.server.add_device(desc(2)).unwrap();
    h.connect();
    h.gpadl(a, 0x10, 100, 8).unwrap();
    h.gpadl(b, 0x20, 200, 8).unwrap();
    h.sent();
    let cases: [(u32, u32, u32, u32); 6] = [
        (a, 0x99, 4, 0), // unknown GPADL
        (a, 0x20, 4, 0), // another channel's GPADL
        (a, 0x10, 1, 0), // upstream ring of one page
        (a, 0x10, 7, 0), // downstream ring of one page
        (a, 0x10, 9, 0), // offset past the GPADL
        (a, 0x10, 4, 5), // no such VP
    ];
    for (relid, gpadl, offset, vp) in cases {
        assert!(h.open(relid, gpadl, offset, vp).is_err());
        assert_eq!(
            open_result(&h.sent()),
            Some((relid, FAILURE_STATUS)),
            "{gpadl:#x} {offset} {vp}"
        );
    }
    // Unknown relid: failure too; the other channel still opens fine.
    assert!(h.open(1234, 0x10, 4, 0).is_err());
    h.sent();
    h.open(b, 0x20, 4, 0).unwrap();
    h.actions();
    h.server.complete_open(b, true).unwrap();
    assert_eq!(open_result(&h.sent()), Some((b, 0)));
}

#[test]
fn rescind_release_and_relid_reuse() {
    let mut h = Harness::new(1);
    let relid = h.server.add_device(desc(1)).unwrap();
    h.connect();
    h.gpadl(relid, 0x10, 100, 8).unwrap();
    h.open(relid, 0x10, 4, 0).unwrap();
    h.server.complete_open(relid, true).unwrap();
    let subs = h.server.add_subchannels(relid, 2);
    assert_eq!(subs, [2, 3]);
    h.actions();
    h.server.rescind(relid);
    let actions = h.actions();
    assert!(actions.contains(&HostAction::Close { relid }));
    let rescinded: Vec<u32> = actions
        .iter()
        .filter_map(|a| match a {
            HostAction::Send { msg, .. } => match parse(msg) {
                ChannelMessage::RescindChannelOffer(r) => Some(r.child_relid),
                _ => None,
            },
            _ => None,
        })
        .collect();
    assert_eq!(rescinded, [2, 3, relid]);
    // Linux: CLOSECHANNEL for the open one, then RELID_RELEASED for each.
    h.post(
        1,
        ChannelMessage::CloseChannel(CloseChannel {
            child_relid: relid,
            ..Default::default()
        }),
    )
    .unwrap();
    for r in [relid, 2, 3] {
        h.post(
            1,
            ChannelMessage::RelidReleased(RelidReleased {
                child_relid: r,
                ..Default::default()
            }),
        )
        .unwrap();
    }
    assert!(
        h.server.gpadl(0x10).is_none(),
        "GPADLs of a released channel are freed"
    );
    assert_eq!(
        h.server.add_device(desc(9)).unwrap(),
        relid,
        "relid reused after release"
    );
}

#[test]
fn unload_and_reconnect() {
    let mut h = Harness::new(1);
    let relid = h.server.add_device(desc(1)).unwrap();
    h.connect();
    h.gpadl(relid, 0x10, 100, 8).unwrap();
    h.open(relid, 0x10, 4, 0).unwrap();
    h.server.complete_open(relid, true).unwrap();
    h.actions();
    h.post(1, ChannelMessage::Unload(Unload::default()))
        .unwrap();
    let actions = h.actions();
    assert_eq!(actions[0], HostAction::Close { relid });
    assert_eq!(actions[1], HostAction::Reset);
    let HostAction::Send { msg, .. } = &actions[2] else {
        panic!()
    };
    assert!(matches!(parse(msg), ChannelMessage::UnloadResponse(_)));
    assert_eq!(h.server.version(), None);
    assert!(h.server.gpadl(0x10).is_none());
    // Reconnect: the same device is offered again.
    h.contact(Version::Win10V5_3, 0).unwrap();
    h.post(1, ChannelMessage::RequestOffers(RequestOffers::default()))
        .unwrap();
    let sent = h.sent();
    assert!(matches!(parse(&sent[1].2), ChannelMessage::OfferChannel(o) if o.child_relid == relid));
}

#[test]
fn hostile_messages_are_refused_without_side_effects() {
    let mut h = Harness::new(1);
    let relid = h.server.add_device(desc(1)).unwrap();
    h.connect();
    let before = h.server.save();
    let offer = ChannelMessage::OfferChannel(OfferChannel::default())
        .to_vec()
        .unwrap();
    let inputs: [&[u8]; 6] = [
        &[],
        &[1, 0],
        &[99, 0, 0, 0, 0, 0, 0, 0],
        &[5, 0, 0, 0, 0, 0, 0, 0],
        &offer,
        &[0xFF; 241],
    ];
    for input in inputs {
        assert!(h.server.handle_message(1, input).is_err());
    }
    // Messages for relids that do not exist, teardown of nothing, release of a live channel.
    assert!(
        h.post(
            1,
            ChannelMessage::CloseChannel(CloseChannel {
                child_relid: 55,
                ..Default::default()
            })
        )
        .is_err()
    );
    assert!(
        h.post(
            1,
            ChannelMessage::GpadlTeardown(GpadlTeardown {
                child_relid: relid,
                gpadl: 1,
                ..Default::default()
            })
        )
        .is_err()
    );
    assert!(
        h.post(
            1,
            ChannelMessage::RelidReleased(RelidReleased {
                child_relid: relid,
                ..Default::default()
            })
        )
        .is_err()
    );
    assert!(
        h.post(3, ChannelMessage::RequestOffers(RequestOffers::default()))
            .is_err()
    );
    assert!(h.sent().is_empty());
    assert_eq!(h.server.save(), before);
}

#[test]
fn snapshot_round_trip_mid_session() {
    let mut h = Harness::new(2);
    let relid = h.server.add_device(desc(1)).unwrap();
    let other = h.server.add_device(desc(2)).unwrap();
    h.connect();
    h.gpadl(relid, 0x10, 100, 64).unwrap();
    h.open(relid, 0x10, 32, 1).unwrap();
    h.server.complete_open(relid, true).unwrap();
    // A GPADL half-way through its bodies, and a deferred teardown.
    let mut words = alloc::vec![
        GpaRange {
            byte_count: 60 * 4096,
            byte_offset: 0
        }
        .to_word()
    ];
    words.extend(500..560);
    h.post(
        1,
        ChannelMessage::GpadlHeader {
            msg: GpadlHeader {
                child_relid: other,
                gpadl: 0x20,
                range_buflen: (words.len() * 8) as u16,
                rangecount: 1,
                ..Default::default()
            },
            words: GpadlWords::from_u64s(&words[..27]),
        },
    )
    .unwrap();
    h.post(
        1,
        ChannelMessage::GpadlTeardown(GpadlTeardown {
            child_relid: relid,
            gpadl: 0x10,
            ..Default::default()
        }),
    )
    .unwrap();
    h.actions();
    let snap = h.server.save();
    let bytes = snap.to_bytes();
    assert_eq!(ServerSnapshot::from_bytes(&bytes).unwrap(), snap);
    let mut restored = Harness {
        server: Server::restore(
            h.server.config().clone(),
            RamRanges(alloc::vec![(0, RAM_PAGES)]),
            ServerSnapshot::from_bytes(&bytes).unwrap(),
        )
        .unwrap(),
    };
    assert_eq!(restored.server.save(), snap);
    assert_eq!(restored.server.open_info(relid), h.server.open_info(relid));
    // Continue: the rest of the GPADL arrives, the channel closes and the teardown completes.
    for chunk in words[27..].chunks(28) {
        restored
            .post(
                1,
                ChannelMessage::GpadlBody {
                    msg: GpadlBody {
                        gpadl: 0x20,
                        ..Default::default()
                    },
                    words: GpadlWords::from_u64s(chunk),
                },
            )
            .unwrap();
    }
    assert_eq!(created_status(&restored.sent()), [(0x20, 0)]);
    restored
        .post(
            1,
            ChannelMessage::CloseChannel(CloseChannel {
                child_relid: relid,
                ..Default::default()
            }),
        )
        .unwrap();
    let actions = restored.actions();
    assert_eq!(actions[0], HostAction::Close { relid });
    assert!(restored.server.gpadl(0x10).is_none());
    // Corrupt snapshots are refused, never panic.
    for cut in [0, 3, 8, bytes.len() / 2, bytes.len() - 1] {
        assert!(ServerSnapshot::from_bytes(&bytes[..cut]).is_err());
    }
    let mut evil = bytes.clone();
    evil[9..17].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(ServerSnapshot::from_bytes(&evil).is_err());
}

#[test]
fn message_floods_stay_bounded_and_other_channels_keep_working() {
    let mut h = Harness::new(1);
    let a = h.server.add_device(desc(1)).unwrap();
    let b = h.server.add_device(desc(2)).unwrap();
    h.connect();
    // 20,000 GPADL headers that never complete: the GPADL table stops at its limit and every
    // refusal is answered (Linux waits for GPADL_CREATED).
    let limit = h.server.config().gpadl_limits.max_gpadls;
    let mut refused = 0;
    for handle in 1..=20_000u32 {
        let words = [
            GpaRange {
                byte_count: 8 * 4096,
                byte_offset: 0,
            }
            .to_word(),
            1,
        ];
        let r = h.post(
            1,
            ChannelMessage::GpadlHeader {
                msg: GpadlHeader {
                    child_relid: a,
                    gpadl: handle,
                    range_buflen: 72,
                    rangecount: 1,
                    ..Default::default()
                },
                words: GpadlWords::from_u64s(&words),
            },
        );
        if r.is_err() {
            refused += 1;
        }
        // The driver drains after each message, as a SynIC port would.
        h.actions();
    }
    assert_eq!(refused, 20_000 - limit);
    assert!(h.server.check_invariants().is_ok());
    // Garbage and out-of-state floods change nothing.
    for i in 0..20_000u32 {
        let _ = h.server.handle_message(1, &i.to_le_bytes());
        let _ = h.post(1, ChannelMessage::RequestOffers(RequestOffers::default()));
    }
    assert!(h.sent().is_empty());
    // Tearing the stuck ones down is refused (never completed); the other device still works
    // once the guest frees a slot by unloading and reconnecting.
    h.post(1, ChannelMessage::Unload(Unload::default()))
        .unwrap();
    h.actions();
    h.connect();
    h.gpadl(b, 0x10, 100, 8).unwrap();
    h.open(b, 0x10, 4, 0).unwrap();
    h.actions();
    h.server.complete_open(b, true).unwrap();
    assert_eq!(open_result(&h.sent()), Some((b, 0)));
}
