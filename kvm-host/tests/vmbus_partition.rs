//! The phase-2 test guest on VMBus in a real KVM partition: connect, offers, a SCSI disk (storvsp
//! in process or in a supervised VSP process, VHD or raw image), a NIC (netvsp on a virtual switch
//! with a host endpoint answering ARP and ping), teardown and UNLOAD. Skipped, with the reason,
//! when /dev/kvm is not usable.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use kvm_host::ExitReason;
use kvm_host::demo::{self, DemoConfig, DemoOutcome, NetworkHosting, StorageHosting};
use kvm_host::testguest;

/// One partition at a time: 2 cores, and KVM emulates every guest instruction.
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

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("kvm-host-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn boot(disk: &Path, storage: StorageHosting, vcpus: u32) -> DemoOutcome {
    boot_scenario(testguest::MODE_VMBUS, disk, storage, vcpus, true)
}

fn boot_scenario(
    scenario: u64,
    disk: &Path,
    storage: StorageHosting,
    vcpus: u32,
    fast_signals: bool,
) -> DemoOutcome {
    boot_hosted(
        scenario,
        disk,
        storage,
        NetworkHosting::InProcess,
        vcpus,
        fast_signals,
    )
}

fn boot_hosted(
    scenario: u64,
    disk: &Path,
    storage: StorageHosting,
    network: NetworkHosting,
    vcpus: u32,
    fast_signals: bool,
) -> DemoOutcome {
    let _one = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let o = demo::run(&DemoConfig {
        guest: guest(),
        scenario,
        mem_bytes: 64 << 20,
        vcpus,
        disk: disk.to_path_buf(),
        storage,
        network,
        timeout: Duration::from_secs(60),
        echo_serial: false,
        fast_signals,
    })
    .unwrap();
    eprintln!(
        "{} vCPU(s), storage {}: {:?} after {:.3} s guest time; bus {:?}; memory {:?}",
        vcpus,
        o.storage_hosting,
        o.run.reason,
        o.run.guest_time.as_secs_f64(),
        o.bus,
        o.memory
    );
    o
}

/// Every step of the scenario passed, in order, and the host saw what the guest reported; guest
/// signals took the in-kernel path.
fn check(o: &DemoOutcome) {
    let sub = check_steps(o);
    // Guest signals on open channels complete in the kernel (ioeventfd): every hypercall exit is
    // a control message, none is a ring signal. The VMM path took one exit per signal (> 5 here).
    assert_eq!(o.bus.kicks, 0, "signals reached the VMM: {:?}", o.bus);
    assert_eq!(
        o.run.hypercalls,
        o.bus.messages_in + o.bus.busy,
        "hypercall exits beyond the control messages: {:?} {:?}",
        o.run,
        o.bus
    );
    assert!(
        o.run.hypercalls < sub,
        "{} exits for {sub} requests",
        o.run.hypercalls
    );
    // storvsp's interrupts complete in the kernel too (irqfd, the device sets the event flag):
    // the bus thread forwards none of them (only in-process netvsp still goes through it).
    assert!(o.bus.irqfds >= 1, "{:?}", o.bus);
}

/// The checks of [`check`] that hold on either signalling path; returns the storvsc requests.
fn check_steps(o: &DemoOutcome) -> u64 {
    let t = &o.transcript;
    let mut expected: Vec<&str> = testguest::VMBUS_STEPS[..3].to_vec();
    expected.extend_from_slice(testguest::STORAGE_STEPS);
    expected.extend_from_slice(testguest::NET_STEPS);
    expected.push("vmbus-teardown");
    assert!(t.failed.is_empty(), "{:?}\n{}", t.failed, o.serial);
    let order: Vec<&str> = t.ok.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(order, expected, "\n{}", o.serial);
    assert!(t.done, "{}", o.serial);
    assert_eq!(o.run.reason, ExitReason::ExitPort(0), "{}", o.serial);
    assert!(o.ok() && o.io_ok() && o.net_ok() && o.bus_ok());
    assert!(o.run.guest_time < Duration::from_secs(60));

    assert!(
        t.detail("vmbus-connect")
            .unwrap()
            .starts_with("version 5.3")
    );
    assert!(t.detail("vmbus-offers").unwrap().starts_with("2 offer(s)"));
    let offers: Vec<&str> = o
        .serial
        .lines()
        .filter(|l| l.starts_with("offer "))
        .collect();
    assert_eq!(offers.len(), 2, "{offers:?}");
    assert!(
        offers[0].contains("class=scsi")
            && offers[0].contains("6b1f0d5e-3c2a-4e8f-9a7b-000000000001")
    );
    assert!(offers[1].contains("class=network") && offers[1].contains("conn=0x2002"));
    assert!(t.detail("storvsc-init").unwrap().contains("Win10"));
    assert!(t.detail("scsi-probe").unwrap().starts_with("1 LUN(s)"));
    assert!(
        t.detail("scsi-inquiry")
            .unwrap()
            .contains("vendor \"Msft\"")
    );
    assert!(
        t.detail("scsi-read-capacity")
            .unwrap()
            .contains("blocks of 512 bytes")
    );
    assert!(
        t.detail("disk-read-verify")
            .unwrap()
            .contains("pattern matches=true")
    );
    assert!(t.detail("scsi-probe").unwrap().starts_with("1 LUN(s)"));
    let bringup = t.detail("netvsc-bringup").unwrap();
    assert!(bringup.starts_with("NVSP 0x60001"), "{bringup}");
    assert!(
        bringup.contains("mac 00:15:5d:00:00:02") && bringup.contains("link up"),
        "{bringup}"
    );
    // The drivers' own counters: every request answered, nothing refused.
    let stor = o
        .serial
        .lines()
        .find(|l| l.starts_with("storvsc stats "))
        .unwrap();
    let (sub, done) = (field(stor, "submitted"), field(stor, "completed"));
    assert!(
        sub > 5 && sub == done && field(stor, "refused") == 0,
        "{stor}"
    );
    let net = o
        .serial
        .lines()
        .find(|l| l.starts_with("netvsc stats "))
        .unwrap();
    assert!(
        net.contains("tx_frames: 2,") && net.contains("rx_frames: 2,"),
        "{net}"
    );
    assert!(
        net.contains("bad_packets: 0,") && net.ends_with("refused=0"),
        "{net}"
    );
    assert!(t.detail("net-arp").unwrap().contains("02:00:00:00:00:01"));

    // The host's side of the same story.
    assert_eq!(o.peer_replies, (1, 1));
    assert_eq!((o.bus.opens, o.bus.closes, o.bus.open_failures), (2, 2, 0));
    assert_eq!(o.bus.refused, 0);
    assert_eq!(o.bus.messages_in, o.bus.messages_out, "{:?}", o.bus);
    assert!(o.memory.guest_mapped_kib > 0);
    assert!(o.memory.rss_kib > o.memory.guest_mapped_kib);
    sub
}

/// `name=<number>` in a stats line.
fn field(line: &str, name: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name}= in {line}"))
}

/// The pattern the guest wrote at LBA 2048 is on the disk (seed from the transcript).
fn check_disk(o: &DemoOutcome, disk: &Path) {
    let detail = o.transcript.detail("disk-write").unwrap();
    let seed: u8 = detail
        .split("(seed ")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .and_then(|s| s.parse().ok())
        .expect("seed in the disk-write detail");
    let want: Vec<u8> = (0..4096usize)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect();
    let (d, _) = kvm_host::devices::open_disk(disk).unwrap();
    let mut got = vec![0u8; 4096];
    d.read_at(2048 * 512, &mut got).unwrap();
    assert_eq!(got, want, "the guest's write is not on the disk");
}

#[test]
fn vmbus_guest_with_storvsp_in_process_on_a_dynamic_vhd() {
    if !kvm_or_skip("vmbus_guest_with_storvsp_in_process_on_a_dynamic_vhd") {
        return;
    }
    let dir = TempDir::new("vhd");
    let disk = dir.0.join("disk.vhd");
    kvm_host::devices::create_dynamic_vhd(&disk, 64 << 20).unwrap();
    let o = boot(&disk, StorageHosting::InProcess, 1);
    check(&o);
    assert_eq!(o.disk_kind, "VHD");
    // In process storvsp shares its flag target with the bus directly; netvsp in process keeps
    // the bus-thread path.
    assert_eq!(o.bus.irqfds, 1, "{:?}", o.bus);
    assert_eq!(o.storage_hosting, "in-process");
    assert_eq!(o.network_hosting, "in-process");
    assert!(o.vsps.is_empty(), "{:?}", o.vsps);
    assert_eq!(o.overhead_kib(), o.memory.overhead_kib());
    check_disk(&o, &disk);
}

#[test]
fn vmbus_guest_with_storvsp_in_a_vsp_process_on_a_raw_image() {
    if !kvm_or_skip("vmbus_guest_with_storvsp_in_a_vsp_process_on_a_raw_image") {
        return;
    }
    let dir = TempDir::new("raw");
    let disk = dir.0.join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_kvm-host"));
    let o = boot(&disk, StorageHosting::Process { exe }, 2);
    check(&o);
    assert_eq!(o.disk_kind, "raw");
    assert!(
        o.storage_hosting.starts_with("VSP process "),
        "{}",
        o.storage_hosting
    );
    assert_eq!(o.vsps.len(), 1, "{:?}", o.vsps);
    assert_eq!(o.vsps[0].name, "storage");
    assert!(o.vsps[0].rss_kib > 0);
    assert!(
        o.transcript
            .detail("scsi-read-capacity")
            .unwrap()
            .starts_with("65536 blocks of 512 bytes (32 MiB)")
    );
    check_disk(&o, &disk);
}

#[test]
fn vmbus_hostile_guest_is_refused_and_still_served() {
    if !kvm_or_skip("vmbus_hostile_guest_is_refused_and_still_served") {
        return;
    }
    let dir = TempDir::new("hostile");
    let disk = dir.0.join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let o = boot_scenario(
        testguest::MODE_VMBUS_HOSTILE,
        &disk,
        StorageHosting::InProcess,
        1,
        true,
    );
    eprintln!("{}", o.serial);
    let t = &o.transcript;
    let mut expected: Vec<&str> = testguest::VMBUS_STEPS[..3].to_vec();
    expected.extend_from_slice(testguest::VMBUS_HOSTILE_STEPS);
    let order: Vec<&str> = t.ok.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(order, expected, "\n{}", o.serial);
    assert!(t.failed.is_empty() && t.done, "{}", o.serial);
    assert_eq!(o.run.reason, ExitReason::ExitPort(0), "{}", o.serial);
    assert!(
        t.detail("reopen-after-corruption")
            .unwrap()
            .contains("(16384 blocks)"),
        "{}",
        o.serial
    );
    // Three junk messages, the bad GPADL, two bad opens (at least) were refused by the server;
    // the device saw two opens (corrupted, re-opened) and closed both (close, UNLOAD).
    assert!(o.bus.refused >= 6, "{:?}", o.bus);
    assert_eq!((o.bus.opens, o.bus.closes), (2, 2), "{:?}", o.bus);
    // The 200-signal flood on an open channel completed in the kernel (ioeventfd), the bogus
    // connection ids went to the VMM and were refused there (the guest checked the statuses).
    assert_eq!(o.bus.kicks, 0, "{:?}", o.bus);
}

#[test]
fn vmbus_guest_with_every_signal_through_the_vmm() {
    if !kvm_or_skip("vmbus_guest_with_every_signal_through_the_vmm") {
        return;
    }
    let dir = TempDir::new("slow");
    let disk = dir.0.join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let o = boot_scenario(
        testguest::MODE_VMBUS,
        &disk,
        StorageHosting::InProcess,
        1,
        false,
    );
    let sub = check_steps(&o);
    // The fallback path: one exit per guest signal, so the fast-path bound of `check` fails here,
    // and every device interrupt through the bus thread.
    assert!(o.bus.kicks >= sub, "{:?}", o.bus);
    assert!(o.bus.interrupts >= sub && o.bus.irqfds == 0, "{:?}", o.bus);
    assert!(
        o.run.hypercalls >= o.bus.messages_in + sub,
        "{:?} {:?}",
        o.run,
        o.bus
    );
}

/// The demo's default: storvsp and netvsp (with the switch and the host endpoint) each in a VSP
/// process that is a child of the VMM while the guest runs; the endpoint in the child answered
/// ARP and ping (its counters come back through the shared page), and the overhead figure counts
/// the children's private memory.
#[test]
fn vmbus_guest_with_both_vsps_in_processes() {
    if !kvm_or_skip("vmbus_guest_with_both_vsps_in_processes") {
        return;
    }
    let dir = TempDir::new("oop");
    let disk = dir.0.join("disk.vhd");
    kvm_host::devices::create_dynamic_vhd(&disk, 64 << 20).unwrap();
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_kvm-host"));
    let o = boot_hosted(
        testguest::MODE_VMBUS,
        &disk,
        StorageHosting::Process { exe: exe.clone() },
        NetworkHosting::Process { exe },
        1,
        true,
    );
    check(&o);
    // Both VSP processes set their channels' event flags and interrupt the guest through KVM
    // irqfds: no device interrupt goes through the bus thread (the old path forwarded one per
    // storvsc request and netvsc packet, > 40 here).
    assert_eq!(o.bus.irqfds, 2, "{:?}", o.bus);
    assert!(o.bus.interrupts <= 2, "{:?}", o.bus);
    assert!(o.io_ok() && o.net_ok());
    assert!(o.peer_replies.0 >= 1 && o.peer_replies.1 >= 1, "{o:?}");
    let names: Vec<&str> = o.vsps.iter().map(|v| v.name).collect();
    assert_eq!(names, ["storage", "network"]);
    for v in &o.vsps {
        assert_ne!(v.pid, std::process::id());
        assert!(
            v.child_while_running,
            "{v:?} was not our child while the guest ran"
        );
        assert!(v.private_kib > 0 && v.rss_kib > v.private_kib, "{v:?}");
    }
    assert_ne!(o.vsps[0].pid, o.vsps[1].pid);
    assert_eq!(o.storage_hosting, format!("VSP process {}", o.vsps[0].pid));
    assert_eq!(o.network_hosting, format!("VSP process {}", o.vsps[1].pid));
    assert_eq!(
        o.overhead_kib(),
        o.memory.overhead_kib() + o.vsps[0].private_kib + o.vsps[1].private_kib
    );
    // The supervisors reaped them when the demo ended.
    for v in &o.vsps {
        assert!(
            !Path::new(&format!("/proc/{}", v.pid)).exists()
                || kvm_host::rss::parent_pid(v.pid).ok() != Some(std::process::id()),
            "{v:?} outlived the demo"
        );
    }
    check_disk(&o, &disk);
}

/// Runs `kvm-host demo` with `args`; returns its stdout.
fn demo_cli(args: &[&str]) -> String {
    let _one = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kvm-host"))
        .arg("demo")
        .arg("--guest")
        .arg(guest())
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// `RESULT demo ok=1 ...` with every flag 1; returns overhead_kib.
fn check_result_line(text: &str) -> u64 {
    let line = text.lines().last().unwrap();
    assert!(line.starts_with("RESULT demo ok=1 boot_ms="), "{text}");
    assert_eq!(field(line, "io_ok"), 1, "{text}");
    assert_eq!(field(line, "net_ok"), 1, "{text}");
    assert!(field(line, "boot_ms") > 0, "{text}");
    field(line, "overhead_kib")
}

#[test]
fn demo_command_runs_both_vsps_as_processes_by_default() {
    if !kvm_or_skip("demo_command_runs_both_vsps_as_processes_by_default") {
        return;
    }
    let text = demo_cli(&[]);
    let overhead = check_result_line(&text);
    let devices = text.lines().find(|l| l.starts_with("devices:")).unwrap();
    assert!(
        devices.contains("storage VSP process ") && devices.contains("network VSP process "),
        "{devices}"
    );
    let sum = text
        .lines()
        .find(|l| l.starts_with("memory: overhead_kib "))
        .unwrap();
    assert!(sum.contains("VSP processes' private"), "{sum}");
    let stated: u64 = sum
        .strip_prefix("memory: overhead_kib ")
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert_eq!(stated, overhead, "{sum}");
    let vsps = text
        .lines()
        .find(|l| l.starts_with("memory: VSP processes "))
        .unwrap();
    assert!(
        vsps.contains("storage pid ") && vsps.contains("network pid "),
        "{vsps}"
    );
    assert!(!vsps.contains("not seen as a child"), "{vsps}");
}

#[test]
fn demo_command_in_process() {
    if !kvm_or_skip("demo_command_in_process") {
        return;
    }
    let text = demo_cli(&["--in-process"]);
    check_result_line(&text);
    let devices = text.lines().find(|l| l.starts_with("devices:")).unwrap();
    assert!(
        devices.contains("storage in-process") && devices.contains("network in-process"),
        "{devices}"
    );
    assert!(!text.contains("memory: VSP processes"), "{text}");
}
