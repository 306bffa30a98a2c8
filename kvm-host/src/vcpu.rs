//! vCPU threads: the KVM_RUN loop and its exits.
//!
//! Handled exits: port I/O (COM1, the test exit port, the hypercall port, everything else ignored
//! and logged once), MMIO (no userspace MMIO devices yet: reads return all-ones), the Hyper-V MSRs
//! (via the MSR filter), HLT, shutdown (triple fault) and internal errors. This host's KVM emulates
//! every guest instruction and cannot execute INT3 or FWAIT (kvm-here.md): an emulation failure on
//! INT3 becomes "advance RIP, inject #BP", on FWAIT "advance RIP"; each work-around is logged once.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{
    KVM_INTERNAL_ERROR_EMULATION, KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES,
};
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::hyperv::hypercall::HypercallInput;
use crate::hyperv::{FAST_SIGNAL_PORT, HYPERCALL_PORT, HvPartition, msr};
use crate::serial::{Com1, SharedCom1};

/// Port a test guest writes a status byte to in order to stop the partition.
pub const EXIT_PORT: u16 = 0x4857;
/// POST code port (Linux uses it as an I/O delay); ignored silently.
const POST_PORT: u16 = 0x80;

/// Why a partition stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest wrote this status to [`EXIT_PORT`].
    ExitPort(u8),
    /// VP `vp` triple-faulted (KVM_EXIT_SHUTDOWN).
    Shutdown { vp: u32 },
    /// KVM could not continue VP `vp` (emulation failure of an unsupported instruction, ...).
    InternalError { vp: u32, detail: String },
    /// KVM_RUN itself failed, or an exit this VMM does not handle.
    VcpuFailed { vp: u32, detail: String },
    /// The run's time limit passed.
    Timeout,
    /// The host asked the partition to stop.
    Stopped,
}

/// Exit counters, summed over all VPs.
#[derive(Debug, Default)]
pub struct ExitStats {
    pub io: AtomicU64,
    pub mmio: AtomicU64,
    pub msr: AtomicU64,
    pub hypercalls: AtomicU64,
    pub emulation_fixups: AtomicU64,
}

/// Start/stop coordination between the partition and its vCPU threads.
#[derive(Debug, Default)]
pub struct RunControl {
    stop: AtomicBool,
    /// vCPUs log their RIP when kicked (a diagnostic sampler runs).
    pub sampling: AtomicBool,
    reason: Mutex<Option<ExitReason>>,
    cv: Condvar,
}

impl RunControl {
    /// Records why the partition stops (the first reason wins) and tells every vCPU to stop.
    pub fn finish(&self, reason: ExitReason) {
        let mut r = self
            .reason
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if r.is_none() {
            *r = Some(reason);
        }
        self.stop.store(true, Ordering::SeqCst);
        self.cv.notify_all();
    }

    /// Whether vCPUs should leave their loops.
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Waits until a reason is recorded or `timeout` passes (then records [`ExitReason::Timeout`]).
    pub fn wait(&self, timeout: Option<Duration>) -> ExitReason {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut r = self
            .reason
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        loop {
            if let Some(reason) = r.clone() {
                return reason;
            }
            let wait = match deadline {
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(left) => left,
                    None => {
                        *r = Some(ExitReason::Timeout);
                        self.stop.store(true, Ordering::SeqCst);
                        return ExitReason::Timeout;
                    }
                },
                None => Duration::from_secs(3600),
            };
            r = self
                .cv
                .wait_timeout(r, wait)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }
}

/// Logs a message once per key (unhandled ports, MSRs, quirks).
#[derive(Debug, Default)]
pub struct LogOnce(Mutex<HashSet<(&'static str, u64)>>);

impl LogOnce {
    /// `true` the first time `(what, key)` is seen.
    pub fn first(&self, what: &'static str, key: u64) -> bool {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert((what, key))
    }
}

/// What every vCPU thread shares.
#[derive(Debug)]
pub struct VcpuShared {
    pub hv: Arc<HvPartition>,
    pub com1: SharedCom1,
    pub control: Arc<RunControl>,
    pub log: LogOnce,
    pub stats: ExitStats,
}

/// Follow-up work that needs the vCPU fd after the exit borrow ends.
enum After {
    Nothing,
    Hypercall,
    FastSignal,
    Internal,
    Stop(ExitReason),
}

/// Runs VP `vp` until the partition stops.
pub fn run_vcpu(vp: u32, mut vcpu: VcpuFd, shared: &VcpuShared) {
    tracing::debug!(vp, "vCPU running");
    while !shared.control.stopping() {
        let after = match vcpu.run() {
            Ok(exit) => handle_exit(vp, exit, shared),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                if shared.control.sampling.load(Ordering::Relaxed)
                    && let Ok(r) = vcpu.get_regs()
                {
                    // Where a guest that prints nothing spends its time (KVM_HOST_SAMPLE_RIP_MS).
                    tracing::info!(vp, rip = format_args!("{:#x}", r.rip), "vCPU sample");
                }
                After::Nothing
            }
            Err(e) => After::Stop(ExitReason::VcpuFailed {
                vp,
                detail: format!("KVM_RUN: {e}"),
            }),
        };
        match after {
            After::Nothing => {}
            After::Hypercall => {
                if let Err(reason) = hypercall(vp, &vcpu, shared) {
                    shared.control.finish(reason);
                }
            }
            After::FastSignal => {
                if let Err(reason) = fast_signal(vp, &vcpu, shared) {
                    shared.control.finish(reason);
                }
            }
            After::Internal => {
                if let Err(reason) = internal_error(vp, &mut vcpu, shared) {
                    shared.control.finish(reason);
                }
            }
            After::Stop(reason) => shared.control.finish(reason),
        }
    }
    tracing::debug!(vp, "vCPU stopped");
}

fn com1(shared: &VcpuShared) -> std::sync::MutexGuard<'_, Com1> {
    shared
        .com1
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn handle_exit(vp: u32, exit: VcpuExit<'_>, shared: &VcpuShared) -> After {
    match exit {
        VcpuExit::IoOut(port, data) => {
            shared.stats.io.fetch_add(1, Ordering::Relaxed);
            match port {
                EXIT_PORT => {
                    return After::Stop(ExitReason::ExitPort(data.first().copied().unwrap_or(0)));
                }
                HYPERCALL_PORT if shared.hv.hypercall_enabled() => return After::Hypercall,
                // No ioeventfd took it: not an open channel's connection id.
                FAST_SIGNAL_PORT if shared.hv.hypercall_enabled() => return After::FastSignal,
                p if Com1::claims(p) => {
                    let mut c = com1(shared);
                    for (i, b) in data.iter().enumerate() {
                        c.write(p.wrapping_add(i as u16), *b);
                    }
                }
                POST_PORT => {}
                p => {
                    if shared.log.first("out", u64::from(p)) {
                        tracing::info!(
                            vp,
                            port = format_args!("{p:#x}"),
                            len = data.len(),
                            "unhandled OUT (ignored; logged once)"
                        );
                    }
                }
            }
        }
        VcpuExit::IoIn(port, data) => {
            shared.stats.io.fetch_add(1, Ordering::Relaxed);
            if Com1::claims(port) {
                let mut c = com1(shared);
                for (i, b) in data.iter_mut().enumerate() {
                    *b = c.read(port.wrapping_add(i as u16));
                }
            } else {
                data.fill(0xFF);
                if port != POST_PORT && shared.log.first("in", u64::from(port)) {
                    tracing::info!(
                        vp,
                        port = format_args!("{port:#x}"),
                        "unhandled IN (reads all-ones; logged once)"
                    );
                }
            }
        }
        VcpuExit::MmioRead(addr, data) => {
            shared.stats.mmio.fetch_add(1, Ordering::Relaxed);
            data.fill(0xFF);
            if shared.log.first("mmio-read", addr >> 12) {
                tracing::info!(
                    vp,
                    addr = format_args!("{addr:#x}"),
                    "MMIO read outside RAM (all-ones; logged once per page)"
                );
            }
        }
        VcpuExit::MmioWrite(addr, _) => {
            shared.stats.mmio.fetch_add(1, Ordering::Relaxed);
            if shared.log.first("mmio-write", addr >> 12) {
                tracing::info!(
                    vp,
                    addr = format_args!("{addr:#x}"),
                    "MMIO write outside RAM (ignored; logged once per page)"
                );
            }
        }
        VcpuExit::X86Rdmsr(exit) => {
            shared.stats.msr.fetch_add(1, Ordering::Relaxed);
            match read_msr(vp, exit.index, shared) {
                Some(v) => *exit.data = v,
                None => *exit.error = 1,
            }
        }
        VcpuExit::X86Wrmsr(exit) => {
            shared.stats.msr.fetch_add(1, Ordering::Relaxed);
            if !write_msr(vp, exit.index, exit.data, shared) {
                *exit.error = 1;
            }
        }
        VcpuExit::Hlt => {
            // With the in-kernel irqchip KVM handles HLT itself; seeing it here means no LAPIC.
            if shared.log.first("hlt", u64::from(vp)) {
                tracing::info!(vp, "HLT exit to userspace");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        VcpuExit::Shutdown => return After::Stop(ExitReason::Shutdown { vp }),
        VcpuExit::InternalError => return After::Internal,
        VcpuExit::Intr => {}
        VcpuExit::SystemEvent(ty, data) => {
            return After::Stop(ExitReason::VcpuFailed {
                vp,
                detail: format!("system event {ty} {data:x?}"),
            });
        }
        VcpuExit::FailEntry(reason, cpu) => {
            return After::Stop(ExitReason::VcpuFailed {
                vp,
                detail: format!("KVM_EXIT_FAIL_ENTRY reason {reason:#x} on cpu {cpu}"),
            });
        }
        other => {
            return After::Stop(ExitReason::VcpuFailed {
                vp,
                detail: format!("unhandled exit {other:?}"),
            });
        }
    }
    After::Nothing
}

fn in_hv_range(index: u32) -> bool {
    index.wrapping_sub(msr::FILTER_FIRST) < msr::FILTER_COUNT
}

fn read_msr(vp: u32, index: u32, shared: &VcpuShared) -> Option<u64> {
    if in_hv_range(index) {
        match shared.hv.read_msr(vp, index) {
            Ok(v) => return Some(v),
            Err(e) => {
                if shared.log.first("rdmsr", u64::from(index)) {
                    tracing::info!(vp, "RDMSR #GP: {e} (logged once per MSR)");
                }
            }
        }
    } else if shared.log.first("rdmsr", u64::from(index)) {
        tracing::info!(
            vp,
            msr = format_args!("{index:#x}"),
            "RDMSR of an MSR KVM refused: #GP (logged once)"
        );
    }
    None
}

fn write_msr(vp: u32, index: u32, value: u64, shared: &VcpuShared) -> bool {
    if in_hv_range(index) {
        match shared.hv.write_msr(vp, index, value) {
            Ok(()) => return true,
            Err(e) => {
                if shared.log.first("wrmsr", u64::from(index)) {
                    tracing::info!(vp, "WRMSR #GP: {e} (logged once per MSR)");
                }
            }
        }
    } else if shared.log.first("wrmsr", u64::from(index)) {
        tracing::info!(
            vp,
            msr = format_args!("{index:#x}"),
            value = format_args!("{value:#x}"),
            "WRMSR KVM refused: #GP (logged once)"
        );
    }
    false
}

/// The guest called the hypercall page: RCX control, R11 (saved RDX) input, R8 output.
fn hypercall(vp: u32, vcpu: &VcpuFd, shared: &VcpuShared) -> Result<(), ExitReason> {
    shared.stats.hypercalls.fetch_add(1, Ordering::Relaxed);
    let failed = |e: kvm_ioctls::Error| ExitReason::VcpuFailed {
        vp,
        detail: format!("registers for hypercall: {e}"),
    };
    let mut regs = vcpu.get_regs().map_err(failed)?;
    let input = HypercallInput {
        control: regs.rcx,
        input: regs.r11,
        output: regs.r8,
    };
    regs.rax = shared.hv.hypercall(vp, input);
    regs.rdx = regs.r11;
    vcpu.set_regs(&regs).map_err(failed)?;
    Ok(())
}

/// A fast `HvSignalEvent` the kernel did not complete: the page stub left control in RCX and the
/// input in R11 and takes the status from R10.
fn fast_signal(vp: u32, vcpu: &VcpuFd, shared: &VcpuShared) -> Result<(), ExitReason> {
    shared.stats.hypercalls.fetch_add(1, Ordering::Relaxed);
    let failed = |e: kvm_ioctls::Error| ExitReason::VcpuFailed {
        vp,
        detail: format!("registers for a fast signal: {e}"),
    };
    let mut regs = vcpu.get_regs().map_err(failed)?;
    let input = HypercallInput {
        control: regs.rcx,
        input: regs.r11,
        output: regs.r8,
    };
    regs.r10 = shared.hv.hypercall(vp, input);
    vcpu.set_regs(&regs).map_err(failed)?;
    Ok(())
}

/// KVM_EXIT_INTERNAL_ERROR: apply the emulator work-arounds or stop the partition.
fn internal_error(vp: u32, vcpu: &mut VcpuFd, shared: &VcpuShared) -> Result<(), ExitReason> {
    let run = vcpu.get_kvm_run();
    // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, for which the kernel fills the
    // `internal` / `emulation_failure` members of the exit union; both are plain integer data.
    let (suberror, flags, insn) = unsafe {
        let ef = run.__bindgen_anon_1.emulation_failure;
        let bytes = ef.__bindgen_anon_1.__bindgen_anon_1;
        (ef.suberror, ef.flags, bytes)
    };
    let fail = |detail: String| ExitReason::InternalError { vp, detail };
    if suberror != KVM_INTERNAL_ERROR_EMULATION {
        return Err(fail(format!("internal error suberror {suberror}")));
    }
    let mut regs = vcpu
        .get_regs()
        .map_err(|e| fail(format!("get_regs: {e}")))?;
    let mut bytes = [0u8; 15];
    let mut len = 0usize;
    if flags & u64::from(KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES) != 0 {
        len = usize::from(insn.insn_size).min(15);
        bytes = insn.insn_bytes;
    } else if let Ok(t) = vcpu.translate_gva(regs.rip)
        && t.valid != 0
        && shared.hv.ram().read(t.physical_address, &mut bytes).is_ok()
    {
        len = 15;
    }
    let insn = bytes.get(..len).unwrap_or(&[]);
    let quirk = match insn.first() {
        Some(0xCC) => "int3",
        Some(0x9B) => "fwait",
        _ => {
            return Err(fail(format!(
                "emulation failure at rip {:#x}, instruction bytes {insn:02x?}",
                regs.rip
            )));
        }
    };
    if shared
        .log
        .first("quirk", u64::from(insn.first().copied().unwrap_or(0)))
    {
        tracing::info!(
            vp,
            rip = format_args!("{:#x}", regs.rip),
            "emulator cannot run {quirk}: working around it (logged once)"
        );
    }
    shared
        .stats
        .emulation_fixups
        .fetch_add(1, Ordering::Relaxed);
    regs.rip = regs.rip.wrapping_add(1);
    vcpu.set_regs(&regs)
        .map_err(|e| fail(format!("set_regs: {e}")))?;
    let mut events = vcpu
        .get_vcpu_events()
        .map_err(|e| fail(format!("get_vcpu_events: {e}")))?;
    // The failed emulation may have queued #UD: replace it.
    events.exception.pending = 0;
    events.exception.has_error_code = 0;
    events.exception.error_code = 0;
    events.exception_has_payload = 0;
    if quirk == "int3" {
        events.exception.injected = 1;
        events.exception.nr = 3;
    } else {
        events.exception.injected = 0;
        events.exception.nr = 0;
    }
    vcpu.set_vcpu_events(&events)
        .map_err(|e| fail(format!("set_vcpu_events: {e}")))?;
    Ok(())
}
