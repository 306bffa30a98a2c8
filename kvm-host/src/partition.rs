//! A KVM partition: VM, in-kernel IRQCHIP + PIT, guest RAM, the Hyper-V MSR filter, CPUID,
//! COM1, ACPI, boot state, vCPU threads; [`Partition::run`] runs it to completion.

use std::path::Path;
use std::sync::{Arc, Mutex, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    KVM_CAP_X86_USER_SPACE_MSR, KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_RUNNABLE,
    KVM_PIT_SPEAKER_DUMMY, kvm_enable_cap, kvm_mp_state, kvm_msi, kvm_pit_config,
    kvm_userspace_memory_region,
};
use kvm_ioctls::{
    Cap, Kvm, MsrExitReason, MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, VcpuFd,
    VmFd,
};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

use crate::boot::{self, LoadedImage};
use crate::hyperv::{HvPartition, cpuid, msr};
use crate::memory::GuestRam;
use crate::serial::{COM1_IRQ, Com1, SerialSink};
use crate::synic::{DEFAULT_QUEUE_DEPTH, InterruptSink, Synic};
use crate::vcpu::{ExitReason, ExitStats, LogOnce, RunControl, VcpuShared, run_vcpu};

/// Largest partition this VMM builds (APIC ids are 8 bits in the MADT and CPUID leaf 1).
pub const MAX_VCPUS: u32 = 64;

/// Partition errors.
#[derive(Debug, thiserror::Error)]
pub enum PartitionError {
    #[error("/dev/kvm is not usable: {0}")]
    NoKvm(String),
    #[error("KVM lacks a capability this VMM needs: {0}")]
    MissingCap(&'static str),
    #[error("{what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU count {0} is outside 1..={MAX_VCPUS}")]
    BadVcpuCount(u32),
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    #[error(transparent)]
    Boot(#[from] crate::boot::BootError),
    #[error(transparent)]
    Acpi(#[from] crate::acpi::AcpiError),
    #[error(transparent)]
    Cpuid(#[from] crate::hyperv::cpuid::CpuidError),
    #[error("no image loaded")]
    NothingLoaded,
    #[error("starting a vCPU thread: {0}")]
    Thread(std::io::Error),
}

fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> PartitionError {
    move |source| PartitionError::Kvm { what, source }
}

/// Checks that /dev/kvm can be opened and has what a partition needs; `Err` says why not.
pub fn kvm_available() -> Result<(), PartitionError> {
    let kvm = Kvm::new().map_err(|e| PartitionError::NoKvm(e.to_string()))?;
    check_caps(&kvm)
}

fn check_caps(kvm: &Kvm) -> Result<(), PartitionError> {
    let api = kvm.get_api_version();
    if api != 12 {
        return Err(PartitionError::NoKvm(format!(
            "/dev/kvm does not answer like KVM (API version {api}, expected 12)"
        )));
    }
    for (cap, name) in [
        (Cap::Irqchip, "IRQCHIP"),
        (Cap::Pit2, "PIT2"),
        (Cap::SignalMsi, "SIGNAL_MSI"),
        (Cap::Irqfd, "IRQFD"),
        (Cap::X86UserSpaceMsr, "X86_USER_SPACE_MSR"),
        (Cap::X86MsrFilter, "X86_MSR_FILTER"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(PartitionError::MissingCap(name));
        }
    }
    Ok(())
}

/// Partition settings.
#[derive(Clone, Debug)]
pub struct PartitionConfig {
    /// Guest RAM in bytes (multiple of 4 KiB).
    pub mem_bytes: u64,
    pub vcpus: u32,
    pub serial: SerialSink,
    /// Bound of each SynIC (VP, SINT) host→guest queue.
    pub synic_queue_depth: usize,
    /// Guest signals on open channels complete in the kernel (ioeventfd) and so do device
    /// interrupts while the guest's SynIC allows it (irqfd, the device sets the event flag);
    /// `false` sends every one through the VMM (for comparisons).
    pub fast_signals: bool,
    /// Guest time runs this many times slower than host time ([`HvPartition::time_dilated`]).
    pub time_dilation: u32,
}

impl Default for PartitionConfig {
    fn default() -> Self {
        PartitionConfig {
            mem_bytes: 128 << 20,
            vcpus: 1,
            serial: SerialSink {
                stdout: true,
                log: false,
                buffer: None,
            },
            synic_queue_depth: DEFAULT_QUEUE_DEPTH,
            fast_signals: true,
            time_dilation: 1,
        }
    }
}

/// How the vCPUs start.
#[derive(Clone, Debug, PartialEq, Eq)]
enum BootPlan {
    /// Every VP starts at `entry` in long mode with RDI = VP index, RDX = VP count, RCX = `arg`.
    TestGuest { entry: u64, arg: u64 },
    /// VP 0 starts at `entry` with RSI = zero page; the others wait for INIT/SIPI.
    Linux { entry: u64 },
}

/// What a finished run reports.
#[derive(Clone, Debug)]
pub struct RunReport {
    pub reason: ExitReason,
    /// From starting the vCPUs to the stop reason.
    pub guest_time: Duration,
    /// Including stopping and joining the vCPU threads.
    pub total_time: Duration,
    pub io_exits: u64,
    pub mmio_exits: u64,
    pub msr_exits: u64,
    pub hypercalls: u64,
    pub emulation_fixups: u64,
}

/// KVM_SIGNAL_MSI to the target VP's LAPIC (APIC id = VP index), fixed delivery, edge.
struct MsiInterrupts(Arc<VmFd>);

impl InterruptSink for MsiInterrupts {
    fn raise(&self, vp: u32, vector: u8) {
        let msi = kvm_msi {
            address_lo: 0xFEE0_0000 | ((vp & 0xFF) << 12),
            address_hi: 0,
            data: u32::from(vector),
            ..Default::default()
        };
        match self.0.signal_msi(msi) {
            Ok(0) => tracing::debug!(vp, vector, "SynIC interrupt blocked by the guest's LAPIC"),
            Ok(_) => {}
            Err(e) => tracing::warn!(vp, vector, "KVM_SIGNAL_MSI: {e}"),
        }
    }
}

/// Guest fast `HvSignalEvent`s on open channels complete in the kernel: a KVM ioeventfd per
/// connection id on [`crate::hyperv::FAST_SIGNAL_PORT`] (PIO, 4 bytes, datamatch = connection id)
/// rings the channel's kick eventfd.
/// Device interrupts complete in the kernel too: the channel's call eventfd becomes a KVM irqfd on
/// an MSI route ([`crate::irqfd`]).
struct IoEventAccel {
    vm: Arc<VmFd>,
    attached: Mutex<std::collections::HashMap<u32, EventFd>>,
    irqfds: Option<crate::irqfd::MsiIrqfds>,
}

impl crate::synic::SignalAccel for IoEventAccel {
    fn attach(&self, connection_id: u32, kick: &ringbuf::signal::Doorbell) -> std::io::Result<()> {
        use std::os::fd::{AsFd, IntoRawFd};
        let fd = kick.as_fd().try_clone_to_owned()?;
        // SAFETY: `fd` is a freshly duplicated, owned eventfd descriptor; EventFd takes ownership.
        let efd = unsafe { <EventFd as std::os::fd::FromRawFd>::from_raw_fd(fd.into_raw_fd()) };
        let mut map = self
            .attached
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if map.contains_key(&connection_id) {
            return Err(std::io::Error::other("connection id already attached"));
        }
        self.vm
            .register_ioevent(
                &efd,
                &kvm_ioctls::IoEventAddress::Pio(u64::from(crate::hyperv::FAST_SIGNAL_PORT)),
                connection_id,
            )
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        map.insert(connection_id, efd);
        Ok(())
    }

    fn attach_irq(
        &self,
        call: &ringbuf::signal::Doorbell,
        vp: u32,
        vector: u8,
    ) -> std::io::Result<u32> {
        match &self.irqfds {
            Some(i) => i.attach(call, vp, vector),
            None => Err(std::io::ErrorKind::Unsupported.into()),
        }
    }

    fn detach_irq(&self, handle: u32) {
        if let Some(i) = &self.irqfds {
            i.detach(handle);
        }
    }

    fn detach(&self, connection_id: u32) {
        let removed = self
            .attached
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&connection_id);
        if let Some(efd) = removed
            && let Err(e) = self.vm.unregister_ioevent(
                &efd,
                &kvm_ioctls::IoEventAddress::Pio(u64::from(crate::hyperv::FAST_SIGNAL_PORT)),
                connection_id,
            )
        {
            tracing::warn!(connection_id, "KVM_IOEVENTFD deassign: {e}");
        }
    }
}

/// A partition ready to run.
pub struct Partition {
    vm: Arc<VmFd>,
    ram: Arc<GuestRam>,
    hv: Arc<HvPartition>,
    vcpus: Vec<VcpuFd>,
    com1: Arc<Mutex<Com1>>,
    _com1_irq: EventFd,
    plan: Option<BootPlan>,
    control: Arc<RunControl>,
    // Keeps /dev/kvm open for the VM's lifetime.
    _kvm: Kvm,
}

impl std::fmt::Debug for Partition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Partition")
            .field("vcpus", &self.vcpus.len())
            .field("ram", &self.ram.size())
            .field("plan", &self.plan)
            .finish_non_exhaustive()
    }
}

impl Partition {
    /// Creates the VM, its memory, irqchip, PIT, MSR filter, vCPUs (with Hyper-V CPUID), COM1 and
    /// the ACPI tables.
    pub fn new(config: PartitionConfig) -> Result<Partition, PartitionError> {
        if config.vcpus == 0 || config.vcpus > MAX_VCPUS {
            return Err(PartitionError::BadVcpuCount(config.vcpus));
        }
        let kvm = Kvm::new().map_err(|e| PartitionError::NoKvm(e.to_string()))?;
        check_caps(&kvm)?;
        let vm = Arc::new(kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?);
        vm.set_tss_address(0xFFFB_D000)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        vm.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        vm.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(kvm_err("KVM_CREATE_PIT2"))?;

        let ram = Arc::new(GuestRam::new(config.mem_bytes)?);
        for (slot, r) in ram.regions().iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: r.gpa,
                memory_size: r.len,
                userspace_addr: r.host_addr,
            };
            // SAFETY: the region is a live shared mapping of `r.len` bytes owned by `ram`, which the
            // partition keeps alive (Arc) for as long as the VM exists.
            unsafe { vm.set_user_memory_region(region) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }

        // Hyper-V MSRs exit to userspace: deny them in the filter; also let refused accesses to
        // other MSRs exit (we answer #GP, logged once).
        let reasons = MsrExitReason::Filter | MsrExitReason::Unknown | MsrExitReason::Inval;
        vm.enable_cap(&kvm_enable_cap {
            cap: KVM_CAP_X86_USER_SPACE_MSR,
            args: [u64::from(reasons.bits()), 0, 0, 0],
            ..Default::default()
        })
        .map_err(kvm_err("KVM_CAP_X86_USER_SPACE_MSR"))?;
        let deny = [0u8; (msr::FILTER_COUNT / 8) as usize];
        vm.set_msr_filter(
            MsrFilterDefaultAction::ALLOW,
            &[MsrFilterRange {
                flags: MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE,
                base: msr::FILTER_FIRST,
                msr_count: msr::FILTER_COUNT,
                bitmap: &deny,
            }],
        )
        .map_err(kvm_err("KVM_X86_SET_MSR_FILTER"))?;

        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let mut vcpus = Vec::new();
        for id in 0..config.vcpus {
            vcpus.push(
                vm.create_vcpu(u64::from(id))
                    .map_err(kvm_err("KVM_CREATE_VCPU"))?,
            );
        }
        let tsc_hz = vcpus
            .first()
            .and_then(|v| v.get_tsc_khz().ok())
            .map_or(0, |khz| u64::from(khz) * 1000);
        for (id, vcpu) in vcpus.iter().enumerate() {
            let table = cpuid::partition_cpuid(&supported, id as u32, config.vcpus, tsc_hz != 0)?;
            vcpu.set_cpuid2(&table).map_err(kvm_err("KVM_SET_CPUID2"))?;
        }

        let synic = Arc::new(Synic::new(
            ram.clone(),
            config.vcpus,
            Arc::new(MsiInterrupts(vm.clone())),
            config.synic_queue_depth,
        ));
        if config.fast_signals && kvm.check_extension(Cap::Ioeventfd) {
            let irqfds = (kvm.check_extension(Cap::Irqfd) && kvm.check_extension(Cap::IrqRouting))
                .then(|| crate::irqfd::MsiIrqfds::new(vm.clone()));
            synic.set_signal_accel(Arc::new(IoEventAccel {
                vm: vm.clone(),
                attached: Mutex::default(),
                irqfds,
            }));
        }
        let hv = Arc::new(
            HvPartition::new(ram.clone(), synic, tsc_hz).time_dilated(config.time_dilation),
        );

        let com1_irq =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|e| PartitionError::NoKvm(e.to_string()))?;
        vm.register_irqfd(&com1_irq, COM1_IRQ)
            .map_err(kvm_err("KVM_IRQFD (COM1)"))?;
        let irq = com1_irq
            .try_clone()
            .map_err(|e| PartitionError::NoKvm(e.to_string()))?;
        let com1 = Arc::new(Mutex::new(Com1::new(irq, config.serial.clone())));

        boot::write_boot_tables(&ram)?;
        crate::acpi::write_tables(&ram, config.vcpus)?;
        tracing::debug!(
            vcpus = config.vcpus,
            mem = config.mem_bytes,
            tsc_hz,
            "partition created"
        );
        Ok(Partition {
            vm,
            ram,
            hv,
            vcpus,
            com1,
            _com1_irq: com1_irq,
            plan: None,
            control: Arc::new(RunControl::default()),
            _kvm: kvm,
        })
    }

    /// Guest RAM (shareable by fd).
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// The SynIC: install a [`crate::synic::SynicHandler`] here, post messages and signal events.
    pub fn synic(&self) -> &Arc<Synic> {
        self.hv.synic()
    }

    /// The Hyper-V MSR / hypercall state.
    pub fn hv(&self) -> &Arc<HvPartition> {
        &self.hv
    }

    /// The VM fd (irqfds, ioeventfds for devices added later).
    pub fn vm(&self) -> &Arc<VmFd> {
        &self.vm
    }

    /// Stops a running partition from another thread: `finish(reason)` ends [`Self::run`].
    pub fn run_control(&self) -> Arc<RunControl> {
        self.control.clone()
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> u32 {
        self.vcpus.len() as u32
    }

    /// Loads a bare-metal test image: every VP enters it in long mode with RDI = VP index,
    /// RSI = zero page, RDX = VP count, RCX = `arg`.
    pub fn load_test_guest(
        &mut self,
        path: &Path,
        arg: u64,
    ) -> Result<LoadedImage, PartitionError> {
        let img = boot::load_elf(&self.ram, path)?;
        boot::write_linux_zero_page(&self.ram, "", boot::ACPI_START)?;
        self.plan = Some(BootPlan::TestGuest {
            entry: img.entry,
            arg,
        });
        Ok(img)
    }

    /// Loads a Linux kernel (bzImage or vmlinux ELF), an optional initrd and the command line for
    /// the 64-bit boot protocol; APs wait for INIT/SIPI.
    pub fn load_linux(
        &mut self,
        kernel: &Path,
        initrd: Option<&Path>,
        cmdline: &str,
    ) -> Result<crate::linux_boot::LinuxKernel, PartitionError> {
        use crate::linux_boot;
        let k = linux_boot::load_kernel(&self.ram, kernel)?;
        let rd = initrd
            .map(|p| linux_boot::load_initrd(&self.ram, &k, p))
            .transpose()?;
        linux_boot::write_boot_params(&self.ram, &k, cmdline, rd, boot::ACPI_START)?;
        self.plan = Some(BootPlan::Linux {
            entry: k.image.entry,
        });
        Ok(k)
    }

    fn setup_vcpus(&self, plan: &BootPlan) -> Result<(), PartitionError> {
        let n = self.vcpu_count();
        for (id, vcpu) in self.vcpus.iter().enumerate() {
            let id = id as u32;
            let (entry, arg) = match *plan {
                BootPlan::TestGuest { entry, arg } => (entry, arg),
                BootPlan::Linux { entry } if id == 0 => (entry, 0),
                BootPlan::Linux { .. } => continue,
            };
            let sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
            vcpu.set_sregs(&boot::long_mode_sregs(sregs))
                .map_err(kvm_err("KVM_SET_SREGS"))?;
            vcpu.set_regs(&boot::entry_regs(entry, [u64::from(id), u64::from(n), arg]))
                .map_err(kvm_err("KVM_SET_REGS"))?;
            if id != 0 {
                vcpu.set_mp_state(kvm_mp_state {
                    mp_state: KVM_MP_STATE_RUNNABLE,
                })
                .map_err(kvm_err("KVM_SET_MP_STATE"))?;
            }
        }
        Ok(())
    }

    /// Runs the partition until the guest stops it, a vCPU fails, or `timeout` passes; then stops
    /// and joins every vCPU thread.
    pub fn run(self, timeout: Option<Duration>) -> Result<RunReport, PartitionError> {
        let plan = self.plan.clone().ok_or(PartitionError::NothingLoaded)?;
        self.setup_vcpus(&plan)?;
        install_kick_handler();
        let shared = Arc::new(VcpuShared {
            hv: self.hv.clone(),
            com1: self.com1.clone(),
            control: self.control.clone(),
            log: LogOnce::default(),
            stats: ExitStats::default(),
        });
        let start = Instant::now();
        let mut handles: Vec<JoinHandle<()>> = Vec::new();
        let mut spawn_error = None;
        for (id, vcpu) in self.vcpus.into_iter().enumerate() {
            let s = shared.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || run_vcpu(id as u32, vcpu, &s));
            match spawned {
                Ok(h) => handles.push(h),
                Err(e) => {
                    spawn_error = Some(e);
                    shared.control.finish(ExitReason::Stopped);
                    break;
                }
            }
        }
        let sampler = rip_sampler(&shared.control, &handles);
        let reason = shared.control.wait(timeout);
        // `wait` returned, so the partition is stopping: the sampler leaves its loop before any
        // vCPU thread is joined.
        if let Some(s) = sampler {
            let _ = s.join();
        }
        let guest_time = start.elapsed();
        stop_threads(&shared.control, handles);
        if let Some(e) = spawn_error {
            return Err(PartitionError::Thread(e));
        }
        let st = &shared.stats;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        Ok(RunReport {
            reason,
            guest_time,
            total_time: start.elapsed(),
            io_exits: load(&st.io),
            mmio_exits: load(&st.mmio),
            msr_exits: load(&st.msr),
            hypercalls: load(&st.hypercalls),
            emulation_fixups: load(&st.emulation_fixups),
        })
    }
}

/// With KVM_HOST_SAMPLE_RIP_MS=n, kicks every vCPU out of KVM_RUN every n ms so it logs its RIP
/// (finding where a silent guest spins; the thread ends with the run).
fn rip_sampler(control: &Arc<RunControl>, handles: &[JoinHandle<()>]) -> Option<JoinHandle<()>> {
    use std::os::unix::thread::JoinHandleExt;
    let ms: u64 = std::env::var("KVM_HOST_SAMPLE_RIP_MS").ok()?.parse().ok()?;
    control
        .sampling
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let threads: Vec<libc::pthread_t> = handles.iter().map(|h| h.as_pthread_t()).collect();
    let control = control.clone();
    std::thread::Builder::new()
        .name("rip-sampler".into())
        .spawn(move || {
            while !control.stopping() {
                std::thread::sleep(Duration::from_millis(ms.max(10)));
                for &t in &threads {
                    // SAFETY: `t` names a vCPU thread that is not joined yet: `run` joins this
                    // sampler before it joins any vCPU thread.
                    unsafe { libc::pthread_kill(t, kick_signal()) };
                }
            }
        })
        .ok()
}

fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) = register_signal_handler(kick_signal(), kick_handler) {
            tracing::warn!("registering the vCPU kick signal: {e}");
        }
    });
}

/// Stops every vCPU thread: the stop flag is set; a signal knocks each out of KVM_RUN (a halted
/// AP sits there otherwise), repeated until it has left its loop.
fn stop_threads(control: &RunControl, handles: Vec<JoinHandle<()>>) {
    control.finish(ExitReason::Stopped);
    let deadline = Instant::now() + Duration::from_secs(10);
    while handles.iter().any(|h| !h.is_finished()) && Instant::now() < deadline {
        for h in handles.iter().filter(|h| !h.is_finished()) {
            let _ = h.kill(kick_signal());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    for h in handles {
        if h.is_finished() {
            if h.join().is_err() {
                tracing::error!("a vCPU thread panicked");
            }
        } else {
            tracing::error!("a vCPU thread did not stop within 10 s; leaving it detached");
        }
    }
}
