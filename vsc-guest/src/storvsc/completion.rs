//! A finished request as the driver's user sees it, the events the controller reports and its
//! counters. Status handling follows Linux `storvsc_on_io_completion` /
//! `storvsc_command_completion`.

use super::cdb::Cdb;
use super::driver::{Pending, ScsiAddress};
use super::init::{InitError, Negotiated};
use super::sense::{IoError, Sense, SenseError, parse_sense};
use vmbus_core::devices::vstor::{SENSE_BUFFER_SIZE, scsi_status, srb_status};

/// A finished SCSI request.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Completion {
    pub tag: u64,
    pub trans_id: u64,
    /// Channel the request went out on.
    pub channel: u16,
    pub addr: ScsiAddress,
    pub cdb: Cdb,
    /// Buffer length sent.
    pub requested: u32,
    pub srb_status: u8,
    pub scsi_status: u8,
    pub nt_status: u32,
    /// `data_transfer_length` as the host reported it (unclamped).
    pub data_transfer_length: u32,
    pub(crate) sense: [u8; SENSE_BUFFER_SIZE],
    pub(crate) sense_len: u8,
    pub(crate) cancelled: bool,
}

impl Completion {
    pub(crate) fn cancelled(trans_id: u64, p: &Pending) -> Self {
        Completion {
            tag: p.tag,
            trans_id,
            channel: p.channel,
            addr: p.addr,
            cdb: p.cdb,
            requested: p.requested,
            srb_status: 0,
            scsi_status: 0,
            nt_status: 0,
            data_transfer_length: 0,
            sense: [0; SENSE_BUFFER_SIZE],
            sense_len: 0,
            cancelled: true,
        }
    }

    /// Bytes moved, as Linux `storvsc_command_completion` counts them: the host's figure only for
    /// SRB status SUCCESS or DATA_OVERRUN (the whole byte: `0x81` is not success), clamped to the
    /// buffer; 0 otherwise.
    pub fn transferred(&self) -> u32 {
        if self.cancelled {
            return 0;
        }
        match self.srb_status {
            srb_status::SUCCESS | srb_status::DATA_OVERRUN => {
                self.data_transfer_length.min(self.requested)
            }
            _ => 0,
        }
    }

    /// The sense bytes the host supplied (only with CHECK CONDITION and AUTOSENSE_VALID, as Linux
    /// copies them; at most 20).
    pub fn sense_bytes(&self) -> &[u8] {
        self.sense.get(..usize::from(self.sense_len)).unwrap_or(&[])
    }

    /// The decoded sense, if any was supplied.
    pub fn sense(&self) -> Option<Result<Sense, SenseError>> {
        (self.sense_len > 0).then(|| parse_sense(self.sense_bytes()))
    }

    /// `Ok(bytes moved)` or why the request failed.
    pub fn result(&self) -> Result<u32, IoError> {
        if self.cancelled {
            return Err(IoError::Cancelled);
        }
        if srb_status::code(self.srb_status) == srb_status::INVALID_LUN {
            return Err(IoError::InvalidLun);
        }
        match self.scsi_status {
            scsi_status::GOOD => {}
            scsi_status::CHECK_CONDITION => {
                return Err(match self.sense() {
                    Some(Ok(s)) => IoError::from_sense(s),
                    Some(Err(e)) => IoError::BadSense(e),
                    None => IoError::CheckConditionNoSense {
                        srb_status: self.srb_status,
                    },
                });
            }
            scsi_status::BUSY | scsi_status::TASK_SET_FULL => {
                return Err(IoError::Busy {
                    scsi_status: self.scsi_status,
                });
            }
            scsi_status::RESERVATION_CONFLICT => return Err(IoError::ReservationConflict),
            _ => return Err(self.host_error()),
        }
        match self.srb_status {
            srb_status::SUCCESS | srb_status::DATA_OVERRUN => Ok(self.transferred()),
            _ => Err(self.host_error()),
        }
    }

    fn host_error(&self) -> IoError {
        IoError::Host {
            srb_status: self.srb_status,
            scsi_status: self.scsi_status,
            nt_status: self.nt_status,
        }
    }
}

/// Something the driver's user should act on.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum StorvscEvent {
    /// The handshake finished: the primary channel takes I/O. When `subchannels > 0` the host
    /// will offer that many sub-channels: open each and call [`Storvsc::add_channel`].
    Ready(Negotiated),
    /// The handshake failed; the controller is unusable.
    InitFailed(InitError),
    /// ENUMERATE_BUS / REMOVE_DEVICE: LUNs came or went; rescan (Linux: TEST UNIT READY on every
    /// known LUN, then a full scan).
    Rescan,
    /// RESET_BUS completed with this status.
    ResetComplete { status: u32 },
}

/// Counters over the life of the controller.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub submitted: u64,
    pub completed: u64,
    /// Completions for requests already completed (e.g. repeated by a restarted VSP).
    pub duplicates: u64,
    /// Completions for ids the driver never used.
    pub unknown: u64,
    /// Packets refused as malformed (bad length, type or operation).
    pub malformed: u64,
    /// Host-initiated messages (id 0).
    pub unsolicited: u64,
    /// Completions that came back on another channel than their request went out on.
    pub wrong_channel: u64,
    /// Requests sent again by [`Storvsc::resend_in_flight`](super::Storvsc::resend_in_flight).
    pub resent: u64,
}
