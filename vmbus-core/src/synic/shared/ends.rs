//! The host and guest ends of a shared port.

use core::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ringbuf::mmap::MappedRing;
use ringbuf::signal::Doorbell;
use ringbuf::{OutgoingPacket, PacketType, RingReader, RingWriter, WriteError};

use super::super::local::lock;
use super::super::message::{
    HVMSG_CHANNEL_MESSAGE, HvMessage, MAX_PAYLOAD, MessageError, Payload, PostedMessage,
    SynicMessage,
};
use super::super::page::{Delivery, EventFlags, PageMem, SlotReader, SlotWriter};
use super::super::queue::VpMessageQueues;
use super::super::{
    CONNECTION_ID_MASK, GuestPort, HostInbox, HostPort, HvStatus, MIN_POST_PAYLOAD, PortKind, Sint,
    SynicError, check_post_payload,
};
use super::mem::{
    EMPTY, KIND_EVENT, KIND_MESSAGE, MAX_PORTS, MappedPage, REMOVED, SharedLayout, TABLE_SLOTS,
    VP_EOM, entry_kind, host_latch, table_hash, table_lookup, table_word, vp_latch, vp_word,
};

pub(super) struct HostVp {
    pub(super) simp: MappedPage,
    pub(super) sief: MappedPage,
    pub(super) queues: Mutex<VpMessageQueues>,
    pub(super) bell: Doorbell,
}

/// The host's private copy of the connection table (the shared one is written from it).
pub(super) struct Table {
    pub(super) entries: Vec<u32>,
    pub(super) live: usize,
}

/// The host end of a shared port.
pub struct SharedHost {
    pub(super) layout: SharedLayout,
    pub(super) header: MappedPage,
    pub(super) events: MappedPage,
    pub(super) table_pages: [MappedPage; 2],
    pub(super) vps: Vec<HostVp>,
    pub(super) bell: Doorbell,
    pub(super) table: Mutex<Table>,
    pub(super) ring: Mutex<RingReader<MappedRing>>,
    pub(super) spins: u32,
    pub(super) dropped: AtomicU64,
}

impl SharedHost {
    /// Polls of the interrupt latch before [`HostInbox::wait`] sleeps.
    pub fn with_spins(mut self, spins: u32) -> Self {
        self.spins = spins;
        self
    }

    fn vp(&self, vp: u32) -> Result<&HostVp, SynicError> {
        self.vps.get(vp as usize).ok_or(SynicError::InvalidVp {
            vp,
            vps: self.layout.vps,
        })
    }

    /// Handles the EOMs guests wrote: offers queued messages to the freed slots and raises the
    /// SINT of each VP that got one. Returns how many messages were delivered.
    pub fn service_eom(&self) -> Result<usize, SynicError> {
        let mut total = 0;
        for (vp, v) in self.vps.iter().enumerate() {
            let eom = vp_word(&self.header, vp as u32, VP_EOM);
            if eom.load(Ordering::Relaxed) == 0 || eom.swap(0, Ordering::SeqCst) == 0 {
                continue;
            }
            let n = lock(&v.queues).on_eom(&SlotWriter::new(&v.simp));
            if n > 0 {
                vp_latch(&self.header, vp as u32, &v.bell).raise()?;
            }
            total += n;
        }
        Ok(total)
    }

    /// Messages waiting behind busy slots for (vp, sint).
    pub fn queued(&self, vp: u32, sint: Sint) -> Result<usize, SynicError> {
        Ok(lock(&self.vp(vp)?.queues).queued(sint))
    }

    /// Guest posts dropped because they named no message port or had a bad size.
    pub fn dropped_messages(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    fn drop_message(&self, why: &'static str, connection_id: u32, len: u64) {
        let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            tracing::warn!(
                why,
                connection_id,
                len,
                dropped = n,
                "dropping guest SynIC post"
            );
        }
    }
}

impl HostPort for SharedHost {
    fn post_to_guest(&self, vp: u32, sint: Sint, payload: &[u8]) -> Result<Delivery, SynicError> {
        let v = self.vp(vp)?;
        let msg = HvMessage::new(HVMSG_CHANNEL_MESSAGE, payload)
            .ok_or(SynicError::PayloadTooLarge(payload.len()))?;
        let outcome = lock(&v.queues).post(&SlotWriter::new(&v.simp), sint, msg)?;
        if outcome.interrupt {
            vp_latch(&self.header, vp, &v.bell).raise()?;
        }
        Ok(outcome.delivery)
    }

    fn signal_guest(&self, vp: u32, sint: Sint, flag: u32) -> Result<bool, SynicError> {
        let v = self.vp(vp)?;
        let newly = EventFlags::new(&v.sief).set(sint, flag)?;
        if newly {
            vp_latch(&self.header, vp, &v.bell).raise()?;
        }
        Ok(newly)
    }

    fn register_port(&self, connection_id: u32, kind: PortKind) -> Result<(), SynicError> {
        if connection_id == 0 || connection_id > CONNECTION_ID_MASK {
            return Err(SynicError::InvalidConnectionId(connection_id));
        }
        let mut t = lock(&self.table);
        if table_lookup(connection_id, |i| t.entries[i]).is_some() {
            return Err(SynicError::PortExists(connection_id));
        }
        if t.live >= MAX_PORTS {
            return Err(SynicError::TooManyPorts(t.live));
        }
        let mut i = table_hash(connection_id);
        while t.entries[i] != EMPTY && t.entries[i] != REMOVED {
            // Terminates: fewer than TABLE_SLOTS entries are live.
            i = (i + 1) % TABLE_SLOTS;
        }
        let entry = connection_id
            | match kind {
                PortKind::Message => KIND_MESSAGE,
                PortKind::Event => KIND_EVENT,
            };
        t.entries[i] = entry;
        t.live += 1;
        table_word(&self.table_pages, i).store(entry, Ordering::Release);
        Ok(())
    }

    fn unregister_port(&self, connection_id: u32) -> bool {
        let mut t = lock(&self.table);
        let Some((i, _)) = table_lookup(connection_id, |i| t.entries[i]) else {
            return false;
        };
        t.entries[i] = REMOVED;
        t.live -= 1;
        table_word(&self.table_pages, i).store(REMOVED, Ordering::Release);
        // A stale signal for the old port must not fire a later port in the same slot.
        self.events.words()[i / 32].fetch_and(!(1 << (i % 32)), Ordering::AcqRel);
        true
    }
}

impl HostInbox for SharedHost {
    fn recv_message(&self) -> Result<Option<PostedMessage>, SynicError> {
        self.service_eom()?;
        let fault = |e: ringbuf::RingError| SynicError::GuestFault {
            what: "guest→host message ring",
            detail: e.to_string(),
        };
        let mut reader = lock(&self.ring);
        loop {
            let mut buf = [0u8; MAX_PAYLOAD];
            let (connection_id, len) = {
                let Some(pkt) = reader.peek().map_err(fault)? else {
                    return Ok(None);
                };
                let connection_id = pkt.trans_id() as u32;
                let len = pkt.trans_id() >> 32;
                let ok = pkt.packet_type() == PacketType::InBand
                    && (MIN_POST_PAYLOAD as u64..=MAX_PAYLOAD as u64).contains(&len)
                    && len as usize <= pkt.payload_len()
                    && pkt.copy_payload(0, &mut buf[..len as usize]).is_ok();
                pkt.consume();
                (connection_id, if ok { Some(len as usize) } else { None })
            };
            reader.commit().map_err(fault)?;
            let Some(len) = len else {
                self.drop_message("malformed record", connection_id, 0);
                continue;
            };
            let kind = {
                let t = lock(&self.table);
                table_lookup(connection_id, |i| t.entries[i]).map(|(_, k)| k)
            };
            if kind != Some(PortKind::Message) {
                self.drop_message("not a message port", connection_id, len as u64);
                continue;
            }
            let Some(payload) = Payload::new(&buf[..len]) else {
                continue;
            };
            return Ok(Some(PostedMessage {
                connection_id,
                payload,
            }));
        }
    }

    fn take_events(&self, f: &mut dyn FnMut(u32)) -> Result<usize, SynicError> {
        let mut fired = Vec::new();
        for (w, word) in self.events.words()[..TABLE_SLOTS / 32].iter().enumerate() {
            if word.load(Ordering::Relaxed) == 0 {
                continue;
            }
            let mut bits = word.swap(0, Ordering::AcqRel);
            while bits != 0 {
                fired.push(w * 32 + bits.trailing_zeros() as usize);
                bits &= bits - 1;
            }
        }
        if fired.is_empty() {
            return Ok(0);
        }
        let ids: Vec<u32> = {
            let t = lock(&self.table);
            fired
                .iter()
                .filter_map(|&i| {
                    let e = t.entries[i];
                    (e != REMOVED && entry_kind(e) == Some(PortKind::Event))
                        .then_some(e & CONNECTION_ID_MASK)
                })
                .collect()
        };
        ids.iter().for_each(|&id| f(id));
        Ok(ids.len())
    }

    fn wait(&self, timeout: Option<Duration>) -> Result<bool, SynicError> {
        let woke = host_latch(&self.header, &self.bell).wait(self.spins, timeout)?;
        self.service_eom()?;
        Ok(woke)
    }
}

pub(super) struct GuestCommon {
    pub(super) header: MappedPage,
    pub(super) events: MappedPage,
    pub(super) table_pages: [MappedPage; 2],
    pub(super) host_bell: Doorbell,
    pub(super) writer: Mutex<RingWriter<MappedRing>>,
}

impl GuestCommon {
    fn lookup(&self, connection_id: u32) -> Option<(usize, PortKind)> {
        table_lookup(connection_id, |i| {
            table_word(&self.table_pages, i).load(Ordering::Acquire)
        })
    }

    fn raise_host(&self) -> Result<(), HvStatus> {
        host_latch(&self.header, &self.host_bell)
            .raise()
            .map_err(|e| {
                tracing::warn!(error = %e, "ringing the host doorbell failed");
                HvStatus::InvalidSynicState
            })
    }
}

/// One VP of the guest end of a shared port.
pub struct SharedGuest {
    pub(super) common: Arc<GuestCommon>,
    pub(super) vp: u32,
    pub(super) simp: MappedPage,
    pub(super) sief: MappedPage,
    pub(super) bell: Doorbell,
    pub(super) spins: u32,
}

impl SharedGuest {
    /// Polls of the interrupt latch before [`GuestPort::wait`] sleeps.
    pub fn with_spins(mut self, spins: u32) -> Self {
        self.spins = spins;
        self
    }

    /// This VP's message page (tests play a hostile guest through it).
    pub fn message_page(&self) -> &MappedPage {
        &self.simp
    }

    /// This VP's event-flag page.
    pub fn event_page(&self) -> &MappedPage {
        &self.sief
    }
}

impl GuestPort for SharedGuest {
    fn vp(&self) -> u32 {
        self.vp
    }

    fn post_message(&self, connection_id: u32, payload: &[u8]) -> Result<(), HvStatus> {
        check_post_payload(payload)?;
        let connection_id = connection_id & CONNECTION_ID_MASK;
        match self.common.lookup(connection_id) {
            Some((_, PortKind::Message)) => {}
            _ => return Err(HvStatus::InvalidConnectionId),
        }
        let trans_id = (payload.len() as u64) << 32 | u64::from(connection_id);
        let parts = [payload];
        let written =
            lock(&self.common.writer).try_write(&OutgoingPacket::in_band(trans_id, false, &parts));
        match written {
            Ok(_) => self.common.raise_host(),
            Err(WriteError::Full { .. }) => Err(HvStatus::InsufficientBuffers),
            Err(e) => {
                tracing::warn!(error = %e, "guest→host message ring unusable");
                Err(HvStatus::InvalidSynicState)
            }
        }
    }

    fn signal_event(&self, connection_id: u32, _flag: u16) -> Result<(), HvStatus> {
        let connection_id = connection_id & CONNECTION_ID_MASK;
        let Some((slot, PortKind::Event)) = self.common.lookup(connection_id) else {
            return Err(HvStatus::InvalidConnectionId);
        };
        let bit = 1u32 << (slot % 32);
        let old = self.common.events.words()[slot / 32].fetch_or(bit, Ordering::SeqCst);
        if old & bit == 0 {
            self.common.raise_host()?;
        }
        Ok(())
    }

    fn next_message(&self, sint: Sint) -> Option<Result<SynicMessage, MessageError>> {
        let taken = SlotReader::new(&self.simp).take(sint)?;
        if taken.eom_needed {
            vp_word(&self.common.header, self.vp, VP_EOM).store(1, Ordering::SeqCst);
            if self.common.raise_host().is_err() {
                tracing::warn!(vp = self.vp, "EOM could not reach the host");
            }
        }
        Some(taken.message)
    }

    fn take_events(&self, sint: Sint, f: &mut dyn FnMut(u32)) -> usize {
        EventFlags::new(&self.sief).take_all(sint, f)
    }

    fn wait(&self, timeout: Option<Duration>) -> Result<bool, SynicError> {
        Ok(vp_latch(&self.common.header, self.vp, &self.bell).wait(self.spins, timeout)?)
    }
}
