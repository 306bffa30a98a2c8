//! The storvsc core: a sans-IO state machine for one SCSI controller (a primary channel and its
//! sub-channels). It produces ring packets ([`OutPacket`]) and consumes what the host writes back;
//! whoever drives it moves the bytes (a bare-metal guest, the std harness, a test).

use super::cdb::Cdb;
pub use super::completion::{Completion, Stats, StorvscEvent};
use super::init::{InitError, InitMachine, InitProgress, InitStep, Negotiated};
use super::packet::{Direction, OutPacket, PageRange, RangeError};
use alloc::collections::VecDeque;
use alloc::vec::Vec;
use hashbrown::HashMap;
use ringbuf::PacketType;
use vmbus_core::devices::vstor::{
    self, DataDirection, FLAG_REQUEST_COMPLETION, HostPacket, MAX_CDB_LEN, Operation, PACKET_SIZE,
    ProtocolVersion, QUEUE_ACTION_SIMPLE_TAG, QUEUE_TAG_UNTAGGED, SENSE_BUFFER_SIZE, VmscsiRequest,
    VstorError, VstorPacket, scsi_status, srb_flags, srb_status,
};

/// Transaction id of every init-phase packet (Linux `VMBUS_RQST_INIT`).
pub const INIT_TRANS_ID: u64 = vstor::LINUX_INIT_TRANS_ID;
/// Transaction id of RESET_BUS (Linux `VMBUS_RQST_RESET`).
pub const RESET_TRANS_ID: u64 = vstor::LINUX_RESET_TRANS_ID;
/// Linux `max_outstanding_req_per_channel` for 128 KiB rings: `(128 KiB − 4 KiB) / 360`.
pub const LINUX_MAX_OUTSTANDING_PER_CHANNEL: u32 = 352;
/// SRB timeout Linux puts in every request (seconds).
pub const LINUX_SRB_TIMEOUT: u32 = 60;

/// How the driver introduces itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StorvscConfig {
    /// Versions to query, in order (default: Linux 6.1's WIN10, WIN8.1, WIN8).
    pub versions: Vec<ProtocolVersion>,
    /// Sub-channels to ask for (Linux: online CPUs − 1); capped by the host's `max_channel_cnt`.
    pub subchannels: u16,
    /// `port_number` in every SRB (Linux: the SCSI host number).
    pub port_number: u8,
    /// Requests in flight per channel at most; beyond it [`Storvsc::submit`] says busy.
    pub max_outstanding_per_channel: u32,
    /// `time_out_value` in every SRB.
    pub srb_timeout: u32,
    /// Keep a copy of every request in flight so [`Storvsc::resend_in_flight`] can send it again
    /// (after a VSP restart that may have lost requests it had read but not completed).
    pub retain_packets: bool,
}

impl Default for StorvscConfig {
    fn default() -> Self {
        StorvscConfig {
            versions: ProtocolVersion::LINUX_ORDER.to_vec(),
            subchannels: 0,
            port_number: 0,
            max_outstanding_per_channel: LINUX_MAX_OUTSTANDING_PER_CHANNEL,
            srb_timeout: LINUX_SRB_TIMEOUT,
            retain_packets: false,
        }
    }
}

/// Where the controller is.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum DriverState {
    Created,
    Initializing,
    Ready,
    Failed,
}

/// A SCSI path/target/LUN.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ScsiAddress {
    pub path_id: u8,
    pub target_id: u8,
    pub lun: u8,
}

impl ScsiAddress {
    pub const fn new(path_id: u8, target_id: u8, lun: u8) -> Self {
        ScsiAddress {
            path_id,
            target_id,
            lun,
        }
    }
}

/// One SCSI command to send.
#[derive(Copy, Clone, Debug)]
pub struct ScsiRequest<'a> {
    pub addr: ScsiAddress,
    pub cdb: Cdb,
    /// The data buffer and its direction; `None` for commands without data.
    pub data: Option<(Direction, PageRange<'a>)>,
    /// The LUN reported CmdQue: send as a simple tagged request (Linux `tagged_supported`).
    pub tagged: bool,
    /// Caller's cookie, returned in the [`Completion`].
    pub tag: u64,
}

/// What [`Storvsc::handle_packet`] did with a packet.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Handled {
    /// Advanced the init handshake.
    Init,
    /// Completed a request (see [`Storvsc::poll_completion`]).
    Completion,
    /// A repeated completion, ignored.
    Duplicate,
    /// A host-initiated message (an event may be queued).
    Unsolicited,
}

/// Errors: misuse by the caller, or a host packet that broke the protocol (state unchanged).
#[derive(Copy, Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StorvscError {
    #[error("controller is {0:?}, not ready for I/O")]
    NotReady(DriverState),
    #[error("controller was already started")]
    AlreadyStarted,
    #[error("channel {0} is not open")]
    NoSuchChannel(u16),
    #[error("no more channels: the host agreed to {0} sub-channels")]
    TooManyChannels(u16),
    #[error("channel {0} has the maximum of requests in flight")]
    Busy(u16),
    #[error("transfer of {len} bytes exceeds the {max}-byte limit")]
    TransferTooLarge { len: u32, max: u32 },
    #[error("bad buffer: {0}")]
    Range(#[from] RangeError),
    #[error("init failed: {0}")]
    Init(#[from] InitError),
    // ---- host-caused ----
    #[error("channel {channel}, id {trans_id:#x}: {error}")]
    Vstor {
        channel: u16,
        trans_id: u64,
        error: VstorError,
    },
    #[error("channel {channel}, id {trans_id:#x}: unexpected packet type {packet_type:?}")]
    PacketType {
        channel: u16,
        trans_id: u64,
        packet_type: PacketType,
    },
    #[error(
        "channel {channel}, id {trans_id:#x}: {len}-byte packet exceeds the 64-byte vstor packet"
    )]
    Oversized {
        channel: u16,
        trans_id: u64,
        len: usize,
    },
    #[error("channel {channel}: completion for unknown transaction id {trans_id:#x}")]
    UnknownTransaction { channel: u16, trans_id: u64 },
    #[error("channel {channel}: COMPLETE_IO / FCHBA_DATA with transaction id 0")]
    CompletionWithoutId { channel: u16 },
}

struct Channel {
    outbound: VecDeque<OutPacket>,
    outstanding: u32,
}

#[derive(Clone, Debug)]
pub(crate) struct Pending {
    pub(crate) channel: u16,
    pub(crate) tag: u64,
    pub(crate) addr: ScsiAddress,
    pub(crate) cdb: Cdb,
    pub(crate) requested: u32,
    /// The packet as sent, kept when `retain_packets` is on.
    pub(crate) packet: Option<OutPacket>,
}

/// One storvsc controller.
pub struct Storvsc {
    config: StorvscConfig,
    state: DriverState,
    init: InitMachine,
    negotiated: Option<Negotiated>,
    channels: Vec<Channel>,
    pending: HashMap<u64, Pending>,
    next_id: u64,
    reset_pending: bool,
    completions: VecDeque<Completion>,
    events: VecDeque<StorvscEvent>,
    stats: Stats,
}

impl Storvsc {
    pub fn new(config: StorvscConfig) -> Self {
        let init = InitMachine::new(config.versions.clone(), config.subchannels);
        Storvsc {
            config,
            state: DriverState::Created,
            init,
            negotiated: None,
            channels: alloc::vec![Channel {
                outbound: VecDeque::new(),
                outstanding: 0,
            }],
            pending: HashMap::new(),
            next_id: 1,
            reset_pending: false,
            completions: VecDeque::new(),
            events: VecDeque::new(),
            stats: Stats::default(),
        }
    }

    pub fn config(&self) -> &StorvscConfig {
        &self.config
    }

    pub fn state(&self) -> DriverState {
        self.state
    }

    /// Version, properties and sub-channel count, once ready.
    pub fn negotiated(&self) -> Option<&Negotiated> {
        self.negotiated.as_ref()
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Open channels (primary + added sub-channels).
    pub fn channel_count(&self) -> u16 {
        self.channels.len() as u16
    }

    /// Requests sent (or queued) and not completed.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// Requests in flight on `channel`.
    pub fn outstanding(&self, channel: u16) -> u32 {
        self.channels
            .get(usize::from(channel))
            .map_or(0, |c| c.outstanding)
    }

    /// Starts the handshake on the primary channel (its ring must be open).
    pub fn start(&mut self) -> Result<(), StorvscError> {
        if self.state != DriverState::Created {
            return Err(StorvscError::AlreadyStarted);
        }
        match self.init.begin() {
            Ok(p) => {
                self.state = DriverState::Initializing;
                self.queue_init(&p);
                Ok(())
            }
            Err(e) => {
                self.state = DriverState::Failed;
                Err(e.into())
            }
        }
    }

    /// Payload size of every packet sent: 64 (Linux 6.1, and Win8+), 48 after a pre-Win8 version.
    fn packet_len(&self) -> usize {
        self.init.version().map_or(PACKET_SIZE, |v| v.packet_size())
    }

    fn queue_init(&mut self, p: &VstorPacket) {
        let pkt = OutPacket::in_band(0, INIT_TRANS_ID, p, PACKET_SIZE);
        if let Some(c) = self.channels.first_mut() {
            c.outbound.push_back(pkt);
        }
    }

    /// Registers an opened sub-channel; returns its channel index.
    pub fn add_channel(&mut self) -> Result<u16, StorvscError> {
        let Some(n) = self.negotiated.filter(|_| self.state == DriverState::Ready) else {
            return Err(StorvscError::NotReady(self.state));
        };
        if self.channels.len() > usize::from(n.subchannels) {
            return Err(StorvscError::TooManyChannels(n.subchannels));
        }
        self.channels.push(Channel {
            outbound: VecDeque::new(),
            outstanding: 0,
        });
        Ok((self.channels.len() - 1) as u16)
    }

    /// The next packet to write on `channel`, left queued (write it, then [`Self::pop_transmit`]).
    pub fn peek_transmit(&self, channel: u16) -> Option<&OutPacket> {
        self.channels.get(usize::from(channel))?.outbound.front()
    }

    /// Takes the next packet for `channel` (it is written, or will be).
    pub fn pop_transmit(&mut self, channel: u16) -> Option<OutPacket> {
        self.channels
            .get_mut(usize::from(channel))?
            .outbound
            .pop_front()
    }

    /// Packets waiting to be written on `channel`.
    pub fn pending_transmit(&self, channel: u16) -> usize {
        self.channels
            .get(usize::from(channel))
            .map_or(0, |c| c.outbound.len())
    }

    /// The channel a new request would go to: the one with the fewest requests in flight.
    pub fn pick_channel(&self) -> u16 {
        let mut best = 0usize;
        for (i, c) in self.channels.iter().enumerate() {
            if c.outstanding < self.channels.get(best).map_or(u32::MAX, |b| b.outstanding) {
                best = i;
            }
        }
        best as u16
    }

    /// Largest data buffer per request.
    pub fn max_transfer(&self) -> u32 {
        self.negotiated.map_or(0, |n| n.max_transfer_bytes)
    }

    fn alloc_id(&mut self) -> u64 {
        loop {
            let id = self.next_id;
            self.next_id = self.next_id.wrapping_add(1);
            if id != 0
                && id != INIT_TRANS_ID
                && id != RESET_TRANS_ID
                && !self.pending.contains_key(&id)
            {
                return id;
            }
        }
    }

    /// Queues an EXECUTE_SRB on the least busy channel; returns its transaction id.
    pub fn submit(&mut self, req: &ScsiRequest<'_>) -> Result<u64, StorvscError> {
        let ch = self.pick_channel();
        self.submit_on(ch, req)
    }

    /// Queues an EXECUTE_SRB on `channel`; returns its transaction id (never 0, never an init or
    /// reset id, never one used before while this controller lives).
    pub fn submit_on(&mut self, channel: u16, req: &ScsiRequest<'_>) -> Result<u64, StorvscError> {
        if self.state != DriverState::Ready {
            return Err(StorvscError::NotReady(self.state));
        }
        let max = self.max_transfer();
        let limit = self.config.max_outstanding_per_channel;
        let c = self
            .channels
            .get(usize::from(channel))
            .ok_or(StorvscError::NoSuchChannel(channel))?;
        if c.outstanding >= limit {
            return Err(StorvscError::Busy(channel));
        }
        if let Some((_, range)) = &req.data
            && range.len() > max
        {
            return Err(StorvscError::TransferTooLarge {
                len: range.len(),
                max,
            });
        }
        let id = self.alloc_id();
        let packet = self.srb_packet(req);
        let len = self.packet_len();
        let out = match &req.data {
            Some((_, range)) => OutPacket::gpa_direct(channel, id, &packet, len, range),
            None => OutPacket::in_band(channel, id, &packet, len),
        };
        let requested = req.data.map_or(0, |(_, r)| r.len());
        let packet = self.config.retain_packets.then(|| out.clone());
        if let Some(c) = self.channels.get_mut(usize::from(channel)) {
            c.outbound.push_back(out);
            c.outstanding = c.outstanding.saturating_add(1);
        }
        self.pending.insert(
            id,
            Pending {
                channel,
                tag: req.tag,
                addr: req.addr,
                cdb: req.cdb,
                requested,
                packet,
            },
        );
        self.stats.submitted = self.stats.submitted.saturating_add(1);
        Ok(id)
    }

    /// The vstor packet for an SRB, field by field as Linux `storvsc_queuecommand` / `storvsc_do_io`.
    fn srb_packet(&self, req: &ScsiRequest<'_>) -> VstorPacket {
        let win8 = self.init.version().is_none_or(|v| v.has_win8_extension());
        let mut cdb = [0u8; SENSE_BUFFER_SIZE];
        let bytes = req.cdb.as_bytes();
        let n = bytes.len().min(MAX_CDB_LEN);
        if let (Some(d), Some(s)) = (cdb.get_mut(..n), bytes.get(..n)) {
            d.copy_from_slice(s);
        }
        let (data_in, dir_flag) = match req.data {
            Some((Direction::Out, _)) => (DataDirection::Write, srb_flags::DATA_OUT),
            Some((Direction::In, _)) => (DataDirection::Read, srb_flags::DATA_IN),
            None => (DataDirection::Unknown, 0),
        };
        let mut flags = srb_flags::DISABLE_SYNCH_TRANSFER | dir_flag;
        let (mut queue_tag, mut queue_action) = (0, 0);
        if req.tagged {
            flags |= srb_flags::QUEUE_ACTION_ENABLE | srb_flags::NO_QUEUE_FREEZE;
            queue_tag = QUEUE_TAG_UNTAGGED;
            queue_action = QUEUE_ACTION_SIMPLE_TAG;
        }
        let mut srb = VmscsiRequest {
            length: vstor::VMSCSI_REQUEST_SIZE as u16,
            port_number: self.config.port_number,
            path_id: req.addr.path_id,
            target_id: req.addr.target_id,
            lun: req.addr.lun,
            cdb_length: n as u8,
            sense_info_length: SENSE_BUFFER_SIZE as u8,
            data_in: data_in as u8,
            data_transfer_length: req.data.map_or(0, |(_, r)| r.len()),
            cdb_or_sense: cdb,
            queue_tag,
            queue_action,
            srb_flags: flags,
            time_out_value: self.config.srb_timeout,
            ..VmscsiRequest::default()
        };
        if !win8 {
            srb.length = vstor::PRE_WIN8_VMSCSI_REQUEST_SIZE as u16;
            srb.sense_info_length = vstor::PRE_WIN8_SENSE_BUFFER_SIZE as u8;
        }
        let mut p = VstorPacket::new(Operation::ExecuteSrb, FLAG_REQUEST_COMPLETION, 0);
        p.set_srb(&srb);
        p
    }

    /// Queues RESET_BUS for `path_id` on the primary channel (Linux `storvsc_host_reset_handler`).
    pub fn reset_bus(&mut self, path_id: u8) -> Result<(), StorvscError> {
        if self.state != DriverState::Ready {
            return Err(StorvscError::NotReady(self.state));
        }
        let mut p = VstorPacket::new(Operation::ResetBus, FLAG_REQUEST_COMPLETION, 0);
        p.set_srb(&VmscsiRequest {
            path_id,
            ..VmscsiRequest::default()
        });
        let out = OutPacket::in_band(0, RESET_TRANS_ID, &p, self.packet_len());
        if let Some(c) = self.channels.first_mut() {
            c.outbound.push_back(out);
        }
        self.reset_pending = true;
        Ok(())
    }

    /// Whether request `trans_id` is still waiting for its completion.
    pub fn is_pending(&self, trans_id: u64) -> bool {
        self.pending.contains_key(&trans_id)
    }

    /// Queues requests `ids` (those still in flight) on `channel` again, in the given order,
    /// with their transaction ids. Needs [`StorvscConfig::retain_packets`]. For requests a
    /// restarted VSP lost: it had taken them from the ring and died before completing them
    /// ([`RingChannel::lost_requests`](super::RingChannel::lost_requests) finds them). A copy
    /// still queued here is not sent twice. Returns how many were queued.
    pub fn resend(&mut self, channel: u16, ids: &[u64]) -> usize {
        let again: Vec<OutPacket> = ids
            .iter()
            .filter_map(|id| self.pending.get(id))
            .filter(|p| p.channel == channel)
            .filter_map(|p| p.packet.clone())
            .collect();
        let Some(c) = self.channels.get_mut(usize::from(channel)) else {
            return 0;
        };
        c.outbound.retain(|q| !ids.contains(&q.trans_id));
        let n = again.len();
        c.outbound.extend(again);
        self.stats.resent = self.stats.resent.saturating_add(n as u64);
        n
    }

    /// Completes every request of `channel` as cancelled and drops its queued packets (the
    /// channel was closed or rescinded). The primary channel's index stays valid.
    pub fn cancel_channel(&mut self, channel: u16) {
        let ids: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.channel == channel)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            if let Some(p) = self.pending.remove(&id) {
                self.completions.push_back(Completion::cancelled(id, &p));
            }
        }
        if let Some(c) = self.channels.get_mut(usize::from(channel)) {
            c.outbound.clear();
            c.outstanding = 0;
        }
    }

    pub fn poll_completion(&mut self) -> Option<Completion> {
        self.completions.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<StorvscEvent> {
        self.events.pop_front()
    }

    fn malformed(&mut self, e: StorvscError) -> StorvscError {
        self.stats.malformed = self.stats.malformed.saturating_add(1);
        tracing::warn!(error = %e, "storvsc: host packet refused");
        e
    }

    /// Takes one packet the host wrote on `channel`'s host→guest ring (its type, transaction id
    /// and payload). Errors name what the host did wrong; the driver's state is unchanged by them.
    pub fn handle_packet(
        &mut self,
        channel: u16,
        packet_type: PacketType,
        trans_id: u64,
        payload: &[u8],
    ) -> Result<Handled, StorvscError> {
        if usize::from(channel) >= self.channels.len() {
            return Err(StorvscError::NoSuchChannel(channel));
        }
        if !matches!(packet_type, PacketType::InBand | PacketType::Completion) {
            return Err(self.malformed(StorvscError::PacketType {
                channel,
                trans_id,
                packet_type,
            }));
        }
        if payload.len() > PACKET_SIZE {
            return Err(self.malformed(StorvscError::Oversized {
                channel,
                trans_id,
                len: payload.len(),
            }));
        }
        let vstor_err = |error| StorvscError::Vstor {
            channel,
            trans_id,
            error,
        };
        if trans_id == 0 {
            let pkt = vstor::parse_host_packet(payload, PACKET_SIZE)
                .map_err(|e| self.malformed(vstor_err(e)))?;
            return match pkt {
                HostPacket::EnumerateBus | HostPacket::RemoveDevice => {
                    self.stats.unsolicited = self.stats.unsolicited.saturating_add(1);
                    self.events.push_back(StorvscEvent::Rescan);
                    Ok(Handled::Unsolicited)
                }
                HostPacket::EventNotification => {
                    self.stats.unsolicited = self.stats.unsolicited.saturating_add(1);
                    Ok(Handled::Unsolicited)
                }
                HostPacket::Completion(_) | HostPacket::FcHbaData(_) => {
                    Err(self.malformed(StorvscError::CompletionWithoutId { channel }))
                }
            };
        }
        // Linux drops anything shorter than a whole vstor packet when it answers a request.
        let min = self.packet_len();
        if payload.len() < min {
            return Err(self.malformed(vstor_err(VstorError::ShortCompletion {
                len: payload.len(),
                min,
            })));
        }
        let raw = VstorPacket::from_prefix_zero_filled(payload)
            .ok_or_else(|| vstor_err(VstorError::TooShort { len: payload.len() }))?;
        match trans_id {
            INIT_TRANS_ID => return self.init_completion(channel, &raw),
            RESET_TRANS_ID if self.reset_pending => {
                self.reset_pending = false;
                self.events.push_back(StorvscEvent::ResetComplete {
                    status: raw.header.status,
                });
                return Ok(Handled::Completion);
            }
            _ => {}
        }
        if !self.pending.contains_key(&trans_id) {
            return if trans_id < self.next_id || trans_id == RESET_TRANS_ID {
                self.stats.duplicates = self.stats.duplicates.saturating_add(1);
                tracing::debug!(channel, trans_id, "storvsc: duplicate completion ignored");
                Ok(Handled::Duplicate)
            } else {
                self.stats.unknown = self.stats.unknown.saturating_add(1);
                tracing::warn!(channel, trans_id, "storvsc: completion for unknown id");
                Err(StorvscError::UnknownTransaction { channel, trans_id })
            };
        }
        let pkt =
            vstor::parse_host_packet(payload, min).map_err(|e| self.malformed(vstor_err(e)))?;
        let HostPacket::Completion(p) = pkt else {
            // Linux: ENUMERATE_BUS / REMOVE_DEVICE carrying a request id trigger a rescan and
            // leave the request waiting.
            if matches!(pkt, HostPacket::EnumerateBus | HostPacket::RemoveDevice) {
                self.events.push_back(StorvscEvent::Rescan);
            }
            self.stats.unsolicited = self.stats.unsolicited.saturating_add(1);
            return Ok(Handled::Unsolicited);
        };
        let Some(pending) = self.pending.remove(&trans_id) else {
            return Err(StorvscError::UnknownTransaction { channel, trans_id });
        };
        if pending.channel != channel {
            self.stats.wrong_channel = self.stats.wrong_channel.saturating_add(1);
        }
        if let Some(c) = self.channels.get_mut(usize::from(pending.channel)) {
            c.outstanding = c.outstanding.saturating_sub(1);
        }
        let srb = p.srb();
        let mut sense = [0u8; SENSE_BUFFER_SIZE];
        let mut sense_len = 0u8;
        if srb.scsi_status == scsi_status::CHECK_CONDITION
            && srb.srb_status & srb_status::AUTOSENSE_VALID != 0
        {
            sense_len = srb.sense_info_length.min(SENSE_BUFFER_SIZE as u8);
            sense = srb.cdb_or_sense;
        }
        self.completions.push_back(Completion {
            tag: pending.tag,
            trans_id,
            channel: pending.channel,
            addr: pending.addr,
            cdb: pending.cdb,
            requested: pending.requested,
            srb_status: srb.srb_status,
            scsi_status: srb.scsi_status,
            nt_status: p.header.status,
            data_transfer_length: srb.data_transfer_length,
            sense,
            sense_len,
            cancelled: false,
        });
        self.stats.completed = self.stats.completed.saturating_add(1);
        Ok(Handled::Completion)
    }

    fn init_completion(&mut self, channel: u16, p: &VstorPacket) -> Result<Handled, StorvscError> {
        if self.state != DriverState::Initializing || self.init.waiting().is_none() {
            self.stats.duplicates = self.stats.duplicates.saturating_add(1);
            return Ok(Handled::Duplicate);
        }
        if channel != 0 {
            return Err(self.malformed(StorvscError::UnknownTransaction {
                channel,
                trans_id: INIT_TRANS_ID,
            }));
        }
        match self.init.on_completion(p) {
            Ok(InitProgress::Send(next)) => {
                self.queue_init(&next);
            }
            Ok(InitProgress::Done(n)) => {
                self.negotiated = Some(n);
                self.state = DriverState::Ready;
                self.events.push_back(StorvscEvent::Ready(n));
            }
            Err(e) => {
                tracing::warn!(error = %e, "storvsc: initialization failed");
                self.state = DriverState::Failed;
                self.events.push_back(StorvscEvent::InitFailed(e));
            }
        }
        Ok(Handled::Init)
    }

    /// The init step whose completion is awaited (diagnostics, tests).
    pub fn init_step(&self) -> Option<InitStep> {
        self.init.waiting()
    }
}
