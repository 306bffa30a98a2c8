//! Executing SRBs: the guest data buffer (one GPA-direct range), request validation, completion
//! packets, and the worker pool that runs synchronous SCSI commands.

use crate::scsi::{DataBuffer, DataError, Outcome};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use vmbus_core::devices::vstor::{
    self, DataDirection, ProtocolVersion, VmscsiRequest, VstorPacket, scsi_status, srb_status,
    status,
};
use vmbus_core::memory::{GuestMemory, PagedRange};

/// The data range of a GPA-direct SRB, copied out of the packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataRange {
    pub byte_offset: u32,
    pub byte_count: u32,
    pub pfns: Vec<u64>,
}

/// The guest's buffer of one SRB: the first `len` bytes of its GPA range. Every access is
/// bounds-checked here and against guest RAM by [`GuestMemory`].
pub struct GuestBuffer {
    mem: Arc<dyn GuestMemory>,
    range: DataRange,
    len: usize,
    direction: DataDirection,
}

impl GuestBuffer {
    /// `None` when the range does not describe its pages exactly, or is shorter than `len`.
    pub fn new(
        mem: Arc<dyn GuestMemory>,
        range: DataRange,
        len: usize,
        direction: DataDirection,
    ) -> Option<Self> {
        let r = PagedRange::new(range.byte_offset, range.byte_count, &range.pfns).ok()?;
        if (r.len() as usize) < len {
            return None;
        }
        Some(GuestBuffer {
            mem,
            range,
            len,
            direction,
        })
    }

    /// An empty buffer (SRBs without data).
    pub fn empty(mem: Arc<dyn GuestMemory>, direction: DataDirection) -> Self {
        GuestBuffer {
            mem,
            range: DataRange {
                byte_offset: 0,
                byte_count: 0,
                pfns: Vec::new(),
            },
            len: 0,
            direction,
        }
    }

    fn paged(&self) -> Result<PagedRange<'_>, DataError> {
        Ok(PagedRange::new(
            self.range.byte_offset,
            self.range.byte_count,
            &self.range.pfns,
        )?)
    }

    fn bounds(&self, offset: usize, len: usize) -> Result<(), DataError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(DataError::OutOfBounds {
                offset,
                len,
                size: self.len,
            }),
        }
    }

    /// Checks that every page of the buffer is guest RAM, without changing anything.
    pub fn probe(&self) -> Result<(), DataError> {
        if self.len == 0 {
            return Ok(());
        }
        let mut one = [0u8; 1];
        for (gpa, _) in self.paged()?.segments(0, self.len as u64)? {
            self.mem.read_at(gpa, &mut one)?;
        }
        Ok(())
    }
}

impl DataBuffer for GuestBuffer {
    fn len(&self) -> usize {
        self.len
    }

    fn read_out(&self, offset: usize, dst: &mut [u8]) -> Result<(), DataError> {
        self.bounds(offset, dst.len())?;
        Ok(self.mem.read_paged(&self.paged()?, offset as u64, dst)?)
    }

    fn write_in(&mut self, offset: usize, src: &[u8]) -> Result<(), DataError> {
        if !self.direction.device_may_write() {
            return Err(DataError::WrongDirection);
        }
        self.bounds(offset, src.len())?;
        Ok(self.mem.write_paged(&self.paged()?, offset as u64, src)?)
    }
}

/// A completion ready to be written to the ring.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completion {
    pub trans_id: u64,
    pub packet: VstorPacket,
    /// Payload bytes to send.
    pub len: usize,
}

/// How an SRB ended, in vstor terms.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct SrbResult {
    pub nt_status: u32,
    pub srb_status: u8,
    pub scsi_status: u8,
    pub transferred: u32,
    pub sense: Option<[u8; crate::scsi::sense::FIXED_SENSE_LEN]>,
}

impl SrbResult {
    /// A transport-level refusal (bad lengths, ranges, direction byte): INVALID_REQUEST, no sense.
    pub fn invalid_request() -> Self {
        SrbResult {
            nt_status: status::INVALID_PARAMETER,
            srb_status: srb_status::INVALID_REQUEST,
            scsi_status: scsi_status::GOOD,
            transferred: 0,
            sense: None,
        }
    }

    /// No disk at this path/target/LUN (Linux removes the device).
    pub fn invalid_lun() -> Self {
        SrbResult {
            nt_status: status::DEVICE_DOES_NOT_EXIST,
            srb_status: srb_status::INVALID_LUN,
            scsi_status: scsi_status::CHECK_CONDITION,
            transferred: 0,
            sense: None,
        }
    }

    /// The vstor form of a SCSI outcome. Failures report 0 bytes moved (Linux trusts the length
    /// of failed INQUIRY/MODE SENSE, reference §2.8).
    pub fn from_outcome(o: &Outcome) -> Self {
        match o {
            Outcome::Good { transferred } => SrbResult {
                nt_status: status::SUCCESS,
                srb_status: srb_status::SUCCESS,
                scsi_status: scsi_status::GOOD,
                transferred: u32::try_from(*transferred).unwrap_or(u32::MAX),
                sense: None,
            },
            Outcome::CheckCondition(s) => {
                let srb = srb_status::ERROR | srb_status::AUTOSENSE_VALID;
                SrbResult {
                    nt_status: vstor::nt_status_for_srb(srb),
                    srb_status: srb,
                    scsi_status: scsi_status::CHECK_CONDITION,
                    transferred: 0,
                    sense: Some(s.to_fixed()),
                }
            }
            Outcome::DataFault(e) => {
                tracing::warn!(error = %e, "SRB data transfer failed");
                SrbResult {
                    nt_status: status::IO_DEVICE_ERROR,
                    srb_status: srb_status::ERROR,
                    scsi_status: scsi_status::GOOD,
                    transferred: 0,
                    sense: None,
                }
            }
        }
    }

    /// The completion packet for `request`.
    pub fn completion(&self, trans_id: u64, request: &VmscsiRequest, len: usize) -> Completion {
        let sense = self.sense.as_ref().map_or(&[][..], |s| &s[..]);
        Completion {
            trans_id,
            packet: vstor::srb_completion(
                request,
                self.nt_status,
                self.srb_status,
                self.scsi_status,
                self.transferred,
                sense,
            ),
            len,
        }
    }
}

/// Payload length of completions on a channel at `version` for a request of `request_len` bytes.
pub fn reply_len(version: Option<ProtocolVersion>, request_len: usize) -> usize {
    vstor::completion_len(version, request_len)
}

type Job = Box<dyn FnOnce() + Send>;

/// Threads running synchronous SCSI commands for all channels of a device.
pub struct WorkerPool {
    tx: Option<mpsc::Sender<Job>>,
    threads: Vec<JoinHandle<()>>,
}

impl WorkerPool {
    pub fn new(threads: usize, name: &str) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let mut handles = Vec::new();
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            handles.push(
                std::thread::Builder::new()
                    .name(format!("{name}-io{i}"))
                    .spawn(move || {
                        loop {
                            // Hold the lock only to take one job.
                            let job = match rx.lock() {
                                Ok(r) => r.recv(),
                                Err(_) => return,
                            };
                            match job {
                                Ok(job) => job(),
                                Err(_) => return,
                            }
                        }
                    })?,
            );
        }
        Ok(WorkerPool {
            tx: Some(tx),
            threads: handles,
        })
    }

    /// Runs `job` on a worker. `false` if the pool is shut down (the job is dropped).
    pub fn spawn(&self, job: impl FnOnce() + Send + 'static) -> bool {
        self.tx
            .as_ref()
            .is_some_and(|tx| tx.send(Box::new(job)).is_ok())
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        self.tx = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
