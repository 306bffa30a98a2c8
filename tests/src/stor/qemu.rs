//! `qemu-img bench` on the same file, for reference. Its access pattern is sequential (no random
//! mode), so its 4 KiB figure is 4 KiB *sequential* reads at the same depth.

use super::{Sample, Workload};
use std::path::Path;
use std::process::Command;
use std::time::Instant;

/// One `qemu-img bench` run, or why there is none.
#[derive(Clone, Debug)]
pub enum QemuResult {
    Ran {
        sample: Sample,
        /// Cache mode used (`none` = O_DIRECT, `writeback`).
        cache: &'static str,
        aio: &'static str,
    },
    Skipped(String),
}

/// Whether `qemu-img` is on the PATH.
pub fn available() -> Result<String, String> {
    match Command::new("qemu-img").arg("--version").output() {
        Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout)
            .lines()
            .next()
            .unwrap_or("qemu-img")
            .to_string()),
        Ok(o) => Err(format!("qemu-img --version failed: {}", o.status)),
        Err(e) => Err(format!("qemu-img not found ({e})")),
    }
}

/// `qemu-img bench -f raw -t <cache> -i io_uring -c <count> -d <depth> -s <block> [-w] <file>`;
/// tries `cache` first, then `writeback` (tmpfs may refuse O_DIRECT), then the default AIO engine.
pub fn bench(file: &Path, w: Workload, count: u64, direct: bool) -> QemuResult {
    let caches: &[&'static str] = if direct {
        &["none", "writeback"]
    } else {
        &["writeback"]
    };
    let mut last = String::new();
    for &cache in caches {
        for aio in ["io_uring", "threads"] {
            match run_once(file, w, count, cache, aio) {
                Ok(sample) => return QemuResult::Ran { sample, cache, aio },
                Err(e) => last = e,
            }
        }
    }
    QemuResult::Skipped(last)
}

fn run_once(
    file: &Path,
    w: Workload,
    count: u64,
    cache: &str,
    aio: &str,
) -> Result<Sample, String> {
    let mut c = Command::new("qemu-img");
    c.args(["bench", "-f", "raw", "-t", cache, "-i", aio])
        .args(["-c", &count.to_string()])
        .args(["-d", &w.depth().to_string()])
        .args(["-s", &w.block().to_string()]);
    if w.write() {
        c.arg("-w");
    }
    c.arg(file);
    let t = Instant::now();
    let out = c.output().map_err(|e| format!("qemu-img: {e}"))?;
    let wall = t.elapsed().as_secs_f64();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!(
            "qemu-img bench -t {cache} -i {aio}: {}",
            err.lines().last().unwrap_or("failed")
        ));
    }
    // "Run completed in 1.234 seconds."
    let secs = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("Run completed in ")
                .and_then(|r| r.split_whitespace().next())
                .and_then(|s| s.parse::<f64>().ok())
        })
        .unwrap_or(wall);
    Ok(Sample {
        ops: count,
        bytes: count * w.block(),
        secs,
        ..Sample::default()
    })
}
