//! VMBus channels in the guest: ring GPADLs in guest pages, OPENCHANNEL / CLOSECHANNEL, the rings
//! as `ringbuf::RingMem` over the identity-mapped pages, guest RAM as vmbus-core `GuestMemory`,
//! and the wait loop shared by the drivers (HvSignalEvent out, SINT 2 event flag in).

use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU32, Ordering};

use ringbuf::{ControlWord, RingMem};
use vmbus_core::guest::{ClientEvent, OfferInfo, OpenParams};
use vmbus_core::memory::{GuestMemory, MemoryError};

use crate::arch::{self, SINT_COUNT};
use crate::bus::Bus;
use crate::{hv, mem};

/// Why a step failed (a test program: the message is what gets reported).
pub type Error = String;

/// One ring in guest memory: a control page and `data_len` bytes of data pages after it.
pub struct GuestRing {
    base: u64,
    data_len: u32,
}

impl GuestRing {
    fn data(&self) -> *mut u8 {
        (self.base + 4096) as *mut u8
    }

    fn copy(&self, offset: u32, buf: *mut u8, len: usize, to_ring: bool) {
        let d = self.data_len as usize;
        let off = offset as usize % d;
        let first = len.min(d - off);
        // SAFETY: the ring's pages were allocated for it and stay alive; `off + first <= d`, the
        // rest (`len - first <= d`) wraps to the start of the data area; `buf` holds `len` bytes.
        unsafe {
            if to_ring {
                core::ptr::copy_nonoverlapping(buf, self.data().add(off), first);
                core::ptr::copy_nonoverlapping(buf.add(first), self.data(), len - first);
            } else {
                core::ptr::copy_nonoverlapping(self.data().add(off), buf, first);
                core::ptr::copy_nonoverlapping(self.data(), buf.add(first), len - first);
            }
        }
    }
}

impl RingMem for GuestRing {
    fn control(&self, word: ControlWord) -> &AtomicU32 {
        // SAFETY: the control page is ours for the life of the ring; offsets are 4-aligned.
        unsafe { &*((self.base as usize + word.offset()) as *const AtomicU32) }
    }

    fn data_len(&self) -> u32 {
        self.data_len
    }

    fn read_data(&self, offset: u32, dst: &mut [u8]) {
        self.copy(offset, dst.as_mut_ptr(), dst.len(), false);
    }

    fn write_data(&self, offset: u32, src: &[u8]) {
        self.copy(offset, src.as_ptr().cast_mut(), src.len(), true);
    }
}

/// Guest RAM as the drivers see it: identity-mapped, so a GPA is an address. Only the driver's
/// own buffers (from [`mem::pages`]) are ever named.
#[derive(Clone, Copy, Debug, Default)]
pub struct GuestMem;

impl GuestMemory for GuestMem {
    fn read_at(&self, gpa: u64, dst: &mut [u8]) -> Result<(), MemoryError> {
        mem::read(gpa, dst);
        Ok(())
    }

    fn write_at(&self, gpa: u64, src: &[u8]) -> Result<(), MemoryError> {
        mem::write(gpa, src);
        Ok(())
    }
}

/// Creates a GPADL over `pfns` on channel `relid` and waits for GPADL_CREATED.
pub fn create_gpadl(bus: &mut Bus, relid: u32, pfns: &[u64]) -> Result<u32, Error> {
    let handle = bus
        .client
        .create_gpadl(relid, pfns)
        .map_err(|e| alloc::format!("GPADL: {e}"))?;
    match bus.wait(|e| matches!(e, ClientEvent::GpadlCreated { handle: h, .. } if *h == handle)) {
        ClientEvent::GpadlCreated { status: 0, .. } => Ok(handle),
        e => Err(alloc::format!("GPADL_CREATED: {e:?}")),
    }
}

/// An open channel: its ids and its two rings (guest→host, host→guest).
pub struct Opened {
    pub relid: u32,
    pub connection_id: u32,
    pub ring_gpadl: u32,
    pub up: GuestRing,
    pub down: GuestRing,
}

/// Opens `offer` with `ring_pages` pages per direction (control page included): ring pages,
/// control pages initialised as Linux does, the GPADL, OPENCHANNEL.
pub fn open(bus: &mut Bus, offer: &OfferInfo, ring_pages: usize) -> Result<Opened, Error> {
    let base = mem::pages(2 * ring_pages).ok_or("out of guest memory for rings")?;
    let data_len = ((ring_pages - 1) * 4096) as u32;
    let up = GuestRing { base, data_len };
    let down = GuestRing {
        base: base + ring_pages as u64 * 4096,
        data_len,
    };
    ringbuf::init_control(&up);
    ringbuf::init_control(&down);
    let relid = offer.relid;
    let pfns: Vec<u64> = (0..2 * ring_pages as u64)
        .map(|i| base / 4096 + i)
        .collect();
    let ring_gpadl = create_gpadl(bus, relid, &pfns)?;
    bus.client
        .open_channel(relid, OpenParams::new(ring_gpadl, ring_pages as u32, 0))
        .map_err(|e| alloc::format!("OPENCHANNEL: {e}"))?;
    match bus.wait(|e| matches!(e, ClientEvent::OpenResult { relid: r, .. } if *r == relid)) {
        ClientEvent::OpenResult { status: 0, .. } => {}
        e => return Err(alloc::format!("OPENCHANNEL_RESULT: {e:?}")),
    }
    Ok(Opened {
        relid,
        connection_id: offer.connection_id,
        ring_gpadl,
        up,
        down,
    })
}

/// Closes channel `relid` and tears its ring GPADL down (waits for GPADL_TORNDOWN).
pub fn close(bus: &mut Bus, relid: u32, ring_gpadl: u32) -> Result<(), Error> {
    bus.client
        .close_channel(relid)
        .map_err(|e| alloc::format!("CLOSECHANNEL: {e}"))?;
    bus.client
        .teardown_gpadl(relid, ring_gpadl)
        .map_err(|e| alloc::format!("GPADL_TEARDOWN: {e}"))?;
    bus.wait(|e| matches!(e, ClientEvent::GpadlTorndown { handle } if *handle == ring_gpadl));
    Ok(())
}

/// Signals the host on a channel's connection id.
pub fn signal(connection_id: u32) {
    hv::signal_event(connection_id, 0);
}

/// What one round of servicing a channel did.
pub struct Serviced {
    /// Packets moved either way.
    pub moved: bool,
    /// The host→guest ring may hold data published after the reader looked (re-arm said so).
    pub pending: bool,
}

/// Services a channel until `done` gives a value: `service` moves packets (and signals the host);
/// between rounds with nothing to do the CPU halts until the next SynIC interrupt. The channel's
/// event flag (bit `relid` of SINT 2) is cleared before each round so no wake-up is lost.
pub fn drive<S, T>(
    state: &mut S,
    relid: u32,
    mut service: impl FnMut(&mut S) -> Result<Serviced, Error>,
    mut done: impl FnMut(&mut S) -> Option<T>,
) -> Result<T, Error> {
    loop {
        let seen = SINT_COUNT.load(Ordering::SeqCst);
        hv::take_event(relid);
        let s = service(state)?;
        if let Some(v) = done(state) {
            return Ok(v);
        }
        if s.moved || s.pending {
            continue;
        }
        arch::wait_sint(seen);
    }
}
