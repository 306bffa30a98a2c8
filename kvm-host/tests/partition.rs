//! Boots the bare-metal test guest in real KVM partitions (skipped, with the reason, when /dev/kvm
//! is not usable).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use kvm_host::hyperv::msr;
use kvm_host::serial::SerialSink;
use kvm_host::testguest::{self, Transcript};
use kvm_host::{ExitReason, Partition, PartitionConfig, RunReport};

/// One partition at a time: the machine has 2 cores and KVM emulates every guest instruction.
static SERIAL: Mutex<()> = Mutex::new(());

fn kvm_or_skip(test: &str) -> bool {
    match kvm_host::kvm_available() {
        Ok(()) => true,
        Err(e) => {
            eprintln!("skipping {test}: {e}");
            false
        }
    }
}

fn guest() -> PathBuf {
    static GUEST: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    GUEST
        .get_or_init(|| {
            testguest::build_guest(&testguest::default_target_dir()).map_err(|e| e.to_string())
        })
        .clone()
        .expect("building the test guest (needs `rustup target add x86_64-unknown-none`)")
}

struct Run {
    report: RunReport,
    serial: String,
    transcript: Transcript,
}

fn boot(
    vcpus: u32,
    mode: u64,
    welcome: bool,
    timeout: Duration,
    inspect: impl FnOnce(&Partition),
) -> Run {
    let _one = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let (sink, buf) = SerialSink::buffered();
    let mut p = Partition::new(PartitionConfig {
        mem_bytes: 64 << 20,
        vcpus,
        serial: sink,
        ..PartitionConfig::default()
    })
    .unwrap();
    p.load_test_guest(&guest(), mode).unwrap();
    testguest::install_echo(p.synic()).unwrap();
    if welcome {
        testguest::queue_welcome(p.synic()).unwrap();
    }
    inspect(&p);
    let report = p.run(Some(timeout)).unwrap();
    let serial = String::from_utf8_lossy(&buf.lock().unwrap()).into_owned();
    eprintln!(
        "{vcpus} vCPU(s), scenario {mode}: {:?} in {:.3} s guest time, {:.3} s with teardown ({} I/O, {} MSR, {} hypercall exits)",
        report.reason,
        report.guest_time.as_secs_f64(),
        report.total_time.as_secs_f64(),
        report.io_exits,
        report.msr_exits,
        report.hypercalls
    );
    let transcript = Transcript::parse(&serial);
    Run {
        report,
        serial,
        transcript,
    }
}

fn phase1(vcpus: u32) {
    if !kvm_or_skip("phase1") {
        return;
    }
    let r = boot(
        vcpus,
        testguest::MODE_PHASE1,
        true,
        Duration::from_secs(60),
        |_| {},
    );
    let mut expected = testguest::PHASE1_STEPS.to_vec();
    if vcpus > 1 {
        expected.push("aps");
    }
    let t = &r.transcript;
    assert!(
        t.failed.is_empty(),
        "failed steps {:?}\n{}",
        t.failed,
        r.serial
    );
    assert_eq!(t.missing(&expected), Vec::<&str>::new(), "\n{}", r.serial);
    assert!(t.done, "{}", r.serial);
    assert_eq!(r.report.reason, ExitReason::ExitPort(0), "{}", r.serial);
    assert!(
        r.serial
            .starts_with(&format!("kvm-test-guest: vp 0 of {vcpus}, scenario 0\n"))
    );
    // Every step line, in order.
    let order: Vec<&str> = t.ok.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(order, expected);
    assert_eq!(
        t.detail("cpuid-hyperv"),
        Some("signature=\"Microsoft Hv\" max=0x40000005")
    );
    assert_eq!(
        t.detail("hypercall-bad-connection"),
        Some("post=0x12 signal=0x12")
    );
    assert!(
        t.detail("synic-welcome-1")
            .unwrap()
            .contains("pending=true")
    );
    if vcpus > 1 {
        assert_eq!(
            t.detail("aps"),
            Some(
                format!(
                    "{} of {} APs up, VP indices match=true",
                    vcpus - 1,
                    vcpus - 1
                )
                .as_str()
            )
        );
    }
    assert!(r.report.hypercalls >= 5);
    assert!(
        r.report.guest_time < Duration::from_secs(10),
        "guest time budget"
    );
}

#[test]
fn phase1_one_vcpu() {
    phase1(1);
}

#[test]
fn phase1_two_vcpus() {
    phase1(2);
}

#[test]
fn phase1_four_vcpus() {
    phase1(4);
}

#[test]
fn hostile_guest_is_refused_and_the_host_stays_alive() {
    if !kvm_or_skip("hostile") {
        return;
    }
    let mut hv = None;
    let r = boot(
        2,
        testguest::MODE_HOSTILE,
        false,
        Duration::from_secs(60),
        |p| {
            hv = Some(p.hv().clone());
        },
    );
    let t = &r.transcript;
    assert!(
        t.failed.is_empty(),
        "failed steps {:?}\n{}",
        t.failed,
        r.serial
    );
    assert_eq!(
        t.missing(testguest::HOSTILE_STEPS),
        Vec::<&str>::new(),
        "\n{}",
        r.serial
    );
    assert_eq!(r.report.reason, ExitReason::ExitPort(0));
    assert_eq!(
        t.detail("post-flood"),
        Some("accepted=65 then 0x13, drained=65")
    );
    // The refused writes left no trace in the host's state.
    let hv = hv.unwrap();
    assert_eq!(hv.read_msr(0, msr::SINT0), Ok(0x1_0000));
    assert_eq!(hv.synic().queued(0, kvm_host::synic::Sint::VMBUS), 0);
    assert_eq!(
        hv.read_msr(1, msr::SIMP),
        Ok(0),
        "VP 1 never enabled its SynIC"
    );
    // And the host still runs partitions.
    let again = boot(
        1,
        testguest::MODE_PHASE1,
        true,
        Duration::from_secs(60),
        |_| {},
    );
    assert_eq!(
        again.report.reason,
        ExitReason::ExitPort(0),
        "{}",
        again.serial
    );
}

#[test]
fn triple_fault_stops_the_partition_and_joins_every_vcpu() {
    if !kvm_or_skip("triple fault") {
        return;
    }
    let r = boot(
        4,
        testguest::MODE_TRIPLE_FAULT,
        false,
        Duration::from_secs(60),
        |_| {},
    );
    assert_eq!(
        r.report.reason,
        ExitReason::Shutdown { vp: 0 },
        "{}",
        r.serial
    );
    assert!(r.serial.contains("triple fault now"));
}

#[test]
fn timeout_stops_vcpus_halted_in_the_kernel() {
    if !kvm_or_skip("timeout") {
        return;
    }
    // Without the welcome messages the guest halts forever waiting for its first SynIC interrupt
    // (and its APs halt too): the VMM must still stop and join all of them.
    let r = boot(
        2,
        testguest::MODE_PHASE1,
        false,
        Duration::from_secs(2),
        |_| {},
    );
    assert_eq!(r.report.reason, ExitReason::Timeout);
    assert!(r.transcript.has("synic-enable"), "{}", r.serial);
    assert!(!r.transcript.has("synic-welcome-1"));
    assert!(
        r.report.total_time < Duration::from_secs(5),
        "teardown took {:?}",
        r.report.total_time
    );
}

#[test]
fn guest_image_avoids_instructions_the_emulator_cannot_run() {
    let g = guest();
    let Ok(out) = std::process::Command::new("objdump")
        .arg("-d")
        .arg(&g)
        .output()
    else {
        eprintln!("skipping: objdump not available");
        return;
    };
    let text = String::from_utf8_lossy(&out.stdout).to_lowercase();
    // Instruction lines are "addr:\tbytes\tmnemonic operands".
    let mnemonics: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split('\t').nth(2))
        .filter_map(|i| i.split_whitespace().next())
        .collect();
    assert!(mnemonics.len() > 100, "objdump output not understood");
    for bad in [
        "popcnt",
        "cmpxchg16b",
        "xsave",
        "xsaveopt",
        "xrstor",
        "clac",
        "stac",
    ] {
        assert!(!mnemonics.contains(&bad), "{bad} in the guest image");
    }
    // The one deliberate FWAIT (emulator work-around test).
    assert_eq!(mnemonics.iter().filter(|m| **m == "fwait").count(), 1);
}
