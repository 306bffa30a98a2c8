//! Storage VSP crash soak (issue 8): storvsc runs random write-then-verify I/O against storvsp in
//! a supervised child process while the child is killed with SIGKILL every 200 ms; then 4 KiB
//! random-read IOPS out of process ÷ in process, in the same run.
//!
//! ```text
//! cargo run --release -p tests --bin vsp-soak -- --quick
//! ```
//!
//! The VSP child is this executable again (`--vsp`): it serves storvsp through
//! `vmbus_core::oop::serve` on the socket the supervisor passes, and a restarted one resumes the
//! negotiated vstor session from the state the harness hands it. (The `vsp-storage serve` daemon
//! cannot be used for this: it has no way to resume a session, so after a restart the guest's I/O
//! would be refused until it re-initialised the controller.)
//!
//! Last line: `RESULT vspsoak kills=N lost=0 io_errors=0 reconnect_p99_ms=R oop_vs_inproc=Q`.

use anyhow::{Context, anyhow, bail};
use clap::Parser;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};
use tests::stor::path::{self, VspSetup};
use tests::stor::soak::{self, SoakConfig};
use tests::stor::{Timing, Workload, fill_file, fs_type, median};

#[derive(Parser)]
#[command(
    name = "vsp-soak",
    about = "storvsp kill soak and out-of-process overhead"
)]
struct Args {
    /// Short run (≤ 60 s): 25 kills, 3 IOPS rounds of 0.5 s.
    #[arg(long)]
    quick: bool,
    /// Internal: run as the VSP child (started by this program's supervisor).
    #[arg(long, hide = true)]
    vsp: bool,
    /// Kills (default 25 quick, 100 otherwise).
    #[arg(long)]
    kills: Option<u32>,
    /// Milliseconds between kills.
    #[arg(long, default_value_t = 200)]
    interval_ms: u64,
    /// Directory for the disk files (default /dev/shm).
    #[arg(long, default_value = "/dev/shm")]
    dir: PathBuf,
    /// Channels for the soak (1 = primary only).
    #[arg(long, default_value_t = 2)]
    queues: u16,
    /// Do not pin threads.
    #[arg(long)]
    no_pin: bool,
}

fn child_command() -> anyhow::Result<path::ChildCommand> {
    let exe = std::env::current_exe().context("locating this executable")?;
    Ok(Box::new(move || {
        let mut c = Command::new(&exe);
        c.arg("--vsp");
        c
    }))
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    if a.vsp {
        if !path::serve_child()? {
            bail!("--vsp: no supervisor socket (this mode is started by vsp-soak itself)");
        }
        return Ok(());
    }
    let t0 = Instant::now();
    let ncpu = tests::stor::cpus();
    let pin = !a.no_pin && ncpu >= 2;
    if pin {
        tests::stor::pin_current_thread(0);
    }
    let tmp = tempfile::Builder::new()
        .prefix("vsp-soak")
        .tempdir_in(&a.dir)
        .with_context(|| format!("temp dir in {}", a.dir.display()))?;
    println!(
        "vsp-soak: {} CPUs, files on {} ({}), pinning {}, load {}",
        ncpu,
        fs_type(tmp.path()),
        a.dir.display(),
        if pin {
            "guest CPU0 / storvsp CPU1"
        } else {
            "off"
        },
        loadavg()
    );

    // 1. The soak.
    let cfg = SoakConfig {
        kills: a.kills.unwrap_or(if a.quick { 25 } else { 100 }),
        kill_interval: Duration::from_millis(a.interval_ms),
        limit: Duration::from_secs(if a.quick { 35 } else { 300 }),
        ..SoakConfig::default()
    };
    let soak_disk = tmp.path().join("soak.raw");
    std::fs::File::create(&soak_disk)?.set_len(cfg.disk_bytes())?;
    let mut setup = VspSetup::new(&soak_disk);
    setup.queues = a.queues;
    setup.pin = pin.then_some(1);
    let mut h = path::start_child(&setup, 16384, child_command()?)?;
    eprintln!(
        "[{:5.1}s] soak: {} kills every {:?}, {} streams, {} channels",
        t0.elapsed().as_secs_f64(),
        cfg.kills,
        cfg.kill_interval,
        cfg.slots,
        h.channel_relids().len()
    );
    let rep = soak::run(&mut h, &soak_disk, &cfg)?;
    drop(h);
    println!(
        "soak: {:.1}s, kills {}, restarts {}, requests {} submitted / {} completed ({} writes, {} verified reads), resent {}, duplicates ignored {}",
        rep.elapsed.as_secs_f64(),
        rep.kills,
        rep.restarts,
        rep.submitted,
        rep.completed,
        rep.writes,
        rep.verified_reads,
        rep.resent,
        rep.duplicates
    );
    println!(
        "soak: lost {}, I/O errors {}, verify errors {}, file blocks differing from the model {}, unknown completions {}",
        rep.lost, rep.io_errors, rep.verify_errors, rep.file_mismatches, rep.unknown
    );
    println!(
        "soak: reconnect (SIGKILL -> first request served by the new VSP) p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms over {}; supervisor restart (noticed -> channels re-opened) p50 {:.1} ms, p99 {:.1} ms",
        rep.reconnect_p50(),
        rep.reconnect_p99(),
        tests::stor::percentile(&rep.reconnect_ms, 100.0),
        rep.reconnect_ms.len(),
        tests::stor::percentile(&rep.restart_ms, 50.0),
        tests::stor::percentile(&rep.restart_ms, 99.0),
    );
    for f in &rep.failures {
        println!("soak failure: {f}");
    }

    // 2. Out-of-process vs in-process 4 KiB random reads (QD32, one channel, no kills).
    let timing = Timing {
        interval: Duration::from_millis(if a.quick { 500 } else { 2000 }),
        rounds: if a.quick { 3 } else { 5 },
    };
    let iops_disk = tmp.path().join("iops.raw");
    fill_file(&iops_disk, 128 << 20, 3)?;
    let mut s1 = VspSetup::new(&iops_disk);
    s1.pin = pin.then_some(1);
    let mut inproc = path::start_in_process(&s1, 4096)?;
    let mut oop = path::start_child(&s1, 4096, child_command()?)?;
    let w = Workload::RandRead4k;
    let (bi, bo) = (path::buffers(&mut inproc, w)?, path::buffers(&mut oop, w)?);
    let (mut vi, mut vo, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..timing.rounds {
        let seed = 77 + r as u64;
        let x = path::run(&mut inproc, &bi, w, timing.interval, seed)?.iops();
        let y = path::run(&mut oop, &bo, w, timing.interval, seed)?.iops();
        vi.push(x);
        vo.push(y);
        ratios.push(y / x);
    }
    let q = median(&ratios);
    println!();
    println!(
        "{:<34} {:>12} {:>12}",
        "4k randread QD32 (tmpfs)", "IOPS", "rounds"
    );
    println!(
        "{:<34} {:>12.0} {:>12}",
        "storvsp in process",
        median(&vi),
        fmt_list(&vi)
    );
    println!(
        "{:<34} {:>12.0} {:>12}",
        "storvsp child process (oop)",
        median(&vo),
        fmt_list(&vo)
    );
    println!(
        "{:<34} {:>12.2} {:>12}",
        "oop / in-process (median of pairs)",
        q,
        fmt_list(&ratios)
    );
    drop((inproc, oop));
    println!(
        "elapsed {:.1}s, load after {}",
        t0.elapsed().as_secs_f64(),
        loadavg()
    );
    let verdict = if rep.clean() && rep.kills >= 20 {
        "ok"
    } else {
        "FAILED"
    };
    println!(
        "RESULT vspsoak kills={} lost={} io_errors={} reconnect_p99_ms={:.1} oop_vs_inproc={q:.2} verify_errors={} reconnect_p50_ms={:.1} {verdict}",
        rep.kills,
        rep.lost,
        rep.io_errors,
        rep.reconnect_p99(),
        rep.verify_errors + rep.file_mismatches,
        rep.reconnect_p50(),
    );
    if verdict != "ok" {
        return Err(anyhow!("soak failed"));
    }
    Ok(())
}

fn fmt_list(v: &[f64]) -> String {
    v.iter()
        .map(|x| {
            if *x < 10.0 {
                format!("{x:.2}")
            } else {
                format!("{x:.0}")
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}
