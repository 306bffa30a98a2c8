//! The VSP process side: serve one device over a connection from the VMM.

use super::inflight::InflightRegion;
use super::irqflag::{FlagSetter, FlagTarget};
use super::regions::GuestRegions;
use super::socket::{Connection, RecvError};
use super::wire::{ChannelOpen, FEATURES, GpadlInfo, Message, PROTOCOL_VERSION, ProtocolError, ty};
use crate::device::{ChannelControl, DeviceError, OpenChannelInfo};
use crate::gpadl::{Gpadl, GpadlRange};
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use ringbuf::mmap::MappedRing;
use ringbuf::signal::Doorbell;
use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::{Arc, RwLock};

/// The GPADLs the VMM forwarded (validated against guest memory), shared with the device: what it
/// looks buffers up in when the guest names them by handle (netvsp's receive and send buffers).
#[derive(Debug, Default)]
pub struct GpadlTable(RwLock<BTreeMap<u32, Gpadl>>);

impl GpadlTable {
    /// A copy of GPADL `handle`, if the VMM forwarded it and has not revoked it.
    pub fn get(&self, handle: u32) -> Option<Gpadl> {
        self.0.read().ok()?.get(&handle).cloned()
    }

    /// Adds a GPADL (in-process hosts fill the table themselves); `false` if the handle is taken.
    pub fn insert(&self, g: Gpadl) -> bool {
        match self.0.write() {
            Ok(mut m) if !m.contains_key(&g.handle) => {
                m.insert(g.handle, g);
                true
            }
            _ => false,
        }
    }

    pub fn remove(&self, handle: u32) -> bool {
        self.0
            .write()
            .is_ok_and(|mut m| m.remove(&handle).is_some())
    }
}

/// Checks a forwarded GPADL: ranges allowed and covering exactly the PFNs, every page guest RAM.
fn validate_gpadl(g: GpadlInfo, memory: &GuestRegions) -> Option<Gpadl> {
    let mut ranges = Vec::with_capacity(g.ranges.len());
    let mut first = 0usize;
    for &(byte_offset, byte_count, n) in &g.ranges {
        let needed = (u64::from(byte_offset) + u64::from(byte_count)).div_ceil(4096);
        if byte_count == 0 || byte_offset >= 4096 || needed != u64::from(n) {
            return None;
        }
        ranges.push(GpadlRange {
            byte_offset,
            byte_count,
            first_pfn: first,
            pfn_count: n as usize,
        });
        first = first.checked_add(n as usize)?;
    }
    if g.ranges.is_empty()
        || first != g.pfns.len()
        || g.pfns.iter().any(|&p| memory.page_source(p).is_none())
    {
        return None;
    }
    Some(Gpadl {
        handle: g.handle,
        relid: g.relid,
        ranges,
        pfns: g.pfns,
    })
}

/// Everything a device needs to serve one open channel in a VSP process.
pub struct ChannelResources {
    pub info: OpenChannelInfo,
    pub memory: Arc<GuestRegions>,
    /// Guest → host ring (the device reads it).
    pub incoming: MappedRing,
    /// Host → guest ring (the device writes it).
    pub outgoing: MappedRing,
    /// Rung by the guest side: data in `incoming` or space in `outgoing`.
    pub kick: Doorbell,
    /// Ring it to interrupt the guest: data in `outgoing` or space in `incoming`.
    pub call: Doorbell,
    /// GPADLs the VMM forwarded for this VSP's channels (shared by all of them).
    pub gpadls: Arc<GpadlTable>,
    /// The in-flight journal that outlives this process (shared by all channels), if the VMM
    /// sent one.
    pub inflight: Option<Arc<InflightRegion>>,
}

/// A device hosted in a VSP process.
pub trait HostedDevice {
    /// Start serving a channel. An error fails the guest's open.
    fn open(
        &mut self,
        channel: ChannelResources,
        bus: &mut dyn ChannelControl,
    ) -> Result<(), DeviceError>;
    /// Stop touching the channel's rings before returning.
    fn close(&mut self, relid: u32);
    fn retarget(&mut self, relid: u32, target_vp: u32) {
        let _ = (relid, target_vp);
    }
    fn save(&self) -> Vec<u8> {
        Vec::new()
    }
    fn restore(&mut self, state: &[u8]) -> Result<(), DeviceError> {
        crate::device::restore_stateless(state)
    }
}

/// Why serving stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("connection: {0}")]
    Recv(#[from] RecvError),
    #[error("send: {0}")]
    Send(#[from] std::io::Error),
    #[error("VMM violated the protocol: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("event loop: {0}")]
    EventLoop(event_manager::Error),
}

/// Reply status values.
pub mod status {
    pub const OK: u32 = 0;
    pub const BAD_REQUEST: u32 = 1;
    pub const DEVICE_ERROR: u32 = 2;
}

struct Bus<'a> {
    conn: &'a Connection,
}

impl ChannelControl for Bus<'_> {
    fn offer_subchannels(&mut self, count: u16) -> u16 {
        // Asynchronous: the VMM answers with a Reply the serve loop consumes.
        match self.conn.send(&Message::OfferSubchannels { count }, &[]) {
            Ok(()) => count,
            Err(_) => 0,
        }
    }
}

/// The VSP's control loop: everything the VMM has set up so far, fed one message at a time by an
/// `event_manager` loop watching the socket. Only this loop takes control messages; the data path
/// runs elsewhere — each device serves its channel rings on its own threads (storvsp: one per
/// channel; netvsp: one worker for all of them), which spin briefly and then park on the channel's
/// kick eventfd (`ringbuf::signal`). They stay off the event manager on purpose: a ring worker must
/// not wait behind control messages (a memory table or an open can take milliseconds), and the
/// spin-then-park receiver saves the epoll round trip when the guest keeps the ring busy.
struct Control<'a> {
    conn: &'a Connection,
    device: &'a mut dyn HostedDevice,
    memory: Option<Arc<GuestRegions>>,
    open: BTreeSet<u32>,
    /// Event-flag target of every open channel (set by `SignalTarget`).
    targets: BTreeMap<u32, Arc<FlagTarget>>,
    gpadls: Arc<GpadlTable>,
    inflight: Option<Arc<InflightRegion>>,
    /// Set when serving ends: `Ok` when the VMM hung up, `Err` when it broke the protocol.
    outcome: Option<Result<(), ServeError>>,
}

impl Control<'_> {
    /// Takes one message off the socket (the loop saw it readable, so this does not block).
    fn step(&mut self) {
        match self.conn.recv(None) {
            Ok((msg, fds)) => {
                if let Err(e) = self.handle(msg, fds) {
                    self.outcome = Some(Err(e));
                }
            }
            Err(RecvError::Closed) => {
                for relid in std::mem::take(&mut self.open) {
                    self.device.close(relid);
                }
                self.targets.clear();
                self.outcome = Some(Ok(()));
            }
            Err(e) => self.outcome = Some(Err(e.into())),
        }
    }

    fn handle(&mut self, msg: Message, fds: Vec<OwnedFd>) -> Result<(), ServeError> {
        let conn = self.conn;
        let reply = |request: u32, relid: u32, status: u32| Message::Reply {
            request,
            relid,
            status,
        };
        match msg {
            Message::SetMemory { regions } => {
                let status = if !self.open.is_empty() {
                    status::BAD_REQUEST
                } else {
                    match GuestRegions::map(&regions, fds) {
                        Ok(m) => {
                            self.memory = Some(Arc::new(m));
                            status::OK
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "VSP: memory table refused");
                            status::BAD_REQUEST
                        }
                    }
                };
                conn.send(&reply(ty::SET_MEMORY, 0, status), &[])?;
            }
            Message::Inflight { size } => {
                let status = match fds.into_iter().next() {
                    Some(fd) if self.open.is_empty() => match InflightRegion::map(fd, size) {
                        Ok(r) => {
                            self.inflight = Some(Arc::new(r));
                            status::OK
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "VSP: in-flight journal refused");
                            status::BAD_REQUEST
                        }
                    },
                    _ => status::BAD_REQUEST,
                };
                conn.send(&reply(ty::INFLIGHT, 0, status), &[])?;
            }
            Message::Open(o) => {
                let relid = o.relid;
                let status = match (&self.memory, self.open.contains(&relid)) {
                    (Some(mem), false) => {
                        let target = Arc::new(FlagTarget::none());
                        match open_channel(
                            mem,
                            &self.gpadls,
                            self.inflight.as_ref(),
                            (o, &target),
                            fds,
                            conn,
                            self.device,
                        ) {
                            Ok(()) => {
                                self.open.insert(relid);
                                self.targets.insert(relid, target);
                                status::OK
                            }
                            Err(s) => s,
                        }
                    }
                    _ => status::BAD_REQUEST,
                };
                conn.send(&reply(ty::OPEN, relid, status), &[])?;
            }
            Message::Close { relid } => {
                let status = if self.open.remove(&relid) {
                    self.targets.remove(&relid);
                    self.device.close(relid);
                    status::OK
                } else {
                    status::BAD_REQUEST
                };
                conn.send(&reply(ty::CLOSE, relid, status), &[])?;
            }
            Message::Gpadl(g) => {
                let handle = g.handle;
                let ok = self
                    .memory
                    .as_ref()
                    .and_then(|m| validate_gpadl(g, m))
                    .is_some_and(|g| self.gpadls.insert(g));
                let status = if ok { status::OK } else { status::BAD_REQUEST };
                conn.send(&reply(ty::GPADL, handle, status), &[])?;
            }
            Message::GpadlRevoke { handle } => {
                let status = if self.gpadls.remove(handle) {
                    status::OK
                } else {
                    status::BAD_REQUEST
                };
                conn.send(&reply(ty::GPADL_REVOKE, handle, status), &[])?;
            }
            Message::Retarget { relid, target_vp } => {
                if self.open.contains(&relid) {
                    self.device.retarget(relid, target_vp);
                }
            }
            Message::SignalTarget { relid, target } => {
                // Hostile input: the word must be guest memory of the table (aligned, in one
                // region) and the channel open; anything else is refused and changes nothing.
                let in_memory = |(gpa, _): (u64, u32)| {
                    self.memory
                        .as_ref()
                        .is_some_and(|m| m.atomic_u32(gpa).is_some())
                };
                let ok = match self.targets.get(&relid) {
                    Some(t) if target.is_none_or(in_memory) => t.set(target),
                    _ => false,
                };
                if !ok {
                    tracing::warn!(relid, ?target, "VSP: signal target refused");
                }
                let status = if ok { status::OK } else { status::BAD_REQUEST };
                conn.send(&reply(ty::SIGNAL_TARGET, relid, status), &[])?;
            }
            Message::Save => conn.send(
                &Message::State {
                    state: self.device.save(),
                },
                &[],
            )?,
            Message::Restore { state } => {
                let status = match self.device.restore(&state) {
                    Ok(()) => status::OK,
                    Err(_) => status::DEVICE_ERROR,
                };
                conn.send(&reply(ty::RESTORE, 0, status), &[])?;
            }
            // The VMM's answer to OfferSubchannels.
            Message::Reply {
                request: ty::OFFER_SUBCHANNELS,
                ..
            } => {}
            Message::Hello { .. } => return Err(ProtocolError::Unexpected("second Hello").into()),
            _ => return Err(ProtocolError::Unexpected("VSP-to-VMM message from the VMM").into()),
        }
        Ok(())
    }
}

impl MutEventSubscriber for Control<'_> {
    fn init(&mut self, ops: &mut EventOps) {
        let ev = Events::new_raw(self.conn.as_fd().as_raw_fd(), EventSet::IN);
        if let Err(e) = ops.add(ev) {
            self.outcome = Some(Err(ServeError::EventLoop(e)));
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if self.outcome.is_none() {
            self.step();
        }
        if self.outcome.is_some() {
            let _ = ops.remove(events);
        }
    }
}

/// Serves `device` until the VMM closes the connection (`Ok`) or breaks the protocol (`Err`; the
/// caller exits and the VMM restarts it).
pub fn serve(conn: &Connection, device: &mut dyn HostedDevice) -> Result<(), ServeError> {
    let (hello, _) = conn.recv(None)?;
    match hello {
        Message::Hello {
            version: PROTOCOL_VERSION,
            ..
        } => {}
        Message::Hello { version, .. } => return Err(ProtocolError::Version(version).into()),
        _ => return Err(ProtocolError::Unexpected("message before Hello").into()),
    }
    conn.send(
        &Message::Hello {
            version: PROTOCOL_VERSION,
            features: FEATURES,
        },
        &[],
    )?;
    let mut em = EventManager::<Control<'_>>::new().map_err(ServeError::EventLoop)?;
    let id = em.add_subscriber(Control {
        conn,
        device,
        memory: None,
        open: BTreeSet::new(),
        targets: BTreeMap::new(),
        gpadls: Arc::new(GpadlTable::default()),
        inflight: None,
        outcome: None,
    });
    loop {
        if let Some(r) = em
            .subscriber_mut(id)
            .map_err(ServeError::EventLoop)?
            .outcome
            .take()
        {
            return r;
        }
        em.run().map_err(ServeError::EventLoop)?;
    }
}

fn open_channel(
    memory: &Arc<GuestRegions>,
    gpadls: &Arc<GpadlTable>,
    inflight: Option<&Arc<InflightRegion>>,
    (o, target): (ChannelOpen, &Arc<FlagTarget>),
    fds: Vec<OwnedFd>,
    conn: &Connection,
    device: &mut dyn HostedDevice,
) -> Result<(), u32> {
    let n = o.ring_pages.len();
    let offset = o.downstream_offset as usize;
    if offset < 2 || n.saturating_sub(offset) < 2 {
        return Err(status::BAD_REQUEST);
    }
    let mut sources = Vec::with_capacity(n);
    for &pfn in &o.ring_pages {
        sources.push(memory.page_source(pfn).ok_or(status::BAD_REQUEST)?);
    }
    let (up, down) = sources.split_at(offset);
    let incoming = MappedRing::map_page_list(up).map_err(|_| status::BAD_REQUEST)?;
    let outgoing = MappedRing::map_page_list(down).map_err(|_| status::BAD_REQUEST)?;
    let mut fds = fds.into_iter();
    let (Some(kick), Some(call)) = (fds.next(), fds.next()) else {
        return Err(status::BAD_REQUEST);
    };
    let info = OpenChannelInfo {
        relid: o.relid,
        subchannel_index: o.subchannel_index,
        ring_pages: o.ring_pages,
        downstream_offset: o.downstream_offset,
        target_vp: o.target_vp,
        connection_id: o.connection_id,
        user_data: o.user_data,
    };
    let res = ChannelResources {
        info,
        memory: memory.clone(),
        incoming,
        outgoing,
        kick: Doorbell::from_fd(kick),
        call: Doorbell::from_fd(call).with_hook(Arc::new(FlagSetter {
            target: target.clone(),
            memory: memory.clone(),
        })),
        gpadls: gpadls.clone(),
        inflight: inflight.cloned(),
    };
    device.open(res, &mut Bus { conn }).map_err(|e| {
        tracing::warn!(error = %e, "VSP: device refused open");
        status::DEVICE_ERROR
    })
}
