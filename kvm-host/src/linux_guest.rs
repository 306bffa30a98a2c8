//! A Linux guest partition (`kvm-host run --kernel ...`): a bzImage or vmlinux with an optional
//! initrd and command line, optionally a VMBus SCSI controller with a disk and a NIC on a virtual
//! switch with a host endpoint (10.0.0.1, answers ARP and ping). The serial console is captured
//! with host-side timestamps per line, and the run ends when the guest prints one of the stop
//! markers (Linux halts after "reboot: Power down" with nothing for a VMM to see), on a VMM stop
//! reason, or at the timeout.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::demo::StorageHosting;
use crate::linux_boot::LinuxKernel;
use crate::serial::SerialSink;
use crate::vmbus::{BusCounters, BusDevice, VmbusHost};
use crate::{ExitReason, Partition, PartitionConfig, RunReport, devices};

/// Lines after which Linux has nothing more to do (it halts with interrupts off).
pub const DEFAULT_STOP_MARKERS: &[&str] = &[
    "reboot: Power down",
    "reboot: System halted",
    "System halted",
    "Kernel panic - not syncing",
];

/// What to boot.
#[derive(Clone, Debug)]
pub struct LinuxConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub mem_bytes: u64,
    pub vcpus: u32,
    /// Disk for a VMBus SCSI controller (LUN 0); no controller without one.
    pub disk: Option<PathBuf>,
    pub storage: StorageHosting,
    /// A VMBus NIC on a switch with the host endpoint.
    pub net: bool,
    pub timeout: Duration,
    pub echo_serial: bool,
    /// Stop when a serial line contains one of these.
    pub stop_markers: Vec<String>,
    /// [`PartitionConfig::time_dilation`].
    pub time_dilation: u32,
}

/// One serial line and when the host saw it complete (from starting the vCPUs).
#[derive(Clone, Debug)]
pub struct SerialLine {
    pub at: Duration,
    pub text: String,
}

/// What happened.
#[derive(Debug)]
pub struct LinuxOutcome {
    pub kernel: LinuxKernel,
    pub run: RunReport,
    pub lines: Vec<SerialLine>,
    pub bus: Option<BusCounters>,
    /// Frames the host endpoint answered: (ARP, ICMP echo).
    pub peer_replies: (u64, u64),
    pub setup_time: Duration,
    /// The stop marker that ended the run, if one did.
    pub marker: Option<String>,
}

impl LinuxOutcome {
    /// The first line containing `needle`, with its time.
    pub fn first(&self, needle: &str) -> Option<&SerialLine> {
        self.lines.iter().find(|l| l.text.contains(needle))
    }

    /// The whole console output.
    pub fn serial(&self) -> String {
        let mut s = String::new();
        for l in &self.lines {
            s.push_str(&l.text);
            s.push('\n');
        }
        s
    }
}

/// Errors setting the guest up.
#[derive(Debug, thiserror::Error)]
pub enum LinuxGuestError {
    #[error(transparent)]
    Partition(#[from] crate::PartitionError),
    #[error(transparent)]
    Vmbus(#[from] crate::vmbus::VmbusError),
    #[error(transparent)]
    Devices(#[from] devices::DeviceSetupError),
}

/// Splits the console buffer into timestamped lines as they complete and stops the partition
/// on a marker.
struct Watcher {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<(Vec<SerialLine>, Option<String>)>>,
}

fn take_lines(buf: &Mutex<Vec<u8>>, seen: &mut usize, partial: &mut Vec<u8>, out: &mut Vec<u8>) {
    let b = buf
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(new) = b.get(*seen..) {
        out.extend_from_slice(new);
    }
    *seen = b.len();
    drop(b);
    partial.append(out);
}

impl Watcher {
    fn start(
        buf: Arc<Mutex<Vec<u8>>>,
        markers: Vec<String>,
        control: Arc<crate::vcpu::RunControl>,
        t0: Instant,
    ) -> Watcher {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("serial-watch".into())
            .stack_size(64 << 10)
            .spawn(move || {
                let (mut lines, mut marker) = (Vec::new(), None);
                let (mut seen, mut partial, mut fresh) = (0usize, Vec::new(), Vec::new());
                loop {
                    let last = s.load(Ordering::Acquire);
                    take_lines(&buf, &mut seen, &mut partial, &mut fresh);
                    while let Some(nl) = partial.iter().position(|&c| c == b'\n') {
                        let raw: Vec<u8> = partial.drain(..=nl).collect();
                        let text = String::from_utf8_lossy(&raw)
                            .trim_end_matches(['\r', '\n'])
                            .to_string();
                        if marker.is_none()
                            && let Some(m) = markers.iter().find(|m| text.contains(m.as_str()))
                        {
                            marker = Some(m.clone());
                            control.finish(ExitReason::Stopped);
                        }
                        lines.push(SerialLine {
                            at: t0.elapsed(),
                            text,
                        });
                    }
                    if last {
                        if !partial.is_empty() {
                            lines.push(SerialLine {
                                at: t0.elapsed(),
                                text: String::from_utf8_lossy(&partial).into_owned(),
                            });
                        }
                        return (lines, marker);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
            .ok();
        Watcher { stop, thread }
    }

    fn finish(mut self) -> (Vec<SerialLine>, Option<String>) {
        self.stop.store(true, Ordering::Release);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

/// Boots Linux with the configured devices and returns its console and counters.
pub fn run(cfg: &LinuxConfig) -> Result<LinuxOutcome, LinuxGuestError> {
    let t0 = Instant::now();
    let (mut sink, buffer) = SerialSink::buffered();
    sink.stdout = cfg.echo_serial;
    let mut p = Partition::new(PartitionConfig {
        mem_bytes: cfg.mem_bytes,
        vcpus: cfg.vcpus,
        serial: sink,
        time_dilation: cfg.time_dilation,
        ..PartitionConfig::default()
    })?;
    let kernel = p.load_linux(&cfg.kernel, cfg.initrd.as_deref(), &cfg.cmdline)?;
    let ram = p.ram().clone();
    let mut bus = None;
    let mut peer = None;
    let mut _switch = None;
    if cfg.disk.is_some() || cfg.net {
        let mut b = VmbusHost::new(p.synic().clone(), ram.clone(), cfg.vcpus)?;
        if let Some(disk) = &cfg.disk {
            let storage: Box<dyn BusDevice> = match &cfg.storage {
                StorageHosting::InProcess => Box::new(devices::storage_in_process(disk)?.0),
                StorageHosting::Process { exe } => {
                    Box::new(devices::storage_out_of_process(exe, disk, &ram)?)
                }
            };
            b.add_device("storage", storage)?;
        }
        if cfg.net {
            let n = devices::network(ram.clone(), b.server().clone())?;
            b.add_device("network", Box::new(n.device))?;
            peer = Some(n.peer);
            _switch = Some(n.switch);
        }
        b.start()?;
        bus = Some(b);
    }
    let setup_time = t0.elapsed();
    let watcher = Watcher::start(
        buffer,
        cfg.stop_markers.clone(),
        p.run_control(),
        Instant::now(),
    );
    let run = p.run(Some(cfg.timeout))?;
    let (lines, marker) = watcher.finish();
    let peer_replies = peer.as_ref().map_or((0, 0), |peer| {
        (
            peer.stats.arp_replies.load(Ordering::Relaxed),
            peer.stats.echo_replies.load(Ordering::Relaxed),
        )
    });
    let counters = bus.as_mut().map(|b| {
        let c = b.stats();
        b.stop();
        c
    });
    drop(peer);
    Ok(LinuxOutcome {
        kernel,
        run,
        lines,
        bus: counters,
        peer_replies,
        setup_time,
        marker,
    })
}
