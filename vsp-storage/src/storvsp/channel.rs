//! One channel's thread: reads vstor packets from the guest→host ring, answers control requests,
//! hands SRBs to the LUN's asynchronous queue (io_uring) or to the worker pool, and writes
//! completions to the host→guest ring in the order they finish.
//!
//! A request's space in the guest→host ring is released (`read_index` moves past it) only once its
//! completion is published (see [`super::release`]): a VSP killed with requests in hand leaves them
//! in the ring, and its successor on the same rings executes them again. Requests answered out of
//! order behind an unanswered one stay in the ring as well; with an in-flight journal (out of
//! process, [`super::journal`]) they are marked answered there and the successor consumes them
//! without executing them again.
//!
//! The thread sleeps on the channel's *kick* eventfd only: the guest rings it (new requests, or
//! space freed for completions), workers ring it when they finish a request, and io_uring signals
//! it on every completion (the fd is registered with the ring). Every sleep is bounded, so a lost
//! wake-up costs latency, never a hang.

use super::io::{Completion, DataRange, GuestBuffer, SrbResult, reply_len};
use super::journal::Journal;
use super::protocol::{ChannelProtocol, Decision};
use super::release::Held;
use super::{DeviceShared, Lun, LunAddr};
use crate::backend::{AsyncQueue, QueueCompletion, QueueOp};
use crate::scsi::{self, DataBuffer, Outcome, Prepared, Sense, block_error_sense, data_fault};
use ringbuf::mmap::MappedRing;
use ringbuf::reader::CommitError;
use ringbuf::signal::Doorbell;
use ringbuf::{OutgoingPacket, PacketType, RingError, RingReader, RingWriter, WriteError};
use std::collections::{HashMap, VecDeque};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmbus_core::devices::vstor::{
    self, DataDirection, Operation, VmscsiRequest, VstorError, VstorPacket, status,
};
use vmbus_core::memory::GuestMemory;
use vmbus_core::oop::InflightRegion;

/// Longest sleep between checks of the rings and the stop flag.
const IDLE_WAIT: Duration = Duration::from_millis(200);
/// Packets read per pass.
const READ_BATCH: usize = 64;
/// How long closing waits for I/O in flight before giving up on it.
const DRAIN_LIMIT: Duration = Duration::from_secs(60);

/// Everything a channel needs from whoever hosts the device.
pub struct ChannelRings {
    /// Guest → host ring.
    pub incoming: MappedRing,
    /// Host → guest ring.
    pub outgoing: MappedRing,
    /// Rung by the guest: requests in `incoming`, or space in `outgoing`.
    pub kick: Doorbell,
    /// Ring to interrupt the guest.
    pub call: Doorbell,
    /// Guest RAM the SRB data ranges point into.
    pub memory: Arc<dyn GuestMemory>,
    /// The in-flight journal that outlives this process (out of process hosting only).
    pub inflight: Option<Arc<InflightRegion>>,
}

/// Work finished elsewhere for this channel.
pub(crate) struct Inbox {
    /// (sequence number of the request, its completion).
    completions: Mutex<Vec<(u64, Completion)>>,
    notifications: Mutex<Vec<VstorPacket>>,
    wake: Doorbell,
}

impl Inbox {
    fn push(&self, seq: u64, c: Completion) {
        if let Ok(mut v) = self.completions.lock() {
            v.push((seq, c));
        }
        let _ = self.wake.ring();
    }

    /// Queues an unsolicited host→guest message (ENUMERATE_BUS).
    pub(crate) fn notify(&self, p: VstorPacket) {
        if let Ok(mut v) = self.notifications.lock() {
            v.push(p);
        }
        let _ = self.wake.ring();
    }
}

/// A running channel, as the device keeps it.
pub(crate) struct ChannelHandle {
    stop: Arc<AtomicBool>,
    pub(crate) inbox: Arc<Inbox>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ChannelHandle {
    /// Stops the thread after the I/O in flight completed; the rings are untouched afterwards.
    pub(crate) fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.inbox.wake.ring();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts serving a channel.
pub(crate) fn spawn(
    relid: u32,
    primary: bool,
    resumed: bool,
    rings: ChannelRings,
    subchannel_index: u16,
    dev: Arc<DeviceShared>,
) -> Result<ChannelHandle, String> {
    let mut reader = RingReader::new(rings.incoming).map_err(|e| e.to_string())?;
    let mut journal = rings
        .inflight
        .and_then(|r| Journal::new(r, subchannel_index));
    if let Some(j) = &mut journal {
        // Entries of packets no longer in the unreleased part of the ring are stale.
        let unread = reader.available().map_err(|e| e.to_string())?;
        let kept = j.sweep(reader.read_index(), unread, reader.data_len());
        if kept > 0 {
            tracing::info!(relid, kept, "storvsp: answered requests still in the ring");
        }
    }
    let writer = RingWriter::new(rings.outgoing).map_err(|e| e.to_string())?;
    let inbox = Arc::new(Inbox {
        completions: Mutex::new(Vec::new()),
        notifications: Mutex::new(Vec::new()),
        wake: rings.kick.try_clone().map_err(|e| e.to_string())?,
    });
    let stop = Arc::new(AtomicBool::new(false));
    let ch = Channel {
        relid,
        reader,
        writer,
        kick: rings.kick,
        call: rings.call,
        memory: rings.memory,
        protocol: if resumed {
            ChannelProtocol::resumed(primary)
        } else {
            ChannelProtocol::new(primary)
        },
        inbox: inbox.clone(),
        stop: stop.clone(),
        out: VecDeque::new(),
        space_requested: false,
        in_flight: 0,
        resets: Vec::new(),
        queues: HashMap::new(),
        pending: HashMap::new(),
        next_tag: 0,
        held: Held::new(journal),
        current: 0,
        dev,
    };
    let thread = std::thread::Builder::new()
        .name(format!("storvsp-{relid}"))
        .spawn(move || ch.run())
        .map_err(|e| e.to_string())?;
    Ok(ChannelHandle {
        stop,
        inbox,
        thread: Some(thread),
    })
}

/// A packet waiting for ring space.
enum Out {
    /// The completion of the request with this sequence number ([`Held`]).
    Completion(Completion, u64),
    Notification(VstorPacket, usize),
}

/// An SRB running on an asynchronous queue.
struct Pending {
    seq: u64,
    trans_id: u64,
    srb: VmscsiRequest,
    len: usize,
    kind: PendingKind,
}

enum PendingKind {
    Read { copy: usize, buffer: GuestBuffer },
    Write { len: usize },
    Flush,
}

/// A LUN's queue on this channel (`None`: the backend has none; use the workers).
struct LunQueue {
    lun: Arc<Lun>,
    queue: Option<Box<dyn AsyncQueue>>,
}

struct Channel {
    relid: u32,
    reader: RingReader<MappedRing>,
    writer: RingWriter<MappedRing>,
    kick: Doorbell,
    call: Doorbell,
    memory: Arc<dyn GuestMemory>,
    protocol: ChannelProtocol,
    inbox: Arc<Inbox>,
    stop: Arc<AtomicBool>,
    out: VecDeque<Out>,
    space_requested: bool,
    /// SRBs handed to a worker or a queue and not completed yet.
    in_flight: usize,
    /// Resets waiting for `in_flight` to reach 0: (transaction id, reply length, sequence number).
    resets: Vec<(u64, usize, u64)>,
    /// Keyed by the LUN's address in memory (a re-added LUN gets a new queue).
    queues: HashMap<usize, LunQueue>,
    pending: HashMap<u64, Pending>,
    next_tag: u64,
    /// Packets read whose ring space is not released yet.
    held: Held,
    /// Sequence number of the request being handled (its completion carries it).
    current: u64,
    dev: Arc<DeviceShared>,
}

impl Channel {
    fn run(mut self) {
        self.reader.mask_interrupts();
        if let Err(e) = self.serve() {
            tracing::warn!(relid = self.relid, error = %e, "storvsp channel stopped: guest broke the ring");
        }
        self.drain();
    }

    fn serve(&mut self) -> Result<(), RingError> {
        let max_in_flight = self.dev.config.max_in_flight.max(1);
        while !self.stop.load(Ordering::Acquire) {
            let mut progress = self.collect();
            progress |= self.flush_out()?;
            if self.in_flight < max_in_flight && self.out.len() < 2 * max_in_flight {
                progress |= self.read_requests(max_in_flight)?;
            }
            if progress {
                continue;
            }
            if self.reader.unmask_interrupts()? {
                self.reader.mask_interrupts();
                continue;
            }
            let _ = self.kick.wait(Some(IDLE_WAIT));
            self.reader.mask_interrupts();
        }
        Ok(())
    }

    /// Waits (bounded) for everything in flight, still sending completions where the ring has room.
    fn drain(&mut self) {
        let deadline = Instant::now() + DRAIN_LIMIT;
        while self.in_flight > 0 && Instant::now() < deadline {
            if !self.collect() {
                let _ = self.kick.wait(Some(Duration::from_millis(20)));
            }
            let _ = self.flush_out();
        }
        if self.in_flight > 0 {
            tracing::error!(
                relid = self.relid,
                in_flight = self.in_flight,
                "storvsp: I/O still in flight at close"
            );
            // Queues wait for their own operations when dropped; the workers' results are dropped.
        }
        let _ = self.flush_out();
        if self.held.len() > 0 {
            // Their read_index was never advanced: whoever serves the ring next reads them again.
            tracing::info!(
                relid = self.relid,
                unanswered = self.held.len(),
                "storvsp: requests left in the ring unanswered"
            );
        }
    }

    fn read_requests(&mut self, max_in_flight: usize) -> Result<bool, RingError> {
        let mut n = 0;
        while n < READ_BATCH && self.in_flight < max_in_flight {
            let Some(pkt) = self.reader.peek()? else {
                break;
            };
            let info = *pkt.info();
            let plen = pkt.payload_len();
            let mut bytes = [0u8; vstor::PACKET_SIZE];
            let take = plen.min(vstor::PACKET_SIZE);
            // `take` is within the validated payload.
            let copied = pkt.copy_payload(0, &mut bytes[..take]).is_ok();
            let start = pkt.start_position();
            let end = pkt.end_position();
            let ranges = pkt.gpa_ranges().map(|mut it| {
                let first = it.next().map(|r| DataRange {
                    byte_offset: r.byte_offset,
                    byte_count: r.byte_count,
                    pfns: r.pfns.iter().map(|p| p.get()).collect(),
                });
                (1 + it.count(), first)
            });
            pkt.consume();
            n += 1;
            let (seq, answered) = self.held.push(start, end, info.trans_id);
            self.current = seq;
            if answered {
                // A predecessor published its completion but died before releasing it.
                self.dev
                    .stats
                    .replays_skipped
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if !copied {
                self.held.done(seq);
                continue;
            }
            match info.packet_type {
                PacketType::InBand | PacketType::GpaDirect => {}
                other => {
                    tracing::debug!(relid = self.relid, ?other, "storvsp: dropping packet type");
                    self.dev.stats.dropped.fetch_add(1, Ordering::Relaxed);
                    self.held.done(seq);
                    continue;
                }
            }
            if !info.completion_requested {
                tracing::warn!(
                    relid = self.relid,
                    "storvsp: request without completion dropped"
                );
                self.dev.stats.dropped.fetch_add(1, Ordering::Relaxed);
                self.held.done(seq);
                continue;
            }
            self.handle(info.trans_id, &bytes[..take], plen, ranges);
        }
        // Dropped packets need no answer: release them if nothing before them is outstanding.
        self.release()?;
        Ok(n > 0)
    }

    /// Returns to the guest the ring space of the longest prefix of answered packets.
    fn release(&mut self) -> Result<(), RingError> {
        let Some(end) = self.held.release() else {
            return Ok(());
        };
        match self.reader.commit_to(end) {
            Ok(true) => {
                self.held.released();
                let _ = self.call.ring();
            }
            Ok(false) => self.held.released(),
            Err(CommitError::Ring(e)) => return Err(e),
            Err(e @ CommitError::BadPosition { .. }) => {
                // A bookkeeping bug, not the guest's doing: keep the space rather than lose requests.
                tracing::error!(relid = self.relid, error = %e, "storvsp: ring release refused");
            }
        }
        Ok(())
    }

    /// Queues the answer of the request being handled.
    fn reply(&mut self, trans_id: u64, packet: VstorPacket, len: usize) {
        let seq = self.current;
        self.reply_to(seq, trans_id, packet, len);
    }

    fn reply_to(&mut self, seq: u64, trans_id: u64, packet: VstorPacket, len: usize) {
        self.out.push_back(Out::Completion(
            Completion {
                trans_id,
                packet,
                len,
            },
            seq,
        ));
    }

    fn handle(
        &mut self,
        trans_id: u64,
        bytes: &[u8],
        plen: usize,
        ranges: Option<(usize, Option<DataRange>)>,
    ) {
        let len = reply_len(self.dev.protocol.version(), plen);
        let pkt = match vstor::parse_guest_packet(bytes) {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(relid = self.relid, error = %e, "storvsp: bad vstor packet");
                self.dev.stats.bad_packets.fetch_add(1, Ordering::Relaxed);
                let s = match e {
                    VstorError::TooShort { .. } => status::INVALID_PARAMETER,
                    _ => status::INVALID_DEVICE_REQUEST,
                };
                self.reply(trans_id, VstorPacket::new(Operation::CompleteIo, 0, s), len);
                return;
            }
        };
        match self
            .protocol
            .handle(&pkt, &self.dev.protocol, &self.dev.config.protocol)
        {
            Decision::Reply(p) => self.reply(trans_id, p, len),
            Decision::ReplyAndOffer { reply, count } => {
                self.reply(trans_id, reply, len);
                self.dev.request_subchannels(count);
            }
            Decision::ResetAfterDrain => {
                if self.in_flight == 0 {
                    self.reply(trans_id, VstorPacket::new(Operation::CompleteIo, 0, 0), len);
                } else {
                    self.resets.push((trans_id, len, self.current));
                }
            }
            Decision::Execute(srb) => self.execute(trans_id, srb, ranges, len),
        }
    }

    fn done(&mut self, trans_id: u64, srb: &VmscsiRequest, r: SrbResult, len: usize) {
        self.dev.stats.inline.fetch_add(1, Ordering::Relaxed);
        self.out.push_back(Out::Completion(
            r.completion(trans_id, srb, len),
            self.current,
        ));
    }

    /// The guest buffer of an SRB, or why the request is refused.
    fn buffer(
        &self,
        srb: &VmscsiRequest,
        ranges: Option<(usize, Option<DataRange>)>,
    ) -> Result<GuestBuffer, SrbResult> {
        let dir = DataDirection::from_wire(srb.data_in).ok_or_else(SrbResult::invalid_request)?;
        let dtl = srb.data_transfer_length as usize;
        if dtl > self.dev.config.protocol.max_transfer_bytes as usize {
            return Err(SrbResult::invalid_request());
        }
        let buffer = match ranges {
            None if dtl == 0 => GuestBuffer::empty(self.memory.clone(), dir),
            Some((1, Some(range))) => GuestBuffer::new(self.memory.clone(), range, dtl, dir)
                .ok_or_else(SrbResult::invalid_request)?,
            _ => return Err(SrbResult::invalid_request()),
        };
        buffer
            .probe()
            .map_err(|e| SrbResult::from_outcome(&Outcome::DataFault(e)))?;
        Ok(buffer)
    }

    fn execute(
        &mut self,
        trans_id: u64,
        srb: VmscsiRequest,
        ranges: Option<(usize, Option<DataRange>)>,
        len: usize,
    ) {
        let mut buffer = match self.buffer(&srb, ranges) {
            Ok(b) => b,
            Err(r) => return self.done(trans_id, &srb, r, len),
        };
        let cdb16 = srb.cdb();
        let cdb_len = usize::from(srb.cdb_length);
        let Some(cdb) = cdb16.get(..cdb_len).filter(|c| !c.is_empty()) else {
            let s = if cdb_len == 0 {
                Sense::INVALID_OPCODE
            } else {
                Sense::INVALID_FIELD_IN_CDB
            };
            return self.done(
                trans_id,
                &srb,
                SrbResult::from_outcome(&Outcome::CheckCondition(s)),
                len,
            );
        };
        let addr = LunAddr {
            path: srb.path_id,
            target: srb.target_id,
            lun: srb.lun,
        };
        let Some(lun) = self.dev.lun(addr) else {
            let luns = self.dev.luns_of(addr.path, addr.target);
            let r = scsi::absent_lun(cdb, addr.lun, &luns, &self.dev.config.identity, &mut buffer)
                .map_or_else(SrbResult::invalid_lun, |o| SrbResult::from_outcome(&o));
            return self.done(trans_id, &srb, r, len);
        };
        if cdb[0] == scsi::cdb::op::REPORT_LUNS {
            let luns = self.dev.luns_of(addr.path, addr.target);
            let o = scsi::absent_lun(cdb, addr.lun, &luns, &self.dev.config.identity, &mut buffer)
                .unwrap_or(Outcome::CheckCondition(Sense::INVALID_FIELD_IN_CDB));
            return self.done(trans_id, &srb, SrbResult::from_outcome(&o), len);
        }
        let plan = lun.scsi.prepare(cdb, buffer.len());
        let plan = match plan {
            Prepared::Done(o) => {
                return self.done(trans_id, &srb, SrbResult::from_outcome(&o), len);
            }
            p @ (Prepared::Read { .. } | Prepared::Write { .. } | Prepared::Flush) => {
                match self.submit_async(&lun, p, trans_id, srb, buffer, len) {
                    Ok(()) => return,
                    Err((p, b)) => {
                        buffer = b;
                        p
                    }
                }
            }
            p => p,
        };
        // The worker pool runs it synchronously.
        let inbox = self.inbox.clone();
        let cdb_owned = cdb.to_vec();
        let seq = self.current;
        let spawned = self.dev.pool.spawn(move || {
            let o = lun.scsi.run(plan, &cdb_owned, &mut buffer);
            inbox.push(
                seq,
                SrbResult::from_outcome(&o).completion(trans_id, &srb, len),
            );
        });
        if spawned {
            self.in_flight += 1;
            self.dev.stats.worker_io.fetch_add(1, Ordering::Relaxed);
        } else {
            let r =
                SrbResult::from_outcome(&Outcome::CheckCondition(Sense::INTERNAL_TARGET_FAILURE));
            self.done(trans_id, &srb, r, len);
        }
    }

    /// Submits a read, write or flush on the LUN's queue for this channel. Gives the plan back when
    /// there is no usable queue.
    fn submit_async(
        &mut self,
        lun: &Arc<Lun>,
        plan: Prepared,
        trans_id: u64,
        srb: VmscsiRequest,
        buffer: GuestBuffer,
        len: usize,
    ) -> Result<(), (Prepared, GuestBuffer)> {
        let Some(disk) = lun.async_disk.as_ref() else {
            return Err((plan, buffer));
        };
        let key = Arc::as_ptr(lun) as usize;
        let depth = u32::try_from(self.dev.config.max_in_flight).unwrap_or(u32::MAX);
        let kick = &self.kick;
        let entry = self.queues.entry(key).or_insert_with(|| LunQueue {
            lun: lun.clone(),
            queue: disk.open_queue(depth, kick.as_fd()).ok(),
        });
        if entry
            .queue
            .as_ref()
            .is_none_or(|q| q.in_flight() >= q.depth())
        {
            return Err((plan, buffer));
        }
        let (op, kind) = match plan {
            Prepared::Read {
                offset,
                len: rlen,
                copy,
            } => (
                QueueOp::Read { offset, len: rlen },
                PendingKind::Read { copy, buffer },
            ),
            Prepared::Write {
                offset,
                len: wlen,
                fua,
            } => {
                let mut data = vec![0u8; wlen];
                if let Err(e) = buffer.read_out(0, &mut data) {
                    let r = SrbResult::from_outcome(&data_fault(e));
                    self.done(trans_id, &srb, r, len);
                    return Ok(());
                }
                (
                    QueueOp::Write { offset, data, fua },
                    PendingKind::Write { len: wlen },
                )
            }
            Prepared::Flush => (QueueOp::Flush, PendingKind::Flush),
            other => return Err((other, buffer)),
        };
        let tag = self.next_tag;
        self.next_tag = self.next_tag.wrapping_add(1);
        let Some(q) = self.queues.get_mut(&key).and_then(|e| e.queue.as_mut()) else {
            let o = Outcome::CheckCondition(Sense::INTERNAL_TARGET_FAILURE);
            self.done(trans_id, &srb, SrbResult::from_outcome(&o), len);
            return Ok(());
        };
        let write = !matches!(kind, PendingKind::Read { .. });
        match q.submit(tag, op) {
            Ok(()) => {
                self.pending.insert(
                    tag,
                    Pending {
                        seq: self.current,
                        trans_id,
                        srb,
                        len,
                        kind,
                    },
                );
                self.in_flight += 1;
                self.dev.stats.async_io.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                let o = Outcome::CheckCondition(block_error_sense(&e, write));
                self.done(trans_id, &srb, SrbResult::from_outcome(&o), len);
            }
        }
        Ok(())
    }

    /// Picks up finished work. `true` if anything changed.
    fn collect(&mut self) -> bool {
        let mut progress = false;
        let done: Vec<(u64, Completion)> = self
            .inbox
            .completions
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default();
        for (seq, c) in done {
            self.in_flight = self.in_flight.saturating_sub(1);
            self.out.push_back(Out::Completion(c, seq));
            progress = true;
        }
        let mut reaped: Vec<QueueCompletion> = Vec::new();
        for q in self.queues.values_mut() {
            if let Some(q) = q.queue.as_mut() {
                q.reap(&mut reaped);
            }
        }
        for c in reaped {
            progress = true;
            self.async_done(c);
        }
        // Queues of LUNs that were removed go once idle.
        let dev = &self.dev;
        self.queues.retain(|_, q| {
            q.queue.as_ref().is_some_and(|q| q.in_flight() > 0) || dev.is_current(&q.lun)
        });
        let notes: Vec<VstorPacket> = self
            .inbox
            .notifications
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default();
        let note_len = vstor::completion_len(self.dev.protocol.version(), vstor::PACKET_SIZE);
        for n in notes {
            self.out.push_back(Out::Notification(n, note_len));
            progress = true;
        }
        if self.in_flight == 0 && !self.resets.is_empty() {
            for (id, len, seq) in std::mem::take(&mut self.resets) {
                self.reply_to(seq, id, VstorPacket::new(Operation::CompleteIo, 0, 0), len);
            }
            progress = true;
        }
        progress
    }

    fn async_done(&mut self, c: QueueCompletion) {
        let Some(p) = self.pending.remove(&c.tag) else {
            return;
        };
        self.in_flight = self.in_flight.saturating_sub(1);
        let o = match (p.kind, c.result) {
            (PendingKind::Read { copy, mut buffer }, Ok(Some(data))) => {
                let bytes = data.get(..copy).unwrap_or(&data);
                match buffer.write_in(0, bytes) {
                    Ok(()) => Outcome::Good { transferred: copy },
                    Err(e) => data_fault(e),
                }
            }
            (PendingKind::Write { len }, Ok(_)) => Outcome::Good { transferred: len },
            (PendingKind::Flush, Ok(_)) => Outcome::Good { transferred: 0 },
            (kind, Err(e)) => {
                let write = !matches!(kind, PendingKind::Read { .. });
                tracing::warn!(relid = self.relid, error = %e, "storvsp: backend I/O failed");
                Outcome::CheckCondition(block_error_sense(&e, write))
            }
            (PendingKind::Read { .. }, Ok(None)) => {
                Outcome::CheckCondition(Sense::INTERNAL_TARGET_FAILURE)
            }
        };
        let c = SrbResult::from_outcome(&o).completion(p.trans_id, &p.srb, p.len);
        self.out.push_back(Out::Completion(c, p.seq));
    }

    /// Writes queued packets while the ring has room, then releases the guest→host ring space of
    /// the requests answered. `true` if any was written.
    fn flush_out(&mut self) -> Result<bool, RingError> {
        let mut written = 0usize;
        let mut answered: Vec<u64> = Vec::new();
        loop {
            if self.out.is_empty() {
                break;
            }
            let mut batch = self.writer.batch();
            let mut full = None;
            while let Some(o) = self.out.front() {
                let (pkt_bytes, id, seq) = match o {
                    Out::Completion(c, seq) => (c.packet.wire_bytes(c.len), c.trans_id, Some(*seq)),
                    Out::Notification(p, len) => (p.wire_bytes(*len), 0, None),
                };
                let completion = seq.is_some();
                let parts: [&[u8]; 1] = [pkt_bytes];
                let pkt = if completion {
                    OutgoingPacket::completion(id, &parts)
                } else {
                    OutgoingPacket::in_band(0, false, &parts)
                };
                match batch.write(&pkt) {
                    Ok(()) => {
                        self.out.pop_front();
                        answered.extend(seq);
                        written += 1;
                    }
                    Err(WriteError::Full { needed, .. }) => {
                        full = Some(needed);
                        break;
                    }
                    Err(WriteError::Ring(e)) => return Err(e),
                    Err(e) => {
                        tracing::error!(relid = self.relid, error = %e, "storvsp: completion dropped");
                        self.out.pop_front();
                        // Executing it again would not make it fit: let the request go.
                        answered.extend(seq);
                    }
                }
            }
            let signal = batch.commit()?;
            // The completions are published (a): mark them answered in the journal (b), then
            // release their ring space and clear their journal entries (c). The guest is
            // signalled after (b): a VSP killed between (a) and (b) runs those requests again
            // (the only duplicates left), so that window is kept to a few loads and stores.
            for seq in answered.drain(..) {
                self.held.done(seq);
            }
            if signal {
                let _ = self.call.ring();
            }
            self.release()?;
            match full {
                None => break,
                Some(needed) => {
                    // Ask the guest to signal once it has read enough; retry at once if it has.
                    self.space_requested = true;
                    if !self.writer.request_space(needed)? {
                        break;
                    }
                }
            }
        }
        if self.space_requested && self.out.is_empty() {
            self.writer.clear_space_request();
            self.space_requested = false;
        }
        Ok(written > 0)
    }
}
