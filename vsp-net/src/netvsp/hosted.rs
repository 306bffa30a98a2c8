//! netvsp in a VSP process ([`vmbus_core::oop::HostedDevice`]): the device is built at the first
//! channel open (guest memory, the forwarded GPADL table and the in-flight journal arrive with
//! it); the receive and send buffer GPADLs the guest names come from
//! [`ChannelResources::gpadls`](vmbus_core::oop::ChannelResources).
//!
//! A restarted process is handed the state its predecessor saved ([`HostedDevice::restore`],
//! before any channel re-opens); it is applied when the primary channel opens, before the device
//! reads any guest packet, so the guest's session simply continues. What the dead process had
//! read but not answered is handled per the ring rules in [`super::core`] (a request is released
//! from the ring only once its completion is in the host→guest ring, so the successor answers it
//! again; a frame re-sent that way is a duplicate on the wire, which networks tolerate). Frames the
//! dead process had taken from the backend but not delivered are lost, like any dropped packet.

use super::device::{ChannelRings, Netvsp, NetvspResources};
use super::journal::RxJournal;
use super::state::SavedState;
use super::{NetvspConfig, NetvspStats};
use crate::backend::NetBackend;
use ringbuf::mmap::MappedRing;
use std::sync::{Arc, Mutex, PoisonError};
use vmbus_core::device::{ChannelControl, DeviceError, VmbusDevice};
use vmbus_core::memory::GuestMemory;
use vmbus_core::oop::{ChannelResources, HostedDevice};

type Slot = Arc<Mutex<Option<ChannelRings<MappedRing>>>>;

/// Refuses sub-channels (a host without a way to offer them).
struct NoSubchannels;

impl ChannelControl for NoSubchannels {
    fn offer_subchannels(&mut self, _: u16) -> u16 {
        0
    }
}

/// netvsp behind the VSP-process interface.
pub struct HostedNetvsp {
    cfg: NetvspConfig,
    backend: Option<Box<dyn NetBackend>>,
    subchannels: Option<Box<dyn ChannelControl + Send>>,
    dev: Option<Netvsp<MappedRing>>,
    slot: Slot,
    restored: Option<SavedState>,
    inherited_lent: usize,
}

impl HostedNetvsp {
    /// `subchannels` offers sub-channels when the guest asks for them (in a VSP process: a clone
    /// of the VMM connection sending `OfferSubchannels`); `None` refuses them.
    pub fn new(
        cfg: NetvspConfig,
        backend: Box<dyn NetBackend>,
        subchannels: Option<Box<dyn ChannelControl + Send>>,
    ) -> Self {
        HostedNetvsp {
            cfg,
            backend: Some(backend),
            subchannels,
            dev: None,
            slot: Arc::default(),
            restored: None,
            inherited_lent: 0,
        }
    }

    /// The device, once a channel has been opened.
    pub fn device(&self) -> Option<&Netvsp<MappedRing>> {
        self.dev.as_ref()
    }

    /// Counters (zero before the first open).
    pub fn stats(&self) -> NetvspStats {
        self.dev.as_ref().map(Netvsp::stats).unwrap_or_default()
    }

    /// Receive sections a restored session started with still lent to the guest.
    pub fn inherited_lent(&self) -> usize {
        self.inherited_lent
    }

    fn build(&mut self, ch: &ChannelResources) -> Result<(), DeviceError> {
        let backend = self.backend.take().ok_or(DeviceError::NoResources)?;
        let memory: Arc<dyn GuestMemory> = ch.memory.clone();
        let table = ch.gpadls.clone();
        let slot = self.slot.clone();
        let res = NetvspResources {
            memory,
            gpadls: Arc::new(move |h| table.get(h)),
            map_rings: Box::new(move |info| {
                slot.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .take()
                    .ok_or_else(|| {
                        DeviceError::RingMapping(format!("channel {}: no rings", info.relid))
                    })
            }),
            subchannels: self
                .subchannels
                .take()
                .unwrap_or_else(|| Box::new(NoSubchannels)),
        };
        let mut dev = Netvsp::new(self.cfg.clone(), backend, res)
            .map_err(|e| DeviceError::RingMapping(e.to_string()))?;
        let journal = ch.inflight.clone().map(RxJournal::new);
        dev.with_core(|c| c.journal = journal);
        dev.spawn_worker()
            .map_err(|e| DeviceError::RingMapping(e.to_string()))?;
        self.dev = Some(dev);
        Ok(())
    }
}

impl HostedDevice for HostedNetvsp {
    fn open(
        &mut self,
        ch: ChannelResources,
        bus: &mut dyn ChannelControl,
    ) -> Result<(), DeviceError> {
        if self.dev.is_none() {
            self.build(&ch)?;
        }
        let dev = self.dev.as_mut().ok_or(DeviceError::NoResources)?;
        // At the first open after a restore (the supervisor re-opens the primary first, but any
        // channel will do: the state must be in place before the first channel is).
        if let Some(st) = self.restored.take() {
            // Before the channel is added: the worker must not see a guest packet first.
            match dev.with_core(|c| c.restore_state(&st)) {
                Ok(n) => {
                    self.inherited_lent = n;
                    tracing::info!(
                        inherited_lent = n,
                        version = ?st.nvsp_version,
                        "netvsp: session resumed"
                    );
                }
                Err(e) => {
                    tracing::warn!(error = %e, "netvsp: saved session not resumable");
                    return Err(e);
                }
            }
        }
        *self.slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(ChannelRings {
            inbound: ch.incoming,
            outbound: ch.outgoing,
            kick: Some(ch.kick),
            call: Some(ch.call),
        });
        let r = VmbusDevice::open(dev, ch.info, bus);
        self.slot
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        r
    }

    fn close(&mut self, relid: u32) {
        if let Some(d) = self.dev.as_mut() {
            VmbusDevice::close(d, relid);
        }
    }

    fn save(&self) -> Vec<u8> {
        match (&self.dev, &self.restored) {
            (_, Some(st)) => st.encode(),
            (Some(d), None) => d.with_core(|c| c.save_state()).encode(),
            (None, None) => Vec::new(),
        }
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), DeviceError> {
        if state.is_empty() {
            self.restored = None;
            return Ok(());
        }
        let st = SavedState::decode(state, self.cfg.max_queues.clamp(1, 64))?;
        if self
            .dev
            .as_ref()
            .is_some_and(|d| d.with_core(|c| !c.channels.is_empty()))
        {
            return Err(DeviceError::BadSavedState(
                "netvsp state restored with channels open".into(),
            ));
        }
        self.restored = Some(st);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::MemoryBackend;
    use crate::netvsp::SavedBuffer;

    fn hosted() -> HostedNetvsp {
        let (backend, _h) = MemoryBackend::new([2, 0, 0, 0, 0, 1], 16);
        let cfg = NetvspConfig {
            max_queues: 2,
            ..NetvspConfig::default()
        };
        HostedNetvsp::new(cfg, Box::new(backend), None)
    }

    #[test]
    fn restore_refuses_garbage_and_keeps_a_good_state_for_the_next_save() {
        let mut h = hosted();
        assert!(h.save().is_empty(), "nothing to save before a session");
        h.restore(&[]).unwrap();
        for bad in [&b"garbage"[..], &[0u8; 64][..], &[0xff; 3][..]] {
            assert!(matches!(h.restore(bad), Err(DeviceError::BadSavedState(_))));
        }
        let st = SavedState {
            nvsp_version: Some(vmbus_core::devices::nvsp::version::V5),
            ndis_version: Some((6, 30)),
            ndis_config: Some((1514, 0, 0)),
            mtu: 1514,
            granted: 1,
            table_pending: false,
            offered: 1,
            rx: Some(SavedBuffer {
                handle: 0x10,
                id: 0xcafe,
                section_size: 1806,
            }),
            tx: None,
            rndis_phase: 1,
            filter: 0x1b,
            mac: [2, 0, 0, 0, 0, 1],
            rx_csum: (true, true, true),
            rss: None,
            reported_link: Some(true),
        };
        h.restore(&st.encode()).unwrap();
        // A VMM that saves again before the channels re-open gets the same session back.
        assert_eq!(SavedState::decode(&h.save(), 2).unwrap(), st);
        // More sub-channels than this device has queues: refused.
        let mut too_many = st.clone();
        too_many.granted = 3;
        too_many.offered = 3;
        assert!(h.restore(&too_many.encode()).is_err());
    }
}
