//! TAP backend: a Linux TAP device opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, so every frame
//! carries a `virtio_net_hdr` with checksum and segmentation offload metadata (see [`vnet`]).
//!
//! * Transmit ([`Tap::send`]): NDIS-style requests (RNDIS checksum / LSOv2 PPIs, reference §3.7) are
//!   finished on a copy of the headers ([`offload::finalize_tx`]: IP lengths, IPv4 header checksum,
//!   pseudo-header sum with length) and sent as `NEEDS_CSUM` / `GSO_TCPV4|TCPV6|UDP_L4`; an
//!   out-of-band VLAN tag is inserted in-band. The payload is never copied (`writev`).
//! * Receive ([`Tap::recv`], [`Tap::poll_recv`]): the header becomes [`FrameMeta`]; super-frames are
//!   passed up with their [`Gso`] when the TSO/USO offloads were enabled (disable them in
//!   [`TapOffloads`] to have the kernel segment instead, or use [`offload::segment`]).
//! * The descriptor is non-blocking and implements [`AsFd`] for epoll/poll.
//! * Link state: `IFF_UP && IFF_RUNNING` of the interface (carrier follows [`Tap::set_carrier`]).

pub mod net_backend;
pub mod netns;
pub mod offload;
pub(crate) mod sys;
pub mod vnet;

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use thiserror::Error;
use tracing::{debug, info, warn};
use zerocopy::IntoBytes;

pub use net_backend::TapBackend;
pub use offload::{Checksum, FrameMeta, Gso, GsoKind, L3Proto, L4Proto, OffloadError, VlanTag};
pub use sys::EventFd;
use vnet::{VNET_HDR_LEN_LEGACY, VNET_HDR_LEN_V1, VirtioNetHdr};

/// Receive buffer: 64 KiB super-frame + Ethernet/VLAN header + virtio-net header, with slack.
const RX_BUF_LEN: usize = 65536 + 64 + VNET_HDR_LEN_V1;

/// Errors of the TAP backend.
#[derive(Debug, Error)]
pub enum TapError {
    /// `/dev/net/tun` could not be opened (missing module, no permission).
    #[error("opening /dev/net/tun: {0}")]
    OpenTun(#[source] io::Error),
    /// Interface name not usable.
    #[error("interface name {0:?} is too long (max 15 bytes) or contains NUL or '/'")]
    BadName(String),
    /// Only 10- and 12-byte virtio-net headers exist.
    #[error("virtio-net header length {0} is not 10 or 12")]
    BadVnetHdrLen(usize),
    /// TSO/USO requested without checksum offload (the kernel refuses it).
    #[error("TSO/USO offloads need checksum offload")]
    OffloadNeedsCsum,
    /// An ioctl or socket operation on the interface failed.
    #[error("{op} on {ifname}: {source}")]
    Io {
        /// Operation.
        op: &'static str,
        /// Interface name.
        ifname: String,
        /// OS error.
        #[source]
        source: io::Error,
    },
    /// Entering the configured network namespace failed.
    #[error("network namespace {path:?}: {source}")]
    Netns {
        /// Namespace path.
        path: PathBuf,
        /// OS error.
        #[source]
        source: io::Error,
    },
    /// Shorter than an Ethernet header.
    #[error("frame of {0} bytes is shorter than an Ethernet header")]
    Runt(usize),
    /// The offload metadata does not fit the frame.
    #[error("frame rejected: {0}")]
    Frame(#[from] OffloadError),
    /// The kernel could not take the frame now (`EAGAIN`); retry after the fd is writable.
    #[error("TAP transmit would block")]
    WouldBlock,
    /// The kernel took fewer bytes than offered.
    #[error("short TAP write: {written} of {len} bytes")]
    ShortWrite {
        /// Bytes written.
        written: usize,
        /// Bytes offered.
        len: usize,
    },
}

/// Offloads the kernel may use for frames it hands to us (`TUNSETOFFLOAD`). Frames we send may
/// always carry checksum/GSO metadata.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TapOffloads {
    /// Partial checksums (`TUN_F_CSUM`): frames may arrive with [`Checksum::Partial`].
    pub csum: bool,
    /// TCP/IPv4 super-frames (`TUN_F_TSO4`).
    pub tso4: bool,
    /// TCP/IPv6 super-frames (`TUN_F_TSO6`).
    pub tso6: bool,
    /// TSO with ECN (`TUN_F_TSO_ECN`).
    pub tso_ecn: bool,
    /// UDP segmentation (`TUN_F_USO4 | TUN_F_USO6`, Linux ≥ 6.2); dropped silently if refused.
    pub uso: bool,
}

impl TapOffloads {
    /// Everything: partial checksums and TCP/UDP super-frames.
    pub const fn all() -> Self {
        Self {
            csum: true,
            tso4: true,
            tso6: true,
            tso_ecn: true,
            uso: true,
        }
    }

    /// Nothing: the kernel completes checksums and segments before handing frames over.
    pub const fn none() -> Self {
        Self {
            csum: false,
            tso4: false,
            tso6: false,
            tso_ecn: false,
            uso: false,
        }
    }

    /// Partial checksums only (no super-frames).
    pub const fn csum_only() -> Self {
        Self {
            csum: true,
            ..Self::none()
        }
    }

    fn bits(self) -> libc::c_uint {
        let mut f = 0;
        for (on, bit) in [
            (self.csum, libc::TUN_F_CSUM),
            (self.tso4, libc::TUN_F_TSO4),
            (self.tso6, libc::TUN_F_TSO6),
            (self.tso_ecn, libc::TUN_F_TSO_ECN),
            (self.uso, libc::TUN_F_USO4 | libc::TUN_F_USO6),
        ] {
            if on {
                f |= bit;
            }
        }
        f
    }
}

impl Default for TapOffloads {
    fn default() -> Self {
        Self::all()
    }
}

/// How to open a TAP device.
#[derive(Clone, Debug)]
pub struct TapConfig {
    /// Interface name; empty lets the kernel pick `tapN`. An existing persistent TAP is attached.
    pub name: String,
    /// virtio-net header size, 12 (v1) or 10 (legacy).
    pub vnet_hdr_len: usize,
    /// Offloads for frames from the kernel.
    pub offloads: TapOffloads,
    /// Host-side interface MAC to set (the guest's MAC is a different address).
    pub mac: Option<[u8; 6]>,
    /// Interface MTU to set.
    pub mtu: Option<u32>,
    /// Bring the interface administratively up.
    pub up: bool,
    /// Create the interface inside this network namespace (`/run/netns/NAME`).
    pub netns: Option<PathBuf>,
    /// Complete partial checksums of received non-GSO frames in software and report them
    /// [`Checksum::Valid`] (for consumers that cannot express "checksum pending", e.g. RNDIS RX).
    pub complete_rx_csum: bool,
}

impl Default for TapConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            vnet_hdr_len: VNET_HDR_LEN_V1,
            offloads: TapOffloads::all(),
            mac: None,
            mtu: None,
            up: false,
            netns: None,
            complete_rx_csum: false,
        }
    }
}

impl TapConfig {
    /// Defaults with this interface name.
    pub fn named(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            ..Self::default()
        }
    }
}

/// Frame and error counters of one TAP.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TapStats {
    /// Frames written to the kernel (a super-frame counts once).
    pub tx_packets: u64,
    /// Bytes written (frame bytes, without the virtio-net header).
    pub tx_bytes: u64,
    /// Frames refused before or by the kernel (bad metadata, I/O errors).
    pub tx_errors: u64,
    /// `send` returned [`TapError::WouldBlock`].
    pub tx_would_block: u64,
    /// Frames read from the kernel.
    pub rx_packets: u64,
    /// Bytes read (without the virtio-net header).
    pub rx_bytes: u64,
    /// Super-frames among them.
    pub rx_gso: u64,
    /// Frames dropped on receive (runt, bad virtio-net header, checksum completion failed).
    pub rx_errors: u64,
}

struct Ctl {
    sock: UnixDatagram,
    name: String,
}

/// An open TAP queue.
pub struct Tap {
    file: File,
    ctl: Mutex<Ctl>,
    vnet_len: usize,
    offloads: TapOffloads,
    complete_rx_csum: bool,
    rx_buf: Vec<u8>,
    stats: TapStats,
}

impl std::fmt::Debug for Tap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tap")
            .field("fd", &self.file.as_raw_fd())
            .field("name", &self.name())
            .field("vnet_len", &self.vnet_len)
            .field("offloads", &self.offloads)
            .finish_non_exhaustive()
    }
}

impl Tap {
    /// Creates (or attaches to) the TAP described by `config`.
    pub fn open(config: &TapConfig) -> Result<Self, TapError> {
        if let Some(ns) = &config.netns {
            let cfg = TapConfig {
                netns: None,
                ..config.clone()
            };
            return netns::run_in_netns(ns, move || Self::open(&cfg)).map_err(|source| {
                TapError::Netns {
                    path: ns.clone(),
                    source,
                }
            })?;
        }
        let name = &config.name;
        if name.len() >= libc::IFNAMSIZ || name.contains(['\0', '/']) {
            return Err(TapError::BadName(name.clone()));
        }
        if config.vnet_hdr_len != VNET_HDR_LEN_V1 && config.vnet_hdr_len != VNET_HDR_LEN_LEGACY {
            return Err(TapError::BadVnetHdrLen(config.vnet_hdr_len));
        }
        let o = config.offloads;
        if !o.csum && (o.tso4 || o.tso6 || o.tso_ecn || o.uso) {
            return Err(TapError::OffloadNeedsCsum);
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let io_err = |op: &'static str, ifname: &str| {
            let ifname = ifname.to_owned();
            move |source| TapError::Io { op, ifname, source }
        };
        let mut ifr = sys::IfReq::new(name);
        ifr.set_flags((libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16);
        sys::ioctl_ifreq(file.as_fd(), libc::TUNSETIFF, &mut ifr)
            .map_err(io_err("TUNSETIFF", name))?;
        let name = ifr.name();
        let mut sz = config.vnet_hdr_len as libc::c_int;
        sys::ioctl_int(file.as_fd(), libc::TUNSETVNETHDRSZ, &mut sz)
            .map_err(io_err("TUNSETVNETHDRSZ", &name))?;
        if cfg!(target_endian = "big") {
            let mut le: libc::c_int = 1;
            sys::ioctl_int(file.as_fd(), libc::TUNSETVNETLE, &mut le)
                .map_err(io_err("TUNSETVNETLE", &name))?;
        }
        let sock = UnixDatagram::unbound().map_err(io_err("socket", &name))?;
        let mut tap = Self {
            file,
            ctl: Mutex::new(Ctl { sock, name }),
            vnet_len: config.vnet_hdr_len,
            offloads: TapOffloads::none(),
            complete_rx_csum: config.complete_rx_csum,
            rx_buf: vec![0; RX_BUF_LEN],
            stats: TapStats::default(),
        };
        tap.set_offloads(config.offloads)?;
        if let Some(mac) = config.mac {
            tap.set_mac(mac)?;
        }
        if let Some(mtu) = config.mtu {
            tap.set_mtu(mtu)?;
        }
        if config.up {
            tap.set_up(true)?;
        }
        info!(ifname = %tap.name(), vnet_hdr = tap.vnet_len, offloads = ?tap.offloads, "TAP opened");
        Ok(tap)
    }

    /// Current interface name (follows renames and namespace moves).
    pub fn name(&self) -> String {
        self.ctl
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .name
            .clone()
    }

    /// Negotiated virtio-net header size.
    pub fn vnet_hdr_len(&self) -> usize {
        self.vnet_len
    }

    /// Offloads in effect for received frames.
    pub fn offloads(&self) -> TapOffloads {
        self.offloads
    }

    /// Counters.
    pub fn stats(&self) -> TapStats {
        self.stats
    }

    /// Changes the receive offloads (e.g. when the guest turns RSC or checksum offload off).
    /// USO is dropped if the kernel does not know it. Returns what is now in effect.
    pub fn set_offloads(&mut self, want: TapOffloads) -> Result<TapOffloads, TapError> {
        if !want.csum && (want.tso4 || want.tso6 || want.tso_ecn || want.uso) {
            return Err(TapError::OffloadNeedsCsum);
        }
        let fd = self.file.as_fd();
        let mut got = want;
        let mut rc = sys::ioctl_val(fd, libc::TUNSETOFFLOAD, libc::c_ulong::from(got.bits()));
        if rc.is_err() && got.uso {
            debug!("TUNSETOFFLOAD refused USO; retrying without it");
            got.uso = false;
            rc = sys::ioctl_val(fd, libc::TUNSETOFFLOAD, libc::c_ulong::from(got.bits()));
        }
        rc.map_err(|source| TapError::Io {
            op: "TUNSETOFFLOAD",
            ifname: self.name(),
            source,
        })?;
        self.offloads = got;
        Ok(got)
    }

    /// Sends one frame (or super-frame) with its offload metadata. Never copies the payload; only
    /// the headers are copied when they must be rewritten or a VLAN tag inserted.
    pub fn send(&mut self, frame: &[u8], meta: &FrameMeta) -> Result<(), TapError> {
        let r = self.send_inner(frame, meta);
        match &r {
            Ok(()) => {
                self.stats.tx_packets += 1;
                self.stats.tx_bytes += frame.len() as u64;
            }
            Err(TapError::WouldBlock) => self.stats.tx_would_block += 1,
            Err(e) => {
                self.stats.tx_errors += 1;
                debug!(ifname = %self.name(), error = %e, "TAP send failed");
            }
        }
        r
    }

    fn send_inner(&mut self, frame: &[u8], meta: &FrameMeta) -> Result<(), TapError> {
        if frame.len() < offload::ETH_HLEN {
            return Err(TapError::Runt(frame.len()));
        }
        let mut meta = *meta;
        let mut hdr = [0u8; offload::MAX_HEADERS + 4];
        // `consumed` bytes of `frame` are replaced by `hdr[..used]`.
        let (mut consumed, mut used) = (0, 0);
        if meta.gso.is_some() || matches!(meta.csum, Checksum::Offload { .. }) {
            let n = frame.len().min(offload::MAX_HEADERS);
            hdr[..n].copy_from_slice(&frame[..n]);
            offload::finalize_tx(&mut hdr[..n], frame.len(), &mut meta)?;
            (consumed, used) = (n, n);
        }
        if let Some(tag) = meta.vlan.take() {
            if consumed == 0 {
                hdr[..12].copy_from_slice(&frame[..12]);
                (consumed, used) = (12, 12);
            }
            hdr.copy_within(12..used, 16);
            hdr[12..14].copy_from_slice(&offload::ETH_P_8021Q.to_be_bytes());
            hdr[14..16].copy_from_slice(&tag.tci().to_be_bytes());
            used += 4;
            offload::shift_offsets(&mut meta, 4);
        }
        let vh = VirtioNetHdr::from_meta(&meta);
        let vh = &vh.as_bytes()[..self.vnet_len];
        let iov = [
            IoSlice::new(vh),
            IoSlice::new(&hdr[..used]),
            IoSlice::new(&frame[consumed..]),
        ];
        let len = vh.len() + used + frame.len() - consumed;
        loop {
            return match (&self.file).write_vectored(&iov) {
                Ok(n) if n == len => Ok(()),
                Ok(written) => Err(TapError::ShortWrite { written, len }),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(TapError::WouldBlock),
                Err(source) => Err(TapError::Io {
                    op: "write",
                    ifname: self.name(),
                    source,
                }),
            };
        }
    }

    /// Reads one frame if one is waiting. The slice borrows an internal buffer.
    pub fn recv(&mut self) -> Result<Option<(&[u8], FrameMeta)>, TapError> {
        let got = loop {
            let n = match (&self.file).read(&mut self.rx_buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(source) => {
                    return Err(TapError::Io {
                        op: "read",
                        ifname: self.name(),
                        source,
                    });
                }
            };
            if let Some(meta) = self.decode_rx(n) {
                break (n, meta);
            }
        };
        let (n, meta) = got;
        Ok(Some((&self.rx_buf[self.vnet_len..n], meta)))
    }

    /// Parses the virtio-net header of the `n` bytes just read; `None` drops the frame.
    fn decode_rx(&mut self, n: usize) -> Option<FrameMeta> {
        let vl = self.vnet_len;
        if n < vl + offload::ETH_HLEN || n >= self.rx_buf.len() {
            self.stats.rx_errors += 1;
            warn!(len = n, "TAP: dropping runt or oversized frame");
            return None;
        }
        let mut meta = match VirtioNetHdr::decode(&self.rx_buf, vl).and_then(|h| h.to_meta()) {
            Ok(m) => m,
            Err(e) => {
                self.stats.rx_errors += 1;
                warn!(error = %e, "TAP: dropping frame with a bad virtio-net header");
                return None;
            }
        };
        if self.complete_rx_csum
            && meta.gso.is_none()
            && let Err(e) = offload::complete_checksum(&mut self.rx_buf[vl..n], &mut meta)
        {
            self.stats.rx_errors += 1;
            warn!(error = %e, "TAP: dropping frame whose checksum cannot be completed");
            return None;
        }
        self.stats.rx_packets += 1;
        self.stats.rx_bytes += (n - vl) as u64;
        if meta.gso.is_some() {
            self.stats.rx_gso += 1;
        }
        Some(meta)
    }

    /// Reads up to `budget` frames, handing each to `out`. Returns how many were delivered; 0 means
    /// nothing was waiting.
    pub fn poll_recv(
        &mut self,
        budget: usize,
        out: &mut dyn FnMut(&[u8], &FrameMeta),
    ) -> Result<usize, TapError> {
        let mut count = 0;
        while count < budget {
            match self.recv()? {
                Some((frame, meta)) => out(frame, &meta),
                None => break,
            }
            count += 1;
        }
        Ok(count)
    }

    /// Waits up to `timeout` (forever if `None`) for a frame to read.
    pub fn wait_readable(&self, timeout: Option<Duration>) -> Result<bool, TapError> {
        sys::poll_readable([self.file.as_fd()], timeout)
            .map(|r| r[0])
            .map_err(|source| TapError::Io {
                op: "poll",
                ifname: self.name(),
                source,
            })
    }

    /// Runs an interface ioctl through the control socket; on `ENODEV` (renamed, or moved to
    /// another namespace) re-resolves name and namespace from the TUN descriptor and retries.
    fn if_ioctl(
        &self,
        op: &'static str,
        req: sys::Req,
        prep: impl Fn(&mut sys::IfReq),
    ) -> Result<sys::IfReq, TapError> {
        let mut ctl = self.ctl.lock().unwrap_or_else(PoisonError::into_inner);
        let run = |ctl: &Ctl| {
            let mut ifr = sys::IfReq::new(&ctl.name);
            prep(&mut ifr);
            sys::ioctl_ifreq(ctl.sock.as_fd(), req, &mut ifr).map(|()| ifr)
        };
        let r = match run(&ctl) {
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => match self.reresolve(&mut ctl) {
                Ok(()) => run(&ctl),
                Err(re) => {
                    debug!(error = %re, "TAP: cannot re-resolve the interface");
                    Err(e)
                }
            },
            r => r,
        };
        r.map_err(|source| TapError::Io {
            op,
            ifname: ctl.name.clone(),
            source,
        })
    }

    fn reresolve(&self, ctl: &mut Ctl) -> io::Result<()> {
        let mut ifr = sys::IfReq::new("");
        sys::ioctl_ifreq(self.file.as_fd(), libc::TUNGETIFF, &mut ifr)?;
        let ns = sys::ioctl_new_fd(self.file.as_fd(), libc::TUNGETDEVNETNS)?;
        let sock = netns::run_in_netns_fd(ns, UnixDatagram::unbound)??;
        ctl.name = ifr.name();
        ctl.sock = sock;
        debug!(ifname = %ctl.name, "TAP: interface re-resolved");
        Ok(())
    }

    /// Interface flags (`IFF_*`).
    pub fn if_flags(&self) -> Result<i32, TapError> {
        let ifr = self.if_ioctl("SIOCGIFFLAGS", libc::SIOCGIFFLAGS, |_| {})?;
        Ok(i32::from(ifr.flags() as u16))
    }

    /// Link up: administratively up and running (carrier on).
    pub fn link_up(&self) -> Result<bool, TapError> {
        let f = self.if_flags()?;
        Ok(f & libc::IFF_UP != 0 && f & libc::IFF_RUNNING != 0)
    }

    /// Sets or clears `IFF_UP`.
    pub fn set_up(&self, up: bool) -> Result<(), TapError> {
        let f = self.if_flags()?;
        let nf = if up {
            f | libc::IFF_UP
        } else {
            f & !libc::IFF_UP
        };
        if nf != f {
            self.if_ioctl("SIOCSIFFLAGS", libc::SIOCSIFFLAGS, |r| {
                r.set_flags(nf as u16 as i16)
            })?;
        }
        Ok(())
    }

    /// Turns the carrier on or off (`TUNSETCARRIER`), e.g. to model a cable pull.
    pub fn set_carrier(&self, on: bool) -> Result<(), TapError> {
        let mut v = libc::c_int::from(on);
        sys::ioctl_int(self.file.as_fd(), libc::TUNSETCARRIER, &mut v).map_err(|source| {
            TapError::Io {
                op: "TUNSETCARRIER",
                ifname: self.name(),
                source,
            }
        })
    }

    /// Host-side interface MAC.
    pub fn mac(&self) -> Result<[u8; 6], TapError> {
        Ok(self
            .if_ioctl("SIOCGIFHWADDR", libc::SIOCGIFHWADDR, |_| {})?
            .hwaddr())
    }

    /// Sets the host-side interface MAC.
    pub fn set_mac(&self, mac: [u8; 6]) -> Result<(), TapError> {
        self.if_ioctl("SIOCSIFHWADDR", libc::SIOCSIFHWADDR, |r| r.set_hwaddr(mac))?;
        Ok(())
    }

    /// Interface MTU.
    pub fn mtu(&self) -> Result<u32, TapError> {
        let ifr = self.if_ioctl("SIOCGIFMTU", libc::SIOCGIFMTU, |_| {})?;
        Ok(u32::try_from(ifr.int()).unwrap_or(0))
    }

    /// Sets the interface MTU.
    pub fn set_mtu(&self, mtu: u32) -> Result<(), TapError> {
        let v = i32::try_from(mtu).unwrap_or(i32::MAX);
        self.if_ioctl("SIOCSIFMTU", libc::SIOCSIFMTU, |r| r.set_int(v))?;
        Ok(())
    }

    /// Interface index.
    pub fn ifindex(&self) -> Result<u32, TapError> {
        let ifr = self.if_ioctl("SIOCGIFINDEX", libc::SIOCGIFINDEX, |_| {})?;
        Ok(u32::try_from(ifr.int()).unwrap_or(0))
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
