#![allow(clippy::indexing_slicing)]

use super::hypercall::{HVCALL_POST_MESSAGE, HVCALL_SIGNAL_EVENT, HypercallInput};
use super::*;
use crate::synic::{HostInbox, HostPort, InterruptSink, PortKind, Sint};
use crate::testguest::{
    ECHO_EVENT_CONNECTION, ECHO_EVENT_FLAG, ECHO_MESSAGE_CONNECTION, install_echo,
};
use vmbus_core::synic::EventFlags;

struct NoIrq;
impl InterruptSink for NoIrq {
    fn raise(&self, _: u32, _: u8) {}
}

const RAM: u64 = 2 << 20;
const INPUT: u64 = 0x20_000;
const SIMP: u64 = 0x30_000;
const SIEFP: u64 = 0x31_000;

fn partition(vps: u32, depth: usize) -> HvPartition {
    let ram = Arc::new(GuestRam::new(RAM).unwrap());
    let synic = Arc::new(Synic::new(ram.clone(), vps, Arc::new(NoIrq), depth));
    HvPartition::new(ram, synic, 2_000_000_000)
}

fn post_input(hv: &HvPartition, gpa: u64, connection: u32, ty: u32, size: u32, payload: &[u8]) {
    let mut b = vec![0u8; 16];
    b[0..4].copy_from_slice(&connection.to_le_bytes());
    b[8..12].copy_from_slice(&ty.to_le_bytes());
    b[12..16].copy_from_slice(&size.to_le_bytes());
    b.extend_from_slice(payload);
    hv.ram().write(gpa, &b).unwrap();
}

fn call(hv: &HvPartition, control: u64, input: u64) -> u64 {
    hv.hypercall(
        0,
        HypercallInput {
            control,
            input,
            output: 0,
        },
    )
}

#[test]
fn guest_os_id_gates_the_hypercall_page_which_holds_the_trap_stub() {
    let hv = partition(1, 8);
    hv.write_msr(0, msr::HYPERCALL, 0x5000 | 1).unwrap();
    assert_eq!(
        hv.read_msr(0, msr::HYPERCALL),
        Ok(0x5000),
        "no guest OS id yet: enable ignored"
    );
    hv.write_msr(0, msr::GUEST_OS_ID, 0x8100_0000_0000_0000)
        .unwrap();
    assert_eq!(hv.read_msr(0, msr::GUEST_OS_ID), Ok(0x8100_0000_0000_0000));
    hv.write_msr(0, msr::HYPERCALL, 0x5000 | 1).unwrap();
    assert_eq!(hv.read_msr(0, msr::HYPERCALL), Ok(0x5001));
    assert!(hv.hypercall_enabled());
    let stub = hypercall_page_code();
    let mut code = vec![0u8; stub.len() + 1];
    hv.ram().read(0x5000, &mut code).unwrap();
    assert_eq!(&code[..stub.len()], &stub[..]);
    assert_eq!(&code[..3], &[0x49, 0x89, 0xD3], "mov r11, rdx");
    assert_eq!(code[stub.len()], 0xCC, "rest of the page is int3");
    assert!(matches!(
        hv.write_msr(0, msr::HYPERCALL, 0x6000 | 4 | 1),
        Err(MsrError::Reserved { .. })
    ));
    assert!(matches!(
        hv.write_msr(0, msr::HYPERCALL, RAM | 1),
        Err(MsrError::OutsideRam { .. })
    ));
    // Locked: later writes are ignored.
    hv.write_msr(0, msr::HYPERCALL, 0x5000 | 3).unwrap();
    hv.write_msr(0, msr::HYPERCALL, 0).unwrap();
    assert_eq!(hv.read_msr(0, msr::HYPERCALL), Ok(0x5003));
}

#[test]
fn read_only_unknown_and_time_msrs() {
    let hv = partition(4, 8);
    assert_eq!(hv.read_msr(3, msr::VP_INDEX), Ok(3));
    assert_eq!(
        hv.write_msr(0, msr::VP_INDEX, 1),
        Err(MsrError::ReadOnly(msr::VP_INDEX))
    );
    assert_eq!(
        hv.read_msr(0, msr::VP_RUNTIME),
        Err(MsrError::Unknown(msr::VP_RUNTIME))
    );
    assert_eq!(
        hv.read_msr(0, 0x4000_00FF),
        Err(MsrError::Unknown(0x4000_00FF))
    );
    assert_eq!(
        hv.write_msr(0, msr::RESET, 1),
        Err(MsrError::Unknown(msr::RESET))
    );
    let t0 = hv.read_msr(0, msr::TIME_REF_COUNT).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(2));
    let t1 = hv.read_msr(1, msr::TIME_REF_COUNT).unwrap();
    assert!(t1 >= t0 + 10_000, "100 ns units: {t0} -> {t1}");
    assert_eq!(hv.read_msr(0, msr::TSC_FREQUENCY), Ok(2_000_000_000));
    assert_eq!(hv.read_msr(0, msr::APIC_FREQUENCY), Ok(1_000_000_000));
    // Linux touches these even without advertising them: they must not #GP.
    hv.write_msr(2, msr::VP_ASSIST_PAGE, 0x7000 | 1).unwrap();
    assert_eq!(hv.read_msr(2, msr::VP_ASSIST_PAGE), Ok(0x7001));
    assert_eq!(hv.read_msr(1, msr::VP_ASSIST_PAGE), Ok(0));
    hv.ram().write(0x8000, &[0xFF; 32]).unwrap();
    hv.write_msr(0, msr::REFERENCE_TSC, 0x8000 | 1).unwrap();
    let mut seq = [0xFFu8; 4];
    hv.ram().read(0x8000, &mut seq).unwrap();
    assert_eq!(seq, [0; 4], "TSC page sequence 0 = invalid");
    assert!(hv.write_msr(0, msr::REFERENCE_TSC, RAM | 1).is_err());
    hv.write_msr(0, msr::TSC_INVARIANT_CONTROL, 1).unwrap();
    assert!(hv.write_msr(0, msr::TSC_INVARIANT_CONTROL, 2).is_err());
}

#[test]
fn hypercalls_without_a_handler_see_unknown_connections() {
    let hv = partition(1, 8);
    post_input(&hv, INPUT, 1, 1, 16, &[0; 16]);
    assert_eq!(call(&hv, u64::from(HVCALL_POST_MESSAGE), INPUT), 0x12);
    assert_eq!(
        call(
            &hv,
            u64::from(HVCALL_SIGNAL_EVENT) | hypercall::CONTROL_FAST,
            1
        ),
        0x12
    );
}

#[test]
fn malformed_hypercalls_get_the_documented_statuses() {
    let hv = partition(1, 8);
    install_echo(hv.synic()).unwrap();
    let post = u64::from(HVCALL_POST_MESSAGE);
    post_input(&hv, INPUT, ECHO_MESSAGE_CONNECTION, 1, 16, &[7; 16]);
    assert_eq!(call(&hv, post, INPUT), 0, "valid post");
    assert_eq!(call(&hv, 0x99, INPUT), 0x2, "unknown call code");
    assert_eq!(call(&hv, post, INPUT + 4), 0x4, "misaligned input");
    assert_eq!(
        call(&hv, post, INPUT + 0xF08),
        0x3,
        "input straddles a page"
    );
    assert_eq!(call(&hv, post, RAM), 0x3, "input outside RAM");
    assert_eq!(call(&hv, post, 0xFEC0_0000), 0x3, "input in the MMIO hole");
    assert_eq!(call(&hv, post, !7u64), 0x3, "absurd GPA");
    assert_eq!(
        call(&hv, post | 1 << 32, INPUT),
        0x3,
        "rep count on a simple call"
    );
    assert_eq!(
        call(&hv, post | 1 << 48, INPUT),
        0x3,
        "rep start on a simple call"
    );
    assert_eq!(call(&hv, post | 1 << 17, INPUT), 0x3, "variable header");
    assert_eq!(call(&hv, post | 1 << 27, INPUT), 0x3, "reserved bits");
    assert_eq!(
        call(&hv, post | hypercall::CONTROL_FAST, INPUT),
        0x3,
        "fast post"
    );
    post_input(&hv, INPUT, ECHO_MESSAGE_CONNECTION, 1, 241, &[]);
    assert_eq!(call(&hv, post, INPUT), 0x5, "payload too large");
    post_input(&hv, INPUT, ECHO_MESSAGE_CONNECTION, 1, 7, &[]);
    assert_eq!(call(&hv, post, INPUT), 0x5, "payload too small");
    post_input(&hv, INPUT, ECHO_MESSAGE_CONNECTION, 0, 16, &[]);
    assert_eq!(call(&hv, post, INPUT), 0x5, "message type 0");
    post_input(&hv, INPUT, ECHO_MESSAGE_CONNECTION, 0x8000_0001, 16, &[]);
    assert_eq!(call(&hv, post, INPUT), 0x5, "hypervisor message type");
    post_input(&hv, INPUT, 0x12345, 1, 16, &[]);
    assert_eq!(call(&hv, post, INPUT), 0x12, "unknown connection id");
    // Bits 31:24 of the connection id are ignored.
    post_input(
        &hv,
        INPUT,
        ECHO_MESSAGE_CONNECTION | 0xFF00_0000,
        1,
        16,
        &[],
    );
    assert_eq!(call(&hv, post, INPUT), 0);

    let signal = u64::from(HVCALL_SIGNAL_EVENT);
    let fast = signal | hypercall::CONTROL_FAST;
    assert_eq!(call(&hv, fast, 0x777), 0x12, "unknown event port");
    assert_eq!(
        call(&hv, fast, u64::from(ECHO_EVENT_CONNECTION) | 2048 << 32),
        0x5,
        "flag >= 2048"
    );
    assert_eq!(
        call(&hv, fast, u64::from(ECHO_EVENT_CONNECTION) | 1 << 48),
        0x3,
        "reserved bits"
    );
    // SIEFP not enabled yet: the echo cannot deliver.
    assert_eq!(call(&hv, fast, u64::from(ECHO_EVENT_CONNECTION)), 0x18);
    hv.write_msr(0, msr::SIEFP, SIEFP | 1).unwrap();
    hv.write_msr(0, msr::SCONTROL, 1).unwrap();
    assert_eq!(call(&hv, fast, u64::from(ECHO_EVENT_CONNECTION)), 0);
    hv.ram()
        .write_u64(INPUT, u64::from(ECHO_EVENT_CONNECTION))
        .unwrap();
    assert_eq!(call(&hv, signal, INPUT), 0, "slow signal");
    assert_eq!(call(&hv, signal, INPUT + 2), 0x4, "slow signal misaligned");
    assert!(
        EventFlags::new(hv.ram().page_words(SIEFP).unwrap())
            .test_and_clear(Sint::VMBUS, ECHO_EVENT_FLAG)
    );
}

#[test]
fn a_guest_that_never_consumes_gets_insufficient_buffers() {
    let hv = partition(1, 4);
    install_echo(hv.synic()).unwrap();
    hv.write_msr(0, msr::SIMP, SIMP | 1).unwrap();
    hv.write_msr(0, msr::SINT0 + 2, 0x50).unwrap();
    hv.write_msr(0, msr::SCONTROL, 1).unwrap();
    post_input(&hv, INPUT, ECHO_MESSAGE_CONNECTION, 1, 8, &[1; 8]);
    let results: Vec<u64> = (0..8)
        .map(|_| call(&hv, u64::from(HVCALL_POST_MESSAGE), INPUT))
        .collect();
    // One in the slot, four queued, then the queue is full.
    assert_eq!(results, vec![0, 0, 0, 0, 0, 0x13, 0x13, 0x13]);
}

#[test]
fn registered_ports_without_a_handler_feed_the_host_inbox() {
    let hv = partition(2, 8);
    let synic = hv.synic();
    synic.register_port(1, PortKind::Message).unwrap();
    synic.register_port(0x2001, PortKind::Event).unwrap();
    assert!(
        synic.register_port(1, PortKind::Event).is_err(),
        "duplicate"
    );
    assert!(
        synic.register_port(0x100_0000, PortKind::Event).is_err(),
        "wider than 24 bits"
    );
    let post = u64::from(HVCALL_POST_MESSAGE);
    let fast = u64::from(HVCALL_SIGNAL_EVENT) | hypercall::CONTROL_FAST;
    post_input(&hv, INPUT, 1, 1, 12, b"hello vmbus!");
    assert_eq!(
        hv.hypercall(
            1,
            HypercallInput {
                control: post,
                input: INPUT,
                output: 0
            }
        ),
        0
    );
    // The kinds must match: an event port is not a message port and vice versa.
    post_input(&hv, INPUT + 0x100, 0x2001, 1, 8, &[0; 8]);
    assert_eq!(call(&hv, post, INPUT + 0x100), 0x12);
    assert_eq!(call(&hv, fast, 1), 0x12);
    assert_eq!(call(&hv, fast, 0x2001), 0);
    assert_eq!(call(&hv, fast, 0x2001), 0, "coalesces");
    assert!(
        synic
            .wait(Some(std::time::Duration::from_millis(10)))
            .unwrap()
    );
    let m = synic.recv_message().unwrap().unwrap();
    assert_eq!((m.connection_id, &*m.payload), (1, &b"hello vmbus!"[..]));
    assert!(synic.recv_message().unwrap().is_none());
    let mut ev = Vec::new();
    assert_eq!(synic.take_events(&mut |c| ev.push(c)).unwrap(), 1);
    assert_eq!(ev, vec![0x2001]);
    assert!(
        !synic
            .wait(Some(std::time::Duration::from_millis(10)))
            .unwrap()
    );
    // Bounded: the 65th unread post is refused with INSUFFICIENT_BUFFERS.
    let statuses: Vec<u64> = (0..65).map(|_| call(&hv, post, INPUT)).collect();
    assert!(statuses[..64].iter().all(|s| *s == 0));
    assert_eq!(statuses[64], 0x13);
    assert!(synic.unregister_port(1));
    assert_eq!(call(&hv, post, INPUT), 0x12);
}

#[test]
fn hypercall_stub_sends_only_plain_fast_signals_to_the_ioeventfd_port() {
    let code = hypercall_page_code();
    let slow = HYPERCALL_PORT.to_le_bytes();
    let fast = FAST_SIGNAL_PORT.to_le_bytes();
    // cmp rcx, 0x1005D: exactly a fast HvSignalEvent (no rep count, no variable header).
    assert_eq!(&code[3..10], &[0x48, 0x81, 0xF9, 0x5D, 0x00, 0x01, 0x00]);
    // Both conditional branches (control mismatch; flag number / reserved bits set) land on the
    // slow path's `mov edx, HYPERCALL_PORT; out dx, eax; ret`.
    for (jcc, rel) in [(10usize, 11usize), (19, 20)] {
        assert_eq!(code[jcc], 0x75);
        let target = rel + 1 + usize::from(code[rel]);
        assert_eq!(
            &code[target..target + 7],
            &[0xBA, slow[0], slow[1], 0, 0, 0xEF, 0xC3]
        );
    }
    // Fast path: the connection id (EAX) goes out to FAST_SIGNAL_PORT with R10 zeroed first, the
    // status comes back from R10 and RDX is restored from R11.
    let fast_out = [
        0x89, 0xD0, 0xBA, fast[0], fast[1], 0, 0, 0x45, 0x31, 0xD2, 0xEF, 0x44, 0x89, 0xD0, 0x4C,
        0x89, 0xDA, 0xC3,
    ];
    assert_eq!(&code[21..39], &fast_out);
    assert!(code.len() < 64);
}

#[test]
fn time_dilation_scales_the_reported_frequencies_and_the_reference_counter() {
    let plain = partition(1, 4);
    let slow = partition(1, 4).time_dilated(10);
    assert_eq!(slow.read_msr(0, msr::TSC_FREQUENCY), Ok(20_000_000_000));
    assert_eq!(slow.read_msr(0, msr::APIC_FREQUENCY), Ok(10_000_000_000));
    assert_eq!(plain.read_msr(0, msr::APIC_FREQUENCY), Ok(1_000_000_000));
    std::thread::sleep(std::time::Duration::from_millis(50));
    let (p, s) = (plain.time_ref_count(), slow.time_ref_count());
    // 50 ms = 500_000 units undilated; the dilated clock saw a tenth (both started together,
    // give or take the time between the two constructors).
    assert!(p >= 500_000, "{p}");
    assert!(s <= p / 10 + 1_000 && s >= 40_000, "{s} vs {p}");
    assert_eq!(
        partition(1, 4)
            .time_dilated(0)
            .read_msr(0, msr::TSC_FREQUENCY),
        Ok(2_000_000_000)
    );
}
