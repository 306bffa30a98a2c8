//! One end of a VMM ↔ VSP connection: a `SOCK_SEQPACKET` Unix socket carrying one protocol message
//! per datagram, with file descriptors as `SCM_RIGHTS`.

use super::wire::{MAX_MESSAGE, MAX_REGIONS, Message, ProtocolError};
use std::io;
use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// Why receiving failed.
#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    #[error("peer closed the connection")]
    Closed,
    #[error("timed out")]
    TimedOut,
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("protocol violation: {0}")]
    Protocol(#[from] ProtocolError),
}

/// A connected message socket.
#[derive(Debug)]
pub struct Connection {
    fd: OwnedFd,
}

const MAX_FDS: usize = MAX_REGIONS;

impl Connection {
    /// A connected pair (close-on-exec).
    pub fn pair() -> io::Result<(Connection, Connection)> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: socketpair writes two descriptors into the local array.
        let r = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors are fresh and owned by nobody else.
        let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok((Connection { fd: a }, Connection { fd: b }))
    }

    /// Wraps a connected `SOCK_SEQPACKET` socket (e.g. inherited by a spawned VSP).
    pub fn from_fd(fd: OwnedFd) -> Self {
        Connection { fd }
    }

    /// Sends `msg` with `fds` attached.
    pub fn send(&self, msg: &Message, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        if fds.len() > MAX_FDS {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "too many fds"));
        }
        let bytes = msg.encode();
        let mut iov = libc::iovec {
            iov_base: bytes.as_ptr().cast_mut().cast(),
            iov_len: bytes.len(),
        };
        let mut cmsg_buf = vec![0u64; cmsg_space(MAX_FDS).div_ceil(8)];
        // SAFETY: msghdr is plain data; every pointer set below points at live local buffers.
        let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
        hdr.msg_iov = &mut iov;
        hdr.msg_iovlen = 1;
        if !fds.is_empty() {
            let data_len = fds.len() * size_of::<RawFd>();
            hdr.msg_control = cmsg_buf.as_mut_ptr().cast();
            // SAFETY: CMSG_SPACE only computes a size.
            hdr.msg_controllen = unsafe { libc::CMSG_SPACE(data_len as u32) } as _;
            // SAFETY: msg_control points at a zeroed buffer of at least CMSG_SPACE(data_len) bytes,
            // so CMSG_FIRSTHDR is non-null and its data area holds `fds.len()` descriptors.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(&hdr);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN(data_len as u32) as _;
                let data = libc::CMSG_DATA(c).cast::<RawFd>();
                for (i, fd) in fds.iter().enumerate() {
                    data.add(i).write_unaligned(fd.as_raw_fd());
                }
            }
        }
        loop {
            // SAFETY: hdr describes live buffers; MSG_NOSIGNAL turns a dead peer into EPIPE.
            let n = unsafe { libc::sendmsg(self.fd.as_raw_fd(), &hdr, libc::MSG_NOSIGNAL) };
            if n >= 0 {
                return if n as usize == bytes.len() {
                    Ok(())
                } else {
                    Err(io::Error::new(io::ErrorKind::WriteZero, "short send"))
                };
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Receives one message and the descriptors that came with it (validated: the count must be
    /// what the message needs). `timeout` `None` waits forever.
    pub fn recv(&self, timeout: Option<Duration>) -> Result<(Message, Vec<OwnedFd>), RecvError> {
        self.wait_readable(timeout)?;
        let mut buf = vec![0u8; MAX_MESSAGE + 1];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let mut cmsg_buf = vec![0u64; cmsg_space(MAX_FDS).div_ceil(8)];
        // SAFETY: plain data, pointers set to live local buffers below.
        let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
        hdr.msg_iov = &mut iov;
        hdr.msg_iovlen = 1;
        hdr.msg_control = cmsg_buf.as_mut_ptr().cast();
        hdr.msg_controllen = cmsg_buf.len() * 8;
        let n = loop {
            // SAFETY: hdr describes live buffers; received fds are close-on-exec.
            let n = unsafe { libc::recvmsg(self.fd.as_raw_fd(), &mut hdr, libc::MSG_CMSG_CLOEXEC) };
            if n >= 0 {
                break n as usize;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e.into());
            }
        };
        // Take ownership of every descriptor first so none leaks whatever happens next.
        let fds = take_fds(&hdr);
        if n == 0 && fds.is_empty() {
            return Err(RecvError::Closed);
        }
        if hdr.msg_flags & libc::MSG_CTRUNC != 0 {
            return Err(ProtocolError::Invalid("too many descriptors").into());
        }
        if hdr.msg_flags & libc::MSG_TRUNC != 0 || n > MAX_MESSAGE {
            return Err(ProtocolError::TooLong(n).into());
        }
        let msg = Message::decode(buf.get(..n).unwrap_or_default())?;
        if fds.len() != msg.fd_count() {
            return Err(ProtocolError::FdCount {
                expected: msg.fd_count(),
                got: fds.len(),
            }
            .into());
        }
        Ok((msg, fds))
    }

    fn wait_readable(&self, timeout: Option<Duration>) -> Result<(), RecvError> {
        let ms = timeout.map_or(-1, |t| i32::try_from(t.as_millis()).unwrap_or(i32::MAX));
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        loop {
            // SAFETY: one valid pollfd for the duration of the call.
            let r = unsafe { libc::poll(&mut pfd, 1, ms) };
            if r > 0 {
                return Ok(());
            }
            if r == 0 {
                return Err(RecvError::TimedOut);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e.into());
            }
        }
    }
}

impl AsFd for Connection {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn cmsg_space(fds: usize) -> usize {
    // SAFETY: CMSG_SPACE only computes a size.
    unsafe { libc::CMSG_SPACE((fds * size_of::<RawFd>()) as u32) as usize }
}

/// Every descriptor in the control messages of `hdr`, owned.
fn take_fds(hdr: &libc::msghdr) -> Vec<OwnedFd> {
    let mut out = Vec::new();
    // SAFETY: hdr was filled by recvmsg; CMSG_FIRSTHDR/NXTHDR walk only the returned control
    // length and each SCM_RIGHTS data area holds (cmsg_len - CMSG_LEN(0)) / 4 descriptors that
    // the kernel just installed in this process for us.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(hdr);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data_len = ((*c).cmsg_len as usize).saturating_sub(libc::CMSG_LEN(0) as usize);
                let data = libc::CMSG_DATA(c).cast::<RawFd>();
                for i in 0..data_len / size_of::<RawFd>() {
                    out.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            c = libc::CMSG_NXTHDR(hdr, c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oop::wire::Region;
    use std::io::{Read, Seek, Write};

    #[test]
    fn messages_and_fds_cross() {
        let (a, b) = Connection::pair().unwrap();
        let mut f = ringbuf::mmap::ring_memfd("t", 4096).unwrap();
        f.write_all(b"hello").unwrap();
        let msg = Message::SetMemory {
            regions: vec![Region {
                gpa: 0,
                size: 4096,
                fd_offset: 0,
            }],
        };
        a.send(&msg, &[f.as_fd()]).unwrap();
        let (got, fds) = b.recv(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(got, msg);
        let mut g = std::fs::File::from(fds.into_iter().next().unwrap());
        g.rewind().unwrap();
        let mut s = String::new();
        g.read_to_string(&mut s).unwrap();
        assert!(s.starts_with("hello"));
    }

    #[test]
    fn wrong_fd_count_eof_and_timeout() {
        let (a, b) = Connection::pair().unwrap();
        let f = ringbuf::mmap::ring_memfd("t", 4096).unwrap();
        // A Close with a descriptor attached: refused, and the descriptor is not leaked.
        a.send(&Message::Close { relid: 1 }, &[f.as_fd()]).unwrap();
        assert!(matches!(
            b.recv(None),
            Err(RecvError::Protocol(ProtocolError::FdCount {
                expected: 0,
                got: 1
            }))
        ));
        assert!(matches!(
            b.recv(Some(Duration::from_millis(10))),
            Err(RecvError::TimedOut)
        ));
        drop(a);
        assert!(matches!(b.recv(None), Err(RecvError::Closed)));
    }
}
