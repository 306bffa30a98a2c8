//! Cross-process SynIC port: a host process and a guest process (the guest library run as a process,
//! for benchmarks and tests) sharing one memfd, with eventfd doorbells for the SINT interrupt
//! (host → guest) and for the hypercall / EOM trap (guest → host).
//!
//! Memfd layout (4 KiB pages):
//!
//! | page | contents | written by |
//! |---|---|---|
//! | 0 | header: magic, version, geometry; interrupt latches (host, per VP); per-VP EOM words | both |
//! | 1–2 | connection table: 2048 u32 entries (id in bits 23:0, kind in 31:24; 0 empty, `0xFF000000` removed), open addressing | host |
//! | 3 | guest → host event bitmap: bit i = connection table slot i signalled | guest |
//! | 4 + 2v, 5 + 2v | VP v's message page (SIMP) and event-flag page (SIEF) | both, SynIC rules |
//! | after | guest → host message ring (ringbuf layout): one in-band packet per `HvPostMessage`, `trans_id` = payload length << 32 + connection id | guest |
//!
//! The host never trusts the shared page contents beyond the SynIC rules: it keeps a private copy
//! of the connection table, re-checks every posted message (connection id, size) and maps event
//! bits through its private table; a corrupt ring fails
//! [`recv_message`](super::HostInbox::recv_message) with [`SynicError::GuestFault`] and nothing
//! else. The guest end checks connection ids against the shared table so that it can return the
//! hypercall status synchronously, as a hypervisor does.
//!
//! Interrupts are latches ("pending" + "armed" words and an eventfd): raising one costs a syscall
//! only when the other side sleeps. The host services EOMs in
//! [`wait`](super::HostInbox::wait), [`recv_message`](super::HostInbox::recv_message) and
//! [`SharedHost::service_eom`]; a host that sleeps on something else must poll its doorbell
//! ([`SharedSynic::fds`]) and call one of those.

mod ends;
mod mem;

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::process::Command;
use std::sync::{Arc, Mutex};

use ringbuf::mmap::{MappedRing, ring_memfd, set_inheritable};
use ringbuf::signal::Doorbell;
use ringbuf::{RingReader, RingWriter};

use super::SynicError;
use super::queue::VpMessageQueues;
use ends::{GuestCommon, HostVp, Table};
use mem::{
    EMPTY, EVENTS_PAGE, H_MAGIC, H_RING_PAGES, H_VERSION, H_VPS, MAGIC, Mapping, TABLE_PAGE,
    TABLE_SLOTS, VERSION, invalid,
};

pub use ends::{SharedGuest, SharedHost};
pub use mem::{MAX_PORTS, MAX_RING_PAGES, MAX_VPS, MappedPage, SharedLayout};
/// The pages and doorbells of one shared port, as created or received.
#[derive(Debug)]
pub struct SharedSynic {
    layout: SharedLayout,
    memfd: File,
    host_bell: Doorbell,
    guest_bells: Vec<Doorbell>,
    host_taken: AtomicBool,
    guest_taken: AtomicBool,
}

/// The descriptors of a [`SharedSynic`], for `SCM_RIGHTS` (send them with the layout).
#[derive(Debug)]
pub struct SharedFds<'a> {
    pub memfd: BorrowedFd<'a>,
    /// Guest → host doorbell (posts, signals, EOM).
    pub host_doorbell: BorrowedFd<'a>,
    /// Host → guest doorbell of each VP (the SINT interrupt).
    pub guest_doorbells: Vec<BorrowedFd<'a>>,
}

impl SharedSynic {
    /// A fresh port: a sealed memfd with the header written and the ring initialised, and new
    /// doorbells.
    pub fn create(name: &str, layout: SharedLayout) -> io::Result<Self> {
        layout.check()?;
        let memfd = ring_memfd(name, layout.total_len() as u64)?;
        let map = Mapping::new(memfd.as_fd(), layout.ring_offset())?;
        let header = MappedPage::new(&map, 0)?;
        header.word(H_VERSION).store(VERSION, Ordering::Relaxed);
        header.word(H_VPS).store(layout.vps, Ordering::Relaxed);
        header
            .word(H_RING_PAGES)
            .store(layout.ring_pages, Ordering::Relaxed);
        let ring = MappedRing::map(
            memfd.as_fd(),
            layout.ring_offset() as u64,
            layout.ring_len(),
        )?;
        ringbuf::init_control(&ring);
        header.word(H_MAGIC).store(MAGIC, Ordering::Release);
        Ok(SharedSynic {
            layout,
            memfd,
            host_bell: Doorbell::new()?,
            guest_bells: (0..layout.vps)
                .map(|_| Doorbell::new())
                .collect::<io::Result<_>>()?,
            host_taken: AtomicBool::new(false),
            guest_taken: AtomicBool::new(false),
        })
    }

    /// Takes over descriptors received from the creator (e.g. over `SCM_RIGHTS`) and checks them
    /// against `layout`. The doorbells are made non-blocking.
    pub fn from_fds(
        layout: SharedLayout,
        memfd: OwnedFd,
        host_doorbell: OwnedFd,
        guest_doorbells: Vec<OwnedFd>,
    ) -> io::Result<Self> {
        layout.check()?;
        let memfd = File::from(memfd);
        if memfd.metadata()?.len() != layout.total_len() as u64
            || guest_doorbells.len() != layout.vps as usize
        {
            return Err(invalid(
                "SynIC memfd size or doorbell count does not match the layout",
            ));
        }
        let map = Mapping::new(memfd.as_fd(), layout.ring_offset())?;
        let header = MappedPage::new(&map, 0)?;
        if header.word(H_MAGIC).load(Ordering::Acquire) != MAGIC
            || header.word(H_VERSION).load(Ordering::Relaxed) != VERSION
            || header.word(H_VPS).load(Ordering::Relaxed) != layout.vps
            || header.word(H_RING_PAGES).load(Ordering::Relaxed) != layout.ring_pages
        {
            return Err(invalid("SynIC memfd header does not match the layout"));
        }
        let bell = |fd: OwnedFd| -> io::Result<Doorbell> {
            set_nonblocking(fd.as_fd())?;
            Ok(Doorbell::from_fd(fd))
        };
        Ok(SharedSynic {
            layout,
            memfd,
            host_bell: bell(host_doorbell)?,
            guest_bells: guest_doorbells
                .into_iter()
                .map(bell)
                .collect::<io::Result<_>>()?,
            host_taken: AtomicBool::new(false),
            guest_taken: AtomicBool::new(false),
        })
    }

    pub fn layout(&self) -> SharedLayout {
        self.layout
    }

    /// The descriptors, to pass with `SCM_RIGHTS` together with [`Self::layout`].
    pub fn fds(&self) -> SharedFds<'_> {
        SharedFds {
            memfd: self.memfd.as_fd(),
            host_doorbell: self.host_bell.as_fd(),
            guest_doorbells: self.guest_bells.iter().map(AsFd::as_fd).collect(),
        }
    }

    /// Makes the descriptors survive `exec` and describes them in environment variable `var` of
    /// `cmd`, for [`Self::from_env`] in the child.
    pub fn pass_to_child(&self, cmd: &mut Command, var: &str) -> io::Result<()> {
        let fds = self.fds();
        set_inheritable(fds.memfd)?;
        set_inheritable(fds.host_doorbell)?;
        let mut spec = format!(
            "{},{},{},{}",
            self.layout.vps,
            self.layout.ring_pages,
            fds.memfd.as_raw_fd(),
            fds.host_doorbell.as_raw_fd()
        );
        for fd in &fds.guest_doorbells {
            set_inheritable(*fd)?;
            spec.push_str(&format!(",{}", fd.as_raw_fd()));
        }
        cmd.env(var, spec);
        Ok(())
    }

    /// Takes over the descriptors a parent passed with [`Self::pass_to_child`]. `Ok(None)` when `var`
    /// is not set.
    ///
    /// # Safety
    /// The descriptors named in `var` must be open, owned by nothing else in this process, and taken
    /// over at most once.
    pub unsafe fn from_env(var: &str) -> io::Result<Option<Self>> {
        let Ok(spec) = std::env::var(var) else {
            return Ok(None);
        };
        let bad = || io::Error::new(io::ErrorKind::InvalidInput, format!("malformed {var}"));
        let nums: Vec<u32> = spec
            .split(',')
            .map(|s| s.parse::<u32>().map_err(|_| bad()))
            .collect::<Result<_, _>>()?;
        let [vps, ring_pages, memfd, host, ref guests @ ..] = nums[..] else {
            return Err(bad());
        };
        let take = |fd: u32| -> io::Result<OwnedFd> {
            let fd = RawFd::try_from(fd).map_err(|_| bad())?;
            // SAFETY: F_GETFD only checks that the descriptor is open.
            if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: open (checked above) and, by this function's contract, owned by nobody else.
            Ok(unsafe { OwnedFd::from_raw_fd(fd) })
        };
        let layout = SharedLayout { vps, ring_pages };
        let guests = guests
            .iter()
            .map(|&fd| take(fd))
            .collect::<io::Result<Vec<_>>>()?;
        Self::from_fds(layout, take(memfd)?, take(host)?, guests).map(Some)
    }

    fn map(&self) -> io::Result<Arc<Mapping>> {
        Mapping::new(self.memfd.as_fd(), self.layout.ring_offset())
    }

    fn ring(&self) -> io::Result<MappedRing> {
        MappedRing::map(
            self.memfd.as_fd(),
            self.layout.ring_offset() as u64,
            self.layout.ring_len(),
        )
    }

    /// The host end (once per `SharedSynic`; there must be one host per memfd). `host_queue_depth`
    /// bounds the messages queued per (VP, SINT) behind busy slots.
    pub fn host(&self, host_queue_depth: usize) -> Result<SharedHost, SynicError> {
        if self.host_taken.swap(true, Ordering::AcqRel) {
            return Err(SynicError::Io(invalid("the host end was taken already")));
        }
        let map = self.map()?;
        let vps = (0..self.layout.vps)
            .map(|vp| {
                Ok(HostVp {
                    simp: MappedPage::new(&map, self.layout.simp_page(vp))?,
                    sief: MappedPage::new(&map, self.layout.sief_page(vp))?,
                    queues: Mutex::new(VpMessageQueues::new(vp, host_queue_depth)),
                    bell: self.guest_bells[vp as usize].try_clone()?,
                })
            })
            .collect::<io::Result<Vec<_>>>()?;
        let reader = RingReader::new(self.ring()?).map_err(|e| SynicError::GuestFault {
            what: "guest→host message ring",
            detail: e.to_string(),
        })?;
        // Signalling goes through the latch; the ring's own decisions are not used.
        reader.mask_interrupts();
        Ok(SharedHost {
            layout: self.layout,
            header: MappedPage::new(&map, 0)?,
            events: MappedPage::new(&map, EVENTS_PAGE)?,
            table_pages: [
                MappedPage::new(&map, TABLE_PAGE)?,
                MappedPage::new(&map, TABLE_PAGE + 1)?,
            ],
            vps,
            bell: self.host_bell.try_clone()?,
            table: Mutex::new(Table {
                entries: vec![EMPTY; TABLE_SLOTS],
                live: 0,
            }),
            ring: Mutex::new(reader),
            spins: 0,
            dropped: AtomicU64::new(0),
        })
    }

    /// The guest end, one port per VP (once per `SharedSynic`: the message ring has one writer).
    pub fn guest(&self) -> Result<Vec<SharedGuest>, SynicError> {
        if self.guest_taken.swap(true, Ordering::AcqRel) {
            return Err(SynicError::Io(invalid("the guest end was taken already")));
        }
        let map = self.map()?;
        let writer = RingWriter::new(self.ring()?).map_err(|e| SynicError::GuestFault {
            what: "guest→host message ring",
            detail: e.to_string(),
        })?;
        let common = Arc::new(GuestCommon {
            header: MappedPage::new(&map, 0)?,
            events: MappedPage::new(&map, EVENTS_PAGE)?,
            table_pages: [
                MappedPage::new(&map, TABLE_PAGE)?,
                MappedPage::new(&map, TABLE_PAGE + 1)?,
            ],
            host_bell: self.host_bell.try_clone()?,
            writer: Mutex::new(writer),
        });
        (0..self.layout.vps)
            .map(|vp| {
                Ok(SharedGuest {
                    common: common.clone(),
                    vp,
                    simp: MappedPage::new(&map, self.layout.simp_page(vp))?,
                    sief: MappedPage::new(&map, self.layout.sief_page(vp))?,
                    bell: self.guest_bells[vp as usize].try_clone()?,
                    spins: 0,
                })
            })
            .collect::<io::Result<Vec<_>>>()
            .map_err(SynicError::from)
    }
}

fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: F_GETFL / F_SETFL on a valid borrowed descriptor.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
