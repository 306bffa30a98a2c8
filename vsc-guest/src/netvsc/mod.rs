//! netvsc: the guest side of the Hyper-V synthetic network adapter, a `no_std` + `alloc` sans-IO
//! state machine that mirrors Linux `hv_netvsc` (`netvsc.c`, `rndis_filter.c`, `netvsc_drv.c`).
//!
//! [`Netvsc`] never touches a ring, a hypercall or a thread. Whoever drives it (the std harness in
//! [`crate::net_harness`], a bare-metal guest, a test):
//!
//! - calls [`Netvsc::start`] once the primary channel is open, then moves packets: it writes what
//!   [`Netvsc::peek_transmit`] / [`Netvsc::pop_transmit`] hand out into the channel's guest→host ring
//!   (`ring::NetChannel` does this for any [`ringbuf::RingMem`]) and feeds every host packet to
//!   [`Netvsc::handle_packet`];
//! - answers [`NetvscEvent`]s: [`NetvscEvent::CreateGpadl`] (establish a GPADL over the pages given,
//!   then [`Netvsc::gpadl_created`]), [`NetvscEvent::OpenSubchannels`] (open that many sub-channel
//!   offers, [`Netvsc::subchannel_opened`] for each);
//! - once [`NetvscEvent::Ready`] arrived, sends frames ([`Netvsc::send`]) and takes received ones
//!   ([`Netvsc::poll_receive`]).
//!
//! The bring-up follows Linux 6.1 step by step (reference §3.3, §3.9): NVSP INIT for 6.1, 6, 5, 4, 2,
//! 1 (`min = max`) until one succeeds; SEND_NDIS_CONFIG (v ≥ 2: MTU + 14, 802.1Q, SR-IOV and teaming
//! from v5, RSC from 6.1); SEND_NDIS_VER (6.1 up to NVSP 4, 6.30 after); the receive buffer GPADL and
//! SEND_RECV_BUF (id `0xCAFE`); the send buffer GPADL and SEND_SEND_BUF (id 0); RNDIS INITIALIZE
//! (max transfer `0x4000`); QUERY MAXIMUM_FRAME_SIZE, PERMANENT_ADDRESS, FRIENDLY_NAME,
//! TCP_OFFLOAD_HARDWARE_CAPABILITIES; SET TCP_OFFLOAD_PARAMETERS (what the capabilities allow);
//! QUERY MEDIA_CONNECT_STATUS; from v5 QUERY LINK_SPEED and RECEIVE_SCALE_CAPABILITIES; with ≥ 2
//! queues SUBCHANNEL ALLOCATE, the sub-channels opened, RSS parameters set twice (disable, then
//! enable); finally SET CURRENT_PACKET_FILTER (what Linux does on `ifup`).
//!
//! Host input is never trusted: every NVSP message is length-checked per type, every transfer-page
//! range is checked against the receive buffer and the sub-allocation size, every RNDIS message is
//! parsed by the total parsers of [`vmbus_core::devices::rndis`], and every transfer-page packet is
//! completed exactly once (status FAIL when something in it was bad) so the host's sections
//! recycle. Errors come back as [`NetvscError`]; the driver stays usable unless the error is fatal
//! to the bring-up.

mod bringup;
mod control;
mod error;
pub mod ring;
mod rx;
mod tx;

pub use error::{NetvscError, SendError};
pub use rx::RxFrame;
pub use tx::{LsoInfo, TxChecksum, TxMeta};

use alloc::collections::VecDeque;
use alloc::vec::Vec;
use hashbrown::HashMap;
use ringbuf::PacketType;
use vmbus_core::devices::{nvsp, rndis};
use vmbus_core::memory::GuestMemory;

/// Transaction id of packets that expect no completion (Linux `VMBUS_RQST_ID_NO_RESPONSE`).
pub const NO_RESPONSE_TRANS_ID: u64 = u64::MAX - 1;
/// RNDIS INITIALIZE `max_transfer_size` Linux sends.
pub const LINUX_MAX_TRANSFER_SIZE: u32 = 0x4000;
/// Smallest receive sub-allocation / send section Linux accepts (`NETVSC_MTU_MIN`).
pub const MIN_SECTION_SIZE: u32 = 68;
/// Most ranges Linux puts in one GPA-direct send (`MAX_PAGE_BUFFER_COUNT`).
pub const MAX_PAGE_BUFFERS: usize = 32;
/// Linux's NDIS-config capabilities for NVSP 6.1: 802.1Q, SR-IOV, teaming, RSC (`0xAC`).
pub const LINUX_CAPABILITIES_V61: u64 = nvsp::capability::IEEE8021Q
    | nvsp::capability::SRIOV
    | nvsp::capability::TEAMING
    | nvsp::capability::RSC;
/// Page size of every GPA the driver names.
pub const PAGE_SIZE: u64 = 4096;

/// A piece of guest RAM the driver owns: `len` bytes at `gpa` (both page aligned).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct DmaRegion {
    pub gpa: u64,
    pub len: u64,
}

impl DmaRegion {
    pub const fn new(gpa: u64, len: u64) -> Self {
        DmaRegion { gpa, len }
    }

    /// The page frame numbers of the region, in order.
    pub fn pfns(&self) -> Vec<u64> {
        let first = self.gpa / PAGE_SIZE;
        (first..first.saturating_add(self.len / PAGE_SIZE)).collect()
    }

    fn is_pages(&self) -> bool {
        self.gpa.is_multiple_of(PAGE_SIZE) && self.len.is_multiple_of(PAGE_SIZE) && self.len > 0
    }
}

/// How the driver introduces itself and which memory it uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetvscConfig {
    /// NVSP versions to offer, in order (default: Linux's 6.1, 6, 5, 4, 2, 1).
    pub nvsp_versions: Vec<u32>,
    /// MTU without the Ethernet header (Linux default 1500).
    pub mtu: u32,
    /// Queues wanted, primary included (Linux: min(8, online CPUs)); more than one needs NVSP 5 and
    /// an RSS-capable host.
    pub queues: u16,
    /// Receive buffer (Linux: 16 MiB), registered as one GPADL.
    pub recv_buffer: DmaRegion,
    /// Send buffer (Linux: 1 044 480 bytes), registered as one GPADL.
    pub send_buffer: DmaRegion,
    /// Pages for RNDIS control requests (sent GPA direct, one page per request in flight).
    pub control_area: DmaRegion,
    /// Pages for frames too large for a send section (sent GPA direct); `None` = such frames fail.
    pub bounce_area: Option<DmaRegion>,
    /// Size of one bounce slot (a frame plus its RNDIS header must fit; default 68 KiB).
    pub bounce_slot_size: u32,
    /// Packet filter set at the end of the bring-up (Linux `ifup`: directed + all-multicast +
    /// broadcast).
    pub packet_filter: u32,
    /// Received frames kept for [`Netvsc::poll_receive`] at most; more are dropped (and counted).
    pub rx_queue_limit: usize,
    /// Guest→host packets queued per channel at most; beyond it [`Netvsc::send`] says busy.
    pub tx_queue_limit: usize,
    /// Frames of at most this many bytes go through send sections, larger ones GPA direct
    /// (default: whatever fits a section, as Linux).
    pub copy_threshold: Option<u32>,
}

impl NetvscConfig {
    /// Linux's settings over the given memory.
    pub fn linux(
        recv_buffer: DmaRegion,
        send_buffer: DmaRegion,
        control_area: DmaRegion,
        bounce_area: Option<DmaRegion>,
    ) -> Self {
        NetvscConfig {
            nvsp_versions: nvsp::version::LINUX_ORDER.to_vec(),
            mtu: 1500,
            queues: 1,
            recv_buffer,
            send_buffer,
            control_area,
            bounce_area,
            bounce_slot_size: 68 * 1024,
            packet_filter: rndis::packet_filter::LINUX_DEFAULT,
            rx_queue_limit: 8192,
            tx_queue_limit: 4096,
            copy_threshold: None,
        }
    }
}

/// Which buffer a GPADL is wanted for.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum BufferKind {
    Receive,
    Send,
}

/// Something the embedder must act on or may want to know, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetvscEvent {
    /// Establish a GPADL over `pfns` on the primary channel, then call [`Netvsc::gpadl_created`].
    CreateGpadl { buffer: BufferKind, pfns: Vec<u64> },
    /// The host granted `count` sub-channels: open each offer (index 1..=count), then call
    /// [`Netvsc::subchannel_opened`].
    OpenSubchannels { count: u16 },
    /// Bring-up finished: frames may flow.
    Ready,
    /// Bring-up failed; the driver is dead until restarted.
    Failed(NetvscError),
    /// Carrier (from the MEDIA_CONNECT_STATUS query or a MEDIA_CONNECT / DISCONNECT indication).
    Link { up: bool },
    /// Link speed in units of 100 bit/s (query or LINK_SPEED_CHANGE indication).
    LinkSpeed(u32),
    /// NETWORK_CHANGE: Linux drops the carrier and raises it again ~2 s later.
    NetworkChange,
    /// The host's send indirection table (queue per `hash & 15`).
    IndirectionTable([u32; nvsp::INDIRECTION_TABLE_ENTRIES]),
}

/// Where the driver is.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum DriverState {
    Created,
    Initializing,
    Ready,
    Failed,
    /// [`Netvsc::halt`] ran: RNDIS halted, buffers revoked; close the channels next.
    Halted,
}

/// What the host granted and told during the bring-up.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceInfo {
    pub nvsp_version: u32,
    /// Receive sub-allocation size and count (SEND_RECV_BUF_COMPLETE).
    pub recv_section_size: u32,
    pub recv_section_count: u32,
    /// Send section size and count (SEND_SEND_BUF_COMPLETE; count = buffer / size).
    pub send_section_size: u32,
    pub send_section_count: u32,
    /// INITIALIZE_CMPLT: most RNDIS packets per send section, batch alignment.
    pub max_packets_per_message: u32,
    pub packet_alignment: u32,
    pub mac: [u8; 6],
    /// MAXIMUM_FRAME_SIZE answer (MTU without header), if it answered with 4 bytes.
    pub host_mtu: Option<u32>,
    /// GEN_FRIENDLY_NAME, UTF-16 decoded lossily (`None` = not answered).
    pub friendly_name: Option<alloc::string::String>,
    /// The host's offload capabilities (raw `ndis_offload`).
    pub offload: Option<rndis::ndis::Offload>,
    /// The offload parameters the driver set.
    pub offload_params: Option<rndis::ndis::OffloadParams>,
    pub link_up: bool,
    /// Units of 100 bit/s.
    pub link_speed: Option<u32>,
    /// RSS capabilities: receive queues, indirection entries.
    pub rss_queues: u32,
    pub rss_table_entries: u16,
    /// Channels in use (primary + sub-channels).
    pub channels: u16,
}

/// Counters (monotonic).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct NetvscStats {
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// Frames sent from send-buffer sections / GPA direct.
    pub tx_section: u64,
    pub tx_gpa_direct: u64,
    /// SEND_RNDIS_PKT messages carrying more than one frame.
    pub tx_batches: u64,
    /// Send completions with a status other than SUCCESS.
    pub tx_failed: u64,
    pub rx_frames: u64,
    pub rx_bytes: u64,
    /// Frames dropped because [`NetvscConfig::rx_queue_limit`] was reached.
    pub rx_dropped: u64,
    /// Transfer-page packets received / completed.
    pub rx_packets: u64,
    pub rx_completions: u64,
    /// Transfer-page packets completed with FAIL (something in them was bad).
    pub rx_failed: u64,
    /// Host packets refused (malformed, unexpected, unknown).
    pub bad_packets: u64,
    pub link_events: u64,
}

/// One packet for the guest→host ring. `payload` is what follows the type-specific header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutPacket {
    pub kind: OutKind,
    pub trans_id: u64,
    pub completion_requested: bool,
    pub payload: Vec<u8>,
}

/// The packet type and, for GPA direct, its ranges.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OutKind {
    InBand,
    Completion,
    /// One range per page buffer, each inside one page (as Linux `vmbus_sendpacket_pagebuffer`).
    GpaDirect(Vec<PageBuffer>),
}

/// `{len, offset, pfn}`: bytes inside one guest page.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct PageBuffer {
    pub pfn: u64,
    pub offset: u32,
    pub len: u32,
}

impl OutPacket {
    /// The ring packet type.
    pub fn packet_type(&self) -> PacketType {
        match self.kind {
            OutKind::InBand => PacketType::InBand,
            OutKind::Completion => PacketType::Completion,
            OutKind::GpaDirect(_) => PacketType::GpaDirect,
        }
    }

    /// The GPA-direct header bytes (`reserved, range_count` then `{len, offset, pfn}` per range);
    /// empty for the other kinds.
    pub fn header_bytes(&self) -> Vec<u8> {
        let OutKind::GpaDirect(ranges) = &self.kind else {
            return Vec::new();
        };
        let mut h = Vec::with_capacity(8 + ranges.len() * 16);
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(
            &u32::try_from(ranges.len())
                .unwrap_or(u32::MAX)
                .to_le_bytes(),
        );
        for r in ranges {
            h.extend_from_slice(&r.len.to_le_bytes());
            h.extend_from_slice(&r.offset.to_le_bytes());
            h.extend_from_slice(&r.pfn.to_le_bytes());
        }
        h
    }
}

/// A host packet as read from a host→guest ring (type-specific header already validated by the
/// ring reader, payload copied out).
#[derive(Copy, Clone, Debug)]
pub struct HostPacket<'a> {
    pub packet_type: PacketType,
    pub trans_id: u64,
    pub completion_requested: bool,
    /// Transfer-page packets: the set id and `(byte_offset, byte_count)` ranges.
    pub transfer: Option<(u16, &'a [(u32, u32)])>,
    pub payload: &'a [u8],
}

/// What a send-path transaction holds until its completion arrives.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum TxSlot {
    /// A send-buffer section with this many frames.
    Section { index: u32, frames: u32 },
    /// A bounce slot (GPA-direct frame).
    Bounce(u32),
    /// A control-area page (RNDIS request).
    Control(u32),
}

/// Frames being batched into one send section on one queue (Linux `multi_send_data`).
#[derive(Copy, Clone, Debug)]
struct Batch {
    section: u32,
    len: u32,
    count: u32,
}

/// Per-channel state.
#[derive(Debug, Default)]
struct Queue {
    out: VecDeque<OutPacket>,
    batch: Option<Batch>,
}

/// The driver for one synthetic NIC (a primary channel and its sub-channels).
pub struct Netvsc<M: GuestMemory> {
    cfg: NetvscConfig,
    mem: M,
    state: DriverState,
    phase: bringup::Phase,
    info: DeviceInfo,
    stats: NetvscStats,
    events: VecDeque<NetvscEvent>,
    queues: Vec<Queue>,
    next_trans: u64,
    next_req: u32,
    /// Send-path transactions waiting for their completion.
    tx_pending: HashMap<u64, TxSlot>,
    free_sections: Vec<u32>,
    free_bounce: Vec<u32>,
    free_control: Vec<u32>,
    /// RNDIS requests waiting for their reply: req_id → what it was.
    rndis_pending: HashMap<u32, control::Request>,
    rx_frames: VecDeque<RxFrame>,
    indirection: Option<[u32; nvsp::INDIRECTION_TABLE_ENTRIES]>,
    recv_gpadl: Option<u32>,
    send_gpadl: Option<u32>,
}

impl<M: GuestMemory> Netvsc<M> {
    /// A driver over `mem` (guest RAM holding the regions named in `cfg`).
    pub fn new(cfg: NetvscConfig, mem: M) -> Result<Self, NetvscError> {
        for (what, r) in [
            ("recv_buffer", Some(cfg.recv_buffer)),
            ("send_buffer", Some(cfg.send_buffer)),
            ("control_area", Some(cfg.control_area)),
            ("bounce_area", cfg.bounce_area),
        ] {
            if let Some(r) = r
                && !r.is_pages()
            {
                return Err(NetvscError::BadConfig(what));
            }
        }
        if cfg.nvsp_versions.is_empty() || cfg.queues == 0 || cfg.mtu < 68 {
            return Err(NetvscError::BadConfig("nvsp_versions / queues / mtu"));
        }
        let control_slots = u32::try_from(cfg.control_area.len / PAGE_SIZE).unwrap_or(u32::MAX);
        let bounce_slots = cfg.bounce_area.map_or(0, |b| {
            u32::try_from(b.len / u64::from(cfg.bounce_slot_size.max(4096))).unwrap_or(u32::MAX)
        });
        Ok(Netvsc {
            mem,
            state: DriverState::Created,
            phase: bringup::Phase::Created,
            info: DeviceInfo::default(),
            stats: NetvscStats::default(),
            events: VecDeque::new(),
            queues: (0..1).map(|_| Queue::default()).collect(),
            next_trans: 1,
            next_req: 1,
            tx_pending: HashMap::new(),
            free_sections: Vec::new(),
            free_bounce: (0..bounce_slots).rev().collect(),
            free_control: (0..control_slots).rev().collect(),
            rndis_pending: HashMap::new(),
            rx_frames: VecDeque::new(),
            indirection: None,
            recv_gpadl: None,
            send_gpadl: None,
            cfg,
        })
    }

    pub fn config(&self) -> &NetvscConfig {
        &self.cfg
    }

    pub fn state(&self) -> DriverState {
        self.state
    }

    /// What the host granted so far.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    pub fn stats(&self) -> NetvscStats {
        self.stats
    }

    /// The GPADL handles registered for the receive and send buffers.
    pub fn gpadls(&self) -> (Option<u32>, Option<u32>) {
        (self.recv_gpadl, self.send_gpadl)
    }

    /// The next event, in order.
    pub fn poll_event(&mut self) -> Option<NetvscEvent> {
        self.events.pop_front()
    }

    /// The next packet for queue `q`'s ring, without taking it.
    pub fn peek_transmit(&self, q: u16) -> Option<&OutPacket> {
        self.queues.get(usize::from(q))?.out.front()
    }

    /// Takes the packet [`Self::peek_transmit`] showed (it was written to the ring).
    pub fn pop_transmit(&mut self, q: u16) -> Option<OutPacket> {
        self.queues.get_mut(usize::from(q))?.out.pop_front()
    }

    /// Packets waiting on every queue.
    pub fn queued_packets(&self) -> usize {
        self.queues.iter().map(|q| q.out.len()).sum()
    }

    /// Number of channels (queues) in use.
    pub fn queue_count(&self) -> u16 {
        u16::try_from(self.queues.len()).unwrap_or(u16::MAX)
    }

    /// The queue Linux would send a flow with this hash on (`tx_table[hash & 15]`).
    pub fn queue_for_hash(&self, hash: u32) -> u16 {
        let n = self.queue_count().max(1);
        let q = match &self.indirection {
            Some(t) => t.get((hash & 15) as usize).copied().unwrap_or(0),
            None => hash & 15,
        };
        u16::try_from(q).unwrap_or(0) % n
    }

    /// A received frame, oldest first.
    pub fn poll_receive(&mut self) -> Option<RxFrame> {
        self.rx_frames.pop_front()
    }

    /// Frames waiting in [`Self::poll_receive`].
    pub fn pending_receive(&self) -> usize {
        self.rx_frames.len()
    }

    /// Free send resources: (send sections, bounce slots).
    pub fn free_send_resources(&self) -> (usize, usize) {
        (self.free_sections.len(), self.free_bounce.len())
    }

    fn trans_id(&mut self) -> u64 {
        let t = self.next_trans;
        // Never the "no response" id; wraps far beyond any test.
        self.next_trans = match t.wrapping_add(1) {
            0 | NO_RESPONSE_TRANS_ID => 1,
            n => n,
        };
        t
    }

    fn queue_packet(&mut self, q: u16, pkt: OutPacket) {
        if let Some(queue) = self.queues.get_mut(usize::from(q)) {
            queue.out.push_back(pkt);
        }
    }

    /// An NVSP message for the primary channel, padded to 40 bytes as Linux sends it.
    fn send_nvsp(&mut self, msg: nvsp::NvspMessage, completion: bool) -> u64 {
        let trans_id = if completion {
            self.trans_id()
        } else {
            NO_RESPONSE_TRANS_ID
        };
        self.queue_packet(
            0,
            OutPacket {
                kind: OutKind::InBand,
                trans_id,
                completion_requested: completion,
                payload: msg.to_bytes(nvsp::MESSAGE_SIZE_V61),
            },
        );
        trans_id
    }

    fn event(&mut self, e: NetvscEvent) {
        self.events.push_back(e);
    }

    fn fail(&mut self, e: NetvscError) -> NetvscError {
        if self.state != DriverState::Failed {
            self.state = DriverState::Failed;
            self.phase = bringup::Phase::Failed;
            self.event(NetvscEvent::Failed(e.clone()));
        }
        e
    }
}
