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
    pub timeout: Duration,
    /// Echo the guest's serial output to stdout as it runs.
    pub echo_serial: bool,
    /// In-kernel fast path for guest signals ([`PartitionConfig::fast_signals`]).
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
    pub disk_kind: &'static str,
    /// Frames the host endpoint answered: (ARP, ICMP echo).
    pub peer_replies: (u64, u64),
    /// Largest overhead seen while the guest ran (and after it), guest RAM excluded.
    pub memory: MemoryReport,
    /// VmRSS of the storage VSP process, when there is one.
    pub vsp_rss_kib: Option<u64>,
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

/// Samples the VMM's memory while the guest runs and keeps the worst overhead.
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<MemoryReport>>,
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
    fn start(ram: Arc<GuestRam>, baseline: u64) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("rss-sampler".into())
            .spawn(move || {
                let mut worst = MemoryReport {
                    baseline_kib: baseline,
                    ..MemoryReport::default()
                };
                loop {
                    if let Some(m) = sample(&ram, baseline)
                        && m.overhead_kib() >= worst.overhead_kib()
                    {
                        worst = m;
                    }
                    if s.load(Ordering::Acquire) {
                        return worst;
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            })
            .ok();
        Sampler { stop, thread }
    }

    fn finish(mut self) -> MemoryReport {
        self.stop.store(true, Ordering::Release);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
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

    let (storage, disk_kind, vsp_pid): (Box<dyn BusDevice>, &'static str, Option<u32>) =
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
    let devices::Network {
        device: nic,
        switch: _switch,
        peer,
    } = devices::network(ram.clone(), bus.server().clone())?;
    bus.add_device("network", Box::new(nic))?;
    bus.start()?;
    let setup_time = t0.elapsed();

    let sampler = Sampler::start(ram.clone(), baseline);
    let run = p.run(Some(cfg.timeout))?;
    let mut memory = sampler.finish();
    if let Some(m) = sample(&ram, baseline)
        && m.overhead_kib() >= memory.overhead_kib()
    {
        memory = m;
    }
    let vsp_rss_kib = vsp_pid.and_then(|p| rss::vm_rss_kib(Some(p)).ok());
    let peer_replies = (
        peer.stats.arp_replies.load(Ordering::Relaxed),
        peer.stats.echo_replies.load(Ordering::Relaxed),
    );
    let counters = bus.stats();
    bus.stop();
    drop(peer);
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
        disk_kind,
        peer_replies,
        memory,
        vsp_rss_kib,
        setup_time,
    })
}
