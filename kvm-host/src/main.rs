//! `kvm-host`: run partitions on KVM with Hyper-V enlightenments.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use kvm_host::serial::SerialSink;
use kvm_host::testguest::{self, Transcript};
use kvm_host::{ExitReason, Partition, PartitionConfig, RunReport};

#[derive(Parser, Debug)]
#[command(
    name = "kvm-host",
    version,
    about = "VMBus / Hyper-V synthetic I/O partitions on KVM"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Boot an ELF image: the bare-metal test guest (default) or a Linux vmlinux (--linux).
    Run(RunArgs),
    /// Build and boot the Rust test guest and report what it did (phase 1: Hyper-V CPUID, MSRs,
    /// hypercalls, SynIC messages and events, multi-vCPU start/stop).
    Demo(DemoArgs),
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// ELF image to boot.
    #[arg(long)]
    kernel: PathBuf,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 128)]
    mem: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// Linux 64-bit boot protocol (zero page, command line; APs wait for INIT/SIPI).
    #[arg(long)]
    linux: bool,
    /// Kernel command line (with --linux).
    #[arg(
        long,
        default_value = "console=ttyS0 noxsave clearcpuid=cx16,smap,smep,umip,popcnt mitigations=off"
    )]
    cmdline: String,
    /// Value passed to a test guest in RCX (0 phase 1, 1 hostile, 2 triple fault).
    #[arg(long, default_value_t = 0)]
    arg: u64,
    /// Stop after this many seconds (0 = never).
    #[arg(long, default_value_t = 0)]
    timeout: u64,
}

#[derive(clap::Args, Debug)]
struct DemoArgs {
    /// Number of vCPUs.
    #[arg(long, default_value_t = 2)]
    cpus: u32,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 64)]
    mem: u64,
    /// Use this test-guest ELF instead of building kvm-host/guest.
    #[arg(long)]
    guest: Option<PathBuf>,
    /// Run the hostile-guest scenario instead of phase 1.
    #[arg(long)]
    hostile: bool,
    /// Print the guest's serial output as it runs.
    #[arg(long)]
    verbose: bool,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Err(e) = kvm_host::kvm_available() {
        eprintln!("kvm-host: cannot run partitions here: {e}");
        eprintln!(
            "kvm-host: needs a readable/writable /dev/kvm with IRQCHIP, PIT2, SIGNAL_MSI, IRQFD, X86_USER_SPACE_MSR and X86_MSR_FILTER"
        );
        return ExitCode::from(2);
    }
    let result = match cli.command {
        Cmd::Run(a) => run(a),
        Cmd::Demo(a) => demo(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kvm-host: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn mem_bytes(mib: u64) -> Result<u64> {
    mib.checked_mul(1 << 20)
        .filter(|b| *b >= 16 << 20)
        .context("--mem must be at least 16 MiB")
}

fn describe(r: &RunReport) -> String {
    format!(
        "{:?} after {:.2} s guest time ({:.2} s total); exits: {} I/O, {} MSR, {} hypercalls, {} MMIO, {} emulator fix-ups",
        r.reason,
        r.guest_time.as_secs_f64(),
        r.total_time.as_secs_f64(),
        r.io_exits,
        r.msr_exits,
        r.hypercalls,
        r.mmio_exits,
        r.emulation_fixups
    )
}

fn exit_code(reason: &ExitReason) -> ExitCode {
    match reason {
        ExitReason::ExitPort(s) => ExitCode::from(*s),
        _ => ExitCode::FAILURE,
    }
}

fn run(a: RunArgs) -> Result<ExitCode> {
    let mut p = Partition::new(PartitionConfig {
        mem_bytes: mem_bytes(a.mem)?,
        vcpus: a.cpus,
        ..PartitionConfig::default()
    })?;
    if a.linux {
        p.load_linux(&a.kernel, &a.cmdline)?;
    } else {
        p.load_test_guest(&a.kernel, a.arg)?;
        testguest::install_echo(p.synic())?;
        if a.arg == testguest::MODE_PHASE1 {
            testguest::queue_welcome(p.synic())?;
        }
    }
    let timeout = (a.timeout > 0).then(|| Duration::from_secs(a.timeout));
    let report = p.run(timeout)?;
    eprintln!("kvm-host: partition stopped: {}", describe(&report));
    Ok(exit_code(&report.reason))
}

fn demo(a: DemoArgs) -> Result<ExitCode> {
    let guest = match a.guest {
        Some(g) => g,
        None => {
            eprintln!("kvm-host demo: building the test guest (cargo, x86_64-unknown-none)...");
            testguest::build_guest(&testguest::default_target_dir())?
        }
    };
    let (mut sink, buffer) = SerialSink::buffered();
    sink.stdout = a.verbose;
    let mut p = Partition::new(PartitionConfig {
        mem_bytes: mem_bytes(a.mem)?,
        vcpus: a.cpus,
        serial: sink,
        ..PartitionConfig::default()
    })?;
    let mode = if a.hostile {
        testguest::MODE_HOSTILE
    } else {
        testguest::MODE_PHASE1
    };
    let img = p.load_test_guest(&guest, mode)?;
    testguest::install_echo(p.synic())?;
    if mode == testguest::MODE_PHASE1 {
        testguest::queue_welcome(p.synic())?;
    }
    println!(
        "booting {} ({} vCPU(s), {} MiB, entry {:#x})",
        guest.display(),
        a.cpus,
        a.mem,
        img.entry
    );
    let report = p.run(Some(Duration::from_secs(120)))?;
    let serial = String::from_utf8_lossy(
        &buffer
            .lock()
            .map_err(|_| anyhow::anyhow!("serial buffer poisoned"))?,
    )
    .into_owned();
    let t = Transcript::parse(&serial);
    let mut expected: Vec<&str> = if a.hostile {
        testguest::HOSTILE_STEPS.to_vec()
    } else {
        testguest::PHASE1_STEPS.to_vec()
    };
    if !a.hostile && a.cpus > 1 {
        expected.push("aps");
    }
    for (step, detail) in &t.ok {
        println!("  ok   {step:<26} {detail}");
    }
    for f in &t.failed {
        println!("  {f}");
    }
    let missing = t.missing(&expected);
    println!("partition: {}", describe(&report));
    if report.reason != ExitReason::ExitPort(0)
        || !missing.is_empty()
        || !t.failed.is_empty()
        || !t.done
    {
        if !a.verbose {
            println!("--- guest serial output ---\n{serial}---");
        }
        bail!("demo failed: missing steps {missing:?}");
    }
    println!(
        "demo passed: {} steps in {:.2} s",
        t.ok.len(),
        report.guest_time.as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}
