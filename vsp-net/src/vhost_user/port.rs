//! What a virtio NIC is attached to: a TAP (its vnet header is the virtio-net header, so offload
//! metadata passes straight through) or a port of the virtual switch (the same [`Switch`] and
//! [`PortHandle`] netvsp NICs use, so both kinds of NIC share one L2 segment).

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tracing::{debug, info};

use super::ctrl::RxFilter;
use crate::backend::NetError;
use crate::switch::{MacAddr, PortConfig, PortHandle, PortKind, Switch};
use crate::tap::net_backend::net_error;
use crate::tap::{FrameMeta, GsoKind, Tap, TapError, TapOffloads, offload};

/// Receive offloads the driver accepted (`GUEST_*` features).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestOffloads {
    /// Partial checksums.
    pub csum: bool,
    /// TCPv4 super-frames.
    pub tso4: bool,
    /// TCPv6 super-frames.
    pub tso6: bool,
    /// TSO super-frames with ECN.
    pub ecn: bool,
}

impl GuestOffloads {
    /// Whether the driver takes this super-frame whole.
    pub fn accepts(&self, g: &crate::tap::Gso) -> bool {
        let kind = match g.kind {
            GsoKind::TcpV4 => self.tso4,
            GsoKind::TcpV6 => self.tso6,
            GsoKind::UdpL4 => false,
        };
        self.csum && kind && (!g.ecn || self.ecn)
    }
}

/// A source and sink of frames with virtio-net-header-shaped metadata ([`FrameMeta`]).
pub trait FramePort: Send {
    /// Transmits one frame (super-frames and partial checksums allowed).
    fn send(&mut self, frame: &[u8], meta: &FrameMeta) -> Result<(), NetError>;
    /// Hands the next waiting frame to `out`; `Ok(false)` when none is waiting (never blocks).
    fn recv(&mut self, out: &mut dyn FnMut(&[u8], &FrameMeta)) -> Result<bool, NetError>;
    /// Readable (edge: written to) when frames arrive.
    fn rx_fd(&self) -> RawFd;
    /// Carrier.
    fn link_up(&self) -> bool;
    /// The NIC's MAC as the port knows it (`None`: the port does not care, e.g. a TAP).
    fn mac(&self) -> Option<MacAddr>;
    /// Frames handed out by `recv` only use these offloads from now on.
    fn set_guest_offloads(&mut self, o: GuestOffloads) -> Result<(), NetError>;
    /// Applies the driver's receive filter (best effort: more may be delivered).
    fn set_rx_filter(&mut self, _f: &RxFilter) {}
    /// Changes the NIC's MAC. Returns whether [`FramePort::rx_fd`] changed.
    fn set_mac(&mut self, _mac: MacAddr) -> Result<bool, NetError> {
        Ok(false)
    }
}

/// A port shared by the queue-pair workers of one device.
#[derive(Clone)]
pub struct SharedPort(Arc<Mutex<Box<dyn FramePort>>>);

impl SharedPort {
    /// Wraps a port.
    pub fn new(p: Box<dyn FramePort>) -> Self {
        Self(Arc::new(Mutex::new(p)))
    }

    /// Locks it (a worker that panicked left it consistent: every call is one frame).
    pub fn lock(&self) -> MutexGuard<'_, Box<dyn FramePort>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl std::fmt::Debug for SharedPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedPort")
    }
}

/// A TAP opened with `IFF_VNET_HDR`: guest offload acks become `TUNSETOFFLOAD`.
#[derive(Debug)]
pub struct TapPort(pub Tap);

impl FramePort for TapPort {
    fn send(&mut self, frame: &[u8], meta: &FrameMeta) -> Result<(), NetError> {
        self.0.send(frame, meta).map_err(net_error)
    }

    fn recv(&mut self, out: &mut dyn FnMut(&[u8], &FrameMeta)) -> Result<bool, NetError> {
        match self.0.recv() {
            Ok(Some((f, m))) => {
                out(f, &m);
                Ok(true)
            }
            Ok(None) | Err(TapError::WouldBlock) => Ok(false),
            Err(e) => Err(net_error(e)),
        }
    }

    fn rx_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    fn link_up(&self) -> bool {
        // Like QEMU's tap netdev: the guest link is up while the daemon holds the TAP; the host
        // side decides whether it forwards.
        true
    }

    fn mac(&self) -> Option<MacAddr> {
        None
    }

    fn set_guest_offloads(&mut self, o: GuestOffloads) -> Result<(), NetError> {
        // Without GUEST_CSUM the kernel must hand over finished checksums, and TSO needs it.
        let want = TapOffloads {
            csum: o.csum,
            tso4: o.csum && o.tso4,
            tso6: o.csum && o.tso6,
            tso_ecn: o.csum && o.ecn && (o.tso4 || o.tso6),
            uso: false,
        };
        let got = self.0.set_offloads(want).map_err(net_error)?;
        debug!(?want, ?got, "TAP offloads follow the guest's");
        Ok(())
    }
}

/// A NIC port on the switch. The port is re-created when the guest changes its MAC (the switch
/// pins a NIC's MAC for the port's life).
#[derive(Debug)]
pub struct SwitchPort {
    switch: Switch,
    cfg: PortConfig,
    handle: Option<PortHandle>,
    offl: GuestOffloads,
}

impl SwitchPort {
    /// Adds a NIC port `name` with `mac` to `switch`.
    pub fn new(switch: &Switch, name: &str, mac: MacAddr) -> Result<Self, NetError> {
        let cfg = PortConfig::nic(name, mac);
        Self::with_config(switch, cfg)
    }

    /// Adds a port with a full configuration (VLANs, queue bounds).
    pub fn with_config(switch: &Switch, cfg: PortConfig) -> Result<Self, NetError> {
        let handle = switch
            .add_port(cfg.clone())
            .map_err(|e| NetError::Io(std::io::Error::other(e)))?;
        Ok(Self {
            switch: switch.clone(),
            cfg,
            handle: Some(handle),
            offl: GuestOffloads::default(),
        })
    }

    /// The port (statistics, filter).
    pub fn handle(&self) -> Option<&PortHandle> {
        self.handle.as_ref()
    }
}

impl FramePort for SwitchPort {
    fn send(&mut self, frame: &[u8], meta: &FrameMeta) -> Result<(), NetError> {
        let h = self.handle.as_mut().ok_or(NetError::Disconnected)?;
        let r = h.send(frame, meta);
        match r.ingress_drop {
            // Policy drops are the switch's business (counted on the port), like a real switch.
            Some(reason) => {
                debug!(
                    port = h.id(),
                    ?reason,
                    "switch dropped a frame from the virtio NIC"
                );
                Ok(())
            }
            None => Ok(()),
        }
    }

    fn recv(&mut self, out: &mut dyn FnMut(&[u8], &FrameMeta)) -> Result<bool, NetError> {
        let h = self.handle.as_mut().ok_or(NetError::Disconnected)?;
        let offl = self.offl;
        let mut failed = None;
        // Per frame: a super-frame the driver takes goes whole; any other (USO from a TAP
        // uplink, ECN without GUEST_ECN, no GUEST_TSO) is cut here, in the worker's thread.
        let n = h.poll_recv(1, &mut |f, m| match m.gso {
            Some(g) if !offl.accepts(&g) => {
                if let Err(e) = offload::segment(f, m, !offl.csum, out) {
                    failed = Some(e);
                }
            }
            _ => out(f, m),
        });
        if let Some(e) = failed {
            debug!(error = %e, "vhost-user-net: super-frame from the switch not segmentable");
            return Err(NetError::Unsupported(
                "super-frame the switch cannot segment",
            ));
        }
        Ok(n > 0)
    }

    fn rx_fd(&self) -> RawFd {
        self.handle
            .as_ref()
            .map_or(-1, |h| h.notify_fd().as_raw_fd())
    }

    fn link_up(&self) -> bool {
        self.handle.as_ref().is_some_and(PortHandle::is_enabled)
    }

    fn mac(&self) -> Option<MacAddr> {
        match self.cfg.kind {
            PortKind::Nic { mac } => Some(mac),
            PortKind::Uplink => None,
        }
    }

    fn set_guest_offloads(&mut self, o: GuestOffloads) -> Result<(), NetError> {
        self.offl = o;
        Ok(())
    }

    fn set_rx_filter(&mut self, f: &RxFilter) {
        self.cfg.packet_filter = apply_filter(self.handle.as_ref(), f);
    }

    fn set_mac(&mut self, mac: MacAddr) -> Result<bool, NetError> {
        if self.mac() == Some(mac) {
            return Ok(false);
        }
        let (filter, mcast) = match &self.handle {
            Some(h) => (h.packet_filter(), h.multicast_list()),
            None => (self.cfg.packet_filter, Vec::new()),
        };
        // The old port goes first: frames queued on it were switched to the old address.
        drop(self.handle.take());
        let mut cfg = self.cfg.clone();
        cfg.kind = PortKind::Nic { mac };
        cfg.packet_filter = filter;
        let handle = match self.switch.add_port(cfg.clone()) {
            Ok(h) => h,
            Err(e) => {
                // Put the old port back so the NIC keeps working with its old address.
                self.handle = self.switch.add_port(self.cfg.clone()).ok();
                return Err(NetError::Io(std::io::Error::other(e)));
            }
        };
        let _ = handle.set_multicast_list(&mcast);
        info!(port = handle.id(), mac = ?mac, "virtio NIC MAC changed; switch port re-created");
        self.cfg = cfg;
        self.handle = Some(handle);
        Ok(true)
    }
}

fn apply_filter(h: Option<&PortHandle>, f: &RxFilter) -> u32 {
    let (bits, list) = f.packet_filter(crate::switch::port::MAX_MULTICAST_LIST);
    if let Some(h) = h {
        h.set_packet_filter(bits);
        if h.set_multicast_list(&list).is_err() {
            h.set_packet_filter(bits | crate::switch::filter::ALL_MULTICAST);
        }
    }
    bits
}
