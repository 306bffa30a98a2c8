//! One netvsp device without threads: channels, NVSP state machine, and the poll loop.

use super::buffers::{RX_HEADER_AREA, ReceiveBuffer, SendBuffer};
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
use vmbus_core::devices::nvsp::{self, Direction, NvspMessage, msg_type, status, version};
use vmbus_core::devices::rndis::ndis::LINUX_RSS_KEY;
use vmbus_core::memory::GuestMemory;
use zerocopy::IntoBytes;

/// Guest packets handled per channel per poll (keeps one busy channel from starving the others).
const PACKETS_PER_POLL: usize = 128;
/// Most NVSP payload bytes copied out of a guest packet (messages are 28 or 40 bytes).
const MAX_NVSP_COPY: usize = 256;
/// OpenVMM's `max_mdl_chain_length` in INIT_COMPLETE.
const MAX_MDL_CHAIN_LENGTH: u32 = 34;
/// Smallest / default NDIS-config MTU (Ethernet header included).
const MIN_MTU: u32 = 68 + 14;
pub(crate) const DEFAULT_MTU: u32 = 1514;
const MAX_MTU: u32 = 65535;

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
    /// Packets for the guest not yet in the ring. While non-empty, no guest packet is read (so
    /// completions cannot pile up); receive packets here hold sections, which are bounded.
    out: VecDeque<Pending>,
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
    fn new(mac: [u8; 6]) -> Self {
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
    gpadls: Arc<dyn GpadlSource>,
    subchannel_ctl: Box<dyn ChannelControl + Send>,
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
    offered: u16,
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
            if ch.broken || !ch.out.is_empty() {
                break;
            }
            if n == PACKETS_PER_POLL {
                break;
            }
            let pkt = match read_packet(&mut ch.reader) {
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

    /// Refuses a guest packet: counted, logged (warn on the 1st, 2nd, 4th... occurrence, so a
    /// flood cannot flood the log), and answered with a failure where the message has a reply.
    pub fn refuse(&mut self, q: u16, pkt: &InPacket, ty: u32, reason: &str) {
        self.stats.bad_packets += 1;
        let relid = self.channels.get(&q).map_or(0, |c| c.relid);
        if self.stats.bad_packets.is_power_of_two() {
            tracing::warn!(
                relid,
                msg_type = ty,
                reason,
                count = self.stats.bad_packets,
                "netvsp: guest packet refused"
            );
        } else {
            tracing::debug!(relid, msg_type = ty, reason, "netvsp: guest packet refused");
        }
        if !pkt.completion_requested {
            return;
        }
        let reply = match ty {
            msg_type::INIT => Some(NvspMessage::InitComplete(nvsp::InitComplete {
                negotiated_protocol_version: u32::MAX,
                max_mdl_chain_length: MAX_MDL_CHAIN_LENGTH,
                status: status::FAIL,
            })),
            msg_type::SEND_RECEIVE_BUFFER => Some(NvspMessage::SendReceiveBufferComplete(
                nvsp::SendReceiveBufferComplete {
                    status: status::FAIL,
                    ..Default::default()
                },
            )),
            msg_type::SEND_SEND_BUFFER => Some(NvspMessage::SendSendBufferComplete(
                nvsp::SendSendBufferComplete {
                    status: status::FAIL,
                    section_size: 0,
                },
            )),
            msg_type::SEND_RNDIS_PACKET => Some(NvspMessage::SendRndisPacketComplete(
                nvsp::SendRndisPacketComplete {
                    status: status::FAIL,
                },
            )),
            msg_type::SUBCHANNEL => {
                Some(NvspMessage::SubchannelComplete(nvsp::SubchannelComplete {
                    status: status::FAIL,
                    num_subchannels: 0,
                }))
            }
            msg_type::SWITCH_DATA_PATH => {
                self.complete(q, pkt.trans_id, Vec::new());
                None
            }
            _ => None,
        };
        if let Some(r) = reply {
            let size = self.msg_size();
            self.complete(q, pkt.trans_id, r.to_bytes(size));
        }
    }

    /// Why `msg` may not be handled now, if it may not.
    fn not_allowed(&self, q: u16, msg: &NvspMessage) -> Option<String> {
        let ty = msg.msg_type();
        let s = &self.session;
        let Some(v) = s.version else {
            return (!matches!(msg, NvspMessage::Init(_))).then(|| "message before INIT".into());
        };
        if let Err(e) = nvsp::check_version(ty, v) {
            return Some(e.to_string());
        }
        if q != 0 && !matches!(msg, NvspMessage::SendRndisPacket(_)) {
            return Some("only SEND_RNDIS_PKT is allowed on a sub-channel".into());
        }
        let dup = |what: &str| Some(format!("{what} twice"));
        match msg {
            NvspMessage::Init(_) => dup("INIT"),
            NvspMessage::SendNdisVersion(_) if s.ndis_version.is_some() => dup("SEND_NDIS_VER"),
            NvspMessage::SendNdisConfig(_) if s.ndis_config.is_some() => dup("SEND_NDIS_CONFIG"),
            NvspMessage::SendReceiveBuffer(_) if self.rx.is_some() => dup("SEND_RECV_BUF"),
            NvspMessage::SendReceiveBuffer(_) if v >= version::V2 && s.ndis_config.is_none() => {
                Some("SEND_RECV_BUF before SEND_NDIS_CONFIG".into())
            }
            NvspMessage::SendSendBuffer(_) if self.tx.is_some() => dup("SEND_SEND_BUF"),
            NvspMessage::SendRndisPacketComplete(_) => {
                Some("SEND_RNDIS_PKT_COMPLETE must be a completion packet".into())
            }
            _ => None,
        }
    }

    fn handle_message(&mut self, q: u16, pkt: InPacket) {
        let msg = match NvspMessage::parse(&pkt.payload, Direction::GuestToHost) {
            Ok(m) => m,
            Err(e) => {
                let ty = nvsp::peek_type(&pkt.payload).unwrap_or(0);
                return self.refuse(q, &pkt, ty, &e.to_string());
            }
        };
        if let Some(reason) = self.not_allowed(q, &msg) {
            return self.refuse(q, &pkt, msg.msg_type(), &reason);
        }
        let size = self.msg_size();
        match msg {
            NvspMessage::Init(i) => self.handle_init(q, &pkt, i),
            NvspMessage::SendNdisVersion(v) => {
                self.session.ndis_version = Some((v.ndis_major_version, v.ndis_minor_version));
            }
            NvspMessage::SendNdisConfig(c) => {
                let mtu = c.mtu;
                self.session.mtu = if (MIN_MTU..=MAX_MTU).contains(&mtu) {
                    mtu
                } else {
                    DEFAULT_MTU
                };
                self.session.ndis_config = Some(c);
            }
            NvspMessage::SendReceiveBuffer(b) => {
                let sub_size = RX_HEADER_AREA + self.session.mtu + 36;
                let result = self
                    .gpadls
                    .gpadl(b.gpadl_handle)
                    .ok_or(super::buffers::BufferError::UnknownGpadl(b.gpadl_handle))
                    .and_then(|g| ReceiveBuffer::new(&g, b.id, sub_size));
                let reply = match result {
                    Ok(rx) => {
                        let r = nvsp::SendReceiveBufferComplete {
                            status: status::SUCCESS,
                            num_sections: 1,
                            section: nvsp::ReceiveBufferSection {
                                offset: 0,
                                sub_allocation_size: rx.sub_size,
                                num_sub_allocations: rx.count,
                                end_offset: rx.sub_size * rx.count,
                            },
                        };
                        tracing::debug!(
                            sections = rx.count,
                            size = rx.sub_size,
                            "netvsp: receive buffer registered"
                        );
                        self.rx = Some(rx);
                        r
                    }
                    Err(e) => {
                        return self.refuse(q, &pkt, msg_type::SEND_RECEIVE_BUFFER, &e.to_string());
                    }
                };
                if pkt.completion_requested {
                    self.complete(
                        q,
                        pkt.trans_id,
                        NvspMessage::SendReceiveBufferComplete(reply).to_bytes(size),
                    );
                }
            }
            NvspMessage::SendSendBuffer(b) => {
                let result = self
                    .gpadls
                    .gpadl(b.gpadl_handle)
                    .ok_or(super::buffers::BufferError::UnknownGpadl(b.gpadl_handle))
                    .and_then(|g| SendBuffer::new(&g, b.id, self.cfg.send_section_size));
                match result {
                    Ok(tx) => {
                        let r = nvsp::SendSendBufferComplete {
                            status: status::SUCCESS,
                            section_size: tx.section_size,
                        };
                        self.tx = Some(tx);
                        if pkt.completion_requested {
                            self.complete(
                                q,
                                pkt.trans_id,
                                NvspMessage::SendSendBufferComplete(r).to_bytes(size),
                            );
                        }
                    }
                    Err(e) => self.refuse(q, &pkt, msg_type::SEND_SEND_BUFFER, &e.to_string()),
                }
            }
            NvspMessage::RevokeReceiveBuffer(r) => {
                if self.rx.as_ref().is_some_and(|rx| rx.buf.id == r.id) {
                    self.rx = None;
                    for ch in self.channels.values_mut() {
                        ch.out.retain(|p| !matches!(p, Pending::Transfer { .. }));
                    }
                } else {
                    self.refuse(
                        q,
                        &pkt,
                        msg_type::REVOKE_RECEIVE_BUFFER,
                        "no receive buffer with that id",
                    );
                }
            }
            NvspMessage::RevokeSendBuffer(r) => {
                if self.tx.as_ref().is_some_and(|tx| tx.buf.id == r.id) {
                    self.tx = None;
                } else {
                    self.refuse(
                        q,
                        &pkt,
                        msg_type::REVOKE_SEND_BUFFER,
                        "no send buffer with that id",
                    );
                }
            }
            NvspMessage::SendRndisPacket(r) => self.handle_send_rndis(q, &pkt, r),
            NvspMessage::SwitchDataPath(d) => {
                tracing::debug!(
                    requested = { d.active_datapath },
                    "netvsp: no VF, data path stays synthetic"
                );
                if pkt.completion_requested {
                    self.complete(q, pkt.trans_id, Vec::new());
                }
            }
            NvspMessage::SubchannelRequest(r) => self.handle_subchannels(q, &pkt, r),
            // Host-to-guest types never parse in this direction.
            _ => self.refuse(q, &pkt, msg.msg_type(), "unexpected message"),
        }
    }

    fn handle_init(&mut self, q: u16, pkt: &InPacket, i: nvsp::Init) {
        let (min, max) = (i.min_protocol_version, i.max_protocol_version);
        let granted = version::ALL
            .iter()
            .rev()
            .copied()
            .find(|&v| v <= self.cfg.max_nvsp_version && v >= min && v <= max);
        let reply = nvsp::InitComplete {
            negotiated_protocol_version: if granted == Some(version::V1) {
                version::V1
            } else {
                u32::MAX
            },
            max_mdl_chain_length: MAX_MDL_CHAIN_LENGTH,
            status: if granted.is_some() {
                status::SUCCESS
            } else {
                status::FAIL
            },
        };
        tracing::debug!(min, max, ?granted, "netvsp: NVSP INIT");
        self.session.version = granted;
        if pkt.completion_requested {
            let size = nvsp::message_size(granted.unwrap_or(max));
            self.complete(
                q,
                pkt.trans_id,
                NvspMessage::InitComplete(reply).to_bytes(size),
            );
        }
    }

    fn handle_subchannels(&mut self, q: u16, pkt: &InPacket, r: nvsp::SubchannelRequest) {
        let (op, want) = (r.operation, r.num_subchannels);
        let max = u32::from(self.cfg.max_queues.saturating_sub(1));
        if op != nvsp::SUBCHANNEL_ALLOCATE || want > max {
            return self.refuse(
                q,
                pkt,
                msg_type::SUBCHANNEL,
                &format!("op {op}, {want} sub-channels (max {max})"),
            );
        }
        let want = want as u16;
        if want > self.offered {
            let got = self.subchannel_ctl.offer_subchannels(want - self.offered);
            self.offered = self.offered.saturating_add(got);
        }
        let granted = want.min(self.offered);
        self.session.granted = granted;
        self.session.table_pending = granted > 0;
        tracing::debug!(want, granted, "netvsp: sub-channels");
        if pkt.completion_requested {
            let reply = NvspMessage::SubchannelComplete(nvsp::SubchannelComplete {
                status: status::SUCCESS,
                num_subchannels: u32::from(granted),
            });
            let size = self.msg_size();
            self.complete(q, pkt.trans_id, reply.to_bytes(size));
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
            let result = ch.writer.try_write(&pkt);
            drop(body);
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
fn read_packet<R: RingMem>(reader: &mut RingReader<R>) -> Result<Option<InPacket>, RingError> {
    let Some(p) = reader.peek()? else {
        return Ok(None);
    };
    let info = *p.info();
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
