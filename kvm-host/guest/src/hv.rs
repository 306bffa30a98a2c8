//! The guest side of the Hyper-V interface: MSR numbers, hypercalls through the hypercall page,
//! SynIC message slots and event flags.

use core::arch::asm;
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU32, Ordering};

use crate::arch::{rdmsr, wrmsr};

pub const GUEST_OS_ID: u32 = 0x4000_0000;
pub const HYPERCALL: u32 = 0x4000_0001;
pub const VP_INDEX: u32 = 0x4000_0002;
pub const RESET: u32 = 0x4000_0003;
pub const VP_RUNTIME: u32 = 0x4000_0010;
pub const TIME_REF_COUNT: u32 = 0x4000_0020;
pub const TSC_FREQUENCY: u32 = 0x4000_0022;
pub const APIC_FREQUENCY: u32 = 0x4000_0023;
pub const SCONTROL: u32 = 0x4000_0080;
pub const SVERSION: u32 = 0x4000_0081;
pub const SIEFP: u32 = 0x4000_0082;
pub const SIMP: u32 = 0x4000_0083;
pub const EOM: u32 = 0x4000_0084;
pub const SINT0: u32 = 0x4000_0090;
pub const CRASH_P0: u32 = 0x4000_0100;

pub const HVCALL_POST_MESSAGE: u64 = 0x5C;
pub const HVCALL_SIGNAL_EVENT: u64 = 0x5D;
pub const FAST: u64 = 1 << 16;

/// A Linux-style guest OS id (open source, Linux kernel 6.1).
pub const OS_ID: u64 = 0x8100_0006_0100_0000;

pub const ECHO_MESSAGE_CONNECTION: u32 = 0x7E57;
pub const ECHO_EVENT_CONNECTION: u32 = 0x7E58;
pub const ECHO_EVENT_FLAG: u32 = 5;
pub const SINT: u32 = 2;

/// A page-aligned page of guest memory (identity-mapped: its address is its GPA).
#[repr(C, align(4096))]
pub struct Page(UnsafeCell<[u8; 4096]>);
// SAFETY: pages are shared with the host by design; all access goes through raw pointers and
// atomics.
unsafe impl Sync for Page {}

impl Page {
    pub const fn new() -> Page {
        Page(UnsafeCell::new([0; 4096]))
    }

    pub fn gpa(&self) -> u64 {
        self.0.get() as u64
    }

    /// The 32-bit word at byte `offset` (4-aligned), as an atomic.
    pub fn word(&self, offset: usize) -> &AtomicU32 {
        let off = offset & 0xFFC;
        // SAFETY: inside the page, 4-aligned; AtomicU32 has u32's layout; the page lives forever.
        unsafe { &*((self.0.get() as *const u8).add(off) as *const AtomicU32) }
    }

    pub fn write(&self, offset: usize, bytes: &[u8]) {
        for (i, b) in bytes.iter().enumerate() {
            let at = (offset + i) & 0xFFF;
            // SAFETY: inside the page.
            unsafe { core::ptr::write_volatile((self.0.get() as *mut u8).add(at), *b) };
        }
    }

    pub fn read(&self, offset: usize) -> u8 {
        // SAFETY: inside the page.
        unsafe { core::ptr::read_volatile((self.0.get() as *const u8).add(offset & 0xFFF)) }
    }
}

pub static HYPERCALL_PAGE: Page = Page::new();
pub static INPUT_PAGE: Page = Page::new();
pub static SIMP_PAGE: Page = Page::new();
pub static SIEF_PAGE: Page = Page::new();

/// Calls the hypercall page. Returns RAX.
pub fn hypercall(control: u64, input: u64, output: u64) -> u64 {
    let status: u64;
    // SAFETY: the hypercall page holds host-provided code that may clobber RAX, RCX, RDX, R8–R11
    // and flags (the Hyper-V ABI), declared here; the red zone is disabled on this target.
    unsafe {
        asm!(
            "call {page}",
            page = in(reg) HYPERCALL_PAGE.gpa(),
            inout("rcx") control => _,
            inout("rdx") input => _,
            inout("r8") output => _,
            out("rax") status,
            out("r9") _,
            out("r10") _,
            out("r11") _,
        );
    }
    status
}

/// Enables the hypercall page (after setting the guest OS id).
pub fn enable_hypercalls() -> bool {
    wrmsr(GUEST_OS_ID, OS_ID);
    wrmsr(HYPERCALL, HYPERCALL_PAGE.gpa() | 1);
    rdmsr(HYPERCALL) & 1 == 1
}

/// Fills the HvPostMessage input block at `INPUT_PAGE + offset`.
pub fn post_input(offset: usize, connection: u32, message_type: u32, size: u32, payload: &[u8]) {
    let mut head = [0u8; 16];
    head[0..4].copy_from_slice(&connection.to_le_bytes());
    head[8..12].copy_from_slice(&message_type.to_le_bytes());
    head[12..16].copy_from_slice(&size.to_le_bytes());
    INPUT_PAGE.write(offset, &head);
    INPUT_PAGE.write(offset + 16, payload);
}

/// HvPostMessage of `payload` (type 1) to `connection`. Returns the status.
pub fn post_message(connection: u32, payload: &[u8]) -> u64 {
    post_input(0, connection, 1, payload.len() as u32, payload);
    hypercall(HVCALL_POST_MESSAGE, INPUT_PAGE.gpa(), 0) & 0xFFFF
}

/// Fast HvSignalEvent on `connection` with flag `flag`. Returns the status.
pub fn signal_event(connection: u32, flag: u16) -> u64 {
    hypercall(
        HVCALL_SIGNAL_EVENT | FAST,
        u64::from(connection) | u64::from(flag) << 32,
        0,
    ) & 0xFFFF
}

/// Enables SIMP, SIEFP, SINT2 (vector) and SCONTROL on this VP.
pub fn enable_synic(vector: u8) {
    wrmsr(SIMP, SIMP_PAGE.gpa() | 1);
    wrmsr(SIEFP, SIEF_PAGE.gpa() | 1);
    wrmsr(SINT0 + SINT, u64::from(vector));
    wrmsr(SCONTROL, 1);
}

/// A message taken from the SINT2 slot.
pub struct Message {
    pub message_type: u32,
    pub len: usize,
    pub payload: [u8; 240],
    pub pending: bool,
}

/// Takes the SINT2 message (as Linux does): copy, free the slot by compare-and-swap, then EOM if
/// the host flagged more.
pub fn take_message() -> Option<Message> {
    let base = SINT as usize * 256;
    let ty = SIMP_PAGE.word(base);
    let seen = ty.load(Ordering::Acquire);
    if seen == 0 {
        return None;
    }
    let head = SIMP_PAGE.word(base + 4).load(Ordering::Relaxed);
    let len = ((head & 0xFF) as usize).min(240);
    let mut payload = [0u8; 240];
    for (i, b) in payload.iter_mut().enumerate().take(len) {
        *b = SIMP_PAGE.read(base + 16 + i);
    }
    if ty
        .compare_exchange(seen, 0, Ordering::SeqCst, Ordering::SeqCst)
        .is_err()
    {
        return None;
    }
    let pending = SIMP_PAGE.word(base + 4).load(Ordering::SeqCst) & 0x100 != 0;
    if pending {
        wrmsr(EOM, 0);
    }
    Some(Message {
        message_type: seen,
        len,
        payload,
        pending,
    })
}

/// Test-and-clears event flag `flag` of SINT2.
pub fn take_event(flag: u32) -> bool {
    let w = SIEF_PAGE.word(SINT as usize * 256 + (flag as usize / 32) * 4);
    let bit = 1u32 << (flag % 32);
    w.fetch_and(!bit, Ordering::SeqCst) & bit != 0
}
