//! Random sequences of host messages and guest operations: the client never panics, keeps its
//! invariants, leaves its state unchanged whenever it returns an error, and survives
//! save/restore.

use proptest::prelude::*;

use super::*;

#[derive(Clone, Debug)]
enum Op {
    // host messages
    VersionResponse(bool, u32),
    Offer {
        relid: u32,
        class: u8,
        inst: u8,
        index: u16,
    },
    Rescind(u32),
    AllOffers,
    OpenResult {
        relid: u32,
        openid_ok: bool,
        status: u32,
    },
    GpadlCreated {
        relid: u32,
        handle: u32,
        status: u32,
    },
    GpadlTorndown(u32),
    ModifyResponse(u32, u32),
    UnloadResponse,
    Raw(Vec<u8>),
    Truncated(Box<Op>, usize),
    // guest operations
    Connect,
    PostFailed(u16),
    RequestOffers,
    CreateGpadl(u32, usize),
    Teardown(u32, u32),
    Open {
        relid: u32,
        handle: u32,
        offset: u32,
    },
    Close(u32),
    Release(u32),
    Modify(u32, u32),
    Unload,
    PollPost,
    PollEvent,
    SaveRestore,
    /// A cooperative host: take the next post and answer it (success or failure status).
    HostAnswer(bool),
    /// Open `relid` on one of its created GPADLs (whichever comes first).
    OpenCreated(u32),
    /// Tear down one of `relid`'s created GPADLs (the last one).
    TeardownCreated(u32),
}

fn relid() -> impl Strategy<Value = u32> {
    prop_oneof![16 => 0u32..4, 1 => any::<u32>(), 1 => Just(2047u32), 1 => Just(2048u32)]
}

fn handle() -> impl Strategy<Value = u32> {
    prop_oneof![8 => (0u32..10).prop_map(|i| LINUX_FIRST_GPADL_HANDLE + i), 1 => any::<u32>()]
}

fn status() -> impl Strategy<Value = u32> {
    prop_oneof![4 => Just(0u32), 1 => any::<u32>()]
}

fn host_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => (any::<bool>(), prop_oneof![Just(4u32), any::<u32>()])
            .prop_map(|(ok, c)| Op::VersionResponse(ok, c)),
        6 => (relid(), 0u8..3, 0u8..4, prop_oneof![3 => Just(0u16), 1 => 1u16..3]).prop_map(
            |(relid, class, inst, index)| Op::Offer {
                relid,
                class,
                inst,
                index
            }
        ),
        1 => relid().prop_map(Op::Rescind),
        1 => Just(Op::AllOffers),
        1 => (relid(), prop::bool::weighted(0.9), status()).prop_map(|(relid, openid_ok, status)| {
            Op::OpenResult {
                relid,
                openid_ok,
                status,
            }
        }),
        1 => (relid(), handle(), status()).prop_map(|(relid, handle, status)| Op::GpadlCreated {
            relid,
            handle,
            status
        }),
        1 => handle().prop_map(Op::GpadlTorndown),
        1 => (relid(), status()).prop_map(|(r, s)| Op::ModifyResponse(r, s)),
        1 => Just(Op::UnloadResponse),
        1 => prop::collection::vec(any::<u8>(), 0..260).prop_map(Op::Raw),
    ]
}

fn guest_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => Just(Op::Connect),
        1 => prop_oneof![Just(0x12u16), Just(0x13u16), any::<u16>()].prop_map(Op::PostFailed),
        1 => Just(Op::RequestOffers),
        4 => (relid(), 0usize..64).prop_map(|(r, n)| Op::CreateGpadl(r, n)),
        1 => (relid(), handle()).prop_map(|(r, h)| Op::Teardown(r, h)),
        2 => relid().prop_map(Op::TeardownCreated),
        1 => (relid(), handle(), 0u32..10).prop_map(|(relid, handle, offset)| Op::Open {
            relid,
            handle,
            offset
        }),
        4 => (0u32..4).prop_map(Op::OpenCreated),
        2 => relid().prop_map(Op::Close),
        2 => relid().prop_map(Op::Release),
        2 => (relid(), 0u32..4).prop_map(|(r, vp)| Op::Modify(r, vp)),
        1 => Just(Op::Unload),
        1 => Just(Op::PollPost),
        1 => Just(Op::PollEvent),
        1 => Just(Op::SaveRestore),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => host_op(),
        1 => (host_op(), 0usize..240).prop_map(|(o, n)| Op::Truncated(Box::new(o), n)),
        5 => guest_op(),
        6 => prop::bool::weighted(0.85).prop_map(Op::HostAnswer),
    ]
}

fn host_bytes(op: &Op) -> Option<Vec<u8>> {
    let classes = [class::SCSI, class::NETWORK, class::KVP];
    let m = match op {
        Op::VersionResponse(ok, conn) => version_response(*ok, *conn),
        Op::Offer {
            relid,
            class,
            inst,
            index,
        } => offer(
            *relid,
            classes[usize::from(*class) % 3],
            instance(u32::from(*inst)),
            *index,
        ),
        Op::Rescind(r) => rescind(*r),
        Op::AllOffers => all_offers(),
        Op::OpenResult {
            relid,
            openid_ok,
            status,
        } => open_result(*relid, if *openid_ok { *relid } else { !*relid }, *status),
        Op::GpadlCreated {
            relid,
            handle,
            status,
        } => gpadl_created(*relid, *handle, *status),
        Op::GpadlTorndown(h) => gpadl_torndown(*h),
        Op::ModifyResponse(r, s) => modify_response(*r, *s),
        Op::UnloadResponse => unload_response(),
        Op::Raw(b) => return Some(b.clone()),
        Op::Truncated(inner, n) => {
            let mut b = host_bytes(inner)?;
            b.truncate(*n);
            return Some(b);
        }
        _ => return None,
    };
    Some(m.to_vec())
}

fn apply(c: &mut Client, op: &Op) -> Result<(), ClientError> {
    if let Some(bytes) = host_bytes(op) {
        return c.handle_message(&bytes);
    }
    match op {
        Op::Connect => c.connect(),
        Op::PostFailed(s) => c.post_failed(*s),
        Op::RequestOffers => c.request_offers(),
        Op::CreateGpadl(r, n) => {
            let pfns: Vec<u64> = (0..*n as u64).collect();
            c.create_gpadl(*r, &pfns).map(drop)
        }
        Op::Teardown(r, h) => c.teardown_gpadl(*r, *h),
        Op::Open {
            relid,
            handle,
            offset,
        } => c.open_channel(*relid, OpenParams::new(*handle, *offset, 0)),
        Op::Close(r) => c.close_channel(*r),
        Op::Release(r) => c.release_relid(*r),
        Op::Modify(r, vp) => c.modify_channel(*r, *vp),
        Op::Unload => c.unload(),
        Op::PollPost => {
            c.poll_post();
            Ok(())
        }
        Op::PollEvent => {
            c.poll_event();
            Ok(())
        }
        Op::OpenCreated(relid) => {
            let h = c
                .gpadls()
                .find(|g| g.relid == *relid && g.state == GpadlState::Created)
                .map(|g| (g.handle, g.page_count));
            match h {
                Some((h, pages)) => c.open_channel(*relid, OpenParams::new(h, pages / 2, 0)),
                None => Ok(()),
            }
        }
        Op::TeardownCreated(relid) => {
            let h = c
                .gpadls()
                .filter(|g| g.relid == *relid && g.state == GpadlState::Created)
                .map(|g| g.handle)
                .last();
            match h {
                Some(h) => c.teardown_gpadl(*relid, h),
                None => Ok(()),
            }
        }
        Op::SaveRestore => {
            let s = c.save();
            *c = Client::restore(s.clone()).expect("a saved state restores");
            assert_eq!(c.save(), s);
            Ok(())
        }
        _ => Ok(()),
    }
}

/// What a cooperative host answers to a guest message (`None`: nothing answers it).
fn answer(post: &Post, ok: bool) -> Option<MessageBuf> {
    let status = if ok { 0 } else { STATUS_UNSUCCESSFUL };
    Some(match ChannelMessage::parse(post.msg.as_bytes()).ok()? {
        ChannelMessage::InitiateContact { .. } => version_response(ok, 4),
        ChannelMessage::RequestOffers(_) => all_offers(),
        ChannelMessage::GpadlHeader { msg, .. } => {
            gpadl_created(msg.child_relid, msg.gpadl, status)
        }
        ChannelMessage::GpadlTeardown(m) => gpadl_torndown(m.gpadl),
        ChannelMessage::OpenChannel { msg, .. } => open_result(msg.child_relid, msg.openid, status),
        ChannelMessage::ModifyChannel(m) => modify_response(m.child_relid, status),
        ChannelMessage::Unload(_) => unload_response(),
        _ => return None,
    })
}

/// Runs one op; asserts the client is unchanged if it fails and keeps its invariants.
fn step(c: &mut Client, op: &Op) -> Result<(), TestCaseError> {
    if let Op::HostAnswer(ok) = op {
        let Some(post) = c.poll_post() else {
            return Ok(());
        };
        let Some(reply) = answer(&post, *ok) else {
            return Ok(());
        };
        return step(c, &Op::Raw(reply.to_vec()));
    }
    let before = c.save();
    let result = apply(c, op);
    if let Err(e) = &result {
        prop_assert_eq!(&c.save(), &before, "error {} changed the state", e);
    }
    if let Err(why) = c.check_invariants() {
        return Err(TestCaseError::fail(alloc::format!("{why} after {op:?}")));
    }
    // Every post is a well-formed guest→host message.
    for p in c.save().pending_posts {
        let m = ChannelMessage::parse(p.msg.as_bytes());
        prop_assert!(m.is_ok(), "post does not parse: {:?}", p);
        if let Ok(m) = m {
            prop_assert_eq!(m.msgtype().direction(), Direction::GuestToHost);
        }
    }
    prop_assert!(c.pending_events() <= MAX_PENDING_EVENTS);
    Ok(())
}

fn start(connected_first: bool) -> Client {
    if connected_first {
        connected(Version::Win10V5_3)
    } else {
        Client::new(ClientConfig::default())
    }
}

fn sequence() -> impl Strategy<Value = (bool, Vec<Op>)> {
    (any::<bool>(), prop::collection::vec(op(), 1..160))
}

/// The random sequences reach every state (so the property test is not vacuous).
#[test]
fn random_sequences_reach_every_state() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let mut channel_states = alloc::collections::BTreeSet::new();
    let mut gpadl_states = alloc::collections::BTreeSet::new();
    let mut conn_states = alloc::collections::BTreeSet::new();
    for _ in 0..400 {
        let (first, ops) = sequence().new_tree(&mut runner).unwrap().current();
        let mut c = start(first);
        for op in &ops {
            step(&mut c, op).unwrap();
            conn_states.insert(c.connection_state().name());
            for ch in c.save().channels {
                channel_states.insert(alloc::format!("{:?}", ch.state));
            }
            for g in c.gpadls() {
                gpadl_states.insert(alloc::format!("{:?}", g.state));
            }
        }
    }
    assert_eq!(conn_states.len(), 4, "{conn_states:?}");
    assert_eq!(channel_states.len(), 6, "{channel_states:?}");
    assert_eq!(gpadl_states.len(), 3, "{gpadl_states:?}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn random_sequences_keep_invariants((first, ops) in sequence()) {
        let mut c = start(first);
        for op in &ops {
            step(&mut c, op)?;
        }
    }
}
