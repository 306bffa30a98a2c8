//! Random guest/VMM sequences against the host: it never panics, keeps its invariants, answers what
//! Linux waits for, and its snapshot always round-trips.

use super::*;
use crate::gpadl::RamRanges;
use crate::wire::*;
use alloc::vec::Vec;
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    /// `conn: None` = the connection id Linux uses for that version.
    Contact {
        version: usize,
        vp: u32,
        conn: Option<u32>,
    },
    RequestOffers,
    Gpadl {
        relid: u32,
        handle: u32,
        first: u64,
        pages: u64,
        bodies_sent: usize,
    },
    Teardown {
        relid: u32,
        handle: Option<u32>,
    },
    Open {
        relid: u32,
        handle: Option<u32>,
        offset: u32,
        vp: u32,
    },
    Close {
        relid: u32,
    },
    Release {
        relid: u32,
    },
    Modify {
        relid: u32,
        vp: u32,
    },
    Unload,
    AddDevice,
    Rescind {
        relid: u32,
    },
    CompleteOpen {
        relid: u32,
        ok: bool,
    },
    AddSubchannels {
        relid: u32,
        count: u16,
    },
    Raw(Vec<u8>),
}

fn op() -> impl Strategy<Value = Op> {
    // Small domains so that deep states (open channels, deferred teardowns) are reached often.
    let relid = prop_oneof![6 => 1u32..3, 1 => 0u32..5];
    // Mostly the channel's own ring GPADL (created with handle = relid in the setup).
    let handle = prop_oneof![3 => Just(None), 1 => (0u32..4).prop_map(Some)];
    let first_pfn = prop_oneof![8 => 0u64..0x100, 1 => 0xFFF0u64..0x10010];
    let conn = prop_oneof![6 => Just(None), 1 => prop::sample::select(alloc::vec![1u32, 4, 7]).prop_map(Some)];
    prop_oneof![
        1 => (0usize..11, 0u32..3, conn).prop_map(|(version, vp, conn)| Op::Contact { version, vp, conn }),
        2 => Just(Op::RequestOffers),
        4 => (relid.clone(), 0u32..4, first_pfn, 1u64..60, 0usize..3).prop_map(
            |(relid, handle, first, pages, bodies_sent)| Op::Gpadl { relid, handle, first, pages, bodies_sent }
        ),
        4 => (relid.clone(), handle.clone()).prop_map(|(relid, handle)| Op::Teardown { relid, handle }),
        4 => (relid.clone(), handle, 0u32..10, 0u32..3)
            .prop_map(|(relid, handle, offset, vp)| Op::Open { relid, handle, offset, vp }),
        1 => relid.clone().prop_map(|relid| Op::Close { relid }),
        1 => relid.clone().prop_map(|relid| Op::Release { relid }),
        1 => (relid.clone(), 0u32..3).prop_map(|(relid, vp)| Op::Modify { relid, vp }),
        1 => Just(Op::Unload),
        1 => Just(Op::AddDevice),
        1 => relid.clone().prop_map(|relid| Op::Rescind { relid }),
        4 => (relid.clone(), prop::bool::weighted(0.8)).prop_map(|(relid, ok)| Op::CompleteOpen { relid, ok }),
        1 => (relid, 0u16..4).prop_map(|(relid, count)| Op::AddSubchannels { relid, count }),
        1 => prop::collection::vec(any::<u8>(), 0..250).prop_map(Op::Raw),
    ]
}

fn post(s: &mut Server, conn: u32, msg: ChannelMessage<'_>) {
    if let Ok(bytes) = msg.to_bytes() {
        let _ = s.handle_message(conn, &bytes);
    }
}

fn apply(s: &mut Server, op: &Op) {
    match *op {
        Op::Contact { version, vp, conn } => {
            let v = Version::ALL[version % Version::ALL.len()];
            let conn = conn.unwrap_or(v.initiate_contact_connection_id());
            let msg = InitiateContact {
                vmbus_version_requested: v.raw(),
                target_vcpu: vp,
                msg_sint: 2,
                ..Default::default()
            };
            post(
                s,
                conn,
                ChannelMessage::InitiateContact {
                    msg,
                    client_id: None,
                },
            );
        }
        Op::RequestOffers => post(
            s,
            1,
            ChannelMessage::RequestOffers(RequestOffers::default()),
        ),
        Op::Gpadl {
            relid,
            handle,
            first,
            pages,
            bodies_sent,
        } => {
            let mut words = alloc::vec![
                GpaRange {
                    byte_count: (pages * 4096) as u32,
                    byte_offset: 0
                }
                .to_word()
            ];
            words.extend(first..first + pages);
            let split = words.len().min(27);
            let msg = GpadlHeader {
                child_relid: relid,
                gpadl: handle,
                range_buflen: (words.len() * 8) as u16,
                rangecount: 1,
                ..Default::default()
            };
            post(
                s,
                1,
                ChannelMessage::GpadlHeader {
                    msg,
                    words: GpadlWords::from_u64s(&words[..split]),
                },
            );
            for chunk in words[split..].chunks(28).take(bodies_sent) {
                let msg = GpadlBody {
                    gpadl: handle,
                    ..Default::default()
                };
                post(
                    s,
                    1,
                    ChannelMessage::GpadlBody {
                        msg,
                        words: GpadlWords::from_u64s(chunk),
                    },
                );
            }
        }
        Op::Teardown { relid, handle } => post(
            s,
            1,
            ChannelMessage::GpadlTeardown(GpadlTeardown {
                child_relid: relid,
                gpadl: handle.unwrap_or(relid),
                ..Default::default()
            }),
        ),
        Op::Open {
            relid,
            handle,
            offset,
            vp,
        } => {
            let msg = OpenChannel {
                child_relid: relid,
                openid: relid,
                ringbuffer_gpadlhandle: handle.unwrap_or(relid),
                target_vp: vp,
                downstream_ringbuffer_pageoffset: offset,
                ..Default::default()
            };
            post(s, 1, ChannelMessage::OpenChannel { msg, ext: None });
        }
        Op::Close { relid } => post(
            s,
            1,
            ChannelMessage::CloseChannel(CloseChannel {
                child_relid: relid,
                ..Default::default()
            }),
        ),
        Op::Release { relid } => post(
            s,
            1,
            ChannelMessage::RelidReleased(RelidReleased {
                child_relid: relid,
                ..Default::default()
            }),
        ),
        Op::Modify { relid, vp } => post(
            s,
            1,
            ChannelMessage::ModifyChannel(ModifyChannel {
                child_relid: relid,
                target_vp: vp,
                ..Default::default()
            }),
        ),
        Op::Unload => post(s, 1, ChannelMessage::Unload(Unload::default())),
        Op::AddDevice => {
            let n = s.save().channels.len() as u128;
            let mut d = DeviceDescription::new(class::SCSI, Guid::from_u128(0x77 + n));
            d.max_subchannels = 2;
            let _ = s.add_device(d);
        }
        Op::Rescind { relid } => s.rescind(relid),
        Op::CompleteOpen { relid, ok } => {
            let _ = s.complete_open(relid, ok);
        }
        Op::AddSubchannels { relid, count } => {
            s.add_subchannels(relid, count);
        }
        Op::Raw(ref bytes) => {
            let _ = s.handle_message(1, bytes);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_sequences_keep_invariants(ops in prop::collection::vec(op(), 1..100)) {
        let config = ServerConfig { vp_count: 2, ..ServerConfig::default() };
        let ram = RamRanges(alloc::vec![(0, 0x10000)]);
        let mut s = Server::new(config.clone(), ram.clone());
        for _ in 0..2 {
            let mut d = DeviceDescription::new(class::NETWORK, Guid::from_u128(s.save().channels.len() as u128 + 1));
            d.max_subchannels = 2;
            s.add_device(d).unwrap();
        }
        // Start connected with a ring GPADL per device, so that short random sequences reach open
        // channels, deferred teardowns and rescinds of open channels.
        let setup = [
            Op::Contact { version: 9, vp: 0, conn: None },
            Op::RequestOffers,
            Op::Gpadl { relid: 1, handle: 1, first: 16, pages: 8, bodies_sent: 0 },
            Op::Gpadl { relid: 2, handle: 2, first: 32, pages: 8, bodies_sent: 0 },
        ];
        for op in setup.iter().chain(&ops) {
            apply(&mut s, op);
            if let Err(e) = s.check_invariants() {
                return Err(TestCaseError::fail(alloc::format!("{e} after {op:?}")));
            }
            // Every message the host sends parses, and every open request names a channel that is
            // opening.
            while let Some(a) = s.poll_action() {
                match a {
                    HostAction::Send { msg, .. } => {
                        prop_assert!(ChannelMessage::parse(&msg).is_ok());
                    }
                    HostAction::Open(info) => {
                        let opening = matches!(s.channel_state(info.relid), Some(ChannelState::Opening { .. }));
                        prop_assert!(opening);
                    }
                    _ => {}
                }
            }
            let snap = s.save();
            let back = ServerSnapshot::from_bytes(&snap.to_bytes()).unwrap();
            prop_assert_eq!(&back, &snap);
            let restored = Server::restore(config.clone(), ram.clone(), back).unwrap();
            prop_assert_eq!(restored.save(), snap);
        }
    }
}
