//! The few raw syscalls the TAP backend and the switch need: interface ioctls, an eventfd, poll and
//! `setns`. Every `unsafe` block of the network backends lives here.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// `ioctl` request type of the libc in use.
pub(crate) type Req = libc::Ioctl;

/// `struct ifreq`: 16-byte name + 24-byte union, kept as plain bytes so no union is ever read.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: [u8; 24],
}

const _: () = assert!(size_of::<IfReq>() == size_of::<libc::ifreq>());

impl IfReq {
    /// An ifreq naming `name` (must be shorter than `IFNAMSIZ`; checked by the caller).
    pub(crate) fn new(name: &str) -> Self {
        let mut r = Self {
            name: [0; libc::IFNAMSIZ],
            data: [0; 24],
        };
        let n = name.len().min(libc::IFNAMSIZ - 1);
        r.name[..n].copy_from_slice(&name.as_bytes()[..n]);
        r
    }

    /// The name the kernel wrote back.
    pub(crate) fn name(&self) -> String {
        let end = self
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.name.len());
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }

    /// `ifr_flags` (short).
    pub(crate) fn flags(&self) -> i16 {
        i16::from_ne_bytes([self.data[0], self.data[1]])
    }

    pub(crate) fn set_flags(&mut self, flags: i16) {
        self.data[..2].copy_from_slice(&flags.to_ne_bytes());
    }

    /// `ifr_mtu` / `ifr_ifindex` (int).
    pub(crate) fn int(&self) -> i32 {
        i32::from_ne_bytes([self.data[0], self.data[1], self.data[2], self.data[3]])
    }

    pub(crate) fn set_int(&mut self, v: i32) {
        self.data[..4].copy_from_slice(&v.to_ne_bytes());
    }

    /// `ifr_hwaddr.sa_data[0..6]`.
    pub(crate) fn hwaddr(&self) -> [u8; 6] {
        let mut mac = [0; 6];
        mac.copy_from_slice(&self.data[2..8]);
        mac
    }

    pub(crate) fn set_hwaddr(&mut self, mac: [u8; 6]) {
        self.data[..2].copy_from_slice(&libc::ARPHRD_ETHER.to_ne_bytes());
        self.data[2..8].copy_from_slice(&mac);
    }
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// `ioctl(fd, req, &mut ifreq)`.
pub(crate) fn ioctl_ifreq(fd: BorrowedFd<'_>, req: Req, ifr: &mut IfReq) -> io::Result<()> {
    // SAFETY: `fd` is a live descriptor; `ifr` points to a writable 40-byte `struct ifreq` that
    // outlives the call, which is all the interface/TUN ioctls used here read or write.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), req, std::ptr::from_mut(ifr)) })?;
    Ok(())
}

/// `ioctl(fd, req, &mut int)` (TUNSETVNETHDRSZ, TUNSETCARRIER, TUNSETVNETLE, TUNGETFEATURES).
pub(crate) fn ioctl_int(fd: BorrowedFd<'_>, req: Req, val: &mut libc::c_int) -> io::Result<()> {
    // SAFETY: `fd` is live; the request reads or writes exactly one `int` through the valid,
    // exclusively borrowed pointer.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), req, std::ptr::from_mut(val)) })?;
    Ok(())
}

/// `ioctl(fd, req, value)` with an integer argument passed by value (TUNSETOFFLOAD).
pub(crate) fn ioctl_val(fd: BorrowedFd<'_>, req: Req, val: libc::c_ulong) -> io::Result<()> {
    // SAFETY: `fd` is live; the request takes its argument by value and dereferences no pointer.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), req, val) })?;
    Ok(())
}

/// `ioctl(fd, req)` returning a new descriptor (TUNGETDEVNETNS).
pub(crate) fn ioctl_new_fd(fd: BorrowedFd<'_>, req: Req) -> io::Result<OwnedFd> {
    // SAFETY: `fd` is live; the request takes no argument.
    let nfd = check(unsafe { libc::ioctl(fd.as_raw_fd(), req) })?;
    // SAFETY: on success the ioctl returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(nfd) })
}

/// Moves the calling thread into the network namespace `ns` (an open `/run/netns/<name>` or
/// `/proc/<pid>/ns/net`).
pub(crate) fn setns_net(ns: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: plain syscall on a live descriptor; it changes only this thread's namespace.
    check(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) })?;
    Ok(())
}

/// Waits until one of `fds` is readable (or has an error/hang-up). Returns one flag per fd.
pub(crate) fn poll_readable<const N: usize>(
    fds: [BorrowedFd<'_>; N],
    timeout: Option<Duration>,
) -> io::Result<[bool; N]> {
    let mut pfds = fds.map(|fd| libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    });
    let ms = timeout.map_or(-1, |t| i32::try_from(t.as_millis()).unwrap_or(i32::MAX));
    loop {
        // SAFETY: `pfds` is a valid array of `N` pollfd structs for the duration of the call.
        let rc = unsafe { libc::poll(pfds.as_mut_ptr(), N as libc::nfds_t, ms) };
        match check(rc) {
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(pfds.map(|p| p.revents != 0))
}

/// A non-blocking eventfd used as a readiness signal (counter semantics).
#[derive(Debug)]
pub struct EventFd(File);

impl EventFd {
    /// Creates a non-blocking, close-on-exec eventfd.
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain syscall with constant flags; no pointers.
        let fd = check(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })?;
        // SAFETY: `fd` is a fresh descriptor owned by nobody else.
        Ok(Self(File::from(unsafe { OwnedFd::from_raw_fd(fd) })))
    }

    /// Adds 1 to the counter (wakes a poller).
    pub fn signal(&self) {
        // A full counter (EAGAIN) still leaves the fd readable, so the error can be ignored.
        let _ = (&self.0).write(&1u64.to_ne_bytes());
    }

    /// Resets the counter; returns whether it was non-zero.
    pub fn drain(&self) -> bool {
        let mut b = [0u8; 8];
        (&self.0).read(&mut b).is_ok_and(|n| n == 8)
    }

    /// Waits up to `timeout` for a signal (does not drain).
    pub fn wait(&self, timeout: Option<Duration>) -> io::Result<bool> {
        Ok(poll_readable([self.0.as_fd()], timeout)?[0])
    }
}

impl AsFd for EventFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}
