//! Hypercall decoding and dispatch (vmbus-protocol.md §6.5, §6.6, §10).
//!
//! Implemented: `HvPostMessage` (0x5C, slow) and `HvSignalEvent` (0x5D, fast or slow). Everything
//! the guest passes is checked before it reaches the [`crate::synic::SynicHandler`]: the control
//! word, input GPA alignment, RAM and page bounds, payload size and message type.
#![warn(clippy::arithmetic_side_effects, clippy::indexing_slicing)]

use super::{HvPartition, HvStatus};
use crate::memory::PAGE_SIZE;

/// `HvCallPostMessage`.
pub const HVCALL_POST_MESSAGE: u16 = 0x005C;
/// `HvCallSignalEvent`.
pub const HVCALL_SIGNAL_EVENT: u16 = 0x005D;
/// Control word bit 16: register ("fast") input.
pub const CONTROL_FAST: u64 = 1 << 16;
/// Size of the `HvPostMessage` input block (header + 240-byte payload).
pub const POST_MESSAGE_INPUT_SIZE: u64 = 0x100;
/// Payload bytes `HvPostMessage` accepts.
pub const POST_PAYLOAD_MIN: u32 = 8;
pub const POST_PAYLOAD_MAX: u32 = 240;

/// The registers of a 64-bit hypercall.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct HypercallInput {
    /// RCX: control word.
    pub control: u64,
    /// RDX (saved in R11 by the page stub): input GPA, or fast input 1.
    pub input: u64,
    /// R8: output GPA, or fast input 2.
    pub output: u64,
}

/// A decoded control word.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Control {
    pub code: u16,
    pub fast: bool,
    pub var_header_qwords: u16,
    pub rep_count: u16,
    pub rep_start: u16,
    /// Bits 31:27, 47:44 and 63:60.
    pub reserved: u64,
}

impl Control {
    pub fn decode(control: u64) -> Control {
        Control {
            code: (control & 0xFFFF) as u16,
            fast: control & CONTROL_FAST != 0,
            var_header_qwords: ((control >> 17) & 0x3FF) as u16,
            rep_count: ((control >> 32) & 0xFFF) as u16,
            rep_start: ((control >> 48) & 0xFFF) as u16,
            reserved: control & 0xF000_F000_F800_0000,
        }
    }
}

/// The 64-bit RAX result for a status (simple calls complete no reps).
pub fn result(status: Result<(), HvStatus>) -> u64 {
    match status {
        Ok(()) => 0,
        Err(s) => u64::from(s.code()),
    }
}

impl HvPartition {
    /// Runs a hypercall from VP `vp`; returns the value for RAX.
    pub fn hypercall(&self, vp: u32, regs: HypercallInput) -> u64 {
        let status = self.dispatch(vp, regs);
        if let Err(s) = status {
            tracing::debug!(vp, control = format_args!("{:#x}", regs.control), status = %s, "hypercall failed");
        }
        result(status)
    }

    fn dispatch(&self, vp: u32, regs: HypercallInput) -> Result<(), HvStatus> {
        let c = Control::decode(regs.control);
        if c.code != HVCALL_POST_MESSAGE && c.code != HVCALL_SIGNAL_EVENT {
            return Err(HvStatus::InvalidHypercallCode);
        }
        // Both are simple (non-rep) calls without a variable header.
        if c.reserved != 0 || c.rep_count != 0 || c.rep_start != 0 || c.var_header_qwords != 0 {
            return Err(HvStatus::InvalidHypercallInput);
        }
        match c.code {
            HVCALL_POST_MESSAGE => self.post_message(vp, c, regs.input),
            _ => self.signal_event(vp, c, regs.input),
        }
    }

    /// Reads `len` bytes of hypercall input at `gpa`: 8-byte aligned, inside one page, in RAM.
    fn read_input(&self, gpa: u64, buf: &mut [u8]) -> Result<(), HvStatus> {
        if !gpa.is_multiple_of(8) {
            return Err(HvStatus::InvalidAlignment);
        }
        let len = buf.len() as u64;
        if (gpa % PAGE_SIZE).saturating_add(len) > PAGE_SIZE {
            return Err(HvStatus::InvalidHypercallInput);
        }
        self.ram()
            .read(gpa, buf)
            .map_err(|_| HvStatus::InvalidHypercallInput)
    }

    fn post_message(&self, vp: u32, c: Control, gpa: u64) -> Result<(), HvStatus> {
        if c.fast {
            // Fast (XMM) input is not advertised.
            return Err(HvStatus::InvalidHypercallInput);
        }
        let mut input = [0u8; POST_MESSAGE_INPUT_SIZE as usize];
        self.read_input(gpa, &mut input)?;
        let word = |off: usize| -> u32 {
            let mut b = [0u8; 4];
            if let Some(s) = input.get(off..off.saturating_add(4)) {
                b.copy_from_slice(s);
            }
            u32::from_le_bytes(b)
        };
        let connection_id = word(0) & 0x00FF_FFFF;
        let message_type = word(8);
        let size = word(0xC);
        if !(POST_PAYLOAD_MIN..=POST_PAYLOAD_MAX).contains(&size) {
            return Err(HvStatus::InvalidParameter);
        }
        // Type 0 is "no message"; types with the top bit set belong to the hypervisor.
        if message_type == 0 || message_type & 0x8000_0000 != 0 {
            return Err(HvStatus::InvalidParameter);
        }
        let payload = input
            .get(0x10..0x10usize.saturating_add(size as usize))
            .ok_or(HvStatus::InvalidParameter)?;
        Ok(self
            .synic()
            .guest_post(vp, connection_id, message_type, payload)?)
    }

    fn signal_event(&self, vp: u32, c: Control, input: u64) -> Result<(), HvStatus> {
        let value = if c.fast {
            input
        } else {
            let mut b = [0u8; 8];
            self.read_input(input, &mut b)?;
            u64::from_le_bytes(b)
        };
        if value >> 48 != 0 || value & 0xFF00_0000 != 0 {
            return Err(HvStatus::InvalidHypercallInput);
        }
        let connection_id = (value & 0x00FF_FFFF) as u32;
        let flag = ((value >> 32) & 0xFFFF) as u16;
        if u32::from(flag) >= vmbus_core::synic::EVENT_FLAGS_PER_SINT {
            return Err(HvStatus::InvalidParameter);
        }
        Ok(self.synic().guest_signal(vp, connection_id, flag)?)
    }
}
