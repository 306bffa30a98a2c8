//! The demo partition (README command 1): the test guest's VMBus scenario against a storage
//! controller with a disk and a NIC on a virtual switch, with timings and the VMM's memory
//! overhead.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::memory::GuestRam;
use crate::rss::{self, MemoryReport};
use crate::serial::SerialSink;
use crate::testguest::{self, Transcript};
use crate::vmbus::{BusCounters, BusDevice, VmbusHost};
use crate::{ExitReason, Partition, PartitionConfig, RunReport, devices};

/// Demo errors (set-up failures; a guest that fails a step is an outcome, not an error).
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Partition(#[from] crate::PartitionError),
    #[error(transparent)]
    Vmbus(#[from] crate::vmbus::VmbusError),
    #[error(transparent)]
    Devices(#[from] devices::DeviceSetupError),
}

/// Where storvsp runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StorageHosting {
    InProcess,
    /// A VSP process started as `<exe> vsp storage --disk <disk>`.
    Process {
        exe: PathBuf,
    },
}

/// Where netvsp runs (with its switch and the host endpoint 10.0.0.1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetworkHosting {
    InProcess,
    /// A VSP process started as `<exe> vsp net --stats-fd N`, holding netvsp, the switch and the
    /// host endpoint ([`crate::netvsp_process`]).
    Process {
        exe: PathBuf,
    },
}

/// A VSP process as the demo saw it.
#[derive(Clone, Debug)]
pub struct VspProcess {
    /// `storage` or `network`.
    pub name: &'static str,
    pub pid: u32,
    /// Its parent was this process and it was running while the guest ran (sampled).
    pub child_while_running: bool,
    /// VmRSS after the run (shared program text included).
    pub rss_kib: u64,
    /// Largest private memory seen (`Private_Clean + Private_Dirty` of `smaps_rollup`).
    pub private_kib: u64,
}

/// What to run.
#[derive(Clone, Debug)]
pub struct DemoConfig {
    /// The test guest ELF.
    pub guest: PathBuf,
    /// Its scenario: [`testguest::MODE_VMBUS`] (the demo) or [`testguest::MODE_VMBUS_HOSTILE`].
    pub scenario: u64,
    pub mem_bytes: u64,
    pub vcpus: u32,
    /// Disk image (`.vhd` = VHD, else raw) for LUN 0.
    pub disk: PathBuf,
    pub storage: StorageHosting,
    pub network: NetworkHosting,
    pub timeout: Duration,
    /// Echo the guest's serial output to stdout as it runs.
    pub echo_serial: bool,
    /// In-kernel fast paths for guest signals and device interrupts
    /// ([`PartitionConfig::fast_signals`]).
    pub fast_signals: bool,
}

/// What happened.
#[derive(Debug)]
pub struct DemoOutcome {
    pub run: RunReport,
    pub serial: String,
    pub transcript: Transcript,
    pub bus: BusCounters,
    pub storage_hosting: String,
    pub network_hosting: String,
    pub disk_kind: &'static str,
    /// Frames the host endpoint answered: (ARP, ICMP echo).
    pub peer_replies: (u64, u64),
    /// Largest overhead seen while the guest ran (and after it), guest RAM excluded.
    pub memory: MemoryReport,
    /// The VSP processes (none in process).
    pub vsps: Vec<VspProcess>,
    /// From creating the partition to starting its vCPUs.
    pub setup_time: Duration,
}

impl DemoOutcome {
    fn steps_ok(&self, steps: &[&str]) -> bool {
        self.transcript.missing(steps).is_empty()
    }

    /// Every bus step passed (connect, offers, teardown).
    pub fn bus_ok(&self) -> bool {
        self.steps_ok(testguest::VMBUS_STEPS)
    }

    /// Disk write + read-back verified.
    pub fn io_ok(&self) -> bool {
        self.steps_ok(testguest::STORAGE_STEPS)
    }

    /// ARP and ping through netvsp and the switch.
    pub fn net_ok(&self) -> bool {
        self.steps_ok(testguest::NET_STEPS) && self.peer_replies.0 > 0 && self.peer_replies.1 > 0
    }

    /// Private memory of every VSP process (KiB).
    pub fn vsp_private_kib(&self) -> u64 {
        self.vsps.iter().map(|v| v.private_kib).sum()
    }

    /// The overhead the RESULT line reports: the VMM's (RSS − guest RAM touched) plus the VSP
    /// processes' private memory.
    pub fn overhead_kib(&self) -> u64 {
        self.memory
            .overhead_kib()
            .saturating_add(self.vsp_private_kib())
    }

    /// The whole demo passed: every step, no failure, a clean exit.
    pub fn ok(&self) -> bool {
        self.bus_ok()
            && self.io_ok()
            && self.net_ok()
            && self.transcript.failed.is_empty()
            && self.transcript.done
            && self.run.reason == ExitReason::ExitPort(0)
    }
}

/// Samples the VMM's memory (and the VSP processes') while the guest runs and keeps the worst.
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<(MemoryReport, Vec<VspProcess>)>>,
}

/// Updates `v` from `/proc`: whether it is still this process's child, its largest private memory.
fn sample_vsp(v: &mut VspProcess, first: bool) {
    let child = rss::parent_pid(v.pid).is_ok_and(|p| p == std::process::id());
    v.child_while_running = if first {
        child
    } else {
        v.child_while_running && child
    };
    if let Ok(k) = rss::private_kib(v.pid) {
        v.private_kib = v.private_kib.max(k);
    }
}

fn sample(ram: &GuestRam, baseline: u64) -> Option<MemoryReport> {
    let starts: Vec<u64> = ram.regions().iter().map(|r| r.host_addr).collect();
    let (anon_kib, file_kib) = rss::anon_file_kib().ok()?;
    Some(MemoryReport {
        anon_kib,
        file_kib,
        baseline_kib: baseline,
        rss_kib: rss::vm_rss_kib(None).ok()?,
        guest_mapped_kib: rss::mapping_rss_kib(&starts).ok()?,
        guest_touched_kib: rss::guest_resident_kib(ram).ok()?,
    })
}

impl Sampler {
    fn start(ram: Arc<GuestRam>, baseline: u64, mut vsps: Vec<VspProcess>) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("rss-sampler".into())
            .spawn(move || {
                let mut worst = MemoryReport {
                    baseline_kib: baseline,
                    ..MemoryReport::default()
                };
                let mut first = true;
                loop {
                    if let Some(m) = sample(&ram, baseline)
                        && m.overhead_kib() >= worst.overhead_kib()
                    {
                        worst = m;
                    }
                    for v in &mut vsps {
                        sample_vsp(v, first);
                    }
                    first = false;
                    if s.load(Ordering::Acquire) {
                        return (worst, vsps);
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            })
            .ok();
        Sampler { stop, thread }
    }

    fn finish(mut self) -> (MemoryReport, Vec<VspProcess>) {
        self.stop.store(true, Ordering::Release);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

/// The host endpoint's counters, wherever it runs.
enum PeerCounters {
    Local(Arc<crate::vmbus::netpeer::PeerStats>),
    Shared(Arc<crate::netvsp_process::SharedPeerStats>),
}

impl PeerCounters {
    fn replies(&self) -> (u64, u64) {
        match self {
            PeerCounters::Local(s) => (
                s.arp_replies.load(Ordering::Relaxed),
                s.echo_replies.load(Ordering::Relaxed),
            ),
            PeerCounters::Shared(s) => s.replies(),
        }
    }
}

/// Boots the test guest's VMBus scenario with a disk and a NIC and reports what it did.
pub fn run(cfg: &DemoConfig) -> Result<DemoOutcome, DemoError> {
    let baseline = rss::vm_rss_kib(None).unwrap_or(0);
    let t0 = Instant::now();
    let (mut sink, buffer) = SerialSink::buffered();
    sink.stdout = cfg.echo_serial;
    let mut p = Partition::new(PartitionConfig {
        mem_bytes: cfg.mem_bytes,
        vcpus: cfg.vcpus,
        serial: sink,
        fast_signals: cfg.fast_signals,
        ..PartitionConfig::default()
    })?;
    p.load_test_guest(&cfg.guest, cfg.scenario)?;
    let ram = p.ram().clone();
    let mut bus = VmbusHost::new(p.synic().clone(), ram.clone(), cfg.vcpus)?;

    let (storage, disk_kind, storage_pid): (Box<dyn BusDevice>, &'static str, Option<u32>) =
        match &cfg.storage {
            StorageHosting::InProcess => {
                let (d, kind) = devices::storage_in_process(&cfg.disk)?;
                (Box::new(d), kind, None)
            }
            StorageHosting::Process { exe } => {
                let d = devices::storage_out_of_process(exe, &cfg.disk, &ram)?;
                let pid = d.pid();
                let kind = if cfg
                    .disk
                    .extension()
                    .is_some_and(|e| e.eq_ignore_ascii_case("vhd"))
                {
                    "VHD"
                } else {
                    "raw"
                };
                (Box::new(d), kind, pid)
            }
        };
    let storage_hosting = storage.hosting();
    bus.add_device("storage", storage)?;
    // In process the switch and the host endpoint live here (kept until the end); out of process
    // in the VSP, whose endpoint counters come back through a shared page.
    let mut _in_process_net = None;
    let (network_hosting, network_pid, peer_stats) = match &cfg.network {
        NetworkHosting::InProcess => {
            let devices::Network {
                device,
                switch,
                peer,
            } = devices::network(ram.clone(), bus.server().clone())?;
            let hosting = device.hosting();
            bus.add_device("network", Box::new(device))?;
            let stats = PeerCounters::Local(peer.stats.clone());
            _in_process_net = Some((switch, peer));
            (hosting, None, stats)
        }
        NetworkHosting::Process { exe } => {
            let (device, stats) = crate::netvsp_process::network_out_of_process(exe, &ram)?;
            let (hosting, pid) = (device.hosting(), device.pid());
            bus.add_device("network", Box::new(device))?;
            (hosting, pid, PeerCounters::Shared(stats))
        }
    };
    bus.start()?;
    let setup_time = t0.elapsed();

    let vsps: Vec<VspProcess> = [("storage", storage_pid), ("network", network_pid)]
        .into_iter()
        .filter_map(|(name, pid)| {
            pid.map(|pid| VspProcess {
                name,
                pid,
                child_while_running: false,
                rss_kib: 0,
                private_kib: 0,
            })
        })
        .collect();
    let sampler = Sampler::start(ram.clone(), baseline, vsps);
    let run = p.run(Some(cfg.timeout))?;
    let (mut memory, mut vsps) = sampler.finish();
    if let Some(m) = sample(&ram, baseline)
        && m.overhead_kib() >= memory.overhead_kib()
    {
        memory = m;
    }
    for v in &mut vsps {
        sample_vsp(v, false);
        v.rss_kib = rss::vm_rss_kib(Some(v.pid)).unwrap_or(0);
    }
    let peer_replies = peer_stats.replies();
    let counters = bus.stats();
    bus.stop();
    drop(_in_process_net);
    let serial = String::from_utf8_lossy(
        &buffer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    )
    .into_owned();
    let transcript = Transcript::parse(&serial);
    Ok(DemoOutcome {
        run,
        serial,
        transcript,
        bus: counters,
        storage_hosting,
        network_hosting,
        disk_kind,
        peer_replies,
        memory,
        vsps,
        setup_time,
    })
}
