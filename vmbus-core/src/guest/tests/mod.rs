//! Tests of the guest client, driven by hand-built host messages.

mod channels;
mod gpadl;
mod hostile;
mod negotiation;
mod proptests;

use alloc::vec::Vec;

use super::*;
use crate::wire::*;

/// A host message as the SynIC slot payload.
pub(super) fn host(msg: ChannelMessage<'_>) -> MessageBuf {
    msg.to_bytes().expect("host message serializes")
}

pub(super) fn version_response(supported: bool, msg_conn_id: u32) -> MessageBuf {
    host(ChannelMessage::VersionResponse {
        msg: VersionResponse {
            version_supported: u8::from(supported),
            msg_conn_id,
            ..VersionResponse::default()
        },
        supported_features: None,
        monitor_pages: None,
    })
}

pub(super) fn instance(n: u32) -> Guid {
    Guid::from_u128(0x1111_2222_3333_4444_5555_0000_0000_0000 | u128::from(n))
}

pub(super) fn offer_msg(relid: u32, class: Guid, inst: Guid, index: u16) -> OfferChannel {
    let mut o = OfferChannel {
        if_type: class,
        if_instance: inst,
        sub_channel_index: index,
        child_relid: relid,
        monitor_id: MONITOR_ID_NONE,
        connection_id: relid | 0x2000,
        ..OfferChannel::default()
    };
    o.set_dedicated_interrupt(true);
    o
}

pub(super) fn offer(relid: u32, class: Guid, inst: Guid, index: u16) -> MessageBuf {
    host(ChannelMessage::OfferChannel(offer_msg(
        relid, class, inst, index,
    )))
}

pub(super) fn rescind(relid: u32) -> MessageBuf {
    host(ChannelMessage::RescindChannelOffer(RescindChannelOffer {
        child_relid: relid,
        ..RescindChannelOffer::default()
    }))
}

pub(super) fn all_offers() -> MessageBuf {
    host(ChannelMessage::AllOffersDelivered(
        AllOffersDelivered::default(),
    ))
}

pub(super) fn open_result(relid: u32, openid: u32, status: u32) -> MessageBuf {
    host(ChannelMessage::OpenChannelResult(OpenChannelResult {
        child_relid: relid,
        openid,
        status,
        ..OpenChannelResult::default()
    }))
}

pub(super) fn gpadl_created(relid: u32, handle: u32, status: u32) -> MessageBuf {
    host(ChannelMessage::GpadlCreated(GpadlCreated {
        child_relid: relid,
        gpadl: handle,
        creation_status: status,
        ..GpadlCreated::default()
    }))
}

pub(super) fn gpadl_torndown(handle: u32) -> MessageBuf {
    host(ChannelMessage::GpadlTorndown(GpadlTorndown {
        gpadl: handle,
        ..GpadlTorndown::default()
    }))
}

pub(super) fn modify_response(relid: u32, status: u32) -> MessageBuf {
    host(ChannelMessage::ModifyChannelResponse(
        ModifyChannelResponse {
            child_relid: relid,
            status,
            ..ModifyChannelResponse::default()
        },
    ))
}

pub(super) fn unload_response() -> MessageBuf {
    host(ChannelMessage::UnloadResponse(UnloadResponse::default()))
}

pub(super) fn posts(c: &mut Client) -> Vec<Post> {
    core::iter::from_fn(|| c.poll_post()).collect()
}

pub(super) fn events(c: &mut Client) -> Vec<ClientEvent> {
    core::iter::from_fn(|| c.poll_event()).collect()
}

/// The one post queued, checked to go to `conn_id`, parsed.
pub(super) fn one_post(c: &mut Client, conn_id: u32) -> MessageBuf {
    let p = posts(c);
    assert_eq!(p.len(), 1, "expected one post, got {p:?}");
    assert_eq!(p[0].connection_id, conn_id, "post {:?}", p[0]);
    p[0].msg
}

pub(super) fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

pub(super) fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

/// Message connection id the tests' host returns for versions ≥ 5.0.
pub(super) const HOST_MSG_CONN: u32 = 0x77;

/// A client connected at `version` (every newer version refused first), queues drained.
pub(super) fn connected(version: Version) -> Client {
    let mut c = Client::new(ClientConfig::default());
    c.connect().unwrap();
    for v in Version::LINUX_NEGOTIATION_ORDER {
        posts(&mut c);
        if v == version {
            c.handle_message(&version_response(true, HOST_MSG_CONN))
                .unwrap();
            break;
        }
        c.handle_message(&version_response(false, 0)).unwrap();
    }
    assert_eq!(c.version(), Some(version));
    posts(&mut c);
    events(&mut c);
    c
}

/// Connected at 5.3 with SCSI primary relid `relid` offered (instance `relid`).
pub(super) fn with_channel(relid: u32) -> Client {
    let mut c = connected(Version::Win10V5_3);
    c.handle_message(&offer(relid, class::SCSI, instance(relid), 0))
        .unwrap();
    events(&mut c);
    c
}

/// Creates a `pages`-page GPADL on `relid` and completes it; returns the handle.
pub(super) fn created_gpadl(c: &mut Client, relid: u32, pages: u64) -> u32 {
    let pfns: Vec<u64> = (0x100..0x100 + pages).collect();
    events(c);
    let h = c.create_gpadl(relid, &pfns).unwrap();
    posts(c);
    c.handle_message(&gpadl_created(relid, h, 0)).unwrap();
    assert_eq!(
        events(c),
        [ClientEvent::GpadlCreated {
            relid,
            handle: h,
            status: 0
        }]
    );
    h
}

/// `with_channel(relid)` plus an 8-page ring GPADL and a successful open on VP 0.
pub(super) fn with_open_channel(relid: u32) -> (Client, u32) {
    let mut c = with_channel(relid);
    let h = created_gpadl(&mut c, relid, 8);
    c.open_channel(relid, OpenParams::new(h, 4, 0)).unwrap();
    posts(&mut c);
    c.handle_message(&open_result(relid, relid, 0)).unwrap();
    assert_eq!(
        events(&mut c),
        [ClientEvent::OpenResult { relid, status: 0 }]
    );
    assert_eq!(c.channel_state(relid), Some(ChannelState::Open));
    (c, h)
}

/// Asserts that `f` returns an error and leaves the client as it was.
pub(super) fn refused(
    c: &mut Client,
    f: impl FnOnce(&mut Client) -> Result<(), ClientError>,
) -> ClientError {
    let before = c.save();
    let err = f(c).expect_err("expected an error");
    assert_eq!(c.save(), before, "state changed by refused call: {err}");
    c.check_invariants().unwrap();
    err
}
