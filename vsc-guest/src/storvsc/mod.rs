//! storvsc: the guest side of the vstor protocol (Hyper-V synthetic SCSI), modelled on Linux
//! `drivers/scsi/storvsc_drv.c` (6.1) and the parts of the SCSI mid-layer and `sd` it relies on.
//!
//! Sans-IO and `no_std` + `alloc`:
//! - [`Storvsc`] is one controller: the init handshake ([`init`]), request ids and the in-flight
//!   table, SRB packets ([`packet`]), completion matching and status → error mapping. It queues
//!   [`OutPacket`]s per channel and takes host packets through [`Storvsc::handle_packet`].
//! - [`RingChannel`] moves those packets through a channel's rings (any `ringbuf::RingMem`).
//! - [`Prober`] is the SCSI probe (INQUIRY, VPD, REPORT LUNS, TEST UNIT READY, READ CAPACITY,
//!   MODE SENSE) as a state machine; [`Disk`] builds Linux's READ/WRITE/flush/discard commands.
//! - [`cdb`], [`parse`] and [`sense`] are the SCSI byte formats.
//!
//! Whoever drives it (a bare-metal guest, the std harness in `crate::harness`, a test) owns the
//! VMBus channel (offer, GPADL, open), the rings, guest memory for data buffers, and signalling.

pub mod cdb;
pub mod completion;
pub mod disk;
pub mod driver;
pub mod init;
pub mod packet;
pub mod parse;
pub mod probe;
pub mod ring;
pub mod sense;

#[cfg(test)]
mod tests;

pub use cdb::Cdb;
pub use disk::{DiscardCommand, DiscardData, DiscardMode, Disk, DiskError};
pub use driver::{
    Completion, DriverState, Handled, INIT_TRANS_ID, RESET_TRANS_ID, ScsiAddress, ScsiRequest,
    Stats, Storvsc, StorvscConfig, StorvscError, StorvscEvent,
};
pub use init::{InitError, InitStep, Negotiated};
pub use packet::{Direction, OutPacket, PageRange, RangeError, contiguous_pfns};
pub use probe::{LunInfo, ProbeCommand, ProbeConfig, ProbeStep, ProbeWarning, Prober};
pub use ring::{ChannelError, RingChannel, RxOutcome, TxOutcome};
pub use sense::{IoError, Sense, SenseError, SenseKey, parse_sense};
