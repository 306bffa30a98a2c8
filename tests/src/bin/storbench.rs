//! Storage headline benchmark (issue 6): storvsc → VMBus ring → storvsp → a raw file, against
//! direct io_uring on the same file, in the same run, on tmpfs and on a disk file system, with
//! `qemu-img bench` on the same file for reference.
//!
//! ```text
//! cargo run --release -p tests --bin storbench -- --quick
//! ```
//!
//! Workloads: 4 KiB random reads at QD32, 1 MiB sequential reads and writes at QD8. Each is measured
//! in alternating short intervals (baseline then storvsc, storvsc then baseline, …); the ratio is
//! the median of the per-round ratios. The
//! guest thread (and the baseline loop) run on CPU 0, storvsp's threads on CPU 1 (`--no-pin` to
//! let the scheduler decide). The tmpfs file is buffered; the disk file is opened O_DIRECT on every
//! path (baseline, storvsp, `qemu-img -t none`) unless `--buffered-disk`.
//!
//! Last lines: `RESULT stor4k ratio_vs_direct=X` and `RESULT stor1m ratio_vs_direct=Y` (tmpfs;
//! 1 MiB = the lower of read and write).

use anyhow::{Context, anyhow};
use clap::Parser;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tests::stor::path::{self, VspSetup};
use tests::stor::qemu::{self, QemuResult};
use tests::stor::{
    Sample, Timing, Workload, cpu_by_role, direct, drop_cache, fill_file, fs_type, median,
    thread_times,
};

#[derive(Parser)]
#[command(
    name = "storbench",
    about = "storvsc/storvsp vs direct io_uring on the same file"
)]
struct Args {
    /// Short run (≤ 60 s): 256 MiB files, 5 rounds of 0.4 s per workload and path.
    #[arg(long)]
    quick: bool,
    /// Directory on tmpfs.
    #[arg(long, default_value = "/dev/shm")]
    tmpfs_dir: PathBuf,
    /// Directory on a disk file system (default: the directory of this executable).
    #[arg(long)]
    disk_dir: Option<PathBuf>,
    /// Skip the disk case.
    #[arg(long)]
    no_disk: bool,
    /// Disk case through the page cache instead of O_DIRECT.
    #[arg(long)]
    buffered_disk: bool,
    /// File size in MiB (default 256 quick, 1024 otherwise).
    #[arg(long)]
    size_mib: Option<u64>,
    /// Seconds per measured interval (default 0.4 quick, 2 otherwise).
    #[arg(long)]
    interval: Option<f64>,
    /// Alternating rounds per workload (default 5 quick, 7 otherwise).
    #[arg(long)]
    rounds: Option<usize>,
    /// Channels (1 = primary only).
    #[arg(long, default_value_t = 1)]
    queues: u16,
    /// Do not pin threads.
    #[arg(long)]
    no_pin: bool,
    /// CPU for storvsp's threads when pinning (the guest thread and the baseline use CPU 0).
    #[arg(long, default_value_t = 1)]
    vsp_cpu: usize,
    /// Skip qemu-img bench.
    #[arg(long)]
    no_qemu: bool,
    /// Only these workloads (comma-separated: 4k, 1mread, 1mwrite).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
}

struct Row {
    case: String,
    w: Workload,
    direct: Sample,
    ours: Sample,
    ratios: Vec<f64>,
    qemu: QemuResult,
    /// storvsc path: CPU µs per request by thread role.
    per_op: Vec<(&'static str, f64)>,
}

impl Row {
    fn ratio(&self) -> f64 {
        median(&self.ratios)
    }
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let t0 = Instant::now();
    let timing = Timing {
        interval: Duration::from_secs_f64(a.interval.unwrap_or(if a.quick { 0.4 } else { 2.0 })),
        rounds: a.rounds.unwrap_or(if a.quick { 5 } else { 7 }),
    };
    let size = a.size_mib.unwrap_or(if a.quick { 256 } else { 1024 }) << 20;
    let ncpu = tests::stor::cpus();
    let pin = !a.no_pin && ncpu >= 2;
    if pin {
        tests::stor::pin_current_thread(0);
    }
    let qemu_note = if a.no_qemu {
        Err("--no-qemu".to_string())
    } else {
        qemu::available()
    };
    println!(
        "storbench: {} CPUs, pinning {}, interval {:?} x {} rounds, file {} MiB, load {}",
        ncpu,
        if pin {
            format!("guest+baseline CPU0 / storvsp CPU{}", a.vsp_cpu)
        } else {
            "off".into()
        },
        timing.interval,
        timing.rounds,
        size >> 20,
        loadavg()
    );
    match &qemu_note {
        Ok(v) => println!("reference: {v}"),
        Err(e) => println!("reference: qemu-img bench skipped: {e}"),
    }

    let mut rows = Vec::new();
    let mut cases: Vec<(PathBuf, bool)> = vec![(a.tmpfs_dir.clone(), false)];
    if !a.no_disk {
        let dir = match &a.disk_dir {
            Some(d) => d.clone(),
            None => std::env::current_exe()?
                .parent()
                .map(Path::to_path_buf)
                .ok_or_else(|| anyhow!("no executable directory"))?,
        };
        cases.push((dir, !a.buffered_disk));
    }
    for (dir, odirect) in cases {
        let tmp = tempfile::Builder::new()
            .prefix("storbench")
            .tempdir_in(&dir)
            .with_context(|| format!("temp dir in {}", dir.display()))?;
        let file = tmp.path().join("disk.raw");
        let fs = fs_type(tmp.path());
        let case = format!(
            "{fs} ({}){}",
            dir.display(),
            if odirect { " O_DIRECT" } else { "" }
        );
        eprintln!(
            "[{:5.1}s] {case}: writing {} MiB",
            t0.elapsed().as_secs_f64(),
            size >> 20
        );
        fill_file(&file, size, 7)?;
        if odirect {
            drop_cache(&file);
        }
        let mut setup = VspSetup::new(&file);
        setup.direct = odirect;
        setup.queues = a.queues;
        setup.pin = pin.then_some(a.vsp_cpu);
        let mut h = path::start_in_process(&setup, 16384)?;
        let base = direct::open(&file, odirect, true)?;
        for w in Workload::ALL {
            let key = match w {
                Workload::RandRead4k => "4k",
                Workload::SeqRead1m => "1mread",
                Workload::SeqWrite1m => "1mwrite",
            };
            if !a.only.is_empty() && !a.only.iter().any(|o| o == key) {
                continue;
            }
            eprintln!("[{:5.1}s] {case}: {}", t0.elapsed().as_secs_f64(), w.name());
            let bufs = path::buffers(&mut h, w)?;
            let (mut d, mut o, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
            let mut roles: BTreeMap<&str, f64> = BTreeMap::new();
            let mut ops_total = 0u64;
            for r in 0..timing.rounds {
                let seed = 1000 + r as u64;
                // Alternate which path goes first: on a disk the second reader of the same
                // blocks may find them in a cache below (the host's).
                let ours_first = r % 2 == 1;
                let mut x = None;
                if !ours_first {
                    x = Some(direct::run(&base, w, timing.interval, seed)?);
                }
                let before = thread_times();
                let y = path::run(&mut h, &bufs, w, timing.interval, seed)?;
                for (role, secs) in cpu_by_role(&before, &thread_times()) {
                    *roles.entry(role).or_insert(0.0) += secs;
                }
                let x = match x {
                    Some(x) => x,
                    None => direct::run(&base, w, timing.interval, seed)?,
                };
                ops_total += y.ops;
                ratios.push(y.iops() / x.iops());
                d.push(x);
                o.push(y);
            }
            for b in bufs {
                h.ram().free(b);
            }
            let qemu = match &qemu_note {
                Ok(_) => {
                    let iops = median(&d.iter().map(Sample::iops).collect::<Vec<_>>());
                    let count = ((iops * timing.interval.as_secs_f64()) as u64).max(64);
                    qemu::bench(&file, w, count, odirect)
                }
                Err(e) => QemuResult::Skipped(e.clone()),
            };
            let per_op: Vec<(&str, f64)> = roles
                .iter()
                .map(|(r, s)| (*r, s * 1e6 / ops_total.max(1) as f64))
                .collect();
            rows.push(Row {
                per_op,
                case: case.clone(),
                w,
                direct: median_sample(&d),
                ours: median_sample(&o),
                ratios,
                qemu,
            });
        }
        let st = h.driver().stats();
        eprintln!(
            "[{:5.1}s] {case}: storvsc submitted {} completed {} duplicates {}",
            t0.elapsed().as_secs_f64(),
            st.submitted,
            st.completed,
            st.duplicates
        );
        drop(h);
    }

    print_table(&rows);
    println!(
        "elapsed {:.1}s, load after {}",
        t0.elapsed().as_secs_f64(),
        loadavg()
    );
    let tmpfs = |w: Workload| {
        rows.iter()
            .find(|r| r.w == w && r.case.starts_with(&fs_type(&a.tmpfs_dir)))
            .map_or(0.0, Row::ratio)
    };
    let r4k = tmpfs(Workload::RandRead4k);
    let (rr, rw) = (tmpfs(Workload::SeqRead1m), tmpfs(Workload::SeqWrite1m));
    println!(
        "RESULT stor4k ratio_vs_direct={r4k:.2} goal=0.90 {}",
        if r4k >= 0.9 { "met" } else { "missed" }
    );
    let r1m = rr.min(rw);
    println!(
        "RESULT stor1m ratio_vs_direct={r1m:.2} read={rr:.2} write={rw:.2} goal=0.95 {}",
        if r1m >= 0.95 { "met" } else { "missed" }
    );
    Ok(())
}

/// The sample with the median rate.
fn median_sample(v: &[Sample]) -> Sample {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.iops().total_cmp(&b.iops()));
    s.get(s.len() / 2).copied().unwrap_or_default()
}

fn rate(w: Workload, s: &Sample) -> String {
    match w {
        Workload::RandRead4k => format!("{:>8.0} IOPS", s.iops()),
        _ => format!("{:>7.0} MiB/s", s.mib_s()),
    }
}

fn print_table(rows: &[Row]) {
    println!();
    println!(
        "{:<40} {:<17} {:>14} {:>14} {:>6} {:>9} {:>13}  qemu-img bench (same file, sequential)",
        "file", "workload", "direct uring", "storvsc path", "ratio", "spread", "CPU us/IO d/s"
    );
    for r in rows {
        let lo = r.ratios.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = r.ratios.iter().copied().fold(0.0, f64::max);
        let q = match &r.qemu {
            QemuResult::Ran { sample, cache, aio } => {
                format!("{} (-t {cache} -i {aio})", rate(r.w, sample))
            }
            QemuResult::Skipped(why) => format!("skipped: {why}"),
        };
        println!(
            "{:<40} {:<17} {:>14} {:>14} {:>6.2} {:>9} {:>13}  {q}",
            r.case,
            r.w.name(),
            rate(r.w, &r.direct),
            rate(r.w, &r.ours),
            r.ratio(),
            format!("{lo:.2}-{hi:.2}"),
            format!(
                "{:.1}/{:.1}",
                r.direct.cpu_us_per_op(),
                r.ours.cpu_us_per_op()
            ),
        );
    }
    println!();
    println!("storvsc path, CPU us per request by thread (all rounds, drain included):");
    for r in rows {
        let parts: Vec<String> = r
            .per_op
            .iter()
            .filter(|(_, us)| *us >= 0.05)
            .map(|(role, us)| format!("{role} {us:.1}"))
            .collect();
        println!("  {:<40} {:<17} {}", r.case, r.w.name(), parts.join(", "));
    }
    println!();
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}
