//! Unit tests of the storvsc core against a scripted fake host: the test plays the VSP, reading
//! the driver's packets and feeding it completions, byte for byte.
#![allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

mod disk;
mod init;
mod io;
mod parse;
mod probe;
mod prop;

use super::*;
use ringbuf::PacketType;
use vmbus_core::devices::vstor::{
    self, ChannelProperties, Operation, ProtocolVersion, VmscsiRequest, VstorPacket, property_flags,
};
use zerocopy::IntoBytes;

/// Takes every packet queued for `ch`.
pub(super) fn drain(drv: &mut Storvsc, ch: u16) -> Vec<OutPacket> {
    let mut v = Vec::new();
    while let Some(p) = drv.pop_transmit(ch) {
        v.push(p);
    }
    v
}

/// The single packet queued on the primary channel.
pub(super) fn one(drv: &mut Storvsc) -> OutPacket {
    let v = drain(drv, 0);
    assert_eq!(v.len(), 1, "{v:?}");
    v.into_iter().next().unwrap()
}

/// A host completion for `id` carrying `p`, fed to the driver.
pub(super) fn reply(
    drv: &mut Storvsc,
    ch: u16,
    id: u64,
    p: &VstorPacket,
) -> Result<Handled, StorvscError> {
    drv.handle_packet(ch, PacketType::Completion, id, p.as_bytes())
}

pub(super) fn complete_io(status: u32) -> VstorPacket {
    VstorPacket::new(Operation::CompleteIo, 0, status)
}

pub(super) fn props(max_channels: u16, flags: u32, max_transfer: u32) -> ChannelProperties {
    ChannelProperties {
        max_channel_cnt: max_channels,
        flags,
        max_transfer_bytes: max_transfer,
        ..ChannelProperties::default()
    }
}

/// Runs the handshake answering as OpenVMM does (accepts `accepted`, properties `p`) and returns
/// every packet the driver sent.
pub(super) fn handshake(
    drv: &mut Storvsc,
    accepted: &[ProtocolVersion],
    p: ChannelProperties,
) -> Vec<OutPacket> {
    drv.start().unwrap();
    let mut sent = Vec::new();
    while drv.state() == DriverState::Initializing {
        let pkt = one(drv);
        let v = pkt.vstor();
        let op = Operation::from_wire(v.header.operation).unwrap();
        let mut r = complete_io(0);
        match op {
            Operation::QueryProtocolVersion => {
                let asked = ProtocolVersion::from_wire(v.version().major_minor).unwrap();
                if !accepted.contains(&asked) {
                    r.header.status = vstor::status::REVISION_MISMATCH;
                }
                r.set_version(&v.version());
            }
            Operation::QueryProperties => r.set_properties(&p),
            _ => {}
        }
        assert_eq!(reply(drv, 0, pkt.trans_id, &r), Ok(Handled::Init));
        sent.push(pkt);
    }
    sent
}

/// A ready controller (WIN10, 256 KiB transfers, no sub-channels).
pub(super) fn ready() -> Storvsc {
    let mut drv = Storvsc::new(StorvscConfig::default());
    handshake(&mut drv, &[ProtocolVersion::Win10], props(0, 0, 0x40000));
    assert!(matches!(drv.poll_event(), Some(StorvscEvent::Ready(_))));
    drv
}

/// The host's completion of SRB `req` (what storvsp / OpenVMM send).
pub(super) fn srb_done(
    req: &OutPacket,
    srb_status: u8,
    scsi_status: u8,
    transferred: u32,
    sense: &[u8],
) -> VstorPacket {
    let srb: VmscsiRequest = req.vstor().srb();
    vstor::srb_completion(
        &srb,
        vstor::nt_status_for_srb(srb_status),
        srb_status,
        scsi_status,
        transferred,
        sense,
    )
}

pub(super) fn fixed_sense(key: u8, asc: u8, ascq: u8) -> [u8; 18] {
    let mut s = [0u8; 18];
    s[0] = 0x70;
    s[2] = key;
    s[7] = 10;
    s[12] = asc;
    s[13] = ascq;
    s
}

#[test]
fn flags_constants_match_reference() {
    assert_eq!(INIT_TRANS_ID, 0xFFFF_FFFF_FFFF_FFFD);
    assert_eq!(RESET_TRANS_ID, 0xFFFF_FFFF_FFFF_FFFC);
    assert_eq!(property_flags::SUPPORTS_MULTI_CHANNEL, 1);
}
