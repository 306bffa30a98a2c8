//! One ring shared between two processes: a memfd holding it and the two doorbells that go with it
//! (writer → reader "data", reader → writer "space"), with a way to hand all three to a child process.
//!
//! VSP processes receive the same three things over a Unix socket with `SCM_RIGHTS`; inheritance is the
//! simpler path for tests and benchmarks that spawn their peer.

use crate::layout::{CONTROL_PAGE_SIZE, PAGE_SIZE};
use crate::mmap::{MappedRing, ring_memfd, set_inheritable};
use crate::reader::RingReader;
use crate::signal::{ChannelError, Doorbell, Receiver, Sender};
use crate::writer::RingWriter;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::Command;

/// A ring in its own memfd plus its doorbells.
#[derive(Debug)]
pub struct SharedRing {
    memfd: File,
    ring_len: usize,
    /// Rung by the writer when the reader must wake up.
    data: Doorbell,
    /// Rung by the reader when the writer's space request is met.
    space: Doorbell,
}

impl SharedRing {
    /// A fresh ring of one control page plus `data_pages` data pages, control page initialised.
    pub fn create(name: &str, data_pages: usize) -> io::Result<Self> {
        let ring_len = data_pages
            .checked_mul(PAGE_SIZE)
            .and_then(|d| d.checked_add(CONTROL_PAGE_SIZE))
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "ring too large"))?;
        let memfd = ring_memfd(name, ring_len as u64)?;
        let ring = MappedRing::map(memfd.as_fd(), 0, ring_len)?;
        crate::init_control(&ring);
        Ok(SharedRing {
            memfd,
            ring_len,
            data: Doorbell::new()?,
            space: Doorbell::new()?,
        })
    }

    /// A new mapping of the ring.
    pub fn map(&self) -> io::Result<MappedRing> {
        MappedRing::map(self.memfd.as_fd(), 0, self.ring_len)
    }

    /// The writing end, blocking on the "space" doorbell.
    pub fn sender(&self) -> Result<Sender<MappedRing>, ChannelError> {
        let writer = RingWriter::new(self.map()?)?;
        Ok(Sender::new(
            writer,
            self.data.try_clone()?,
            self.space.try_clone()?,
        ))
    }

    /// The reading end, parking on the "data" doorbell.
    pub fn receiver(&self) -> Result<Receiver<MappedRing>, ChannelError> {
        let reader = RingReader::new(self.map()?)?;
        Ok(Receiver::new(
            reader,
            self.space.try_clone()?,
            self.data.try_clone()?,
        ))
    }

    /// Makes the three descriptors survive `exec` and names them in environment variable `var` of
    /// `cmd`, for [`Self::from_env`] in the child.
    pub fn pass_to_child(&self, cmd: &mut Command, var: &str) -> io::Result<()> {
        for fd in [self.memfd.as_fd(), self.data.as_fd(), self.space.as_fd()] {
            set_inheritable(fd)?;
        }
        cmd.env(
            var,
            format!(
                "{},{},{},{}",
                self.memfd.as_raw_fd(),
                self.data.as_fd().as_raw_fd(),
                self.space.as_fd().as_raw_fd(),
                self.ring_len
            ),
        );
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
        let nums: Vec<i64> = spec
            .split(',')
            .map(|s| s.parse::<i64>().map_err(|_| bad()))
            .collect::<Result<_, _>>()?;
        let [memfd, data, space, ring_len] = nums[..] else {
            return Err(bad());
        };
        let take = |fd: i64| -> io::Result<OwnedFd> {
            let fd = RawFd::try_from(fd).map_err(|_| bad())?;
            // SAFETY: F_GETFD only checks that the descriptor is open.
            if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: open (checked above) and, by this function's contract, owned by nobody else.
            Ok(unsafe { OwnedFd::from_raw_fd(fd) })
        };
        Ok(Some(SharedRing {
            memfd: File::from(take(memfd)?),
            ring_len: usize::try_from(ring_len).map_err(|_| bad())?,
            data: Doorbell::from_fd(take(data)?),
            space: Doorbell::from_fd(take(space)?),
        }))
    }
}
