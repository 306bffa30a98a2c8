//! The contract between the VMBus host and a virtual service provider (VSP): what a device declares
//! and what it is handed when the guest opens, closes or loses one of its channels.
//!
//! Kept narrow on purpose: the host server owns offers, GPADLs and channel state; a device only ever
//! sees ready-to-use rings (already mapped by whoever hosts it: in-process, or a VSP process that got
//! the ring pages over its socket) and a way to interrupt the guest.

use crate::wire::{Guid, USER_DEFINED_SIZE};
use alloc::vec::Vec;

/// What a device offers on the bus.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceDescription {
    /// Device class (interface type), e.g. [`crate::wire::class::SCSI`].
    pub class: Guid,
    /// This device's instance; stable across reboots and hibernation (Linux matches on it).
    pub instance: Guid,
    /// Pipe-mode offers put the pipe type in the user-defined area; `None` = ordinary device.
    pub pipe_mode: Option<u32>,
    /// MMIO space the device wants (only synthetic video uses it).
    pub mmio_megabytes: u16,
    /// Most sub-channels the device will ever request (0 = single channel).
    pub max_subchannels: u16,
    /// Device-specific offer bytes (ignored for pipe-mode offers).
    pub user_defined: [u8; USER_DEFINED_SIZE],
}

impl DeviceDescription {
    pub fn new(class: Guid, instance: Guid) -> Self {
        DeviceDescription {
            class,
            instance,
            pipe_mode: None,
            mmio_megabytes: 0,
            max_subchannels: 0,
            user_defined: [0; USER_DEFINED_SIZE],
        }
    }
}

/// A channel the guest opened, as the host hands it to the device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenChannelInfo {
    pub relid: u32,
    /// 0 for the primary channel, 1.. for sub-channels.
    pub subchannel_index: u16,
    /// The ring GPADL's pages: guest→host ring first (`[0, downstream_offset)`), host→guest ring
    /// after it. The first page of each ring is its control page.
    pub ring_pages: Vec<u64>,
    /// Page offset of the host→guest ring inside `ring_pages`.
    pub downstream_offset: u32,
    /// VP that receives this channel's interrupts (moved later through [`VmbusDevice::retarget`]).
    pub target_vp: u32,
    /// Event connection id the guest signals this channel with (HvSignalEvent).
    pub connection_id: u32,
    /// The 120 bytes the guest passed in OPENCHANNEL (devices such as hv_sock read them).
    pub user_data: [u8; USER_DEFINED_SIZE],
}

/// Errors a device reports to the host; the host turns them into a failed OPENCHANNEL_RESULT.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    #[error("ring pages could not be mapped: {0}")]
    RingMapping(alloc::string::String),
    #[error("ring layout refused: {0}")]
    BadRing(ringbuf::RingError),
    #[error("device is out of resources")]
    NoResources,
    #[error("saved device state is invalid: {0}")]
    BadSavedState(alloc::string::String),
}

impl From<crate::savestate::Truncated> for DeviceError {
    fn from(e: crate::savestate::Truncated) -> Self {
        DeviceError::BadSavedState(alloc::string::ToString::to_string(&e))
    }
}

/// Requests a device makes to the bus while running.
pub trait ChannelControl {
    /// Offer `count` sub-channels of the device's primary channel (the device protocol asked for
    /// them, e.g. storvsc's CREATE_SUB_CHANNELS). Returns how many were offered.
    fn offer_subchannels(&mut self, count: u16) -> u16;
}

/// A virtual service provider device on the bus.
pub trait VmbusDevice {
    /// What to offer. Called once when the device is added.
    fn description(&self) -> DeviceDescription;

    /// The guest opened a channel: start serving its rings. An error fails the guest's open.
    fn open(
        &mut self,
        channel: OpenChannelInfo,
        bus: &mut dyn ChannelControl,
    ) -> Result<(), DeviceError>;

    /// The guest closed the channel, or the bus is resetting: stop touching its rings before
    /// returning (the host releases the ring GPADL afterwards).
    fn close(&mut self, relid: u32);

    /// The guest moved the channel's interrupt to another VP.
    fn retarget(&mut self, relid: u32, target_vp: u32) {
        let _ = (relid, target_vp);
    }

    /// Device state for quick migration or a VSP restart (the rings' own state lives in guest memory).
    fn save(&self) -> Vec<u8> {
        Vec::new()
    }

    /// Takes back state produced by [`Self::save`] before channels are re-opened.
    fn restore(&mut self, state: &[u8]) -> Result<(), DeviceError> {
        restore_stateless(state)
    }
}

/// `restore` of a device that keeps no state: only the empty state it saves is accepted.
pub fn restore_stateless(state: &[u8]) -> Result<(), DeviceError> {
    if state.is_empty() {
        Ok(())
    } else {
        Err(DeviceError::BadSavedState("device keeps no state".into()))
    }
}
