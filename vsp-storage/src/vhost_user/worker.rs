//! One thread per virtqueue: takes requests off the avail ring, runs them on the disk (through an
//! io_uring [`AsyncQueue`] when the backend has one, so a QD32 guest really has 32 requests in
//! flight), and publishes completions in batches — one used-index update pass and at most one
//! interrupt (EVENT_IDX honoured) per wake-up. Completions may be out of order.

use super::chain;
use super::device::{BlkDevice, SEG_MAX};
use super::inflight::InflightQueue;
use super::request::{self, Desc, Kind, Limits, Request, SECTOR};
use crate::backend::{AsyncQueue, QueueCompletion, QueueOp};
use crate::block::BlockError;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};
use virtio_queue::{Queue, QueueT};
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

pub(crate) type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

const TOK_KICK: u64 = 0;
const TOK_DISK: u64 = 1;
const TOK_STOP: u64 = 2;

/// Everything a queue worker needs; built by the connection handler when a ring starts.
pub(crate) struct QueueSetup {
    pub index: u16,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub next_avail: u16,
    pub event_idx: bool,
    pub kick: EventFd,
    pub call: Option<EventFd>,
    pub mem: Mem,
    pub dev: Arc<BlkDevice>,
    pub limits: Limits,
    pub inflight: Option<InflightQueue>,
}

/// A running worker; [`WorkerHandle::stop`] ends it and gives back the ring position.
pub(crate) struct WorkerHandle {
    stop: EventFd,
    thread: JoinHandle<u16>,
}

impl WorkerHandle {
    pub fn spawn(setup: QueueSetup) -> std::io::Result<Self> {
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let w = Worker::new(setup, stop.try_clone()?)?;
        let thread = std::thread::Builder::new()
            .name(format!("vhost-blk-q{}", w.index))
            .spawn(move || w.run())?;
        Ok(WorkerHandle { stop, thread })
    }

    /// Stops the worker after the I/O it has in flight completed; returns the next avail index.
    pub fn stop(self) -> Option<u16> {
        let _ = self.stop.write(1);
        self.thread.join().ok()
    }
}

/// A request in flight on the asynchronous queue (or parked by the test hold).
struct Pending {
    req: Request,
    /// The guest memory a zero-copy transfer points into, kept mapped until it completes (even if
    /// the frontend replaces the memory table meanwhile).
    _mem: Option<Arc<GuestMemoryMmap>>,
    /// Bytes of bounce buffer this request holds.
    bounce: u64,
}

/// Most bounce-buffer bytes in flight per queue; past it requests run synchronously, so a guest
/// cannot make the daemon allocate queue size × `MAX_DATA`.
const MAX_BOUNCE: u64 = 64 << 20;

struct Worker {
    index: u16,
    q: Queue,
    size: u16,
    desc_table: u64,
    kick: EventFd,
    call: Option<EventFd>,
    stop: EventFd,
    mem: Mem,
    dev: Arc<BlkDevice>,
    limits: Limits,
    inflight: Option<InflightQueue>,
    aq: Option<Box<dyn AsyncQueue>>,
    aq_ev: EventFd,
    pending: Vec<Option<Pending>>,
    /// Bytes of bounce buffers in flight (bounded by `MAX_BOUNCE`).
    bounced: u64,
    done: Vec<(u16, u32)>,
    descs: Vec<Desc>,
    comps: Vec<QueueCompletion>,
    epoll: Epoll,
}

fn invalid(msg: &'static str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, msg)
}

impl Worker {
    fn new(s: QueueSetup, stop: EventFd) -> std::io::Result<Self> {
        let mut q = Queue::new(s.size).map_err(|_| invalid("bad queue size"))?;
        q.set_size(s.size);
        let lo_hi = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
        let (l, h) = lo_hi(s.desc);
        q.set_desc_table_address(l, h);
        let (l, h) = lo_hi(s.avail);
        q.set_avail_ring_address(l, h);
        let (l, h) = lo_hi(s.used);
        q.set_used_ring_address(l, h);
        q.set_event_idx(s.event_idx);
        q.set_next_avail(s.next_avail);
        q.set_ready(true);
        {
            let m = s.mem.memory();
            if !q.is_valid(&*m) {
                return Err(invalid("virtqueue addresses are not in guest memory"));
            }
            let used = q
                .used_idx(&*m, Ordering::Acquire)
                .map_err(|_| invalid("used ring"))?;
            q.set_next_used(used.0);
        }
        let aq_ev = EventFd::new(EFD_NONBLOCK)?;
        let aq = match &s.dev.async_disk {
            Some(d) => match d.open_queue(
                u32::from(s.size),
                // SAFETY: `aq_ev` outlives the queue: both are fields of this worker and the queue is dropped first.
                unsafe { BorrowedFd::borrow_raw(aq_ev.as_raw_fd()) },
            ) {
                Ok(mut q) => {
                    // One io_uring_enter per wake-up instead of one per request.
                    q.set_batching(true);
                    Some(q)
                }
                Err(e) => {
                    tracing::info!(error = %e, "no asynchronous queue; using the synchronous path");
                    None
                }
            },
            None => None,
        };
        let epoll = Epoll::new()?;
        for (fd, tok) in [(&s.kick, TOK_KICK), (&aq_ev, TOK_DISK), (&stop, TOK_STOP)] {
            epoll.ctl(
                ControlOperation::Add,
                fd.as_raw_fd(),
                EpollEvent::new(EventSet::IN, tok),
            )?;
        }
        Ok(Worker {
            index: s.index,
            q,
            size: s.size,
            desc_table: s.desc,
            kick: s.kick,
            call: s.call,
            stop,
            mem: s.mem,
            dev: s.dev,
            limits: s.limits,
            inflight: s.inflight,
            aq,
            aq_ev,
            pending: (0..s.size).map(|_| None).collect(),
            bounced: 0,
            done: Vec::with_capacity(usize::from(s.size)),
            descs: Vec::with_capacity(SEG_MAX as usize + 2),
            comps: Vec::with_capacity(usize::from(s.size)),
            epoll,
        })
    }

    fn run(mut self) -> u16 {
        if let Some(inf) = self.inflight.as_mut() {
            let (heads, avail) = inf.recover(self.q.next_used());
            if !heads.is_empty() {
                tracing::info!(
                    queue = self.index,
                    count = heads.len(),
                    "re-running in-flight requests"
                );
            }
            if let Some(avail) = avail {
                self.q.set_next_avail(avail);
            }
            for head in heads {
                self.start(head);
            }
        }
        // A kick may have been lost while no one was listening (daemon restart).
        self.process_avail();
        self.submit_and_reap();
        self.flush_used();
        let mut events = vec![EpollEvent::default(); 4];
        'outer: loop {
            let busy = self.poll_briefly();
            if !busy && self.dev.opts.poll_us > 0 {
                // Polling left notifications off: re-arm them before sleeping (and catch what
                // raced with that).
                self.process_avail();
                self.submit_and_reap();
                self.flush_used();
            }
            let timeout = if busy { 0 } else { -1 };
            let n = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(error = %e, queue = self.index, "epoll failed; queue stops");
                    break;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOK_KICK => {
                        let _ = self.kick.read();
                        self.process_avail();
                    }
                    TOK_DISK => {
                        let _ = self.aq_ev.read();
                        self.reap();
                    }
                    _ => break 'outer,
                }
            }
            self.submit_and_reap();
            self.flush_used();
        }
        self.drain();
        self.q.next_avail()
    }

    /// Adaptive polling, as QEMU's IOThreads do (`poll-max-ns`): while requests or completions
    /// keep arriving within `poll_us` of each other, handle them without kicks, interrupts to
    /// ourselves or sleeping. Returns whether it did any work (then it stopped after `MAX_SPIN`
    /// rounds so that the stop event is still seen).
    fn poll_briefly(&mut self) -> bool {
        const MAX_SPIN: u32 = 4096;
        let poll = std::time::Duration::from_micros(u64::from(self.dev.opts.poll_us));
        if poll.is_zero() {
            return false;
        }
        let mut idle_since = std::time::Instant::now();
        let mut worked = false;
        for _ in 0..MAX_SPIN {
            let avail = {
                let mem = self.mem.memory();
                self.q.avail_idx(&*mem, Ordering::Acquire).ok()
            };
            let mut progress = false;
            if avail.is_some_and(|a| a.0 != self.q.next_avail()) {
                let mem = self.mem.memory();
                let _ = self.q.disable_notification(&*mem);
                while let Some(chain) = self.q.pop_descriptor_chain(&*mem) {
                    let head = chain.head_index();
                    self.start(head);
                    progress = true;
                }
            }
            if self.aq.as_ref().is_some_and(|q| q.in_flight() > 0) || progress {
                self.submit_and_reap();
            }
            if !self.done.is_empty() {
                self.flush_used();
                progress = true;
            }
            if progress {
                worked = true;
                idle_since = std::time::Instant::now();
            } else if idle_since.elapsed() > poll {
                return worked;
            }
            std::hint::spin_loop();
        }
        worked
    }

    /// Starts the batch queued on the disk and collects whatever finished already (buffered
    /// reads often complete inside the submit call), saving a wake-up.
    fn submit_and_reap(&mut self) {
        let Some(aq) = self.aq.as_mut() else { return };
        if let Err(e) = aq.flush() {
            tracing::warn!(queue = self.index, error = %e, "io_uring submit failed; retrying on the next wake-up");
        }
        self.reap();
    }

    /// Waits (bounded) for the I/O still running, so that what was taken is also returned.
    fn drain(&mut self) {
        let _ = self.stop.read();
        for _ in 0..500 {
            let running = self.aq.as_ref().map_or(0, |q| q.in_flight());
            if running == 0 {
                break;
            }
            let mut events = vec![EpollEvent::default(); 4];
            let _ = self.epoll.wait(10, &mut events);
            let _ = self.aq_ev.read();
            self.submit_and_reap();
        }
        self.flush_used();
    }

    fn process_avail(&mut self) {
        loop {
            let mem = self.mem.memory();
            let _ = self.q.disable_notification(&*mem);
            let mut popped = false;
            while let Some(chain) = self.q.pop_descriptor_chain(&*mem) {
                popped = true;
                let head = chain.head_index();
                self.start(head);
            }
            match self.q.enable_notification(&*mem) {
                Ok(true) if popped => continue,
                Ok(true) => {
                    tracing::warn!(
                        queue = self.index,
                        "avail ring is inconsistent; waiting for a kick"
                    );
                    break;
                }
                _ => break,
            }
        }
    }

    /// Completes `head` with the status byte `code` at `status` (or with nothing written).
    fn finish(&mut self, head: u16, status: Option<u64>, code: u8, data_len: u32) {
        let mem = self.mem.memory();
        let len = match status {
            Some(at) if mem.write_obj(code, GuestAddress(at)).is_ok() => data_len.saturating_add(1),
            _ => 0,
        };
        self.done.push((head, len));
    }

    /// Takes one request off the ring and starts it.
    fn start(&mut self, head: u16) {
        if let Some(inf) = self.inflight.as_mut() {
            inf.get(head);
        }
        if self
            .pending
            .get(usize::from(head))
            .is_some_and(|p| p.is_some())
        {
            tracing::warn!(
                queue = self.index,
                head,
                "guest reused a descriptor still in flight"
            );
            return;
        }
        let mem = self.mem.memory();
        let mut descs = std::mem::take(&mut self.descs);
        let walked = chain::walk(
            &mem,
            self.desc_table,
            self.size,
            head,
            SEG_MAX as usize + 2,
            &mut descs,
        );
        if let Err(e) = walked {
            tracing::warn!(queue = self.index, head, error = %e, "bad descriptor chain dropped");
            self.descs = descs;
            self.done.push((head, 0));
            return;
        }
        let header = descs
            .first()
            .filter(|d| !d.write && d.len == request::HEADER_LEN)
            .and_then(|d| {
                let mut h = [0u8; 16];
                mem.read_slice(&mut h, GuestAddress(d.addr)).ok().map(|_| h)
            });
        let parsed = request::parse(&descs, header, &self.limits);
        self.descs = descs;
        let req = match parsed {
            Ok(r) => r,
            Err(rej) => {
                tracing::debug!(
                    queue = self.index,
                    head,
                    reason = rej.reason,
                    "request refused"
                );
                drop(mem);
                self.finish(head, rej.status, rej.code, 0);
                return;
            }
        };
        if !mem.check_range(GuestAddress(req.status), 1) {
            tracing::warn!(
                queue = self.index,
                head,
                "status byte outside guest memory; dropped"
            );
            self.done.push((head, 0));
            return;
        }
        let in_ram = req
            .data
            .iter()
            .all(|d| mem.check_range(GuestAddress(d.addr), d.len as usize));
        drop(mem);
        if !in_ram {
            tracing::warn!(queue = self.index, head, "data buffer outside guest memory");
            self.finish(head, Some(req.status), VIRTIO_BLK_S_IOERR as u8, 0);
            return;
        }
        self.dispatch(head, req);
    }

    fn dispatch(&mut self, head: u16, req: Request) {
        if let Some(hold) = self.dev.opts.hold_sector
            && matches!(req.kind, Kind::In | Kind::Out)
            && (req.sector..req.sector + req.data_len / SECTOR).contains(&hold)
        {
            self.pending[usize::from(head)] = Some(Pending {
                req,
                _mem: None,
                bounce: 0,
            });
            return;
        }
        let offset = req.sector * SECTOR;
        if matches!(req.kind, Kind::In | Kind::Out) && self.aq.is_some() {
            match self.submit_zero_copy(head, &req, offset) {
                Ok(Some(mem)) => {
                    self.pending[usize::from(head)] = Some(Pending {
                        req,
                        _mem: Some(mem),
                        bounce: 0,
                    });
                    return;
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(queue = self.index, head, error = %e, "submit failed");
                    return self.finish(head, Some(req.status), VIRTIO_BLK_S_IOERR as u8, 0);
                }
            }
        }
        let bounce = match req.kind {
            Kind::In | Kind::Out => req.data_len,
            _ => 0,
        };
        let async_ok = self.aq.is_some() && self.bounced + bounce <= MAX_BOUNCE;
        let op = match req.kind {
            _ if !async_ok => None,
            Kind::In => Some(QueueOp::Read {
                offset,
                len: req.data_len as usize,
            }),
            Kind::Out => match self.gather(&req) {
                Some(data) => Some(QueueOp::Write {
                    offset,
                    data,
                    fua: false,
                }),
                None => return self.finish(head, Some(req.status), VIRTIO_BLK_S_IOERR as u8, 0),
            },
            Kind::Flush => Some(QueueOp::Flush),
            _ => None,
        };
        if let (Some(op), Some(aq)) = (op, self.aq.as_mut()) {
            match aq.submit(u64::from(head), op) {
                Ok(()) => {
                    self.bounced += bounce;
                    self.pending[usize::from(head)] = Some(Pending {
                        req,
                        _mem: None,
                        bounce,
                    });
                }
                Err(e) => {
                    tracing::warn!(queue = self.index, head, error = %e, "submit failed");
                    self.finish(head, Some(req.status), VIRTIO_BLK_S_IOERR as u8, 0);
                }
            }
            return;
        }
        let (code, len) = match self.run_sync(&req) {
            Ok(len) => (VIRTIO_BLK_S_OK as u8, len),
            Err(e) => {
                tracing::warn!(queue = self.index, head, error = %e, kind = ?req.kind, "request failed");
                (VIRTIO_BLK_S_IOERR as u8, 0)
            }
        };
        self.finish(head, Some(req.status), code, len);
    }

    /// Starts an IN/OUT request directly on guest memory. `Ok(None)`: not possible here (e.g.
    /// O_DIRECT with unaligned buffers); the caller bounces the data instead.
    fn submit_zero_copy(
        &mut self,
        head: u16,
        req: &Request,
        offset: u64,
    ) -> Result<Option<Arc<GuestMemoryMmap>>, BlockError> {
        let Some(aq) = self.aq.as_mut() else {
            return Ok(None);
        };
        let mem = self.mem.memory();
        let mut iov = Vec::with_capacity(req.data.len());
        for d in &req.data {
            // A descriptor that spans two memory regions cannot be one iovec: bounce it.
            let Ok(vs) = mem.get_slice(GuestAddress(d.addr), d.len as usize) else {
                return Ok(None);
            };
            iov.push(libc::iovec {
                iov_base: vs.ptr_guard_mut().as_ptr().cast(),
                iov_len: d.len as usize,
            });
        }
        let (tag, write) = (u64::from(head), req.kind == Kind::Out);
        // The Arc returned below is stored with the pending request, and the queue (dropped before
        // `pending`) waits for in-flight operations; a guest changing the buffer hurts only itself.
        // SAFETY: every iovec lies in a mapping of `mem` (checked by `get_slice`) that outlives
        // the operation, as explained above.
        let submitted = unsafe { aq.submit_vectored(tag, offset, iov, write) };
        match submitted {
            Ok(()) => Ok(Some(mem.into_inner())),
            Err(BlockError::Unsupported) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Copies the guest's data descriptors of a write out (once).
    fn gather(&self, req: &Request) -> Option<Vec<u8>> {
        let mem = self.mem.memory();
        let mut data = vec![0u8; req.data_len as usize];
        let mut at = 0usize;
        for d in &req.data {
            let end = at + d.len as usize;
            mem.read_slice(&mut data[at..end], GuestAddress(d.addr))
                .ok()?;
            at = end;
        }
        Some(data)
    }

    fn scatter(&self, req: &Request, data: &[u8]) -> bool {
        let mem = self.mem.memory();
        let mut at = 0usize;
        for d in &req.data {
            let end = (at + d.len as usize).min(data.len());
            if mem
                .write_slice(&data[at..end], GuestAddress(d.addr))
                .is_err()
            {
                return false;
            }
            at = end;
        }
        true
    }

    /// Runs a request on the synchronous path; returns the bytes written to the guest.
    fn run_sync(&self, req: &Request) -> Result<u32, BlockError> {
        let disk = &self.dev.disk;
        let bad = |m: &'static str| BlockError::Io(invalid(m));
        match req.kind {
            Kind::In => {
                let mut buf = vec![0u8; req.data_len as usize];
                disk.read_at(req.sector * SECTOR, &mut buf)?;
                if !self.scatter(req, &buf) {
                    return Err(bad("guest buffer vanished"));
                }
                Ok(req.data_len as u32)
            }
            Kind::Out => {
                let data = self
                    .gather(req)
                    .ok_or_else(|| bad("guest buffer vanished"))?;
                disk.write_at(req.sector * SECTOR, &data, false)?;
                Ok(0)
            }
            Kind::Flush => disk.flush().map(|_| 0),
            Kind::GetId => {
                let id = self.dev.serial();
                let n = (req.data_len as usize).min(id.len());
                if !self.scatter(req, &id[..n]) {
                    return Err(bad("guest buffer vanished"));
                }
                Ok(n as u32)
            }
            Kind::Discard | Kind::WriteZeroes => {
                let bytes = self
                    .gather(req)
                    .ok_or_else(|| bad("guest buffer vanished"))?;
                let max = if req.kind == Kind::Discard {
                    super::device::MAX_DISCARD_SECTORS
                } else {
                    super::device::MAX_WRITE_ZEROES_SECTORS
                };
                let segs =
                    request::parse_dwz(&bytes, req.kind, self.limits.capacity, max).map_err(bad)?;
                for s in segs {
                    if req.kind == Kind::Discard {
                        disk.unmap(s.offset, s.len)?;
                    } else {
                        write_zeroes(disk.as_ref(), s.offset, s.len)?;
                    }
                }
                Ok(0)
            }
        }
    }

    fn reap(&mut self) {
        let Some(aq) = self.aq.as_mut() else { return };
        let mut comps = std::mem::take(&mut self.comps);
        aq.reap(&mut comps);
        for c in comps.drain(..) {
            let head = c.tag as u16;
            let Some(p) = self
                .pending
                .get_mut(usize::from(head))
                .and_then(Option::take)
            else {
                continue;
            };
            self.bounced -= p.bounce;
            let (code, len) = match c.result {
                Ok(Some(data)) if p.req.kind == Kind::In => {
                    if self.scatter(&p.req, &data) {
                        (VIRTIO_BLK_S_OK as u8, p.req.data_len as u32)
                    } else {
                        (VIRTIO_BLK_S_IOERR as u8, 0)
                    }
                }
                // A zero-copy read: the data is already in guest memory.
                Ok(None) if p.req.kind == Kind::In => {
                    (VIRTIO_BLK_S_OK as u8, p.req.data_len as u32)
                }
                Ok(_) => (VIRTIO_BLK_S_OK as u8, 0),
                Err(e) => {
                    tracing::warn!(queue = self.index, head, error = %e, "I/O failed");
                    (VIRTIO_BLK_S_IOERR as u8, 0)
                }
            };
            self.finish(head, Some(p.req.status), code, len);
        }
        self.comps = comps;
    }

    /// Publishes finished requests and interrupts the guest once if it wants to hear.
    fn flush_used(&mut self) {
        if self.done.is_empty() {
            return;
        }
        let mem = self.mem.memory();
        for (head, len) in self.done.drain(..) {
            if let Some(inf) = &self.inflight {
                inf.pre_put(head);
            }
            if let Err(e) = self.q.add_used(&*mem, head, len) {
                tracing::warn!(queue = self.index, head, error = %e, "add_used failed");
                continue;
            }
            if let Some(inf) = &self.inflight {
                inf.post_put(head, self.q.next_used());
            }
        }
        if self.q.needs_notification(&*mem).unwrap_or(true)
            && let Some(call) = &self.call
        {
            let _ = call.write(1);
        }
    }
}

fn write_zeroes(
    disk: &dyn crate::block::BlockDevice,
    offset: u64,
    len: u64,
) -> Result<(), BlockError> {
    const CHUNK: u64 = 1 << 20;
    let zeros = vec![0u8; CHUNK.min(len) as usize];
    let mut at = 0;
    while at < len {
        let n = CHUNK.min(len - at);
        disk.write_at(offset + at, &zeros[..n as usize], false)?;
        at += n;
    }
    Ok(())
}
