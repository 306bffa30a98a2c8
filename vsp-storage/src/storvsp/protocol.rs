//! The vstor control protocol of one channel, sans I/O: the init handshake (reference §2.6), what
//! each request is answered with, and which requests reach the SCSI layer.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use vmbus_core::devices::vstor::{
    ChannelProperties, GuestPacket, GuestRequest, Operation, ProtocolVersion, VmscsiRequest,
    VstorPacket, property_flags, status,
};

/// Protocol settings of a storvsp device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProtocolConfig {
    /// Versions QUERY_PROTOCOL_VERSION accepts.
    pub versions: Vec<ProtocolVersion>,
    /// Sub-channels the guest may ask for (advertised as `max_channel_cnt` from Win8 on).
    pub max_subchannels: u16,
    /// Largest transfer per request (a non-zero multiple of 4096).
    pub max_transfer_bytes: u32,
    /// An IDE accelerator: never advertises multi-channel.
    pub ide: bool,
}

impl Default for ProtocolConfig {
    fn default() -> Self {
        ProtocolConfig {
            versions: ProtocolVersion::ALL.to_vec(),
            max_subchannels: 0,
            max_transfer_bytes: 0x40000,
            ide: false,
        }
    }
}

/// State every channel of a device shares: what the primary channel negotiated.
#[derive(Debug, Default)]
pub struct SharedProtocol {
    /// Negotiated version (0 = none yet).
    version: AtomicU16,
    /// END_INITIALIZATION done on the primary channel.
    ready: AtomicBool,
    /// Sub-channels asked for so far (never more than advertised).
    subchannels: Mutex<u16>,
}

impl SharedProtocol {
    pub fn version(&self) -> Option<ProtocolVersion> {
        ProtocolVersion::from_wire(self.version.load(Ordering::Acquire))
    }

    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Back to "nothing negotiated" (the primary channel closed).
    pub fn reset(&self) {
        self.version.store(0, Ordering::Release);
        self.ready.store(false, Ordering::Release);
        if let Ok(mut n) = self.subchannels.lock() {
            *n = 0;
        }
    }

    /// Restores a negotiated state (device restore after a VSP restart).
    pub fn restore(&self, version: Option<ProtocolVersion>, ready: bool, subchannels: u16) {
        self.version
            .store(version.map_or(0, ProtocolVersion::raw), Ordering::Release);
        self.ready.store(ready, Ordering::Release);
        if let Ok(mut n) = self.subchannels.lock() {
            *n = subchannels;
        }
    }

    pub fn subchannels(&self) -> u16 {
        self.subchannels.lock().map(|n| *n).unwrap_or(0)
    }
}

/// Where one channel stands in the init handshake.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum InitState {
    AwaitBegin,
    AwaitVersion,
    AwaitProperties,
    AwaitEnd,
    Ready,
}

/// What to do with a guest request.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Send this completion now.
    Reply(VstorPacket),
    /// Send this completion, then have the bus offer `count` more sub-channels.
    ReplyAndOffer { reply: VstorPacket, count: u16 },
    /// Run this SCSI request.
    Execute(VmscsiRequest),
    /// A reset: complete with success once this channel's I/O in flight has completed.
    ResetAfterDrain,
}

fn reply(s: u32) -> Decision {
    Decision::Reply(VstorPacket::new(Operation::CompleteIo, 0, s))
}

/// The protocol state of one channel.
#[derive(Debug)]
pub struct ChannelProtocol {
    primary: bool,
    state: InitState,
}

impl ChannelProtocol {
    pub fn new(primary: bool) -> Self {
        ChannelProtocol {
            primary,
            state: InitState::AwaitBegin,
        }
    }

    /// A channel of a session restored after a VSP restart: already initialised.
    pub fn resumed(primary: bool) -> Self {
        ChannelProtocol {
            primary,
            state: InitState::Ready,
        }
    }

    pub fn state(&self) -> InitState {
        self.state
    }

    /// Whether SRBs are accepted on this channel.
    pub fn accepts_io(&self, shared: &SharedProtocol) -> bool {
        if self.primary {
            self.state == InitState::Ready
        } else {
            shared.ready()
        }
    }

    /// Decides what `pkt` gets. Out-of-order requests get INVALID_DEVICE_STATE and leave the state
    /// as it was (as OpenVMM does).
    pub fn handle(
        &mut self,
        pkt: &GuestPacket,
        shared: &SharedProtocol,
        config: &ProtocolConfig,
    ) -> Decision {
        use InitState::*;
        let bad_state = reply(status::INVALID_DEVICE_STATE);
        match (pkt.body, self.state) {
            (GuestRequest::ExecuteSrb(srb), _) => {
                if self.accepts_io(shared) {
                    Decision::Execute(srb)
                } else {
                    bad_state
                }
            }
            (
                GuestRequest::ResetLun(_)
                | GuestRequest::ResetAdapter
                | GuestRequest::ResetBus { .. },
                _,
            ) => {
                if self.accepts_io(shared) {
                    Decision::ResetAfterDrain
                } else {
                    bad_state
                }
            }
            _ if !self.primary => bad_state,
            (GuestRequest::BeginInitialization, AwaitBegin) => {
                self.state = AwaitVersion;
                reply(status::SUCCESS)
            }
            (GuestRequest::QueryProtocolVersion(v), AwaitVersion) => {
                let raw = v.major_minor;
                match ProtocolVersion::from_wire(raw).filter(|v| config.versions.contains(v)) {
                    Some(v) => {
                        shared.version.store(v.raw(), Ordering::Release);
                        self.state = AwaitProperties;
                        let mut p = VstorPacket::new(Operation::CompleteIo, 0, status::SUCCESS);
                        p.set_version(&pkt_version(v));
                        Decision::Reply(p)
                    }
                    None => {
                        tracing::debug!(version = raw, "vstor version refused");
                        let mut p =
                            VstorPacket::new(Operation::CompleteIo, 0, status::REVISION_MISMATCH);
                        p.set_version(&v);
                        Decision::Reply(p)
                    }
                }
            }
            (GuestRequest::QueryProperties, AwaitProperties) => {
                self.state = AwaitEnd;
                let mut p = VstorPacket::new(Operation::CompleteIo, 0, status::SUCCESS);
                p.set_properties(&properties(shared.version(), config));
                Decision::Reply(p)
            }
            (GuestRequest::EndInitialization, AwaitEnd) => {
                self.state = Ready;
                shared.ready.store(true, Ordering::Release);
                reply(status::SUCCESS)
            }
            (GuestRequest::CreateSubChannels { count }, AwaitEnd | Ready) => {
                self.create_subchannels(count, shared, config)
            }
            (GuestRequest::FcHbaData, _) => reply(status::INVALID_DEVICE_REQUEST),
            _ => bad_state,
        }
    }

    fn create_subchannels(
        &mut self,
        count: u16,
        shared: &SharedProtocol,
        config: &ProtocolConfig,
    ) -> Decision {
        let max = advertised_subchannels(shared.version(), config);
        if max == 0 {
            return reply(status::INVALID_DEVICE_REQUEST);
        }
        if count == 0 || count > max {
            return reply(status::INVALID_PARAMETER);
        }
        let Ok(mut asked) = shared.subchannels.lock() else {
            return reply(status::UNSUCCESSFUL);
        };
        // Idempotent: asking again for as many (or fewer) offers nothing new.
        let more = count.saturating_sub(*asked);
        *asked = (*asked).max(count);
        let ok = VstorPacket::new(Operation::CompleteIo, 0, status::SUCCESS);
        if more == 0 {
            Decision::Reply(ok)
        } else {
            Decision::ReplyAndOffer {
                reply: ok,
                count: more,
            }
        }
    }
}

fn pkt_version(v: ProtocolVersion) -> vmbus_core::devices::vstor::ProtocolVersionBody {
    vmbus_core::devices::vstor::ProtocolVersionBody {
        major_minor: v.raw(),
        revision: 0,
    }
}

/// Sub-channels the device advertises at `version`.
pub fn advertised_subchannels(version: Option<ProtocolVersion>, config: &ProtocolConfig) -> u16 {
    match version {
        Some(v) if v.supports_multichannel() && !config.ide => config.max_subchannels,
        _ => 0,
    }
}

/// The QUERY_PROPERTIES answer.
pub fn properties(version: Option<ProtocolVersion>, config: &ProtocolConfig) -> ChannelProperties {
    let max = advertised_subchannels(version, config);
    ChannelProperties {
        max_channel_cnt: max,
        flags: if max > 0 {
            property_flags::SUPPORTS_MULTI_CHANNEL
        } else {
            0
        },
        max_transfer_bytes: config.max_transfer_bytes,
        ..ChannelProperties::default()
    }
}
