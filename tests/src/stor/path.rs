//! The measured path: storvsc in the harness → VMBus ring → storvsp → the same backing file, with
//! storvsp in this process or in a supervised child process (`vmbus_core::oop::serve`).
//!
//! A child VSP is this very executable started again: the caller's command builder decides how
//! (`storbench`/`vsp-soak` pass `--vsp`, the integration test names its child test); the child
//! finds its settings in the environment ([`ENV_DISK`] …) and runs [`serve_child`].

use super::{Meter, Sample, Workload, pin_threads_named};
use anyhow::{Context, anyhow, bail};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vmbus_core::oop::{HostedDevice, connection_from_env, serve};
use vmbus_core::wire::Guid;
use vsc_guest::harness::{DmaBuffer, HarnessConfig, IoOp, StorHarness, Vsp};
use vsp_storage::backend::raw::{RawDisk, RawOptions};
use vsp_storage::storvsp::{LunAddr, StorVsp, StorVspConfig};

/// Controller instance used by every harness here.
pub const INSTANCE: Guid = Guid::from_u128(0x5c5c_0006_0000_4000_8000_0000_0000_0006);
/// Child VSP: the raw image to serve.
pub const ENV_DISK: &str = "STORBENCH_VSP_DISK";
/// Child VSP: sub-channels to allow.
pub const ENV_SUBS: &str = "STORBENCH_VSP_SUBCHANNELS";
/// Child VSP: open the image O_DIRECT ("1").
pub const ENV_DIRECT: &str = "STORBENCH_VSP_DIRECT";
/// Child VSP: largest transfer per request.
pub const ENV_MAX_TRANSFER: &str = "STORBENCH_VSP_MAX_TRANSFER";
/// Child VSP: pin every thread to this CPU.
pub const ENV_PIN: &str = "STORBENCH_VSP_PIN";
/// Child VSP (restarts): storvsp session state to resume, hex.
pub const ENV_RESTORE: &str = "STORBENCH_VSP_RESTORE";

/// How the VSP side is set up.
#[derive(Clone, Debug)]
pub struct VspSetup {
    pub disk: PathBuf,
    /// Channels (primary + sub-channels).
    pub queues: u16,
    pub direct: bool,
    /// Largest transfer per SCSI command (1 MiB: the 1 MiB workloads are not split).
    pub max_transfer: u32,
    /// CPU for the VSP's threads (`None`: no pinning).
    pub pin: Option<usize>,
    pub timeout: Duration,
}

impl VspSetup {
    pub fn new(disk: &Path) -> Self {
        VspSetup {
            disk: disk.to_path_buf(),
            queues: 1,
            direct: false,
            max_transfer: 1 << 20,
            pin: None,
            timeout: Duration::from_secs(20),
        }
    }

    fn storvsp_config(&self) -> StorVspConfig {
        storvsp_config(self.queues.saturating_sub(1), self.max_transfer)
    }

    fn harness_config(&self, ram_pages: u64) -> HarnessConfig {
        let mut h = HarnessConfig {
            queues: self.queues,
            ram_pages,
            targets: Some(vec![(0, 0)]),
            timeout: self.timeout,
            ..HarnessConfig::default()
        };
        h.description.instance = INSTANCE;
        h.description.max_subchannels = self.queues.saturating_sub(1).max(1);
        h
    }

    fn raw_options(&self) -> RawOptions {
        RawOptions {
            direct: self.direct,
            ..RawOptions::default()
        }
    }
}

fn storvsp_config(subs: u16, max_transfer: u32) -> StorVspConfig {
    let mut c = StorVspConfig::new(INSTANCE);
    c.protocol.max_subchannels = subs;
    c.protocol.max_transfer_bytes = max_transfer;
    c.io_threads = 2;
    c
}

/// A harness with storvsp in this process on `setup.disk`.
pub fn start_in_process(setup: &VspSetup, ram_pages: u64) -> anyhow::Result<StorHarness> {
    let vsp = StorVsp::new(setup.storvsp_config(), None).context("storvsp")?;
    let disk = RawDisk::open(&setup.disk, &setup.raw_options())
        .with_context(|| format!("opening {}", setup.disk.display()))?;
    vsp.add_raw_lun(LunAddr::new(0, 0, 0), Arc::new(disk));
    // storvsp's threads start during bring-up: start them on the VSP's CPU (and pin them by name
    // in case one started elsewhere).
    let h = super::on_cpu(setup.pin, || {
        StorHarness::start(
            setup.harness_config(ram_pages),
            Vsp::InProcess(Box::new(vsp)),
        )
    })
    .map_err(|e| anyhow!("harness (in-process storvsp): {e}"))?;
    if let Some(cpu) = setup.pin {
        pin_threads_named("storvsp", cpu);
    }
    Ok(h)
}

/// Builds the command that starts this executable as a VSP child ([`serve_child`] must run in
/// it); the environment for the child is added by [`start_child`].
pub type ChildCommand = Box<dyn FnMut() -> Command + Send>;

/// A harness with storvsp in a supervised child process; the supervisor restarts it when it dies
/// and the restarted one resumes the session the guest negotiated.
pub fn start_child(
    setup: &VspSetup,
    ram_pages: u64,
    mut command: ChildCommand,
) -> anyhow::Result<StorHarness> {
    // Written once the guest negotiated: what a restarted storvsp resumes. The supervisor cannot
    // fetch a killed VSP's state, so the VMM side keeps it (the storvsp layout: see `session_state`).
    let restore: Arc<Mutex<Option<String>>> = Arc::default();
    let r = restore.clone();
    let s = setup.clone();
    let vsp = Vsp::Child(Box::new(move || {
        let mut c = command();
        c.env(ENV_DISK, &s.disk)
            .env(ENV_SUBS, s.queues.saturating_sub(1).to_string())
            .env(ENV_DIRECT, if s.direct { "1" } else { "0" })
            .env(ENV_MAX_TRANSFER, s.max_transfer.to_string())
            .stdout(std::process::Stdio::null());
        if let Some(cpu) = s.pin {
            c.env(ENV_PIN, cpu.to_string());
        }
        if let Some(hex) = r.lock().ok().and_then(|g| g.clone()) {
            c.env(ENV_RESTORE, hex);
        }
        c
    }));
    let h = StorHarness::start(setup.harness_config(ram_pages), vsp)
        .map_err(|e| anyhow!("harness (child storvsp): {e}"))?;
    let state = session_state(&h)?;
    if let Ok(mut g) = restore.lock() {
        *g = Some(state);
    }
    Ok(h)
}

/// The storvsp session the guest negotiated, in storvsp's saved-state layout ("VST1", version,
/// initialised, sub-channels), hex-encoded for the child's environment.
fn session_state(h: &StorHarness) -> anyhow::Result<String> {
    let n = h
        .driver()
        .negotiated()
        .copied()
        .ok_or_else(|| anyhow!("storvsc not negotiated"))?;
    let mut v = b"VST1".to_vec();
    v.extend_from_slice(&n.version.raw().to_le_bytes());
    v.push(1);
    v.extend_from_slice(&n.subchannels.to_le_bytes());
    Ok(v.iter().map(|b| format!("{b:02x}")).collect())
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// In a VSP child: serves storvsp on the image named in the environment until the VMM hangs up.
/// `Ok(false)` when this process was not started as a VSP child (no socket passed).
pub fn serve_child() -> anyhow::Result<bool> {
    // SAFETY: the supervisor passed this socket to this process only; it is taken once, here.
    let Some(conn) = (unsafe { connection_from_env() }) else {
        return Ok(false);
    };
    if let Ok(cpu) = std::env::var(ENV_PIN)
        && let Ok(cpu) = cpu.parse::<usize>()
    {
        // Threads started from here on inherit the mask.
        super::pin_current_thread(cpu);
    }
    let disk = std::env::var(ENV_DISK).with_context(|| format!("{ENV_DISK} not set"))?;
    let subs: u16 = env_or(ENV_SUBS, 0);
    let max_transfer: u32 = env_or(ENV_MAX_TRANSFER, 1 << 20);
    let opts = RawOptions {
        direct: std::env::var(ENV_DIRECT).is_ok_and(|v| v == "1"),
        ..RawOptions::default()
    };
    let mut vsp = StorVsp::new(storvsp_config(subs, max_transfer), None)?;
    let raw = RawDisk::open(Path::new(&disk), &opts).with_context(|| format!("opening {disk}"))?;
    vsp.add_raw_lun(LunAddr::new(0, 0, 0), Arc::new(raw));
    if let Ok(hex) = std::env::var(ENV_RESTORE) {
        let state = (0..hex.len())
            .step_by(2)
            .map(|i| {
                hex.get(i..i + 2)
                    .and_then(|s| u8::from_str_radix(s, 16).ok())
                    .ok_or_else(|| anyhow!("bad {ENV_RESTORE}"))
            })
            .collect::<anyhow::Result<Vec<u8>>>()?;
        HostedDevice::restore(&mut vsp, &state).map_err(|e| anyhow!("restore: {e}"))?;
    }
    // The steady-state allow-list of `vsp-storage serve` (opt out with VSP_NO_SECCOMP=1).
    if std::env::var("VSP_NO_SECCOMP").is_err() {
        use vmbus_core::oop::seccomp;
        seccomp::install(&seccomp::storage_syscalls())?;
        seccomp::selftest_from_env();
    }
    serve(&conn, &mut vsp).map_err(|e| anyhow!("serve: {e}"))?;
    Ok(true)
}

/// Guest buffers for `w`: one per request in flight, filled with a pattern (writes).
pub fn buffers(h: &mut StorHarness, w: Workload) -> anyhow::Result<Vec<DmaBuffer>> {
    let mut v = Vec::new();
    for i in 0..w.depth() {
        let b = h.ram().alloc(w.block()).map_err(|e| anyhow!("{e}"))?;
        h.ram()
            .write(&b, 0, &vec![0xa5 ^ i as u8; w.block() as usize])
            .map_err(|e| anyhow!("{e}"))?;
        v.push(b);
    }
    Ok(v)
}

/// Runs `w` through the harness for `interval` (requests completing after it are drained, not
/// counted).
pub fn run(
    h: &mut StorHarness,
    bufs: &[DmaBuffer],
    w: Workload,
    interval: Duration,
    seed: u64,
) -> anyhow::Result<Sample> {
    let disk = h.disk().map_err(|e| anyhow!("{e}"))?.clone();
    let block_size = u64::from(disk.block_size);
    let size = disk.blocks * block_size;
    let mut offsets = super::Offsets::new(w, size, seed);
    let op = |buf: &DmaBuffer, off: u64| {
        let lba = off / block_size;
        if w.write() {
            IoOp::Write {
                lba,
                buf: buf.clone(),
                fua: false,
            }
        } else {
            IoOp::Read {
                lba,
                buf: buf.clone(),
            }
        }
    };
    let mut slots: HashMap<u64, usize> = HashMap::with_capacity(bufs.len());
    for (i, b) in bufs.iter().enumerate() {
        let tag = h
            .submit(op(b, offsets.next_offset()))
            .map_err(|e| anyhow!("{e}"))?;
        slots.insert(tag, i);
    }
    let mut meter = Meter::start(interval);
    let mut sample = Sample::default();
    let mut failure = None;
    while !slots.is_empty() {
        let measuring = meter.measuring();
        let done = h
            .poll(Duration::from_millis(100))
            .map_err(|e| anyhow!("poll: {e}"))?;
        for d in done {
            let Some(i) = slots.remove(&d.tag) else {
                continue;
            };
            match d.result {
                Ok(n) if n == w.block() => {}
                other => {
                    failure.get_or_insert(format!("{other:?}"));
                    meter.close();
                    continue;
                }
            }
            if !measuring {
                continue;
            }
            sample.ops += 1;
            sample.bytes += w.block();
            let b = &bufs[i];
            let tag = h
                .submit(op(b, offsets.next_offset()))
                .map_err(|e| anyhow!("{e}"))?;
            slots.insert(tag, i);
        }
        meter.tick(&mut sample);
        if meter.elapsed() > interval + Duration::from_secs(30) {
            bail!("{} requests never completed", slots.len());
        }
    }
    if let Some(f) = failure {
        bail!("storvsc {}: {f}", w.name());
    }
    Ok(sample)
}
