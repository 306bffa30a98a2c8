//! A switch port as a netvsp [`NetBackend`]: the guest NIC's frames enter the switch with their
//! offload metadata; frames for the guest are segmented and checksum-completed in the device's
//! own thread (netvsp's `RxMeta` cannot carry super-frames or pending checksums).

use std::os::fd::{AsRawFd, RawFd};

use tracing::debug;

use super::{DropReason, PortHandle, PortKind};
use crate::backend::{BackendCaps, NetBackend, NetError, RxMeta, TxMeta};
use crate::tap::net_backend::{MAX_GSO_SIZE, deliver_rx, frame_meta_from_tx};

impl NetBackend for PortHandle {
    /// Policy drops (spoofed source, VLAN not allowed, packet filter) return `Ok`, like a real
    /// switch; they show in the port counters. A unicast frame whose destination queue is full
    /// returns `WouldBlock`.
    fn send(&mut self, frame: &[u8], meta: &TxMeta) -> Result<(), NetError> {
        let fm = frame_meta_from_tx(meta)?;
        let r = PortHandle::send(self, frame, &fm);
        match r.ingress_drop {
            Some(DropReason::BadOffload) => Err(NetError::Unsupported(
                "offload metadata does not match the frame",
            )),
            Some(DropReason::Oversize) => Err(NetError::FrameTooLarge {
                len: frame.len(),
                max: MAX_GSO_SIZE,
            }),
            Some(DropReason::Runt) => Err(NetError::Unsupported(
                "frame shorter than an Ethernet header",
            )),
            Some(_) => Ok(()),
            None if !r.flooded && r.delivered == 0 && r.queue_full > 0 => Err(NetError::WouldBlock),
            None => Ok(()),
        }
    }

    fn poll_recv(
        &mut self,
        budget: usize,
        out: &mut dyn FnMut(&[u8], &RxMeta),
    ) -> Result<usize, NetError> {
        let shared = self.shared.clone();
        Ok(PortHandle::poll_recv(self, budget, &mut |f, m| {
            if let Err(e) = deliver_rx(f, m, false, out) {
                debug!(port = shared.id, error = %e, "dropping frame for the guest");
                shared.count_drop(DropReason::BadOffload);
            }
        }))
    }

    fn link_up(&self) -> bool {
        self.is_enabled()
    }

    fn mac(&self) -> [u8; 6] {
        match self.kind() {
            PortKind::Nic { mac } => mac,
            PortKind::Uplink => [0; 6],
        }
    }

    fn caps(&self) -> BackendCaps {
        BackendCaps {
            tx_csum: true,
            tx_gso: true,
            max_gso_size: MAX_GSO_SIZE,
            tx_vlan: true,
        }
    }

    fn rx_fd(&self) -> Option<RawFd> {
        Some(self.notify_fd().as_raw_fd())
    }
}
