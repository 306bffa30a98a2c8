//! Scenario 0: what a VMBus guest needs from the partition, step by step.

use core::sync::atomic::{AtomicBool, Ordering};

use crate::arch::{self, SINT_COUNT, SINT_VECTOR, cpuid, rdmsr, wrmsr};
use crate::hv::{self, ECHO_EVENT_CONNECTION, ECHO_EVENT_FLAG, ECHO_MESSAGE_CONNECTION};
use crate::{AP_COUNT, AP_VP_INDEX, check};

pub static IDT_READY: AtomicBool = AtomicBool::new(false);

const WELCOME: [&[u8]; 2] = [b"welcome 1 from the host", b"welcome 2 from the host"];
const PING: &[u8] = b"ping from the guest over HvPostMessage";

fn sig(r: [u32; 4]) -> [u8; 12] {
    let mut s = [0u8; 12];
    s[0..4].copy_from_slice(&r[1].to_le_bytes());
    s[4..8].copy_from_slice(&r[2].to_le_bytes());
    s[8..12].copy_from_slice(&r[3].to_le_bytes());
    s
}

fn text(b: &[u8]) -> &str {
    core::str::from_utf8(b).unwrap_or("<binary>")
}

pub fn run(vp_count: u64) {
    let l0 = cpuid(0x4000_0000);
    let s = sig(l0);
    check(
        "cpuid-hyperv",
        &s == b"Microsoft Hv" && l0[0] >= 0x4000_0005,
        format_args!("signature={:?} max=0x{:x}", text(&s), l0[0]),
    );
    let l1 = cpuid(1);
    let i1 = cpuid(0x4000_0001);
    let f3 = cpuid(0x4000_0003);
    let r4 = cpuid(0x4000_0004);
    let l5 = cpuid(0x4000_0005);
    let want = (1 << 2) | (1 << 5) | (1 << 6);
    check(
        "cpuid-features",
        l1[2] & (1 << 31) != 0
            && i1[0] == 0x3123_7648
            && f3[0] & want == want
            && f3[1] & (1 << 12) == 0
            && r4[0] & (1 << 9) != 0
            && u64::from(l5[0]) == vp_count,
        format_args!(
            "features=0x{:x} hints=0x{:x} max_vps={}",
            f3[0], r4[0], l5[0]
        ),
    );

    wrmsr(hv::GUEST_OS_ID, hv::OS_ID);
    let id = rdmsr(hv::GUEST_OS_ID);
    check("guest-os-id", id == hv::OS_ID, format_args!("0x{id:x}"));

    let vp = rdmsr(hv::VP_INDEX);
    check("vp-index", vp == 0, format_args!("{vp}"));

    let t1 = rdmsr(hv::TIME_REF_COUNT);
    let t2 = rdmsr(hv::TIME_REF_COUNT);
    let freq = f3[0] & (1 << 11) != 0;
    let (tsc, apic) = if freq {
        (rdmsr(hv::TSC_FREQUENCY), rdmsr(hv::APIC_FREQUENCY))
    } else {
        (0, 0)
    };
    check(
        "time-ref-count",
        t1 > 0 && t2 >= t1 && (!freq || (tsc > 0 && apic == 1_000_000_000)),
        format_args!("{t1} -> {t2} (100 ns), tsc {tsc} Hz, apic timer {apic} Hz"),
    );

    let on = hv::enable_hypercalls();
    check(
        "hypercall-enable",
        on,
        format_args!("page at 0x{:x}", hv::HYPERCALL_PAGE.gpa()),
    );

    let st = hv::post_message(0x12345, b"nobody listens here");
    let st2 = hv::signal_event(0x12345, 0);
    check(
        "hypercall-bad-connection",
        st == 0x12 && st2 == 0x12,
        format_args!("post=0x{st:x} signal=0x{st2:x}"),
    );
    let st = hv::hypercall(0x99, hv::INPUT_PAGE.gpa(), 0) & 0xFFFF;
    check(
        "hypercall-bad-code",
        st == 0x2,
        format_args!("status=0x{st:x}"),
    );

    // SynIC: the host queued two welcome messages before we started; they arrive once the LAPIC,
    // SIMP, SINT2 and SCONTROL are enabled. The first carries the pending flag (so we EOM).
    arch::enable_lapic();
    hv::enable_synic(SINT_VECTOR);
    let version = rdmsr(hv::SVERSION);
    check(
        "synic-enable",
        version == 1
            && rdmsr(hv::SCONTROL) == 1
            && rdmsr(hv::SINT0 + hv::SINT) == u64::from(SINT_VECTOR),
        format_args!("version={version} vector=0x{SINT_VECTOR:x}"),
    );
    let mut seen = 0;
    for (i, want) in WELCOME.iter().enumerate() {
        seen = arch::wait_sint(seen);
        let step = if i == 0 {
            "synic-welcome-1"
        } else {
            "synic-welcome-2"
        };
        match hv::take_message() {
            Some(m) => {
                let body = &m.payload[..m.len];
                check(
                    step,
                    m.message_type == 1 && body == *want && m.pending == (i == 0),
                    format_args!(
                        "type={} pending={} \"{}\"",
                        m.message_type,
                        m.pending,
                        text(body)
                    ),
                );
            }
            None => check(step, false, format_args!("interrupt but empty slot")),
        }
    }

    let st = hv::post_message(ECHO_MESSAGE_CONNECTION, PING);
    seen = arch::wait_sint(seen);
    match hv::take_message() {
        Some(m) => check(
            "synic-echo",
            st == 0 && &m.payload[..m.len] == PING,
            format_args!("status=0x{st:x} {} bytes back", m.len),
        ),
        None => check(
            "synic-echo",
            false,
            format_args!("status=0x{st:x}, no message"),
        ),
    }

    let st = hv::signal_event(ECHO_EVENT_CONNECTION, 0);
    arch::wait_sint(seen);
    let flagged = hv::take_event(ECHO_EVENT_FLAG);
    check(
        "synic-event",
        st == 0 && flagged,
        format_args!(
            "status=0x{st:x} flag {ECHO_EVENT_FLAG} set={flagged} interrupts={}",
            SINT_COUNT.load(Ordering::SeqCst)
        ),
    );

    // INT3 and FWAIT: the emulator cannot execute them; the VMM injects #BP / skips FWAIT.
    let before = arch::BP_COUNT.load(Ordering::SeqCst);
    // SAFETY: #BP is handled by isr_bp, which returns after the INT3; FWAIT has no FPU effect here.
    unsafe { core::arch::asm!("int3", ".byte 0x9b", options(nomem, nostack)) };
    let bp = arch::BP_COUNT.load(Ordering::SeqCst) - before;
    check(
        "emulator-quirks",
        bp == 1,
        format_args!("int3 -> #BP x{bp}, fwait skipped"),
    );

    if vp_count > 1 {
        let want = vp_count - 1;
        let mut spins = 0u64;
        while AP_COUNT.load(Ordering::SeqCst) < want && spins < 20_000_000 {
            core::hint::spin_loop();
            spins += 1;
        }
        let ups = AP_COUNT.load(Ordering::SeqCst);
        let indices_ok = (1..vp_count.min(crate::arch::MAX_CPUS))
            .all(|i| AP_VP_INDEX[i as usize].load(Ordering::SeqCst) == i);
        check(
            "aps",
            ups == want && indices_ok,
            format_args!("{ups} of {want} APs up, VP indices match={indices_ok}"),
        );
    }
}
