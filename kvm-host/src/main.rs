//! `kvm-host`: run partitions on KVM with Hyper-V enlightenments.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};

mod demo_cmd;
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
    /// Boot the bare-metal test guest, or Linux (bzImage, or vmlinux with --linux) with an initrd,
    /// a command line and VMBus disk / NIC.
    Run(RunArgs),
    /// The demo partition: the Rust test guest on VMBus with a SCSI disk (a dynamic VHD made in a
    /// temporary directory unless --disk is given) and a NIC on a virtual switch; prints what the
    /// guest found and did, with timings, the VMM's memory overhead, and a RESULT line.
    Demo(DemoArgs),
    /// Run a VSP (device) process; started by kvm-host itself for out-of-process devices.
    Vsp(VspArgs),
}

#[derive(clap::Args, Debug)]
struct VspArgs {
    #[command(subcommand)]
    kind: VspKind,
}

#[derive(Subcommand, Debug)]
enum VspKind {
    /// storvsp over the VSP socket inherited from the VMM (VMBUS_VSP_SOCKET_FD).
    Storage(VspStorageArgs),
    /// netvsp with the demo's virtual switch and host endpoint 10.0.0.1, over the VSP socket.
    Net(demo_cmd::VspNetArgs),
}

#[derive(clap::Args, Debug)]
struct VspStorageArgs {
    /// Disk image for LUN 0 (`.vhd` = VHD, anything else raw).
    #[arg(long)]
    disk: PathBuf,
}

#[derive(clap::Args, Debug)]
#[command(after_help = "\
Linux: `kvm-host run --kernel bzImage --initrd initramfs.cpio.gz --cmdline '...' --disk d.vhd --net`
boots a bzImage (entered at startup_64, code32_start + 0x200) or a vmlinux ELF (with --linux) through
the 64-bit boot protocol: zero page from the bzImage's setup header, command line, initrd below
initrd_addr_max, E820 around the MMIO hole, ACPI RSDP. --disk adds a VMBus SCSI controller, --net a
VMBus NIC on a virtual switch whose host endpoint 10.0.0.1 answers ARP and ping (give the guest
10.0.0.2/24). The console goes to stdout; the run ends at 'reboot: Power down', a kernel panic or
--timeout.")]
struct RunArgs {
    /// Image to boot: the bare-metal test guest (ELF), a Linux bzImage, or a Linux vmlinux (ELF,
    /// with --linux).
    #[arg(long)]
    kernel: PathBuf,
    /// Initial RAM disk for Linux (implies --linux).
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 128)]
    mem: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// Boot an ELF --kernel as Linux (a bzImage always is).
    #[arg(long)]
    linux: bool,
    /// Kernel command line (Linux). The default avoids instructions this host's KVM emulator
    /// cannot run (kvm-here.md).
    #[arg(
        long,
        default_value = "console=ttyS0 noxsave clearcpuid=cx16,smap,smep,umip,popcnt mitigations=off nokaslr tsc=reliable"
    )]
    cmdline: String,
    /// Linux: disk image (`.vhd` = VHD, else raw) for a VMBus SCSI controller, LUN 0.
    #[arg(long)]
    disk: Option<PathBuf>,
    /// Linux: run storvsp in a supervised VSP process instead of in process.
    #[arg(long, requires = "disk")]
    vsp_process: bool,
    /// Linux: a VMBus NIC on a virtual switch with a host endpoint at 10.0.0.1.
    #[arg(long)]
    net: bool,
    /// Value passed to a test guest in RCX (0 phase 1, 1 hostile, 2 triple fault; 3, VMBus, needs
    /// the devices `demo` sets up).
    #[arg(long, default_value_t = 0)]
    arg: u64,
    /// Stop after this many seconds (0 = never).
    #[arg(long, default_value_t = 0)]
    timeout: u64,
    /// Linux: guest time runs N times slower than host time (the Hyper-V TSC / LAPIC frequencies
    /// are reported N times higher), so the emulated guest is not swamped by its timer tick.
    #[arg(long, default_value_t = 1)]
    time_dilation: u32,
}

#[derive(clap::Args, Debug)]
#[command(after_help = "\
By default storvsp and netvsp each run in a supervised VSP process (`kvm-host vsp storage`,
`kvm-host vsp net`; the latter also holds the virtual switch and the host endpoint 10.0.0.1), and
the output names their pids. overhead_kib = VMM RSS - guest RAM touched + the VSP processes' private
memory (Private_Clean + Private_Dirty of /proc/<pid>/smaps_rollup), each the largest seen while
the guest ran.")]
struct DemoArgs {
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 64)]
    mem: u64,
    /// Disk image for the SCSI controller (`.vhd` = VHD, anything else raw). Default: a new
    /// dynamic VHD in a temporary directory, removed afterwards.
    #[arg(long)]
    disk: Option<PathBuf>,
    /// Size of the temporary VHD in MiB.
    #[arg(long, default_value_t = 64)]
    disk_size: u64,
    /// Run storvsp and netvsp (with its switch and host endpoint) in the VMM instead of in
    /// supervised VSP processes (`kvm-host vsp storage`, `kvm-host vsp net`, the default).
    #[arg(long)]
    in_process: bool,
    /// Accepted for compatibility: the VSPs run as processes by default.
    #[arg(long, hide = true, conflicts_with = "in_process")]
    vsp_process: bool,
    /// Use this test-guest ELF instead of building kvm-host/guest.
    #[arg(long)]
    guest: Option<PathBuf>,
    /// Stop the guest after this many seconds.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    /// Run the phase-1 scenario (Hyper-V CPUID, MSRs, hypercalls, SynIC) instead of VMBus.
    #[arg(long, conflicts_with = "hostile")]
    phase1: bool,
    /// Run the hostile-guest scenario instead of VMBus.
    #[arg(long)]
    hostile: bool,
    /// Print the guest's serial output as it runs.
    #[arg(long)]
    verbose: bool,
    /// Send every guest signal and device interrupt through the VMM instead of the in-kernel
    /// ioeventfd / irqfd paths (to compare exit counts and timings).
    #[arg(long)]
    slow_signals: bool,
}

/// Logs to stderr, filtered by `RUST_LOG` (`level` or `target=level,...`; default `warn`).
///
/// A `Targets` filter rather than `EnvFilter`: `EnvFilter` compiles its directives with the regex
/// engine at start-up, faulting regex code and tables into every VMM and VSP process (≈ 100 KiB of
/// the demo's per-partition RSS) for span-field filters the VMM never uses.
fn init_logging() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(
            |spec| match spec.parse::<tracing_subscriber::filter::Targets>() {
                Ok(t) => Some(t),
                Err(e) => {
                    eprintln!("kvm-host: ignoring RUST_LOG={spec:?}: {e}");
                    None
                }
            },
        )
        .unwrap_or_else(|| {
            tracing_subscriber::filter::Targets::new()
                .with_default(tracing::level_filters::LevelFilter::WARN)
        });
    tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .with(filter)
        .init();
}

fn main() -> ExitCode {
    init_logging();
    let cli = Cli::parse();
    if !matches!(cli.command, Cmd::Vsp(_))
        && let Err(e) = kvm_host::kvm_available()
    {
        eprintln!("kvm-host: cannot run partitions here: {e}");
        eprintln!(
            "kvm-host: needs a readable/writable /dev/kvm with IRQCHIP, PIT2, SIGNAL_MSI, IRQFD, X86_USER_SPACE_MSR and X86_MSR_FILTER"
        );
        if matches!(cli.command, Cmd::Demo(_)) {
            println!("RESULT demo ok=0 boot_ms=0 io_ok=0 net_ok=0 overhead_kib=0");
        }
        return ExitCode::from(2);
    }
    let result = match cli.command {
        Cmd::Run(a) => run(a),
        Cmd::Demo(a) if a.phase1 || a.hostile => demo_phase1(a),
        Cmd::Demo(a) => demo_cmd::demo(a),
        Cmd::Vsp(a) => vsp(a),
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
    let bz =
        kvm_host::linux_boot::detect(&a.kernel)? == kvm_host::linux_boot::KernelFormat::BzImage;
    if a.linux || bz || a.initrd.is_some() {
        return run_linux(a);
    }
    if a.disk.is_some() || a.net {
        bail!("--disk and --net are for Linux guests (the test guest's devices come with `demo`)");
    }
    let mut p = Partition::new(PartitionConfig {
        mem_bytes: mem_bytes(a.mem)?,
        vcpus: a.cpus,
        ..PartitionConfig::default()
    })?;
    p.load_test_guest(&a.kernel, a.arg)?;
    testguest::install_echo(p.synic())?;
    if a.arg == testguest::MODE_PHASE1 {
        testguest::queue_welcome(p.synic())?;
    }
    let timeout = (a.timeout > 0).then(|| Duration::from_secs(a.timeout));
    let report = p.run(timeout)?;
    eprintln!("kvm-host: partition stopped: {}", describe(&report));
    Ok(exit_code(&report.reason))
}

fn run_linux(a: RunArgs) -> Result<ExitCode> {
    use kvm_host::linux_guest::{self, DEFAULT_STOP_MARKERS, LinuxConfig};
    let storage = if a.vsp_process {
        kvm_host::demo::StorageHosting::Process {
            exe: std::env::current_exe().context("locating this executable for the VSP")?,
        }
    } else {
        kvm_host::demo::StorageHosting::InProcess
    };
    let cfg = LinuxConfig {
        kernel: a.kernel,
        initrd: a.initrd,
        cmdline: a.cmdline,
        mem_bytes: mem_bytes(a.mem)?,
        vcpus: a.cpus,
        disk: a.disk,
        storage,
        net: a.net,
        // No limit means a long one: Linux halts without telling the VMM.
        timeout: Duration::from_secs(if a.timeout > 0 { a.timeout } else { 86_400 }),
        echo_serial: true,
        stop_markers: DEFAULT_STOP_MARKERS.iter().map(|m| m.to_string()).collect(),
        time_dilation: a.time_dilation,
    };
    let o = linux_guest::run(&cfg)?;
    eprintln!(
        "kvm-host: {:?} kernel, entry {:#x}; set-up {} ms",
        o.kernel.format,
        o.kernel.image.entry,
        o.setup_time.as_millis()
    );
    if let Some(b) = &o.bus {
        eprintln!(
            "kvm-host: vmbus: {} messages from the guest, {} to it, {} refused; {} channel opens; host endpoint answered {} ARP, {} ping",
            b.messages_in, b.messages_out, b.refused, b.opens, o.peer_replies.0, o.peer_replies.1
        );
    }
    eprintln!("kvm-host: partition stopped: {}", describe(&o.run));
    Ok(match o.marker.as_deref() {
        Some(m) if m.contains("Power down") => ExitCode::SUCCESS,
        Some(_) => ExitCode::FAILURE,
        None => exit_code(&o.run.reason),
    })
}

fn guest_image(guest: Option<PathBuf>) -> Result<PathBuf> {
    match guest {
        Some(g) => Ok(g),
        None => {
            eprintln!("kvm-host demo: building the test guest (cargo, x86_64-unknown-none)...");
            Ok(testguest::build_guest(&testguest::default_target_dir())?)
        }
    }
}

fn vsp(a: VspArgs) -> Result<ExitCode> {
    match a.kind {
        VspKind::Storage(s) => {
            // SAFETY: called once, at the start of this process.
            let conn = unsafe { vmbus_core::oop::connection_from_env() }.with_context(|| {
                format!(
                    "no VSP socket: this command is started by kvm-host ({} unset or not a descriptor)",
                    vmbus_core::oop::SOCKET_FD_ENV
                )
            })?;
            let (disk, _) = kvm_host::devices::open_disk(&s.disk)?;
            let mut dev = kvm_host::devices::storvsp(disk)?;
            vmbus_core::oop::serve(&conn, &mut dev).context("serving the VMM")?;
            Ok(ExitCode::SUCCESS)
        }
        VspKind::Net(n) => demo_cmd::vsp_net(n),
    }
}

/// The phase-1 and hostile scenarios (no VMBus devices).
fn demo_phase1(a: DemoArgs) -> Result<ExitCode> {
    let guest = guest_image(a.guest)?;
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
