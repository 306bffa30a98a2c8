//! The vstor initialization handshake on the primary channel, as Linux `storvsc_channel_init` runs
//! it: BEGIN_INITIALIZATION, QUERY_PROTOCOL_VERSION for each version newest first until one is
//! accepted, QUERY_PROPERTIES, END_INITIALIZATION, then CREATE_SUB_CHANNELS when the host supports
//! multi-channel and sub-channels are wanted. Every packet is in-band, 64 bytes, completion
//! requested, transaction id [`vstor::LINUX_INIT_TRANS_ID`].

use alloc::vec::Vec;
use vmbus_core::devices::vstor::{
    self, ChannelProperties, FLAG_REQUEST_COMPLETION, Operation, ProtocolVersion,
    ProtocolVersionBody, VstorPacket, property_flags,
};

/// A step of the handshake (what a completion answers).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum InitStep {
    Begin,
    QueryVersion(ProtocolVersion),
    QueryProperties,
    End,
    CreateSubChannels(u16),
}

/// Why initialization failed (Linux fails the probe for each of these).
#[derive(Copy, Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InitError {
    #[error("{step:?} answered with operation {operation} (not COMPLETE_IO)")]
    NotCompleteIo { step: InitStep, operation: u32 },
    #[error("{step:?} refused with status {status:#010x}")]
    Refused { step: InitStep, status: u32 },
    #[error(
        "no protocol version accepted (\"Obsolete Hyper-V version\"); last status {status:#010x}"
    )]
    NoVersion { status: u32 },
    #[error("no protocol versions configured")]
    NoVersionsConfigured,
    #[error("channel properties give max_transfer_bytes {0:#x}: less than one page")]
    MaxTransfer(u32),
}

/// Where the handshake ended up.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Negotiated {
    pub version: ProtocolVersion,
    pub properties: ChannelProperties,
    /// Largest transfer per request: `max_transfer_bytes` rounded down to whole pages.
    pub max_transfer_bytes: u32,
    /// Sub-channels the host agreed to offer (0 when not asked or refused).
    pub subchannels: u16,
}

pub(crate) enum InitProgress {
    /// Send this packet next.
    Send(VstorPacket),
    Done(Negotiated),
}

pub(crate) struct InitMachine {
    versions: Vec<ProtocolVersion>,
    want_subchannels: u16,
    waiting: Option<InitStep>,
    next_version: usize,
    version: Option<ProtocolVersion>,
    properties: Option<ChannelProperties>,
}

fn request(op: Operation) -> VstorPacket {
    VstorPacket::new(op, FLAG_REQUEST_COMPLETION, 0)
}

impl InitMachine {
    pub(crate) fn new(versions: Vec<ProtocolVersion>, want_subchannels: u16) -> Self {
        InitMachine {
            versions,
            want_subchannels,
            waiting: None,
            next_version: 0,
            version: None,
            properties: None,
        }
    }

    /// The step whose completion is awaited.
    pub(crate) fn waiting(&self) -> Option<InitStep> {
        self.waiting
    }

    /// The negotiated version, once accepted.
    pub(crate) fn version(&self) -> Option<ProtocolVersion> {
        self.version
    }

    pub(crate) fn begin(&mut self) -> Result<VstorPacket, InitError> {
        if self.versions.is_empty() {
            return Err(InitError::NoVersionsConfigured);
        }
        self.waiting = Some(InitStep::Begin);
        Ok(request(Operation::BeginInitialization))
    }

    fn query_version(&mut self, status: u32) -> Result<InitProgress, InitError> {
        let Some(&v) = self.versions.get(self.next_version) else {
            self.waiting = None;
            return Err(InitError::NoVersion { status });
        };
        self.next_version = self.next_version.saturating_add(1);
        self.waiting = Some(InitStep::QueryVersion(v));
        let mut p = request(Operation::QueryProtocolVersion);
        p.set_version(&ProtocolVersionBody {
            major_minor: v.raw(),
            revision: 0,
        });
        Ok(InitProgress::Send(p))
    }

    fn finish(&mut self, subchannels: u16) -> Result<InitProgress, InitError> {
        self.waiting = None;
        let (Some(version), Some(properties)) = (self.version, self.properties) else {
            // Unreachable by construction: both are set before END_INITIALIZATION.
            return Err(InitError::NoVersion { status: 0 });
        };
        Ok(InitProgress::Done(Negotiated {
            version,
            properties,
            max_transfer_bytes: properties.max_transfer_bytes & !0xFFF,
            subchannels,
        }))
    }

    /// Takes the completion of the awaited step. Errors end the handshake.
    pub(crate) fn on_completion(&mut self, p: &VstorPacket) -> Result<InitProgress, InitError> {
        let Some(step) = self.waiting else {
            // Callers only feed completions while a step is awaited.
            return Err(InitError::NoVersion { status: 0 });
        };
        let (operation, status) = (p.header.operation, p.header.status);
        let is_complete = operation == Operation::CompleteIo.raw();
        // QUERY_PROTOCOL_VERSION and CREATE_SUB_CHANNELS have their own status handling.
        if !is_complete && !matches!(step, InitStep::CreateSubChannels(_)) {
            self.waiting = None;
            return Err(InitError::NotCompleteIo { step, operation });
        }
        match step {
            InitStep::Begin => {
                if status != vstor::status::SUCCESS {
                    self.waiting = None;
                    return Err(InitError::Refused { step, status });
                }
                self.query_version(status)
            }
            InitStep::QueryVersion(v) => {
                if status != vstor::status::SUCCESS {
                    tracing::debug!(version = %v, status, "storvsc: version refused");
                    return self.query_version(status);
                }
                self.version = Some(v);
                self.waiting = Some(InitStep::QueryProperties);
                Ok(InitProgress::Send(request(Operation::QueryProperties)))
            }
            InitStep::QueryProperties => {
                if status != vstor::status::SUCCESS {
                    self.waiting = None;
                    return Err(InitError::Refused { step, status });
                }
                let props = p.properties();
                if props.max_transfer_bytes < 0x1000 {
                    self.waiting = None;
                    return Err(InitError::MaxTransfer(props.max_transfer_bytes));
                }
                self.properties = Some(props);
                self.waiting = Some(InitStep::End);
                Ok(InitProgress::Send(request(Operation::EndInitialization)))
            }
            InitStep::End => {
                if status != vstor::status::SUCCESS {
                    self.waiting = None;
                    return Err(InitError::Refused { step, status });
                }
                let props = self.properties.unwrap_or_default();
                let count = self.want_subchannels.min(props.max_channel_cnt);
                if props.flags & property_flags::SUPPORTS_MULTI_CHANNEL != 0 && count > 0 {
                    self.waiting = Some(InitStep::CreateSubChannels(count));
                    let mut p = request(Operation::CreateSubChannels);
                    p.set_sub_channel_count(count);
                    return Ok(InitProgress::Send(p));
                }
                self.finish(0)
            }
            InitStep::CreateSubChannels(count) => {
                // Linux logs a failure here and carries on with one channel.
                if is_complete && status == vstor::status::SUCCESS {
                    self.finish(count)
                } else {
                    tracing::warn!(operation, status, "storvsc: CREATE_SUB_CHANNELS failed");
                    self.finish(0)
                }
            }
        }
    }
}
