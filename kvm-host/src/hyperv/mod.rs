//! Hyper-V enlightenments in userspace: CPUID leaves, the synthetic MSRs and hypercalls
//! (vmbus-protocol.md §6, §7; kvm-here.md).
//!
//! KVM here has no in-kernel Hyper-V: the partition installs an MSR filter that denies
//! `0x40000000..=0x400001FF`, so every access to them exits to [`HvPartition::read_msr`] /
//! [`HvPartition::write_msr`] (an `Err` becomes #GP). The hypercall page holds a stub that traps
//! through [`HYPERCALL_PORT`]; the vCPU loop hands the registers to [`HvPartition::hypercall`].

pub mod cpuid;
pub mod hypercall;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::memory::{GuestRam, PAGE_SIZE};
use crate::synic::Synic;

/// I/O port the hypercall page stub writes to (`out dx, eax`).
pub const HYPERCALL_PORT: u16 = 0x4856;

/// Synthetic MSR numbers.
pub mod msr {
    pub const GUEST_OS_ID: u32 = 0x4000_0000;
    pub const HYPERCALL: u32 = 0x4000_0001;
    pub const VP_INDEX: u32 = 0x4000_0002;
    pub const RESET: u32 = 0x4000_0003;
    pub const VP_RUNTIME: u32 = 0x4000_0010;
    pub const TIME_REF_COUNT: u32 = 0x4000_0020;
    pub const REFERENCE_TSC: u32 = 0x4000_0021;
    pub const TSC_FREQUENCY: u32 = 0x4000_0022;
    pub const APIC_FREQUENCY: u32 = 0x4000_0023;
    pub const VP_ASSIST_PAGE: u32 = 0x4000_0073;
    pub const SCONTROL: u32 = 0x4000_0080;
    pub const SVERSION: u32 = 0x4000_0081;
    pub const SIEFP: u32 = 0x4000_0082;
    pub const SIMP: u32 = 0x4000_0083;
    pub const EOM: u32 = 0x4000_0084;
    pub const SINT0: u32 = 0x4000_0090;
    pub const SINT15: u32 = 0x4000_009F;
    pub const TSC_INVARIANT_CONTROL: u32 = 0x4000_0118;
    /// First and last MSR the partition's filter sends to userspace.
    pub const FILTER_FIRST: u32 = 0x4000_0000;
    pub const FILTER_COUNT: u32 = 0x200;
}

/// Hypercall result statuses (reference §6.5).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, thiserror::Error)]
#[repr(u16)]
pub enum HvStatus {
    #[error("HV_STATUS_INVALID_HYPERCALL_CODE")]
    InvalidHypercallCode = 0x0002,
    #[error("HV_STATUS_INVALID_HYPERCALL_INPUT")]
    InvalidHypercallInput = 0x0003,
    #[error("HV_STATUS_INVALID_ALIGNMENT")]
    InvalidAlignment = 0x0004,
    #[error("HV_STATUS_INVALID_PARAMETER")]
    InvalidParameter = 0x0005,
    #[error("HV_STATUS_ACCESS_DENIED")]
    AccessDenied = 0x0006,
    #[error("HV_STATUS_INSUFFICIENT_MEMORY")]
    InsufficientMemory = 0x000B,
    #[error("HV_STATUS_INVALID_PORT_ID")]
    InvalidPortId = 0x0011,
    #[error("HV_STATUS_INVALID_CONNECTION_ID")]
    InvalidConnectionId = 0x0012,
    #[error("HV_STATUS_INSUFFICIENT_BUFFERS")]
    InsufficientBuffers = 0x0013,
    #[error("HV_STATUS_INVALID_SYNIC_STATE")]
    InvalidSynicState = 0x0018,
}

impl HvStatus {
    /// The 16-bit status code.
    pub const fn code(self) -> u16 {
        self as u16
    }
}

/// The statuses a SynIC port (vmbus-core) returns are a subset of the hypercall statuses.
impl From<crate::synic::PortStatus> for HvStatus {
    fn from(s: crate::synic::PortStatus) -> HvStatus {
        use crate::synic::PortStatus as P;
        match s {
            P::InvalidParameter => HvStatus::InvalidParameter,
            P::InsufficientMemory => HvStatus::InsufficientMemory,
            P::InvalidConnectionId => HvStatus::InvalidConnectionId,
            P::InsufficientBuffers => HvStatus::InsufficientBuffers,
            P::InvalidSynicState => HvStatus::InvalidSynicState,
        }
    }
}

/// Why an MSR access gets #GP.
#[derive(Copy, Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MsrError {
    #[error("MSR {0:#x} is not implemented")]
    Unknown(u32),
    #[error("MSR {0:#x} is read-only")]
    ReadOnly(u32),
    #[error("MSR {index:#x}: reserved bits set in {value:#x}")]
    Reserved { index: u32, value: u64 },
    #[error("MSR {index:#x}: page {gpa:#x} is not guest RAM")]
    OutsideRam { index: u32, gpa: u64 },
    #[error("MSR {index:#x}: unmasked SINT with vector < 16 ({value:#x})")]
    BadVector { index: u32, value: u64 },
}

#[derive(Debug, Default)]
struct PartitionMsrs {
    guest_os_id: u64,
    hypercall: u64,
    reference_tsc: u64,
    tsc_invariant_control: u64,
}

/// Partition-wide Hyper-V state; per-VP SynIC state lives in [`Synic`].
#[derive(Debug)]
pub struct HvPartition {
    ram: Arc<GuestRam>,
    synic: Arc<Synic>,
    msrs: Mutex<PartitionMsrs>,
    vp_assist: Vec<Mutex<u64>>,
    start: Instant,
    tsc_hz: u64,
    dilation: u64,
}

/// Port of the fast `HvSignalEvent` path: the hypercall page writes the connection id here
/// (`out dx, eax`). Each open channel has a KVM ioeventfd on it with datamatch = its connection
/// id, so a signal on an open channel completes in the kernel without leaving KVM_RUN; any other
/// value exits to the VMM, which runs the full hypercall and leaves the status in R10.
pub const FAST_SIGNAL_PORT: u16 = 0x4858;

/// `HvCallSignalEvent` with the fast bit and nothing else in the control word.
const FAST_SIGNAL_CONTROL: u32 = 0x1_005D;

/// What the hypercall page holds.
///
/// Fast `HvSignalEvent` with flag 0 and no reserved bits (what Linux's `vmbus_set_event` and
/// vsc-guest issue): `out` of the connection id to [`FAST_SIGNAL_PORT`], status from R10 (zeroed
/// before; the VMM writes it when no ioeventfd took the write). Everything else: save the input
/// GPA (RDX) in R11 and trap through [`HYPERCALL_PORT`]; the VMM reads RCX (control), R11 (input
/// GPA / fast input 1) and R8 (output GPA / fast input 2), writes RAX, restores RDX, and resumes
/// after the `out`. Clobbers only what the hypercall ABI allows (RAX, RDX restored, R10, R11).
pub fn hypercall_page_code() -> Vec<u8> {
    let slow = HYPERCALL_PORT.to_le_bytes();
    let fast = FAST_SIGNAL_PORT.to_le_bytes();
    let c = FAST_SIGNAL_CONTROL.to_le_bytes();
    // Offsets in the comments; both `jne`/`jnz` go to `slow` at 39 (rel8 from the next byte).
    vec![
        0x49,
        0x89,
        0xD3, // 0: mov r11, rdx
        0x48,
        0x81,
        0xF9,
        c[0],
        c[1],
        c[2],
        c[3], // 3: cmp rcx, 0x1005D
        0x75,
        39 - 12, // 10: jne slow
        0x48,
        0x89,
        0xD0, // 12: mov rax, rdx
        0x48,
        0xC1,
        0xE8,
        0x18, // 15: shr rax, 24 (flag number and reserved bits must be 0)
        0x75,
        39 - 21, // 19: jnz slow
        0x89,
        0xD0, // 21: mov eax, edx (the connection id)
        0xBA,
        fast[0],
        fast[1],
        0x00,
        0x00, // 23: mov edx, FAST_SIGNAL_PORT
        0x45,
        0x31,
        0xD2, // 28: xor r10d, r10d
        0xEF, // 31: out dx, eax
        0x44,
        0x89,
        0xD0, // 32: mov eax, r10d (status)
        0x4C,
        0x89,
        0xDA, // 35: mov rdx, r11
        0xC3, // 38: ret
        0xBA,
        slow[0],
        slow[1],
        0x00,
        0x00, // 39 slow: mov edx, HYPERCALL_PORT
        0xEF, // 44: out dx, eax
        0xC3, // 45: ret
        0xCC, // 46: int3 (never reached)
    ]
}

impl HvPartition {
    /// Hyper-V state for a partition whose guest TSC runs at `tsc_hz`.
    pub fn new(ram: Arc<GuestRam>, synic: Arc<Synic>, tsc_hz: u64) -> HvPartition {
        let vps = synic.vp_count();
        HvPartition {
            ram,
            synic,
            msrs: Mutex::new(PartitionMsrs::default()),
            vp_assist: (0..vps).map(|_| Mutex::new(0)).collect(),
            start: Instant::now(),
            tsc_hz,
            dilation: 1,
        }
    }

    /// Time dilation: the guest is told its TSC and LAPIC timer run `factor` times faster than
    /// they do, and the reference counter `factor` times slower, so its clock — and its periodic
    /// tick — runs `factor` times slower than the host's. Under this host's instruction emulator a
    /// Linux tick costs milliseconds: at HZ=250 a loaded machine spent all guest time in the timer
    /// interrupt (every RIP sample in tick code). Guest timeouts stretch by the same factor.
    pub fn time_dilated(mut self, factor: u32) -> HvPartition {
        self.dilation = u64::from(factor.max(1));
        self
    }

    /// The SynIC.
    pub fn synic(&self) -> &Arc<Synic> {
        &self.synic
    }

    /// Guest RAM.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    fn msrs(&self) -> std::sync::MutexGuard<'_, PartitionMsrs> {
        self.msrs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether the guest enabled the hypercall page.
    pub fn hypercall_enabled(&self) -> bool {
        self.msrs().hypercall & 1 != 0
    }

    /// 100 ns units since the partition was created.
    pub fn time_ref_count(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos() / 100 / u128::from(self.dilation))
            .unwrap_or(u64::MAX)
    }

    /// RDMSR from VP `vp`.
    pub fn read_msr(&self, vp: u32, index: u32) -> Result<u64, MsrError> {
        Ok(match index {
            msr::GUEST_OS_ID => self.msrs().guest_os_id,
            msr::HYPERCALL => self.msrs().hypercall,
            msr::VP_INDEX => u64::from(vp),
            msr::TIME_REF_COUNT => self.time_ref_count(),
            msr::REFERENCE_TSC => self.msrs().reference_tsc,
            msr::TSC_FREQUENCY => self.tsc_hz.saturating_mul(self.dilation),
            // KVM's in-kernel LAPIC timer runs at 1 GHz.
            msr::APIC_FREQUENCY => 1_000_000_000u64.saturating_mul(self.dilation),
            msr::VP_ASSIST_PAGE => *self
                .vp_assist
                .get(vp as usize)
                .ok_or(MsrError::Unknown(index))?
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            msr::TSC_INVARIANT_CONTROL => self.msrs().tsc_invariant_control,
            msr::SCONTROL..=msr::SINT15 => self.synic.read_msr(vp, index)?,
            _ => return Err(MsrError::Unknown(index)),
        })
    }

    /// WRMSR from VP `vp`. An `Err` means #GP and no state change.
    pub fn write_msr(&self, vp: u32, index: u32, value: u64) -> Result<(), MsrError> {
        match index {
            msr::GUEST_OS_ID => {
                let mut m = self.msrs();
                m.guest_os_id = value;
                if value == 0 {
                    // TLFS: clearing the guest OS id disables the hypercall page.
                    m.hypercall &= !1;
                }
            }
            msr::HYPERCALL => self.write_hypercall(value)?,
            msr::REFERENCE_TSC => {
                if value & 0xFFE != 0 {
                    return Err(MsrError::Reserved { index, value });
                }
                let gpa = value & !0xFFF;
                if value & 1 != 0 {
                    if !self.ram.contains(gpa, PAGE_SIZE) {
                        return Err(MsrError::OutsideRam { index, gpa });
                    }
                    // Not advertised (leaf 0x40000003 EAX bit 9 clear): publish sequence 0 =
                    // "invalid", so a guest that enables it anyway falls back to the MSR.
                    self.ram
                        .zero(gpa, 32)
                        .map_err(|_| MsrError::OutsideRam { index, gpa })?;
                }
                self.msrs().reference_tsc = value;
            }
            msr::VP_ASSIST_PAGE => {
                if value & 0xFFE != 0 {
                    return Err(MsrError::Reserved { index, value });
                }
                let gpa = value & !0xFFF;
                if value & 1 != 0 && !self.ram.contains(gpa, PAGE_SIZE) {
                    return Err(MsrError::OutsideRam { index, gpa });
                }
                let slot = self
                    .vp_assist
                    .get(vp as usize)
                    .ok_or(MsrError::Unknown(index))?;
                *slot
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = value;
            }
            msr::TSC_INVARIANT_CONTROL => {
                if value & !1 != 0 {
                    return Err(MsrError::Reserved { index, value });
                }
                self.msrs().tsc_invariant_control = value;
            }
            msr::VP_INDEX | msr::TIME_REF_COUNT | msr::TSC_FREQUENCY | msr::APIC_FREQUENCY => {
                return Err(MsrError::ReadOnly(index));
            }
            msr::SCONTROL..=msr::SINT15 => self.synic.write_msr(vp, index, value)?,
            _ => return Err(MsrError::Unknown(index)),
        }
        Ok(())
    }

    fn write_hypercall(&self, value: u64) -> Result<(), MsrError> {
        let index = msr::HYPERCALL;
        if value & 0xFFC != 0 {
            return Err(MsrError::Reserved { index, value });
        }
        let mut m = self.msrs();
        if m.hypercall & 2 != 0 {
            // Locked: writes are ignored until reset.
            return Ok(());
        }
        let gpa = value & !0xFFF;
        let mut value = value;
        if m.guest_os_id == 0 {
            // TLFS: the page cannot be enabled before the guest identifies itself.
            value &= !1;
        }
        if value & 1 != 0 {
            if !self.ram.contains(gpa, PAGE_SIZE) {
                return Err(MsrError::OutsideRam { index, gpa });
            }
            let mut page = vec![0xCCu8; PAGE_SIZE as usize];
            let code = hypercall_page_code();
            if let Some(dst) = page.get_mut(..code.len()) {
                dst.copy_from_slice(&code);
            }
            self.ram
                .write(gpa, &page)
                .map_err(|_| MsrError::OutsideRam { index, gpa })?;
        }
        m.hypercall = value;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
