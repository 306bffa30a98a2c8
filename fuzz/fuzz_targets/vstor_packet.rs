//! Fuzzes the storvsp request path without rings: arbitrary vstor packets (with an optional GPA
//! range and guest memory contents) go through the vstor parser, the channel protocol state machine
//! (primary and sub-channel) and, for SRBs, the data-buffer checks and the SCSI emulation over an
//! in-memory disk, exactly as a storvsp channel handles them.
//!
//! Properties checked: nothing panics; a parsed packet's SRB is the zero-filled input; completions
//! never report more bytes than the buffer, report 0 on failure, carry at most 20 sense bytes and
//! sense only with CHECK CONDITION + AUTOSENSE_VALID; the disk never changes size; a failed command
//! never writes guest memory for data-in; the init handshake never reaches Ready out of order.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use std::sync::Arc;
use vmbus_core::devices::vstor::{
    self, DataDirection, GuestRequest, ProtocolVersion, scsi_status, srb_status,
};
use vmbus_core::memory::{GuestMemory, VecMemory};
use vsp_storage::backend::mem::MemDisk;
use vsp_storage::block::BlockDevice;
use vsp_storage::scsi::{self, DataBuffer, Identity, Outcome, ScsiDisk, ScsiParams};
use vsp_storage::storvsp::protocol::{
    ChannelProtocol, Decision, InitState, ProtocolConfig, SharedProtocol,
};
use vsp_storage::storvsp::{DataRange, GuestBuffer, SrbResult};

const RAM_PAGES: u64 = 64;
const DISK: usize = 256 * 1024;

#[derive(Arbitrary, Debug)]
struct Packet {
    body: Body,
    /// A GPA range `(byte_offset, byte_count, first PFN)` over consecutive pages.
    range: Option<(u16, u32, u64)>,
    /// Make the SRB's transfer length the range's length (as Linux always does).
    match_length: bool,
    sub_channel: bool,
}

#[derive(Arbitrary, Debug)]
enum Body {
    /// The whole packet.
    Raw(Vec<u8>),
    /// An operation (`% 16`) and the bytes after it.
    Op(u8, Vec<u8>),
    /// An EXECUTE_SRB built field by field (`lun_sel < 224`: LUN 0, else `lun_sel & 7`).
    Srb {
        lun_sel: u8,
        cdb_length: u8,
        data_in: u8,
        data_transfer_length: u32,
        cdb: [u8; 16],
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    /// Run Linux's handshake first (random bytes rarely get through it on their own).
    init: bool,
    versions: u8,
    max_sub: u8,
    ram_fill: u8,
    packets: Vec<Packet>,
}

fuzz_target!(|input: Input| {
    let mem: Arc<VecMemory> = Arc::new(VecMemory::new((RAM_PAGES * 4096) as usize));
    mem.write_at(0, &vec![input.ram_fill; (RAM_PAGES * 4096) as usize])
        .unwrap();
    let disk = Arc::new(MemDisk::new(DISK, 512));
    let scsi = ScsiDisk::new(disk.clone(), ScsiParams::new(Identity::msft("fuzz", 1)));
    let versions: Vec<ProtocolVersion> = ProtocolVersion::ALL
        .iter()
        .enumerate()
        .filter(|(i, _)| (input.versions | 0x18) & (1 << i) != 0)
        .map(|(_, v)| *v)
        .collect();
    let config = ProtocolConfig {
        versions,
        max_subchannels: u16::from(input.max_sub % 8),
        ..ProtocolConfig::default()
    };
    let shared = SharedProtocol::default();
    let mut primary = ChannelProtocol::new(true);
    let mut sub = ChannelProtocol::new(false);
    if input.init {
        use vstor::{Operation, VstorPacket};
        let op = |o: Operation, body: &[u8]| {
            let mut p = VstorPacket::new(o, 1, 0);
            p.body[..body.len()].copy_from_slice(body);
            vstor::parse_guest_packet(p.wire_bytes(64)).unwrap()
        };
        primary.handle(&op(Operation::BeginInitialization, &[]), &shared, &config);
        for v in ProtocolVersion::LINUX_ORDER {
            let d = primary.handle(
                &op(Operation::QueryProtocolVersion, &v.raw().to_le_bytes()),
                &shared,
                &config,
            );
            if matches!(d, Decision::Reply(p) if p.header.status == 0) {
                break;
            }
        }
        primary.handle(&op(Operation::QueryProperties, &[]), &shared, &config);
        primary.handle(&op(Operation::EndInitialization, &[]), &shared, &config);
    }
    for pkt in input.packets.iter().take(64) {
        let bytes: Vec<u8> = match &pkt.body {
            Body::Raw(b) => b.clone(),
            Body::Op(op, b) => u32::from(op % 16)
                .to_le_bytes()
                .iter()
                .chain(b)
                .copied()
                .collect(),
            Body::Srb {
                lun_sel,
                cdb_length,
                data_in,
                data_transfer_length,
                cdb,
            } => {
                let mut r = vstor::VmscsiRequest {
                    length: 0x34,
                    lun: if *lun_sel < 224 { 0 } else { lun_sel & 7 },
                    cdb_length: *cdb_length,
                    data_in: *data_in,
                    data_transfer_length: *data_transfer_length,
                    ..Default::default()
                };
                r.cdb_or_sense[..16].copy_from_slice(cdb);
                let mut p = vstor::VstorPacket::new(vstor::Operation::ExecuteSrb, 1, 0);
                p.set_srb(&r);
                p.wire_bytes(64).to_vec()
            }
        };
        let Ok(parsed) = vstor::parse_guest_packet(&bytes) else {
            assert!(
                bytes.len() < 12
                    || vstor::Operation::from_wire(u32::from_le_bytes(
                        bytes[..4].try_into().unwrap()
                    ))
                    .is_none_or(|o| !o.is_guest_request())
            );
            continue;
        };
        let before = primary.state();
        let ch = if pkt.sub_channel {
            &mut sub
        } else {
            &mut primary
        };
        let decision = ch.handle(&parsed, &shared, &config);
        if !pkt.sub_channel && primary.state() == InitState::Ready && before != InitState::Ready {
            assert_eq!(before, InitState::AwaitEnd);
            assert!(matches!(parsed.body, GuestRequest::EndInitialization));
        }
        let Decision::Execute(mut srb) = decision else {
            continue;
        };
        let range = pkt.range.map(|(off, count, base)| {
            let off = u32::from(off) % 4096;
            let count = count % (300 * 1024) + 1;
            let pages = (u64::from(off) + u64::from(count)).div_ceil(4096);
            let pfns: Vec<u64> = (0..pages)
                .map(|i| base.wrapping_add(i) % (RAM_PAGES + 4))
                .collect();
            DataRange {
                byte_offset: off,
                byte_count: count,
                pfns,
            }
        });
        if pkt.match_length {
            srb.data_transfer_length = range.as_ref().map_or(0, |r| r.byte_count);
        }
        // The channel's buffer checks.
        let dtl = srb.data_transfer_length as usize;
        let Some(dir) = DataDirection::from_wire(srb.data_in) else {
            continue;
        };
        if dtl > config.max_transfer_bytes as usize {
            continue;
        }
        let buffer = match range {
            None if dtl == 0 => Some(GuestBuffer::empty(mem.clone(), dir)),
            Some(r) => GuestBuffer::new(mem.clone(), r, dtl, dir),
            None => None,
        };
        let Some(mut buffer) = buffer else { continue };
        if buffer.probe().is_err() {
            continue;
        }
        let cdb16 = srb.cdb();
        let Some(cdb) = cdb16.get(..usize::from(srb.cdb_length)) else {
            continue;
        };
        let snapshot = {
            let mut v = vec![0u8; (RAM_PAGES * 4096) as usize];
            mem.read_at(0, &mut v).unwrap();
            v
        };
        let outcome = if srb.lun == 0 && srb.path_id == 0 && srb.target_id == 0 {
            scsi.execute(cdb, &mut buffer)
        } else {
            scsi::absent_lun(cdb, srb.lun, &[0], &Identity::msft("fuzz", 1), &mut buffer)
                .unwrap_or(Outcome::CheckCondition(scsi::Sense::LUN_NOT_SUPPORTED))
        };
        let r = SrbResult::from_outcome(&outcome);
        let c = r.completion(7, &srb, 64).packet.srb();
        assert!(c.data_transfer_length as usize <= buffer.len());
        assert!(usize::from(c.sense_info_length) <= vstor::SENSE_BUFFER_SIZE);
        if c.srb_status != srb_status::SUCCESS {
            assert_eq!({ c.data_transfer_length }, 0);
        }
        if c.sense_info_length > 0 {
            assert_eq!(c.scsi_status, scsi_status::CHECK_CONDITION);
            assert_ne!(c.srb_status & srb_status::AUTOSENSE_VALID, 0);
        }
        if !outcome.is_good() {
            let mut now = vec![0u8; (RAM_PAGES * 4096) as usize];
            mem.read_at(0, &mut now).unwrap();
            assert!(now == snapshot, "a failed command wrote guest memory");
        }
        assert_eq!(disk.size(), DISK as u64);
    }
});
