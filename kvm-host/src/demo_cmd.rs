//! `kvm-host demo`: the VMBus demo partition and its report.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use kvm_host::demo::{self, DemoConfig, DemoOutcome, NetworkHosting, StorageHosting};
use kvm_host::testguest;

use crate::{DemoArgs, describe, guest_image, mem_bytes};

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<TempDir> {
        let base = std::env::temp_dir();
        for n in 0..100u32 {
            let p = base.join(format!("kvm-host-demo-{}-{n}", std::process::id()));
            match std::fs::create_dir(&p) {
                Ok(()) => return Ok(TempDir(p)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e).with_context(|| format!("creating {}", p.display())),
            }
        }
        anyhow::bail!("no free temporary directory name under {}", base.display())
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

fn result_line(o: Option<&DemoOutcome>) -> String {
    match o {
        Some(o) => format!(
            "RESULT demo ok={} boot_ms={} io_ok={} net_ok={} overhead_kib={}",
            u8::from(o.ok()),
            ms(o.run.guest_time),
            u8::from(o.io_ok()),
            u8::from(o.net_ok()),
            o.overhead_kib()
        ),
        None => "RESULT demo ok=0 boot_ms=0 io_ok=0 net_ok=0 overhead_kib=0".to_string(),
    }
}

/// Options of `kvm-host vsp net`.
#[derive(clap::Args, Debug)]
pub struct VspNetArgs {
    /// Descriptor (inherited) of the page the host endpoint's counters are published in.
    #[arg(long)]
    stats_fd: Option<i32>,
    /// Do not install the steady-state seccomp allow-list.
    #[arg(long)]
    no_seccomp: bool,
}

/// `kvm-host vsp net`: netvsp, the switch and the host endpoint, served to the VMM.
pub fn vsp_net(a: VspNetArgs) -> Result<ExitCode> {
    // SAFETY: called once, at the start of this process.
    let conn = unsafe { vmbus_core::oop::connection_from_env() }.with_context(|| {
        format!(
            "no VSP socket: this command is started by kvm-host ({} unset or not a descriptor)",
            vmbus_core::oop::SOCKET_FD_ENV
        )
    })?;
    let stats = match a.stats_fd {
        // SAFETY: the VMM passed this descriptor to this process for the stats page only; it is
        // taken once, here.
        Some(fd) => Some(
            unsafe { kvm_host::netvsp_process::SharedPeerStats::from_raw_fd(fd) }
                .context("--stats-fd")?,
        ),
        None => None,
    };
    kvm_host::netvsp_process::serve(&conn, stats, !a.no_seccomp).context("serving the VMM")?;
    Ok(ExitCode::SUCCESS)
}

fn file_size(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

pub fn demo(a: DemoArgs) -> Result<ExitCode> {
    match run(&a) {
        Ok(o) => {
            println!("{}", result_line(Some(&o)));
            Ok(if o.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Err(e) => {
            println!("demo failed: {e:#}");
            println!("{}", result_line(None));
            Ok(ExitCode::FAILURE)
        }
    }
}

fn run(a: &DemoArgs) -> Result<DemoOutcome> {
    let guest = guest_image(a.guest.clone())?;
    let mut _temp = None;
    let disk = match &a.disk {
        Some(d) => d.clone(),
        None => {
            let dir = TempDir::new()?;
            let path = dir.0.join("demo.vhd");
            kvm_host::devices::create_dynamic_vhd(&path, a.disk_size << 20)?;
            println!(
                "disk: new dynamic VHD {} ({} MiB virtual, {} KiB file)",
                path.display(),
                a.disk_size,
                file_size(&path) / 1024
            );
            _temp = Some(dir);
            path
        }
    };
    let (storage, network) = if a.in_process {
        (StorageHosting::InProcess, NetworkHosting::InProcess)
    } else {
        let exe = std::env::current_exe().context("locating this executable for the VSPs")?;
        (
            StorageHosting::Process { exe: exe.clone() },
            NetworkHosting::Process { exe },
        )
    };
    let cfg = DemoConfig {
        guest: guest.clone(),
        scenario: testguest::MODE_VMBUS,
        mem_bytes: mem_bytes(a.mem)?,
        vcpus: a.cpus,
        disk: disk.clone(),
        storage,
        network,
        timeout: Duration::from_secs(a.timeout.max(1)),
        echo_serial: a.verbose,
        fast_signals: !a.slow_signals,
    };
    println!(
        "booting {} ({} vCPU(s), {} MiB) with a SCSI controller ({}) and a NIC on a virtual switch",
        guest.display(),
        a.cpus,
        a.mem,
        disk.display()
    );
    let o = demo::run(&cfg)?;
    report(&o, &disk);
    Ok(o)
}

fn report(o: &DemoOutcome, disk: &Path) {
    println!(
        "devices: storage {} on a {} disk; network {} (netvsp on switch port guest0, host endpoint 10.0.0.1 on host0)",
        o.storage_hosting, o.disk_kind, o.network_hosting
    );
    println!("guest:");
    for line in o.serial.lines() {
        if line.starts_with("offer ") || line.contains("stats ") {
            println!("  {line}");
        }
    }
    for (step, detail) in &o.transcript.ok {
        println!("  ok   {step:<20} {detail}");
    }
    for f in &o.transcript.failed {
        println!("  {f}");
    }
    let mut expected = testguest::VMBUS_STEPS.to_vec();
    expected.extend_from_slice(testguest::STORAGE_STEPS);
    expected.extend_from_slice(testguest::NET_STEPS);
    let missing = o.transcript.missing(&expected);
    if !missing.is_empty() {
        println!("  missing steps: {missing:?}");
    }
    println!(
        "vmbus: {} messages from the guest, {} to it, {} refused; {} guest signals, {} interrupts through the VMM ({} channel(s) on irqfds); {} channel opens, {} closes",
        o.bus.messages_in,
        o.bus.messages_out,
        o.bus.refused,
        o.bus.kicks,
        o.bus.interrupts,
        o.bus.irqfds,
        o.bus.opens,
        o.bus.closes
    );
    println!(
        "host endpoint: answered {} ARP request(s), {} echo request(s)",
        o.peer_replies.0, o.peer_replies.1
    );
    println!("partition: {}", describe(&o.run));
    println!(
        "timing: set-up {} ms (partition, devices, bus), guest run {} ms",
        ms(o.setup_time),
        ms(o.run.guest_time)
    );
    let m = &o.memory;
    println!(
        "memory: VMM RSS {} KiB = guest RAM mapped {} KiB + overhead {} KiB (goal <= 4096)",
        m.rss_kib,
        m.guest_mapped_kib,
        m.overhead_kib(),
    );
    println!(
        "memory: of the RSS {} KiB are private (anonymous) and {} KiB file pages (program and library text, shared); \
         RSS before the partition {} KiB, growth for the partition {} KiB; guest RAM touched {} KiB",
        m.anon_kib,
        m.file_kib,
        m.baseline_kib,
        m.partition_overhead_kib(),
        m.guest_touched_kib
    );
    if !o.vsps.is_empty() {
        let each: Vec<String> = o
            .vsps
            .iter()
            .map(|v| {
                format!(
                    "{} pid {}: private {} KiB (RSS {} KiB incl. shared text){}",
                    v.name,
                    v.pid,
                    v.private_kib,
                    v.rss_kib,
                    if v.child_while_running {
                        ""
                    } else {
                        " [not seen as a child while the guest ran]"
                    }
                )
            })
            .collect();
        println!(
            "memory: VSP processes {} KiB private: {}",
            o.vsp_private_kib(),
            each.join("; ")
        );
    }
    println!(
        "memory: overhead_kib {} = VMM overhead {} KiB + VSP processes' private {} KiB",
        o.overhead_kib(),
        m.overhead_kib(),
        o.vsp_private_kib()
    );
    println!("disk after the run: {} KiB file", file_size(disk) / 1024);
    if !o.ok() {
        println!("--- guest serial output ---\n{}---", o.serial);
    }
}
