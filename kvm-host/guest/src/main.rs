//! kvm-host's bare-metal test guest.
//!
//! Entered in 64-bit mode on every VP with RDI = VP index, RDX = VP count, RCX = scenario (0 phase 1,
//! 1 hostile, 2 triple fault, 3 VMBus end to end, 4 VMBus hostile). VP 0
//! runs the scenario and reports each step on COM1 (`ok <step> …` / `FAIL <step> …`), then writes
//! the number of failures to the exit port. Other VPs record their VP index and halt.
//!
//! Kept small on purpose: this host's KVM emulates every instruction (≈ 2 M/s).
#![no_std]
#![no_main]

extern crate alloc;

mod arch;
mod bus;
mod chan;
mod frames;
mod hostile;
mod hv;
mod mem;
mod net;
mod phase1;
mod phase2;
mod storage;
mod vmbus_hostile;

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

const COM1: u16 = 0x3F8;

pub struct Console;

impl core::fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for b in s.bytes() {
            arch::outb(COM1, b);
        }
        Ok(())
    }
}

#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        let _ = <$crate::Console as core::fmt::Write>::write_fmt(
            &mut $crate::Console,
            format_args!("{}\n", format_args!($($arg)*)),
        );
    }};
}

static FAILURES: AtomicU32 = AtomicU32::new(0);

/// Reports one step.
pub fn check(step: &str, ok: bool, detail: core::fmt::Arguments<'_>) {
    if ok {
        println!("ok {step} {detail}");
    } else {
        FAILURES.fetch_add(1, Ordering::SeqCst);
        println!("FAIL {step} {detail}");
    }
}

/// APs that reached their known point, and the VP index each read from the VP_INDEX MSR.
pub static AP_COUNT: AtomicU64 = AtomicU64::new(0);
pub static AP_VP_INDEX: [AtomicU64; arch::MAX_CPUS as usize] =
    [const { AtomicU64::new(u64::MAX) }; arch::MAX_CPUS as usize];

#[unsafe(no_mangle)]
extern "C" fn guest_main(vp: u64, _zero_page: u64, vp_count: u64, mode: u64) -> ! {
    if vp != 0 {
        // APs: wait for the BSP's IDT (so an MSR #GP would be survivable), report, halt.
        while !phase1::IDT_READY.load(Ordering::Acquire) {
            core::hint::spin_loop();
        }
        arch::load_idt();
        let idx = arch::rdmsr(hv::VP_INDEX);
        if let Some(slot) = AP_VP_INDEX.get(vp as usize) {
            slot.store(idx, Ordering::SeqCst);
        }
        AP_COUNT.fetch_add(1, Ordering::SeqCst);
        arch::halt();
    }
    arch::init_idt();
    arch::load_idt();
    phase1::IDT_READY.store(true, Ordering::Release);
    println!("kvm-test-guest: vp 0 of {vp_count}, scenario {mode}");
    match mode {
        0 => phase1::run(vp_count),
        1 => hostile::run(),
        3 => phase2::run(),
        4 => vmbus_hostile::run(),
        2 => {
            println!("triple fault now");
            arch::load_null_idt();
            // SAFETY: deliberately raises #UD with no IDT: #GP, #DF, triple fault.
            unsafe { core::arch::asm!("ud2", options(nomem, nostack)) };
        }
        _ => check("scenario", false, format_args!("unknown scenario {mode}")),
    }
    let failures = FAILURES.load(Ordering::SeqCst);
    println!("done");
    arch::exit(failures.min(0x7F) as u8)
}

/// Called by the exception stubs for anything unexpected.
#[unsafe(no_mangle)]
extern "C" fn fatal_exception(vector: u64, rip: u64, error: u64) -> ! {
    println!("FAIL exception vector={vector} rip={rip:#x} error={error:#x}");
    arch::exit(0x80 | (vector as u8 & 0x1F))
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    println!("FAIL panic {info}");
    arch::exit(0xFE)
}
