//! Errors of the netvsc driver. Host-caused errors name the message and the field at fault.

use vmbus_core::devices::nvsp::NvspError;
use vmbus_core::devices::rndis::RndisError;
use vmbus_core::memory::MemoryError;

/// Why a host packet was refused or the bring-up failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NetvscError {
    #[error("configuration: {0} is not a whole number of pages")]
    BadConfig(&'static str),
    #[error("operation not allowed in state {0}")]
    WrongState(&'static str),
    #[error("host refused every NVSP version")]
    NoVersion,
    #[error("NVSP from host: {0}")]
    Nvsp(#[from] NvspError),
    #[error("NVSP {msg_type} completion of {len} bytes, Linux needs {needed}")]
    ShortCompletion {
        msg_type: u32,
        len: usize,
        needed: usize,
    },
    #[error("{what}: host status {status:#x}")]
    HostStatus { what: &'static str, status: u32 },
    #[error("SEND_RECV_BUF_COMPLETE: {0}")]
    BadReceiveBuffer(&'static str),
    #[error("SEND_SEND_BUF_COMPLETE: section size {0} below 68")]
    BadSendSection(u32),
    #[error("completion for unknown transaction {0:#x}")]
    UnknownTransaction(u64),
    #[error("unexpected {0} from host")]
    Unexpected(&'static str),
    #[error("unexpected NVSP message type {0} from host")]
    UnexpectedNvsp(u32),
    #[error("transfer-page packet: set id {0:#x} is not the receive buffer's")]
    BadSetId(u16),
    #[error("transfer-page range {offset:#x}+{len:#x}: {why}")]
    BadRange {
        offset: u32,
        len: u32,
        why: &'static str,
    },
    #[error("RNDIS from host: {0}")]
    Rndis(#[from] RndisError),
    #[error("RNDIS {what}: {why}")]
    BadRndisReply {
        what: &'static str,
        why: &'static str,
    },
    #[error("RNDIS reply for unknown request id {0}")]
    UnknownRequest(u32),
    #[error("guest memory: {0}")]
    Memory(#[from] MemoryError),
    #[error("sub-channels: host granted {granted}, asked for {asked}")]
    BadSubchannels { granted: u32, asked: u32 },
    #[error("{0} resources exhausted")]
    Exhausted(&'static str),
}

/// Why [`super::Netvsc::send`] did not take a frame.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("driver is not ready")]
    NotReady,
    #[error("no free send section or bounce slot, or the queue is full: retry after completions")]
    Busy,
    #[error("frame of {len} bytes cannot be sent (max {max})")]
    TooLarge { len: usize, max: usize },
    #[error("empty frame")]
    Empty,
    #[error("no queue {0}")]
    NoQueue(u16),
    #[error("guest memory: {0}")]
    Memory(#[from] MemoryError),
}
