//! Blocking ring channels over eventfd doorbells (std only).
//!
//! The ring halves only *decide* whether the peer must be signalled; this layer rings an eventfd when
//! they say so and parks on one when there is nothing to do. Waiting spins first (a peer that is
//! actively producing or consuming answers within microseconds and a park/unpark round trip costs
//! several) and only then re-arms signalling and sleeps, re-checking the ring after re-arming so a
//! packet published in between is never missed.

use crate::error::{RingError, WriteError};
use crate::mem::RingMem;
use crate::reader::{IncomingPacket, PacketInfo, RingReader};
use crate::writer::{OutgoingPacket, RingWriter};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// Errors of the blocking channel layer.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error(transparent)]
    Ring(#[from] RingError),
    #[error(transparent)]
    Write(WriteError),
    #[error("doorbell: {0}")]
    Io(#[from] io::Error),
    #[error("timed out waiting for the peer")]
    TimedOut,
}

impl From<WriteError> for ChannelError {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::Ring(r) => ChannelError::Ring(r),
            other => ChannelError::Write(other),
        }
    }
}

/// Runs in [`Doorbell::ring`] before the eventfd is written (e.g. a VMBus device setting the
/// channel's event flag in guest memory when the eventfd is a KVM irqfd).
pub trait RingHook: Send + Sync + std::fmt::Debug {
    /// `false`: the peer needs no signal this time (the eventfd is not written).
    fn before_ring(&self) -> bool;
}

/// A non-blocking eventfd used as a one-way doorbell between two ring users (possibly in different
/// processes; pass the fd with `SCM_RIGHTS` or inheritance).
#[derive(Debug)]
pub struct Doorbell {
    fd: OwnedFd,
    hook: Option<std::sync::Arc<dyn RingHook>>,
}

impl Doorbell {
    /// A new close-on-exec, non-blocking eventfd.
    pub fn new() -> io::Result<Self> {
        // SAFETY: eventfd takes no pointers; the result is checked before use.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(Doorbell { fd, hook: None })
    }

    /// Wraps an eventfd received from elsewhere. It must be non-blocking: [`Self::wait`] polls first
    /// and then drains the counter with a read that must not block.
    pub fn from_fd(fd: OwnedFd) -> Self {
        Doorbell { fd, hook: None }
    }

    /// This doorbell with `hook` run before every [`Self::ring`] (clones keep it).
    pub fn with_hook(mut self, hook: std::sync::Arc<dyn RingHook>) -> Self {
        self.hook = Some(hook);
        self
    }

    /// Another handle on the same eventfd.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Doorbell {
            fd: self.fd.try_clone()?,
            hook: self.hook.clone(),
        })
    }

    /// Rings the doorbell (adds 1 to the counter), after the hook (if any) said it is needed.
    pub fn ring(&self) -> io::Result<()> {
        if let Some(h) = &self.hook
            && !h.before_ring()
        {
            return Ok(());
        }
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live local buffer to our descriptor.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), one.as_ptr().cast(), 8) };
        if n == 8 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        // EAGAIN: the counter is saturated, so the doorbell is rung already.
        if err.kind() == io::ErrorKind::WouldBlock {
            Ok(())
        } else {
            Err(err)
        }
    }

    /// Resets the counter; `Ok(true)` if it had been rung.
    pub fn clear(&self) -> io::Result<bool> {
        let mut buf = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a live local buffer.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), 8) };
        if n == 8 {
            return Ok(true);
        }
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::WouldBlock {
            Ok(false)
        } else {
            Err(err)
        }
    }

    /// Sleeps until the doorbell rings (then clears it) or `timeout` passes. `Ok(false)` on timeout.
    pub fn wait(&self, timeout: Option<Duration>) -> io::Result<bool> {
        let ms = match timeout {
            None => -1,
            Some(t) => i32::try_from(t.as_millis().max(1)).unwrap_or(i32::MAX),
        };
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        loop {
            // SAFETY: one valid pollfd for the duration of the call.
            let n = unsafe { libc::poll(&mut pfd, 1, ms) };
            if n > 0 {
                return self.clear().map(|_| true);
            }
            if n == 0 {
                return Ok(false);
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }
}

impl AsFd for Doorbell {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// How long a blocked side polls the ring before it parks on its doorbell.
#[derive(Copy, Clone, Debug)]
pub struct SpinPolicy {
    /// Ring polls before parking (each poll is one acquire load of the peer's index).
    pub spins: u32,
}

impl Default for SpinPolicy {
    fn default() -> Self {
        SpinPolicy { spins: 2_000 }
    }
}

fn deadline_left(deadline: Option<Instant>) -> Result<Option<Duration>, ChannelError> {
    match deadline {
        None => Ok(None),
        Some(d) => {
            let now = Instant::now();
            if now >= d {
                Err(ChannelError::TimedOut)
            } else {
                Ok(Some(d - now))
            }
        }
    }
}

/// The sending end of a ring: writes packets, rings the reader's doorbell when the ring half says so,
/// and waits for space through `pending_send_sz` and its own doorbell when the ring is full.
pub struct Sender<M: RingMem> {
    writer: RingWriter<M>,
    /// Rung to wake the reader.
    to_reader: Doorbell,
    /// Rung by the reader when space frees up.
    space: Doorbell,
    spin: SpinPolicy,
}

impl<M: RingMem> Sender<M> {
    pub fn new(writer: RingWriter<M>, to_reader: Doorbell, space: Doorbell) -> Self {
        Sender {
            writer,
            to_reader,
            space,
            spin: SpinPolicy::default(),
        }
    }

    pub fn with_spin(mut self, spin: SpinPolicy) -> Self {
        self.spin = spin;
        self
    }

    pub fn writer(&mut self) -> &mut RingWriter<M> {
        &mut self.writer
    }

    /// Sends one packet, blocking while the ring is full (up to `timeout`).
    pub fn send(
        &mut self,
        pkt: &OutgoingPacket<'_>,
        timeout: Option<Duration>,
    ) -> Result<(), ChannelError> {
        self.send_all(core::slice::from_ref(pkt), timeout)
    }

    /// Sends packets in as few batches as the ring allows: each batch is published with one signalling
    /// decision. Blocks while the ring is full (up to `timeout` in all).
    pub fn send_all(
        &mut self,
        pkts: &[OutgoingPacket<'_>],
        timeout: Option<Duration>,
    ) -> Result<(), ChannelError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut next = 0;
        while next < pkts.len() {
            let mut batch = self.writer.batch();
            let mut full_on = None;
            for pkt in &pkts[next..] {
                match batch.write(pkt) {
                    Ok(()) => {}
                    Err(WriteError::Full { needed, .. }) => {
                        full_on = Some(needed);
                        break;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            next += batch.len();
            if batch.commit()? {
                self.to_reader.ring()?;
            }
            if let Some(needed) = full_on {
                self.wait_for_space(needed, deadline)?;
            }
        }
        Ok(())
    }

    /// Blocks until more than `needed` bytes are free.
    fn wait_for_space(
        &mut self,
        needed: u32,
        deadline: Option<Instant>,
    ) -> Result<(), ChannelError> {
        for i in 0..self.spin.spins {
            if self.writer.free_bytes()? > needed {
                return Ok(());
            }
            backoff(i);
        }
        let can_park = self.writer.peer_supports_pending_send();
        loop {
            if can_park {
                if self.writer.request_space(needed)? {
                    return Ok(());
                }
                let signalled = self.space.wait(deadline_left(deadline)?)?;
                if self.writer.free_bytes()? > needed {
                    self.writer.clear_space_request();
                    return Ok(());
                }
                if !signalled {
                    deadline_left(deadline)?;
                }
            } else {
                // A reader without `feat_pending_send_sz` never signals space: poll gently.
                if self.writer.free_bytes()? > needed {
                    return Ok(());
                }
                let left = deadline_left(deadline)?;
                std::thread::sleep(left.map_or(Duration::from_micros(50), |l| {
                    l.min(Duration::from_micros(50))
                }));
            }
        }
    }
}

/// The receiving end of a ring: drains packets in batches (one commit and signalling decision per
/// batch), spins while the writer is active and parks on its doorbell otherwise.
pub struct Receiver<M: RingMem> {
    reader: RingReader<M>,
    /// Rung when a commit frees space the writer asked for.
    to_writer: Doorbell,
    /// Rung by the writer when data arrives in an empty ring with the interrupt mask clear.
    data: Doorbell,
    spin: SpinPolicy,
}

impl<M: RingMem> Receiver<M> {
    /// Masks the ring's interrupts: while the receiver is awake the writer need not signal it.
    pub fn new(reader: RingReader<M>, to_writer: Doorbell, data: Doorbell) -> Self {
        reader.mask_interrupts();
        Receiver {
            reader,
            to_writer,
            data,
            spin: SpinPolicy::default(),
        }
    }

    pub fn with_spin(mut self, spin: SpinPolicy) -> Self {
        self.spin = spin;
        self
    }

    pub fn reader(&mut self) -> &mut RingReader<M> {
        &mut self.reader
    }

    /// Hands up to `max` packets to `each` (in ring order), consuming them and publishing the space
    /// with one commit. Blocks until at least one packet arrives or `timeout` passes.
    pub fn recv_batch<F>(
        &mut self,
        max: usize,
        timeout: Option<Duration>,
        each: F,
    ) -> Result<usize, ChannelError>
    where
        F: FnMut(&IncomingPacket<'_, M>),
    {
        let n = self.recv_batch_uncommitted(max, timeout, each)?;
        self.commit()?;
        Ok(n)
    }

    /// Like [`Self::recv_batch`] but the space is not returned to the writer: call [`Self::commit`]
    /// once the packets are fully handled. A device that commits only after completing requests
    /// finds the unfinished ones still in the ring after a crash and restart.
    pub fn recv_batch_uncommitted<F>(
        &mut self,
        max: usize,
        timeout: Option<Duration>,
        mut each: F,
    ) -> Result<usize, ChannelError>
    where
        F: FnMut(&IncomingPacket<'_, M>),
    {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let mut n = 0;
            while n < max {
                let Some(pkt) = self.reader.peek()? else {
                    break;
                };
                each(&pkt);
                pkt.consume();
                n += 1;
            }
            if n > 0 {
                return Ok(n);
            }
            self.wait_for_data(deadline)?;
        }
    }

    /// Returns the space of every packet handed out so far to the writer (signalling it if it
    /// asked for space).
    pub fn commit(&mut self) -> Result<(), ChannelError> {
        if self.reader.commit()? {
            self.to_writer.ring()?;
        }
        Ok(())
    }

    /// Receives one packet's payload into `buf` (copy-out), blocking up to `timeout`.
    pub fn recv_into(
        &mut self,
        buf: &mut Vec<u8>,
        timeout: Option<Duration>,
    ) -> Result<PacketInfo, ChannelError> {
        let mut info = None;
        self.recv_batch(1, timeout, |pkt| {
            buf.clear();
            buf.resize(pkt.payload_len(), 0);
            // The length comes from the validated descriptor, so the copy is in bounds.
            if pkt.copy_payload(0, buf).is_ok() {
                info = Some(*pkt.info());
            }
        })?;
        info.ok_or(ChannelError::Ring(RingError::Broken))
    }

    fn wait_for_data(&mut self, deadline: Option<Instant>) -> Result<(), ChannelError> {
        for i in 0..self.spin.spins {
            if self.reader.available()? != 0 {
                return Ok(());
            }
            backoff(i);
        }
        // Re-arm, then re-check: a packet published before the writer saw the cleared mask would
        // otherwise go unsignalled.
        if self.reader.unmask_interrupts()? {
            self.reader.mask_interrupts();
            return Ok(());
        }
        let woke = self.data.wait(deadline_left(deadline)?);
        self.reader.mask_interrupts();
        if !woke? && self.reader.available()? == 0 {
            deadline_left(deadline)?;
        }
        Ok(())
    }
}

#[inline]
fn backoff(i: u32) {
    if i < 64 {
        core::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::HeapRing;
    use std::sync::Arc;

    fn pair(pages: usize) -> (Sender<Arc<HeapRing>>, Receiver<Arc<HeapRing>>) {
        let ring = Arc::new(HeapRing::new(pages).unwrap());
        let data = Doorbell::new().unwrap();
        let space = Doorbell::new().unwrap();
        let tx = Sender::new(
            RingWriter::new(ring.clone()).unwrap(),
            data.try_clone().unwrap(),
            space.try_clone().unwrap(),
        );
        let rx = Receiver::new(RingReader::new(ring).unwrap(), space, data);
        (tx, rx)
    }

    #[test]
    fn timeout_when_nothing_arrives() {
        let (_tx, mut rx) = pair(1);
        let err = rx
            .recv_batch(8, Some(Duration::from_millis(20)), |_| {})
            .unwrap_err();
        assert!(matches!(err, ChannelError::TimedOut), "{err}");
    }

    #[test]
    fn timeout_when_full_and_nobody_reads() {
        let (mut tx, _rx) = pair(1);
        let payload = [7u8; 1000];
        let parts: [&[u8]; 1] = [&payload];
        let pkt = OutgoingPacket::in_band(1, false, &parts);
        let mut sent = 0;
        let err = loop {
            match tx.send(&pkt, Some(Duration::from_millis(20))) {
                Ok(()) => sent += 1,
                Err(e) => break e,
            }
        };
        assert_eq!(sent, 3, "a 4 KiB ring holds three 1 KiB packets");
        assert!(matches!(err, ChannelError::TimedOut), "{err}");
    }

    #[test]
    fn parked_threads_wake_each_other() {
        // Tiny ring and no spinning: every exchange goes through pending_send_sz / interrupt_mask
        // and the doorbells. A lost wake-up shows up as a timeout.
        let (tx, rx) = pair(1);
        let mut tx = tx.with_spin(SpinPolicy { spins: 0 });
        let mut rx = rx.with_spin(SpinPolicy { spins: 0 });
        const N: u64 = 20_000;
        let reader = std::thread::spawn(move || {
            let mut expect = 0u64;
            while expect < N {
                rx.recv_batch(16, Some(Duration::from_secs(20)), |pkt| {
                    let mut v = [0u8; 8];
                    pkt.copy_payload(0, &mut v).unwrap();
                    assert_eq!(u64::from_le_bytes(v), expect);
                    assert_eq!(pkt.trans_id(), expect);
                    expect += 1;
                })
                .unwrap();
            }
        });
        for i in 0..N {
            let bytes = i.to_le_bytes();
            let big = [0u8; 700];
            let parts: [&[u8]; 2] = [&bytes, &big[..(i as usize % 700)]];
            tx.send(
                &OutgoingPacket::in_band(i, false, &parts),
                Some(Duration::from_secs(20)),
            )
            .unwrap();
        }
        reader.join().unwrap();
    }
}
