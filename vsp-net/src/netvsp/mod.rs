//! netvsp: the host side of the Hyper-V synthetic network adapter (what Linux `hv_netvsc` drives).
//!
//! Layers, bottom up:
//! - [`vmbus_core::devices::nvsp`] / [`vmbus_core::devices::rndis`]: wire structs and total parsers.
//! - `buffers`: the guest's receive buffer (split in sub-allocations, lent to the guest one
//!   transfer-page packet at a time and recycled on its completion) and send buffer (sections).
//! - `core`: one device's state machine, sans threads: NVSP negotiation, buffer registration,
//!   sub-channels, the channel rings (with bounded queues of replies waiting for ring space), and
//!   `poll()`, which drains guest rings, moves frames from the backend to the guest and sends
//!   link-state indications.
//! - `tx` (guest → backend: RNDIS messages from send-buffer sections and/or GPA-direct pages, PPIs,
//!   checksum/LSO/VLAN offloads finished in software when the backend cannot), `control` (RNDIS
//!   INITIALIZE / QUERY / SET / HALT / RESET / KEEPALIVE and every OID Linux uses), `rx` (backend →
//!   receive sections → transfer-page packets, packet filter, RSS hash and queue selection).
//! - `device`: [`Netvsp`], the [`vmbus_core::device::VmbusDevice`] implementation, with an optional
//!   worker thread that sleeps on the channels' eventfds.
//! - `hosted`: [`HostedNetvsp`], netvsp in a VSP process ([`vmbus_core::oop::HostedDevice`]);
//!   `state` ([`SavedState`]: the session a restarted process resumes) and `journal` (which
//!   receive sections the guest holds, kept across processes; the reuse rule is documented there);
//!   [`daemon`]: `vsp-net serve`.
//!
//! Every guest-caused error is contained to the packet that caused it: it is answered with a
//! failure status where the protocol has one, counted in [`NetvspStats`] and logged; nothing a
//! guest sends can panic the host or grow host memory without bound.

mod buffers;
mod control;
mod core;
pub mod daemon;
mod device;
mod hosted;
mod journal;
mod rss;
mod rx;
mod session;
mod state;
mod tx;

pub use device::{ChannelRings, GpadlSource, Netvsp, NetvspResources, RingMapper};
pub use hosted::HostedNetvsp;
pub use rss::toeplitz_hash;
pub use state::{SavedBuffer, SavedState};

use vmbus_core::wire::Guid;

/// Device configuration.
#[derive(Clone, Debug)]
pub struct NetvspConfig {
    /// Instance GUID offered on the bus (Linux names the interface by it; keep it stable).
    pub instance: Guid,
    /// Most queues (channels) the guest may use: primary + sub-channels, 1..=64.
    pub max_queues: u16,
    /// Link speed reported to the guest, in units of 100 bit/s (10 Gb/s = 100 000 000).
    pub link_speed: u32,
    /// GEN_FRIENDLY_NAME answer (becomes the Linux ifalias); `None` = not supported.
    pub friendly_name: Option<String>,
    /// MAC address to report; `None` = the backend's.
    pub mac: Option<[u8; 6]>,
    /// Send-buffer section size announced in SEND_SEND_BUF_COMPLETE (OpenVMM: 6144).
    pub send_section_size: u32,
    /// Most RNDIS messages (ranges) per receive transfer-page packet (Linux accepts 562).
    pub max_rx_ranges: usize,
    /// Most frames taken from the backend per poll.
    pub rx_poll_budget: usize,
    /// Most RNDIS control replies waiting for a receive section (more: the request fails).
    pub max_pending_control: usize,
    /// Largest guest transmit (all RNDIS messages of one SEND_RNDIS_PKT) accepted, in bytes.
    pub max_tx_message: usize,
    /// Highest NVSP version granted (one of `nvsp::version::ALL`).
    pub max_nvsp_version: u32,
}

impl Default for NetvspConfig {
    fn default() -> Self {
        NetvspConfig {
            instance: Guid::from_u128(0x9a3f_8c52_0d1e_4b6a_8f00_0000_0000_0001),
            max_queues: 8,
            link_speed: 100_000_000,
            friendly_name: None,
            mac: None,
            send_section_size: 6144,
            max_rx_ranges: 64,
            rx_poll_budget: 256,
            max_pending_control: 64,
            max_tx_message: 256 * 1024,
            max_nvsp_version: vmbus_core::devices::nvsp::version::V61,
        }
    }
}

/// Counters of one device (monotonic since creation).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetvspStats {
    /// Frames handed to the backend (after segmentation: segments).
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// Frames the backend refused (queue full) or that were too large.
    pub tx_dropped: u64,
    /// Backend errors other than "full".
    pub tx_errors: u64,
    /// Frames delivered into receive sections.
    pub rx_frames: u64,
    pub rx_bytes: u64,
    /// Frames dropped because no receive section was free or the frame did not fit one.
    pub rx_dropped_no_buffer: u64,
    /// Frames dropped by the packet filter or because the guest was not ready to receive.
    pub rx_filtered: u64,
    /// Guest packets refused: malformed NVSP/RNDIS, out-of-order, bad indices, bad GPAs.
    pub bad_packets: u64,
    /// Guest completions for receive packets that were not outstanding (ignored).
    pub stray_completions: u64,
    /// RNDIS control replies that could not be queued (guest not completing receives).
    pub control_dropped: u64,
    /// Link-state indications sent.
    pub link_indications: u64,
}
