//! Storage benchmark and soak helpers shared by `storbench`, `vsp-soak` and `tests/vsp_soak.rs`:
//! the workloads, a direct io_uring baseline ([`direct`]), the same workloads through the storvsc
//! harness ([`path`]), `qemu-img bench` for reference ([`qemu`]) and the VSP kill soak ([`soak`]).

pub mod direct;
pub mod path;
pub mod qemu;
pub mod soak;

use anyhow::{Context, bail};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

/// One benchmark workload.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Workload {
    /// 4 KiB reads at random 4 KiB-aligned offsets, 32 in flight.
    RandRead4k,
    /// 1 MiB sequential reads (wrapping at the end of the file).
    SeqRead1m,
    /// 1 MiB sequential writes (wrapping at the end of the file).
    SeqWrite1m,
}

impl Workload {
    pub const ALL: [Workload; 3] = [
        Workload::RandRead4k,
        Workload::SeqRead1m,
        Workload::SeqWrite1m,
    ];

    /// Bytes per request.
    pub fn block(self) -> u64 {
        match self {
            Workload::RandRead4k => 4096,
            Workload::SeqRead1m | Workload::SeqWrite1m => 1 << 20,
        }
    }

    /// Requests in flight.
    pub fn depth(self) -> usize {
        match self {
            Workload::RandRead4k => 32,
            Workload::SeqRead1m | Workload::SeqWrite1m => 8,
        }
    }

    pub fn write(self) -> bool {
        self == Workload::SeqWrite1m
    }

    pub fn name(self) -> &'static str {
        match self {
            Workload::RandRead4k => "4k randread QD32",
            Workload::SeqRead1m => "1M seqread QD8",
            Workload::SeqWrite1m => "1M seqwrite QD8",
        }
    }
}

/// Where the next request of a workload goes.
pub struct Offsets {
    block: u64,
    blocks: u64,
    next: u64,
    random: bool,
    rng: Rng,
}

impl Offsets {
    pub fn new(w: Workload, file_size: u64, seed: u64) -> Self {
        Offsets {
            block: w.block(),
            blocks: (file_size / w.block()).max(1),
            next: 0,
            random: w == Workload::RandRead4k,
            rng: Rng::new(seed),
        }
    }

    /// Byte offset of the next request.
    pub fn next_offset(&mut self) -> u64 {
        let b = if self.random {
            self.rng.below(self.blocks)
        } else {
            let b = self.next;
            self.next = (self.next + 1) % self.blocks;
            b
        };
        b * self.block
    }
}

/// A small xorshift generator (benchmarks need speed and repeatability, not quality).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform-enough in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// Completed requests over a measured interval.
#[derive(Copy, Clone, Debug, Default)]
pub struct Sample {
    pub ops: u64,
    pub bytes: u64,
    pub secs: f64,
    /// CPU time of this whole process (every thread, io_uring workers included) over the interval.
    pub cpu_secs: f64,
}

/// User + system CPU time of this process so far, in seconds.
pub fn process_cpu() -> f64 {
    // SAFETY: rusage is plain data filled by the kernel.
    let (rc, ru) = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        (libc::getrusage(libc::RUSAGE_SELF, &mut ru), ru)
    };
    if rc != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Measures an interval: call [`Meter::tick`] after each batch of completions.
pub struct Meter {
    start: std::time::Instant,
    cpu0: f64,
    interval: Duration,
    open: bool,
}

impl Meter {
    pub fn start(interval: Duration) -> Self {
        Meter {
            start: std::time::Instant::now(),
            cpu0: process_cpu(),
            interval,
            open: true,
        }
    }

    /// Whether completions still count.
    pub fn measuring(&self) -> bool {
        self.open
    }

    /// Updates `s` while the interval lasts; closes it (and takes the CPU time) once it is over.
    pub fn tick(&mut self, s: &mut Sample) {
        if !self.open {
            return;
        }
        s.secs = self.start.elapsed().as_secs_f64();
        if self.start.elapsed() >= self.interval {
            s.cpu_secs = process_cpu() - self.cpu0;
            self.open = false;
        }
    }

    /// Closes the interval now (a failure).
    pub fn close(&mut self) {
        self.open = false;
    }

    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
}

impl Sample {
    /// CPU microseconds per request (all threads of the process).
    pub fn cpu_us_per_op(&self) -> f64 {
        if self.ops > 0 {
            self.cpu_secs * 1e6 / self.ops as f64
        } else {
            0.0
        }
    }

    pub fn iops(&self) -> f64 {
        if self.secs > 0.0 {
            self.ops as f64 / self.secs
        } else {
            0.0
        }
    }

    pub fn mib_s(&self) -> f64 {
        if self.secs > 0.0 {
            self.bytes as f64 / self.secs / f64::from(1u32 << 20)
        } else {
            0.0
        }
    }
}

/// Median of `v` (0 when empty).
pub fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return 0.0;
    }
    s.sort_by(f64::total_cmp);
    let m = s.len() / 2;
    if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    }
}

/// Percentile `p` (0..=100) of `v`, nearest rank (0 when empty).
pub fn percentile(v: &[f64], p: f64) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return 0.0;
    }
    s.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}

/// Pins the calling thread to `cpu` (ignored, with a note, when the CPU is not available).
pub fn pin_current_thread(cpu: usize) -> bool {
    pin_thread(0, cpu)
}

/// Pins thread `tid` (0 = the calling thread) to `cpu`.
pub fn pin_thread(tid: libc::pid_t, cpu: usize) -> bool {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET only write inside it, and
    // sched_setaffinity reads `size_of::<cpu_set_t>()` bytes from a valid reference.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

/// Runs `f` with the calling thread pinned to `cpu`, then restores its previous mask: threads `f`
/// spawns (and the io_uring workers they create) start on `cpu`.
pub fn on_cpu<T>(cpu: Option<usize>, f: impl FnOnce() -> T) -> T {
    let Some(cpu) = cpu else {
        return f();
    };
    // SAFETY: cpu_set_t is plain data, filled by the kernel for the calling thread.
    let (rc, old) = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        let rc = libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set);
        (rc, set)
    };
    pin_current_thread(cpu);
    let r = f();
    if rc == 0 {
        // SAFETY: restores the mask read above for the calling thread.
        unsafe {
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &old);
        }
    }
    r
}

/// Pins every thread of this process whose name starts with `prefix` to `cpu`; returns how many.
pub fn pin_threads_named(prefix: &str, cpu: usize) -> usize {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    let mut n = 0;
    for e in dir.flatten() {
        let Some(tid) = e
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        if comm.trim_end().starts_with(prefix) && pin_thread(tid, cpu) {
            n += 1;
        }
    }
    n
}

/// CPU time per thread of this process (`/proc/self/task/*/schedstat`, ns), keyed by
/// `(tid, name)`.
pub fn thread_times() -> std::collections::BTreeMap<(i32, String), u64> {
    let mut m = std::collections::BTreeMap::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return m;
    };
    for e in dir.flatten() {
        let Some(tid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let name = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        let ns = std::fs::read_to_string(e.path().join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
            .unwrap_or(0);
        m.insert((tid, name.trim_end().to_string()), ns);
    }
    m
}

/// Where the CPU time between two [`thread_times`] snapshots went, by role: the calling
/// (guest/baseline) thread, storvsp's threads, io_uring workers of each, the rest.
pub fn cpu_by_role(
    before: &std::collections::BTreeMap<(i32, String), u64>,
    after: &std::collections::BTreeMap<(i32, String), u64>,
) -> std::collections::BTreeMap<&'static str, f64> {
    // SAFETY: gettid has no preconditions.
    let me = unsafe { libc::gettid() };
    let vsp_tids: Vec<i32> = after
        .keys()
        .filter(|(_, n)| n.starts_with("storvsp"))
        .map(|(t, _)| *t)
        .collect();
    let mut out = std::collections::BTreeMap::new();
    for ((tid, name), ns) in after {
        let d = ns.saturating_sub(before.get(&(*tid, name.clone())).copied().unwrap_or(0));
        let parent = name
            .strip_prefix("iou-wrk-")
            .and_then(|p| p.parse::<i32>().ok());
        let role = if *tid == me {
            "guest thread"
        } else if name.starts_with("storvsp") {
            "storvsp threads"
        } else if parent == Some(me) {
            "io-wq (guest/baseline ring)"
        } else if parent.is_some_and(|p| vsp_tids.contains(&p)) {
            "io-wq (storvsp rings)"
        } else {
            "other threads"
        };
        *out.entry(role).or_insert(0.0) += d as f64 / 1e9;
    }
    out
}

/// Online CPUs this process may run on.
pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The file system type of `path` (statfs magic → name).
pub fn fs_type(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return "unknown".into();
    };
    // SAFETY: statfs is plain data; the kernel fills it from a NUL-terminated path.
    let (rc, st) = unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        (libc::statfs(c.as_ptr(), &mut st), st)
    };
    if rc != 0 {
        return "unknown".into();
    }
    #[allow(clippy::unnecessary_cast)]
    let magic = st.f_type as u64;
    match magic {
        0x0102_1994 => "tmpfs".into(),
        0xEF53 => "ext4".into(),
        0x5846_5342 => "xfs".into(),
        0x9123_683E => "btrfs".into(),
        0x794C_7630 => "overlayfs".into(),
        0x6969 => "nfs".into(),
        m => format!("fs-magic-{m:#x}"),
    }
}

/// Creates `path` with `size` bytes of non-zero pseudo-random data (no holes: reads must hit data)
/// and syncs it.
pub fn fill_file(path: &Path, size: u64, seed: u64) -> anyhow::Result<()> {
    if size == 0 || !size.is_multiple_of(1 << 20) {
        bail!("file size must be a positive multiple of 1 MiB");
    }
    let mut f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut rng = Rng::new(seed);
    let mut chunk = vec![0u8; 1 << 20];
    for _ in 0..size >> 20 {
        for w in chunk.chunks_exact_mut(8) {
            w.copy_from_slice(&(rng.next_u64() | 1).to_le_bytes());
        }
        f.write_all(&chunk)?;
    }
    f.sync_all()?;
    Ok(())
}

/// Drops `path` from the page cache (after a sync), so O_DIRECT and buffered runs start alike.
pub fn drop_cache(path: &Path) {
    if let Ok(f) = File::open(path) {
        let _ = f.sync_all();
        use std::os::fd::AsRawFd;
        // SAFETY: advisory call on an open descriptor; no memory is passed.
        unsafe {
            libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
        }
    }
}

/// Reads `len` bytes at `offset` of `path` (verification).
pub fn read_at(path: &Path, offset: u64, len: usize) -> anyhow::Result<Vec<u8>> {
    let f = File::open(path)?;
    let mut v = vec![0u8; len];
    f.read_exact_at(&mut v, offset)?;
    Ok(v)
}

/// How long each measured interval lasts and how many alternating rounds are taken.
#[derive(Copy, Clone, Debug)]
pub struct Timing {
    pub interval: Duration,
    pub rounds: usize,
}
