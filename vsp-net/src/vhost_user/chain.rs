//! Descriptor chains and the used ring, with every guest-provided value checked: directions,
//! lengths (bounded before anything is read), GPAs (vm-memory refuses addresses outside guest
//! RAM), chain length (the queue iterator's TTL plus a truncation check).

use std::num::Wrapping;
use std::ops::Deref;
use std::sync::atomic::{Ordering, fence};

use thiserror::Error;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

/// Guest memory as the vhost-user daemon maps it.
pub type Mem = GuestMemoryMmap<()>;

/// Why a chain was refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ChainError {
    /// No descriptor could be read.
    #[error("empty or unreadable descriptor chain")]
    Empty,
    /// The chain ended in a descriptor that still points to a next one (loop, over-long chain,
    /// bad indirect table, descriptor outside memory).
    #[error("descriptor chain truncated (loop, too long or bad indirect table)")]
    Truncated,
    /// A descriptor of the wrong direction.
    #[error("{0}")]
    Direction(&'static str),
    /// More bytes than the request may have.
    #[error("descriptor chain of more than {max} bytes")]
    TooLong {
        /// Bound.
        max: usize,
    },
    /// A buffer outside guest memory.
    #[error("descriptor buffer at {addr:#x}+{len} outside guest memory")]
    BadAddress {
        /// GPA.
        addr: u64,
        /// Length.
        len: u32,
    },
}

/// A device-writable buffer: `(gpa, len)` segments.
#[derive(Clone, Debug, Default)]
pub struct WritableBuf {
    /// Head index (for the used ring).
    pub head: u16,
    /// Segments in order.
    pub segs: Vec<(GuestAddress, u32)>,
    /// Sum of the segment lengths (bounded by the caller's limit).
    pub cap: usize,
}

/// Walks a chain: device-readable descriptors first (copied into `out`, at most `max_read`
/// bytes, more is an error), then device-writable ones (returned, trimmed to `max_write` bytes in
/// total). A readable descriptor after a writable one is refused, as the spec orders them.
pub fn walk<M>(
    chain: DescriptorChain<M>,
    mem: &Mem,
    out: &mut Vec<u8>,
    max_read: usize,
    max_write: usize,
) -> Result<WritableBuf, ChainError>
where
    M: Deref,
    M::Target: GuestMemory,
{
    let head = chain.head_index();
    out.clear();
    let mut w = WritableBuf {
        head,
        ..WritableBuf::default()
    };
    let mut last_has_next = true;
    let mut any = false;
    for d in chain {
        any = true;
        last_has_next = d.has_next();
        let (addr, len) = (d.addr(), d.len());
        if d.is_write_only() {
            // Buffers may be larger than anything we write (Linux's "big packets" chains are
            // ~17 pages): use at most `max_write` bytes of them and check only what we use.
            let room = max_write - w.cap;
            let use_len = len.min(u32::try_from(room).unwrap_or(u32::MAX));
            check_range(mem, addr, use_len)?;
            if use_len > 0 {
                w.segs.push((addr, use_len));
                w.cap += use_len as usize;
            }
        } else {
            if !w.segs.is_empty() {
                return Err(ChainError::Direction(
                    "device-readable descriptor after a device-writable one",
                ));
            }
            let start = out.len();
            let end = start
                .checked_add(len as usize)
                .filter(|&e| e <= max_read)
                .ok_or(ChainError::TooLong { max: max_read })?;
            out.resize(end, 0);
            mem.read_slice(&mut out[start..end], addr)
                .map_err(|_| ChainError::BadAddress {
                    addr: addr.raw_value(),
                    len,
                })?;
        }
    }
    if !any {
        return Err(ChainError::Empty);
    }
    if last_has_next {
        return Err(ChainError::Truncated);
    }
    Ok(w)
}

fn check_range(mem: &Mem, addr: GuestAddress, len: u32) -> Result<(), ChainError> {
    let bad = ChainError::BadAddress {
        addr: addr.raw_value(),
        len,
    };
    if len == 0 {
        return Ok(());
    }
    // Every byte inside guest RAM (no hole, no wrap).
    if mem.check_range(addr, len as usize, Permissions::Write) {
        Ok(())
    } else {
        Err(bad)
    }
}

/// Writes `parts` (concatenated) into `buf`'s segments starting `skip` bytes in; returns bytes
/// written. Fails if a segment is no longer in memory (the table changed under us).
pub fn write_into(
    mem: &Mem,
    buf: &WritableBuf,
    skip: usize,
    parts: &[&[u8]],
) -> Result<usize, ChainError> {
    let mut seg = 0;
    let mut seg_off = skip;
    // Find the segment holding `skip`.
    while seg < buf.segs.len() && seg_off >= buf.segs[seg].1 as usize {
        seg_off -= buf.segs[seg].1 as usize;
        seg += 1;
    }
    let mut written = 0;
    for part in parts {
        let mut p = *part;
        while !p.is_empty() && seg < buf.segs.len() {
            let (addr, len) = buf.segs[seg];
            let room = len as usize - seg_off;
            let n = room.min(p.len());
            let a = addr
                .checked_add(seg_off as u64)
                .ok_or(ChainError::BadAddress {
                    addr: addr.raw_value(),
                    len,
                })?;
            mem.write_slice(&p[..n], a)
                .map_err(|_| ChainError::BadAddress {
                    addr: addr.raw_value(),
                    len,
                })?;
            written += n;
            p = &p[n..];
            seg_off += n;
            if seg_off == len as usize {
                seg += 1;
                seg_off = 0;
            }
        }
    }
    Ok(written)
}

/// Adds `elems` (`(head, len)`) to the used ring and publishes them with one index store, so a
/// driver never sees the first buffer of a merged frame without the rest.
pub fn publish_used(mem: &Mem, q: &mut Queue, elems: &[(u16, u32)]) -> Result<(), ChainError> {
    if elems.is_empty() {
        return Ok(());
    }
    let size = q.size();
    if size == 0 {
        return Err(ChainError::Empty);
    }
    let base = GuestAddress(q.used_ring());
    let bad = |a: GuestAddress| ChainError::BadAddress {
        addr: a.raw_value(),
        len: 8,
    };
    let mut next = Wrapping(q.next_used());
    for &(head, len) in elems {
        let slot = u64::from(next.0 % size);
        let a = base.checked_add(4 + slot * 8).ok_or(bad(base))?;
        let mut e = [0u8; 8];
        e[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        e[4..].copy_from_slice(&len.to_le_bytes());
        mem.write_slice(&e, a).map_err(|_| bad(a))?;
        next += 1;
    }
    fence(Ordering::Release);
    let idx = base.checked_add(2).ok_or(bad(base))?;
    mem.store(next.0.to_le(), idx, Ordering::Release)
        .map_err(|_| bad(idx))?;
    q.set_next_used(next.0);
    Ok(())
}

/// Whether the driver wants an interrupt for the used entries added since `old` (the
/// `used_event` rule with EVENT_IDX, else the avail ring's NO_INTERRUPT flag). Unreadable
/// fields answer yes: a spurious interrupt is harmless, a missed one hangs the driver.
pub fn needs_signal(mem: &Mem, q: &Queue, old: u16) -> bool {
    // The used index store must be visible before we read the driver's suppression state.
    fence(Ordering::SeqCst);
    let avail = GuestAddress(q.avail_ring());
    let new = q.next_used();
    if q.event_idx_enabled() {
        let Some(a) = avail.checked_add(4 + 2 * u64::from(q.size())) else {
            return true;
        };
        let Ok(ev) = mem.load::<u16>(a, Ordering::Acquire) else {
            return true;
        };
        let ev = u16::from_le(ev);
        new.wrapping_sub(ev).wrapping_sub(1) < new.wrapping_sub(old)
    } else {
        match mem.load::<u16>(avail, Ordering::Acquire) {
            Ok(flags) => u16::from_le(flags) & 1 == 0,
            Err(_) => true,
        }
    }
}
