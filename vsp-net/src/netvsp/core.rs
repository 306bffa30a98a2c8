//! One netvsp device without threads: channels, NVSP state machine, and the poll loop.

use super::buffers::{ReceiveBuffer, SendBuffer};
use super::device::GpadlSource;
use super::{NetvspConfig, NetvspStats};
use crate::backend::NetBackend;
use ringbuf::layout::{TransferPageHeader, TransferPageRange};
use ringbuf::signal::Doorbell;
use ringbuf::{
    HeaderInfo, OutgoingPacket, PacketType, RingError, RingMem, RingReader, RingWriter, WriteError,
};
use std::borrow::Cow;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use vmbus_core::device::ChannelControl;
use vmbus_core::devices::nvsp::{self, Direction, NvspMessage, version};
use vmbus_core::devices::rndis::ndis::LINUX_RSS_KEY;
use vmbus_core::memory::GuestMemory;
use zerocopy::IntoBytes;

/// Guest packets handled per channel per poll (keeps one busy channel from starving the others).
const PACKETS_PER_POLL: usize = 128;
/// Most NVSP payload bytes copied out of a guest packet (messages are 28 or 40 bytes).
const MAX_NVSP_COPY: usize = 256;
/// Default NDIS-config MTU (Ethernet header included).
pub(crate) const DEFAULT_MTU: u32 = 1514;

/// A GPA-direct range copied out of the ring.
#[derive(Clone, Debug)]
pub(crate) struct OwnedRange {
    pub byte_offset: u32,
    pub byte_count: u32,
    pub pfns: Vec<u64>,
}

#[derive(Debug)]
pub(crate) enum InKind {
    InBand,
    GpaDirect(Vec<OwnedRange>),
    Completion,
    TransferPages,
}

/// A guest packet, copied out of the ring and consumed.
#[derive(Debug)]
pub(crate) struct InPacket {
    pub kind: InKind,
    pub trans_id: u64,
    pub completion_requested: bool,
    pub payload: Vec<u8>,
}

/// A packet for the guest waiting for ring space.
#[derive(Debug)]
pub(crate) enum Pending {
    Completion {
        trans_id: u64,
        payload: Vec<u8>,
    },
    InBand {
        payload: Vec<u8>,
    },
    Transfer {
        trans_id: u64,
        ranges: Vec<TransferPageRange>,
        channel_type: u32,
    },
}

/// One open channel (queue) of the device.
pub(crate) struct Channel<R: RingMem> {
    pub relid: u32,
    reader: RingReader<R>,
    writer: RingWriter<R>,
    pub kick: Option<Doorbell>,
    call: Option<Doorbell>,
    /// Packets for the guest not yet in the ring. While non-empty, only guest completions are
    /// read (so replies cannot pile up); receive packets here hold sections, which are bounded.
    pub out: VecDeque<Pending>,
    signal: bool,
    broken: bool,
}

impl<R: RingMem> Channel<R> {
    pub fn new(
        relid: u32,
        reader: RingReader<R>,
        writer: RingWriter<R>,
        kick: Option<Doorbell>,
        call: Option<Doorbell>,
    ) -> Self {
        Channel {
            relid,
            reader,
            writer,
            kick,
            call,
            out: VecDeque::new(),
            signal: false,
            broken: false,
        }
    }
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum RndisPhase {
    Uninitialized,
    Initialized,
    Halted,
}

/// Receive-side scaling the guest configured.
#[derive(Clone, Debug)]
pub(crate) struct Rss {
    pub key: [u8; 40],
    pub table: Vec<u32>,
    pub hash_info: u32,
}

/// RNDIS-level state (reset with the NVSP session).
#[derive(Clone, Debug)]
pub(crate) struct RndisState {
    pub phase: RndisPhase,
    pub filter: u32,
    pub mac: [u8; 6],
    /// Receive checksum results may be reported for (IPv4 header, TCP, UDP).
    pub rx_csum: (bool, bool, bool),
    pub rss: Option<Rss>,
    /// Link state the guest last learnt (query answer or indication).
    pub reported_link: Option<bool>,
}

impl RndisState {
    pub(crate) fn new(mac: [u8; 6]) -> Self {
        RndisState {
            phase: RndisPhase::Uninitialized,
            filter: 0,
            mac,
            rx_csum: (true, true, true),
            rss: None,
            reported_link: None,
        }
    }
}

/// NVSP session state (reset when the primary channel closes).
#[derive(Clone, Debug, Default)]
pub(crate) struct Session {
    pub version: Option<u32>,
    pub ndis_version: Option<(u32, u32)>,
    pub ndis_config: Option<nvsp::SendNdisConfig>,
    /// Frame size including the Ethernet header.
    pub mtu: u32,
    /// Sub-channels granted in this session.
    pub granted: u16,
    pub table_pending: bool,
}

pub(crate) struct Core<R: RingMem> {
    pub cfg: NetvspConfig,
    pub backend: Box<dyn NetBackend>,
    pub mem: Arc<dyn GuestMemory>,
    pub gpadls: Arc<dyn GpadlSource>,
    pub subchannel_ctl: Box<dyn ChannelControl + Send>,
    /// Open channels by queue index (0 = primary).
    pub channels: BTreeMap<u16, Channel<R>>,
    pub session: Session,
    pub rndis: RndisState,
    pub rx: Option<ReceiveBuffer>,
    pub tx: Option<SendBuffer>,
    /// RNDIS messages for the guest waiting for a receive section (always sent on the primary).
    pub control_out: VecDeque<Vec<u8>>,
    pub stats: NetvspStats,
    /// Sub-channels the bus has offered so far (they outlive a session).
    pub offered: u16,
    /// The in-flight journal receive buffers record lent sections in (VSP processes).
    pub journal: Option<super::journal::RxJournal>,
    /// Until then a backend link that looks down is not reported (a resumed session: the TAP's
    /// operational state follows its re-attached reader asynchronously, ~1 s in Linux's
    /// linkwatch, and the guest must not see a restart as a cable pull).
    pub link_grace_until: Option<std::time::Instant>,
}

impl<R: RingMem> Core<R> {
    pub fn new(
        cfg: NetvspConfig,
        backend: Box<dyn NetBackend>,
        mem: Arc<dyn GuestMemory>,
        gpadls: Arc<dyn GpadlSource>,
        subchannel_ctl: Box<dyn ChannelControl + Send>,
    ) -> Self {
        let mac = cfg.mac.unwrap_or_else(|| backend.mac());
        Core {
            cfg,
            backend,
            mem,
            gpadls,
            subchannel_ctl,
            channels: BTreeMap::new(),
            session: Session {
                mtu: DEFAULT_MTU,
                ..Session::default()
            },
            rndis: RndisState::new(mac),
            rx: None,
            tx: None,
            control_out: VecDeque::new(),
            stats: NetvspStats::default(),
            offered: 0,
            journal: None,
            link_grace_until: None,
        }
    }

    pub fn mac(&self) -> [u8; 6] {
        self.cfg.mac.unwrap_or_else(|| self.backend.mac())
    }

    /// NVSP message size for replies in this session.
    pub fn msg_size(&self) -> usize {
        nvsp::message_size(self.session.version.unwrap_or(version::V61))
    }

    pub fn add_channel(&mut self, index: u16, ch: Channel<R>) {
        self.channels.insert(index, ch);
    }

    /// Stops serving a channel. Closing the primary ends the session: everything the guest set
    /// up is forgotten (its buffers are released with the channel).
    pub fn remove_channel(&mut self, relid: u32) -> bool {
        let Some(index) = self
            .channels
            .iter()
            .find(|(_, c)| c.relid == relid)
            .map(|(i, _)| *i)
        else {
            return false;
        };
        self.channels.remove(&index);
        if index == 0 {
            tracing::debug!(relid, "netvsp: primary closed, session reset");
            self.session = Session {
                mtu: DEFAULT_MTU,
                ..Session::default()
            };
            self.rndis = RndisState::new(self.mac());
            self.rx = None;
            self.tx = None;
            self.control_out.clear();
        }
        true
    }

    /// One round of work. Returns true when work is left that does not depend on a new signal
    /// (guest packets beyond the per-poll budget, frames waiting in the backend).
    pub fn poll(&mut self) -> bool {
        let queues: Vec<u16> = self.channels.keys().copied().collect();
        let mut busy = false;
        for &q in &queues {
            busy |= self.service_channel(q);
        }
        self.check_link();
        self.maybe_send_indirection_table();
        self.deliver_control();
        busy |= self.receive_from_backend();
        for &q in &queues {
            self.flush(q);
            self.signal(q);
        }
        busy
    }

    /// Reads and handles the channel's guest packets; true if the budget ran out.
    fn service_channel(&mut self, q: u16) -> bool {
        self.flush(q);
        let mut n = 0;
        loop {
            let Some(ch) = self.channels.get_mut(&q) else {
                return false;
            };
            if ch.broken || n == PACKETS_PER_POLL {
                break;
            }
            // With replies still waiting for ring space, only completions (which produce no
            // reply) are taken; requests wait in the guest's ring.
            let only_completions = !ch.out.is_empty();
            let pkt = match read_packet(&mut ch.reader, only_completions) {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(e) => {
                    ch.broken = true;
                    self.stats.bad_packets += 1;
                    tracing::warn!(relid = ch.relid, error = %e, "netvsp: guest ring broken; channel stopped");
                    break;
                }
            };
            n += 1;
            self.handle_packet(q, pkt);
            // Release each request's ring space as soon as its replies are in the ring rather than
            // once per batch: a VSP process killed mid-batch then leaves its successor only
            // requests whose completion the guest has not been sent (it must not get two).
            if let Some(ch) = self.channels.get_mut(&q)
                && ch.out.is_empty()
            {
                match ch.reader.commit() {
                    Ok(true) => ch.signal = true,
                    Ok(false) => {}
                    Err(_) => ch.broken = true,
                }
            }
        }
        if let Some(ch) = self.channels.get_mut(&q) {
            match ch.reader.commit() {
                Ok(true) => ch.signal = true,
                Ok(false) => {}
                Err(_) => ch.broken = true,
            }
        }
        n == PACKETS_PER_POLL
    }

    fn handle_packet(&mut self, q: u16, pkt: InPacket) {
        match pkt.kind {
            InKind::Completion => self.handle_completion(pkt),
            InKind::TransferPages => {
                self.refuse(q, &pkt, 0, "transfer-page packets are host-to-guest only")
            }
            InKind::InBand | InKind::GpaDirect(_) => self.handle_message(q, pkt),
        }
    }

    fn handle_completion(&mut self, pkt: InPacket) {
        let ok = matches!(
            NvspMessage::parse(&pkt.payload, Direction::GuestToHost),
            Ok(NvspMessage::SendRndisPacketComplete(_))
        ) && self.rx.as_mut().is_some_and(|rx| rx.complete(pkt.trans_id));
        if !ok {
            self.stats.stray_completions += 1;
            tracing::debug!(trans_id = pkt.trans_id, "netvsp: stray completion ignored");
        }
    }

    /// Sends the send indirection table once every granted sub-channel is open.
    fn maybe_send_indirection_table(&mut self) {
        let queues = self.session.granted as usize + 1;
        if !self.session.table_pending
            || self.channels.len() < queues
            || !self.channels.contains_key(&0)
        {
            return;
        }
        self.session.table_pending = false;
        let table: [u32; nvsp::INDIRECTION_TABLE_ENTRIES] =
            std::array::from_fn(|i| (i % queues) as u32);
        self.emit(
            0,
            Pending::InBand {
                payload: nvsp::indirection_table_message(&table),
            },
        );
    }

    /// Media connect / disconnect indications following the backend's carrier.
    fn check_link(&mut self) {
        let Some(reported) = self.rndis.reported_link else {
            return;
        };
        let up = self.backend.link_up();
        if up == reported || self.rndis.phase != RndisPhase::Initialized {
            return;
        }
        if !up
            && self
                .link_grace_until
                .is_some_and(|t| std::time::Instant::now() < t)
        {
            return;
        }
        use vmbus_core::devices::rndis::{indicate_status, status as rs};
        let s = if up {
            rs::MEDIA_CONNECT
        } else {
            rs::MEDIA_DISCONNECT
        };
        if self.queue_control(indicate_status(s, &[])) {
            self.rndis.reported_link = Some(up);
            self.stats.link_indications += 1;
        }
    }

    /// Queues an RNDIS message for the guest; false (counted) when the queue is full.
    pub fn queue_control(&mut self, msg: Vec<u8>) -> bool {
        if self.control_out.len() >= self.cfg.max_pending_control {
            self.stats.control_dropped += 1;
            return false;
        }
        self.control_out.push_back(msg);
        true
    }

    /// Moves queued RNDIS control messages into receive sections on the primary channel.
    fn deliver_control(&mut self) {
        if !self.channels.contains_key(&0) {
            return;
        }
        while let Some(msg) = self.control_out.front() {
            let Some(rx) = self.rx.as_mut() else { return };
            if msg.len() > rx.sub_size as usize {
                self.stats.control_dropped += 1;
                self.control_out.pop_front();
                continue;
            }
            let Some(section) = rx.alloc() else { return };
            let len = match rx.write_section(self.mem.as_ref(), section, &[msg]) {
                Ok(n) => n,
                Err(e) => {
                    rx.free_unsent([section]);
                    self.stats.control_dropped += 1;
                    tracing::warn!(error = %e, "netvsp: receive buffer not writable");
                    self.control_out.pop_front();
                    continue;
                }
            };
            let range = TransferPageRange {
                byte_count: len.into(),
                byte_offset: (rx.offset(section) as u32).into(),
            };
            let trans_id = rx.lend(vec![section]);
            self.control_out.pop_front();
            self.emit(
                0,
                Pending::Transfer {
                    trans_id,
                    ranges: vec![range],
                    channel_type: nvsp::CHANNEL_TYPE_CONTROL,
                },
            );
        }
    }

    /// A completion packet for guest transaction `trans_id`.
    pub fn complete(&mut self, q: u16, trans_id: u64, payload: Vec<u8>) {
        self.emit(q, Pending::Completion { trans_id, payload });
    }

    /// Queues a packet for the guest on queue `q` and writes what fits.
    pub fn emit(&mut self, q: u16, p: Pending) {
        let Some(ch) = self.channels.get_mut(&q) else {
            if let (Pending::Transfer { trans_id, .. }, Some(rx)) = (&p, self.rx.as_mut()) {
                rx.complete(*trans_id);
            }
            return;
        };
        ch.out.push_back(p);
        self.flush(q);
    }

    /// Writes queued packets into the channel's ring until it is full.
    fn flush(&mut self, q: u16) {
        let size = self.msg_size();
        let Some(ch) = self.channels.get_mut(&q) else {
            return;
        };
        let set_id = self
            .rx
            .as_ref()
            .map_or(nvsp::LINUX_RECEIVE_BUFFER_ID, |rx| rx.buf.id);
        while let Some(p) = ch.out.front() {
            if ch.broken {
                break;
            }
            let (packet_type, completion_requested, trans_id, headers, body) =
                encode(p, size, set_id);
            let parts = [&*body];
            let pkt = OutgoingPacket {
                packet_type,
                completion_requested,
                trans_id,
                headers: &headers,
                payload: &parts,
            };
            let lending = match p {
                Pending::Transfer { trans_id, .. } => Some(*trans_id),
                _ => None,
            };
            if let (Some(id), Some(rx)) = (lending, self.rx.as_ref()) {
                rx.publishing(id, true);
            }
            let result = ch.writer.try_write(&pkt);
            drop(body);
            if let (Some(id), Some(rx), Err(_)) = (lending, self.rx.as_ref(), &result) {
                rx.publishing(id, false);
            }
            match result {
                Ok(sig) => {
                    ch.signal |= sig;
                    ch.out.pop_front();
                }
                Err(WriteError::Full { needed, .. }) => match ch.writer.request_space(needed) {
                    Ok(true) => continue,
                    Ok(false) => break,
                    Err(_) => ch.broken = true,
                },
                Err(e) => {
                    let dropped = ch.out.pop_front();
                    if matches!(e, WriteError::Ring(_)) {
                        ch.broken = true;
                    }
                    tracing::warn!(relid = ch.relid, error = %e, "netvsp: packet to guest dropped");
                    if let (Some(Pending::Transfer { trans_id, .. }), Some(rx)) =
                        (dropped, self.rx.as_mut())
                    {
                        rx.complete(trans_id);
                    }
                }
            }
        }
        if ch.out.is_empty() {
            ch.writer.clear_space_request();
        }
    }

    /// Interrupts the guest if a ring operation asked for it.
    fn signal(&mut self, q: u16) {
        let Some(ch) = self.channels.get_mut(&q) else {
            return;
        };
        if std::mem::take(&mut ch.signal)
            && let Some(call) = &ch.call
            && let Err(e) = call.ring()
        {
            tracing::warn!(relid = ch.relid, error = %e, "netvsp: guest interrupt failed");
        }
    }

    /// The default indirection table / key used until the guest sets RSS parameters.
    pub fn default_rss(&self) -> Rss {
        let queues = u32::from(self.session.granted) + 1;
        Rss {
            key: LINUX_RSS_KEY,
            table: (0..128).map(|i| i % queues).collect(),
            hash_info: vmbus_core::devices::rndis::ndis::hash_info::LINUX,
        }
    }
}

/// The descriptor fields, type-specific header and payload of a pending item's ring packet.
fn encode(
    p: &Pending,
    size: usize,
    set_id: u16,
) -> (PacketType, bool, u64, Vec<u8>, Cow<'_, [u8]>) {
    match p {
        Pending::Completion { trans_id, payload } => (
            PacketType::Completion,
            false,
            *trans_id,
            Vec::new(),
            Cow::Borrowed(payload),
        ),
        Pending::InBand { payload } => (
            PacketType::InBand,
            false,
            0,
            Vec::new(),
            Cow::Borrowed(payload),
        ),
        Pending::Transfer {
            trans_id,
            ranges,
            channel_type,
        } => {
            let h = TransferPageHeader {
                transfer_page_set_id: set_id.into(),
                sender_owns_set: 0,
                reserved: 0,
                range_count: (ranges.len() as u32).into(),
            };
            let mut headers = h.as_bytes().to_vec();
            for r in ranges {
                headers.extend_from_slice(r.as_bytes());
            }
            let body = NvspMessage::SendRndisPacket(nvsp::SendRndisPacket {
                channel_type: *channel_type,
                send_buffer_section_index: nvsp::INVALID_SECTION_INDEX,
                send_buffer_section_size: 0,
            })
            .to_bytes(size);
            (
                PacketType::TransferPages,
                true,
                *trans_id,
                headers,
                Cow::Owned(body),
            )
        }
    }
}

/// Copies the next guest packet out of the ring (header ranges and at most `MAX_NVSP_COPY`
/// payload bytes) and consumes it.
fn read_packet<R: RingMem>(
    reader: &mut RingReader<R>,
    only_completions: bool,
) -> Result<Option<InPacket>, RingError> {
    let Some(p) = reader.peek()? else {
        return Ok(None);
    };
    let info = *p.info();
    if only_completions && info.packet_type != PacketType::Completion {
        return Ok(None);
    }
    let kind = match info.header {
        HeaderInfo::GpaDirect { .. } => InKind::GpaDirect(
            p.gpa_ranges()
                .into_iter()
                .flatten()
                .map(|r| OwnedRange {
                    byte_offset: r.byte_offset,
                    byte_count: r.byte_count,
                    pfns: r.pfns.iter().map(|x| x.get()).collect(),
                })
                .collect(),
        ),
        HeaderInfo::TransferPages { .. } => InKind::TransferPages,
        HeaderInfo::None if info.packet_type == PacketType::Completion => InKind::Completion,
        HeaderInfo::None => InKind::InBand,
    };
    let mut payload = vec![0u8; p.payload_len().min(MAX_NVSP_COPY)];
    // The length is within the validated payload.
    let copied = p.copy_payload(0, &mut payload).is_ok();
    p.consume();
    if !copied {
        payload.clear();
    }
    Ok(Some(InPacket {
        kind,
        trans_id: info.trans_id,
        completion_requested: info.completion_requested,
        payload,
    }))
}
