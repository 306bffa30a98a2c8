//! A message relay between the frontend's connection and vhost-user-backend's, for one
//! incompatibility the library cannot be configured around: QEMU 7.2's virtio-net sends
//! `SET_VRING_ENABLE` when the guest sets FEATURES_OK, before `SET_FEATURES`; vhost-user-backend
//! 0.24 answers that with `InactiveFeature(PROTOCOL_FEATURES)` and drops the connection. The relay
//! holds such early enables and forwards them right after `SET_FEATURES` (QEMU re-sends them at
//! device start anyway). Everything else passes unchanged, file descriptors included.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use tracing::{debug, info};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// `VHOST_USER_SET_FEATURES`.
const SET_FEATURES: u32 = 2;
/// `VHOST_USER_SET_VRING_ENABLE`.
const SET_VRING_ENABLE: u32 = 18;
/// Header: request, flags, size (all le32).
const HDR: usize = 12;
/// Largest payload a vhost-user message may carry (the vhost crate's `MAX_MSG_SIZE`).
const MAX_PAYLOAD: usize = 0x1000;
/// More descriptors than any message carries (memory regions are at most 8 per message).
const MAX_FDS: usize = 32;

/// One message as read: bytes and the descriptors that came with them.
struct Msg {
    bytes: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Msg {
    fn request(&self) -> u32 {
        u32::from_le_bytes([self.bytes[0], self.bytes[1], self.bytes[2], self.bytes[3]])
    }
}

/// Reads one message; `Ok(None)` at a clean end of stream.
fn read_msg(s: &mut UnixStream) -> io::Result<Option<Msg>> {
    let mut hdr = [0u8; HDR];
    let mut raw = [-1 as RawFd; MAX_FDS];
    let mut iov = [libc::iovec {
        iov_base: hdr.as_mut_ptr().cast(),
        iov_len: HDR,
    }];
    // SAFETY: the iovec points at `hdr`, which lives across the call and is HDR bytes long.
    let (n, nfds) = unsafe { s.recv_with_fds(&mut iov, &mut raw) }
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    let fds: Vec<OwnedFd> = raw[..nfds.min(MAX_FDS)]
        .iter()
        // SAFETY: recvmsg just gave us these descriptors; nothing else owns them.
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    if n == 0 {
        return Ok(None);
    }
    s.read_exact(&mut hdr[n..])?;
    let size = u32::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]) as usize;
    if size > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("vhost-user message of {size} bytes"),
        ));
    }
    let mut bytes = vec![0u8; HDR + size];
    bytes[..HDR].copy_from_slice(&hdr);
    s.read_exact(&mut bytes[HDR..])?;
    Ok(Some(Msg { bytes, fds }))
}

fn write_msg(s: &UnixStream, m: &Msg) -> io::Result<()> {
    let fds: Vec<RawFd> = m.fds.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect();
    let n = s
        .send_with_fds(&[&m.bytes[..]], &fds)
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    if n < m.bytes.len() {
        // The descriptors went with the first part; the rest is plain bytes.
        (&*s).write_all(&m.bytes[n..])?;
    }
    Ok(())
}

/// Frontend → backend: forwards messages, holding `SET_VRING_ENABLE`s that arrive before
/// `SET_FEATURES`. Returns when either side closes.
fn forward_requests(mut front: UnixStream, back: UnixStream) -> io::Result<()> {
    let mut features_set = false;
    let mut held = Vec::new();
    while let Some(m) = read_msg(&mut front)? {
        tracing::trace!(
            request = m.request(),
            len = m.bytes.len(),
            fds = m.fds.len(),
            "vhost-user request"
        );
        match m.request() {
            SET_VRING_ENABLE if !features_set => {
                debug!("vhost-user-net: SET_VRING_ENABLE before SET_FEATURES held back");
                held.push(m);
                continue;
            }
            SET_FEATURES => {
                write_msg(&back, &m)?;
                features_set = true;
                if !held.is_empty() {
                    info!(
                        count = held.len(),
                        "vhost-user-net: replaying early SET_VRING_ENABLE"
                    );
                }
                for h in held.drain(..) {
                    write_msg(&back, &h)?;
                }
                continue;
            }
            _ => {}
        }
        write_msg(&back, &m)?;
    }
    Ok(())
}

/// Runs the relay until either side hangs up, then closes both.
pub fn run(front: UnixStream, back: UnixStream) -> io::Result<()> {
    let (f2, b2) = (front.try_clone()?, back.try_clone()?);
    let replies = std::thread::Builder::new()
        .name("vhost-user-relay".into())
        .spawn(move || {
            // Backend → frontend: replies carry no descriptors here (no backend channel fds).
            let (mut b, mut f) = (b2, f2);
            let r = io::copy(&mut b, &mut f);
            let _ = f.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
            r
        })?;
    let r = forward_requests(front.try_clone()?, back.try_clone()?);
    let _ = back.shutdown(Shutdown::Both);
    let _ = front.shutdown(Shutdown::Both);
    let _ = replies.join();
    r
}
