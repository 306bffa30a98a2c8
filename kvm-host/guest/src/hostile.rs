//! Scenario 1: a guest that misuses every interface; the host must refuse cleanly and stay up.

use crate::arch::{self, gp, inb, mmio_read32, mmio_write32, outb, rdmsr, wrmsr};
use crate::check;
use crate::hv::{
    self, ECHO_MESSAGE_CONNECTION, HVCALL_POST_MESSAGE, HVCALL_SIGNAL_EVENT, INPUT_PAGE,
};

/// Far beyond any test partition's RAM (64 GiB), and the IOAPIC page in the MMIO hole.
const FAR_GPA: u64 = 0x10_0000_0000;
const HOLE_GPA: u64 = 0xFEC0_0000;

fn post_at(offset: u64) -> u64 {
    hv::hypercall(HVCALL_POST_MESSAGE, INPUT_PAGE.gpa() + offset, 0) & 0xFFFF
}

pub fn run() {
    let ro = gp(|| wrmsr(hv::VP_INDEX, 5))
        && gp(|| wrmsr(hv::SVERSION, 2))
        && gp(|| wrmsr(hv::TIME_REF_COUNT, 0));
    check(
        "msr-gp-readonly",
        ro,
        format_args!("VP_INDEX, SVERSION, TIME_REF_COUNT writes"),
    );

    let unknown = gp(|| {
        rdmsr(hv::VP_RUNTIME);
    }) && gp(|| {
        rdmsr(0x4000_00FF);
    }) && gp(|| wrmsr(hv::RESET, 1))
        && gp(|| {
            rdmsr(hv::CRASH_P0);
        });
    check(
        "msr-gp-unknown",
        unknown,
        format_args!("VP_RUNTIME, 0x400000FF, RESET, CRASH_P0"),
    );

    let reserved = gp(|| wrmsr(hv::SCONTROL, 2))
        && gp(|| wrmsr(hv::SIMP, hv::SIMP_PAGE.gpa() | 2 | 1))
        && gp(|| wrmsr(hv::HYPERCALL, hv::HYPERCALL_PAGE.gpa() | 4 | 1))
        && gp(|| wrmsr(hv::SINT0, 0x50 | 1 << 20));
    check(
        "msr-gp-reserved",
        reserved,
        format_args!("SCONTROL, SIMP, HYPERCALL, SINT0 reserved bits"),
    );

    let vec = gp(|| wrmsr(hv::SINT0 + 2, 0x05));
    let sint2 = rdmsr(hv::SINT0 + 2);
    check(
        "msr-gp-sint-vector",
        vec && sint2 == 0x10000,
        format_args!("SINT2 still 0x{sint2:x}"),
    );

    let simp = gp(|| wrmsr(hv::SIMP, FAR_GPA | 1)) && gp(|| wrmsr(hv::SIMP, HOLE_GPA | 1));
    let simp_val = rdmsr(hv::SIMP);
    check(
        "simp-outside-ram",
        simp && simp_val == 0,
        format_args!("SIMP still 0x{simp_val:x}"),
    );
    let siefp = gp(|| wrmsr(hv::SIEFP, FAR_GPA | 1)) && gp(|| wrmsr(hv::SIEFP, HOLE_GPA | 1));
    let siefp_val = rdmsr(hv::SIEFP);
    check(
        "siefp-outside-ram",
        siefp && siefp_val == 0,
        format_args!("SIEFP still 0x{siefp_val:x}"),
    );

    wrmsr(hv::GUEST_OS_ID, hv::OS_ID);
    let hc =
        gp(|| wrmsr(hv::HYPERCALL, 0xFEE0_0000 | 1)) && gp(|| wrmsr(hv::HYPERCALL, FAR_GPA | 1));
    let hc_val = rdmsr(hv::HYPERCALL);
    check(
        "hypercall-outside-ram",
        hc && hc_val == 0,
        format_args!("HYPERCALL still 0x{hc_val:x}"),
    );

    check(
        "hypercall-enable",
        hv::enable_hypercalls(),
        format_args!(""),
    );

    hv::post_input(0, ECHO_MESSAGE_CONNECTION, 1, 16, b"0123456789abcdef");
    hv::post_input(0xF08, ECHO_MESSAGE_CONNECTION, 1, 16, b"0123456789abcdef");
    let mis = post_at(4);
    check(
        "hypercall-misaligned",
        mis == 0x4,
        format_args!("status=0x{mis:x}"),
    );
    let straddle = post_at(0xF08);
    check(
        "hypercall-straddle",
        straddle == 0x3,
        format_args!("status=0x{straddle:x}"),
    );
    let hole = hv::hypercall(HVCALL_POST_MESSAGE, HOLE_GPA, 0) & 0xFFFF;
    let far = hv::hypercall(HVCALL_POST_MESSAGE, FAR_GPA, 0) & 0xFFFF;
    check(
        "hypercall-gpa-hole",
        hole == 0x3 && far == 0x3,
        format_args!("hole=0x{hole:x} far=0x{far:x}"),
    );

    hv::post_input(0, ECHO_MESSAGE_CONNECTION, 1, 241, &[]);
    let big = post_at(0);
    hv::post_input(0, ECHO_MESSAGE_CONNECTION, 1, 0, &[]);
    let empty = post_at(0);
    check(
        "hypercall-payload-size",
        big == 0x5 && empty == 0x5,
        format_args!("241 -> 0x{big:x}, 0 -> 0x{empty:x}"),
    );

    hv::post_input(0, ECHO_MESSAGE_CONNECTION, 0, 16, &[]);
    let t0 = post_at(0);
    hv::post_input(0, ECHO_MESSAGE_CONNECTION, 0x8000_0001, 16, &[]);
    let thv = post_at(0);
    check(
        "hypercall-message-type",
        t0 == 0x5 && thv == 0x5,
        format_args!("type 0 -> 0x{t0:x}, 0x80000001 -> 0x{thv:x}"),
    );

    hv::post_input(0, ECHO_MESSAGE_CONNECTION, 1, 16, b"0123456789abcdef");
    let rep = hv::hypercall(HVCALL_POST_MESSAGE | 3 << 32, INPUT_PAGE.gpa(), 0) & 0xFFFF;
    check(
        "hypercall-rep-count",
        rep == 0x3,
        format_args!("status=0x{rep:x}"),
    );
    let fast = hv::hypercall(HVCALL_POST_MESSAGE | hv::FAST, INPUT_PAGE.gpa(), 0) & 0xFFFF;
    check(
        "hypercall-fast-post",
        fast == 0x3,
        format_args!("status=0x{fast:x}"),
    );

    let flag = hv::hypercall(
        HVCALL_SIGNAL_EVENT | hv::FAST,
        u64::from(hv::ECHO_EVENT_CONNECTION) | 2048 << 32,
        0,
    ) & 0xFFFF;
    let conn = hv::signal_event(0x00AB_CDEF, 0);
    check(
        "signal-bad-flag",
        flag == 0x5 && conn == 0x12,
        format_args!("flag 2048 -> 0x{flag:x}, unknown port -> 0x{conn:x}"),
    );

    // Flood the echo port without consuming: one message fills the slot, the host queue fills,
    // then HV_STATUS_INSUFFICIENT_BUFFERS. Interrupts stay off; drain by polling with EOM.
    hv::enable_synic(arch::SINT_VECTOR);
    let mut accepted = 0u32;
    let mut last = 0;
    for _ in 0..200 {
        last = hv::post_message(ECHO_MESSAGE_CONNECTION, b"flood flood flood");
        if last != 0 {
            break;
        }
        accepted += 1;
    }
    let mut drained = 0u32;
    while hv::take_message().is_some() {
        drained += 1;
    }
    check(
        "post-flood",
        last == 0x13 && accepted > 1 && drained == accepted,
        format_args!("accepted={accepted} then 0x{last:x}, drained={drained}"),
    );

    // Stray port I/O and MMIO in the hole: ignored writes, all-ones reads.
    outb(0x1234, 0xAA);
    let port = inb(0x5678);
    mmio_write32(0xD000_0000, 0xDEAD_BEEF);
    let mmio = mmio_read32(0xD000_0000);
    check(
        "stray-io",
        port == 0xFF && mmio == 0xFFFF_FFFF,
        format_args!("in=0x{port:x} mmio=0x{mmio:x}"),
    );
}
