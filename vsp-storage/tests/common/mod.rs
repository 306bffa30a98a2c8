//! A storvsc-like guest for integration tests: guest RAM in a memfd, the channel's rings in it, and
//! vstor requests built exactly as Linux `storvsc_drv.c` builds them (64-byte packets, one GPA range
//! per data request, fixed init transaction id).
#![allow(clippy::unwrap_used, dead_code)]

use ringbuf::layout::{GpaDirectHeader, GpaRangeHeader};
use ringbuf::mmap::{MappedRing, ring_memfd};
use ringbuf::signal::Doorbell;
use ringbuf::{OutgoingPacket, PacketType, RingReader, RingWriter, WriteError, init_control};
use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmbus_core::device::OpenChannelInfo;
use vmbus_core::devices::vstor::{
    self, HostPacket, LINUX_INIT_TRANS_ID, Operation, ProtocolVersion, VmscsiRequest, VstorPacket,
};
use vmbus_core::memory::{GuestMemory, MappedMemory};
use vmbus_core::wire::USER_DEFINED_SIZE;
use zerocopy::IntoBytes;

pub const PAGE: u64 = 4096;
/// Pages of guest RAM (32 MiB).
pub const RAM_PAGES: u64 = 8192;
/// Ring pages per direction, control page included (Linux: 128 KiB).
pub const RING_PAGES: u64 = 32;

/// Guest RAM shared with the device.
pub struct Ram {
    pub file: Arc<File>,
    pub mem: Arc<MappedMemory>,
}

impl Ram {
    pub fn new() -> Self {
        let file = ring_memfd("guest-ram", RAM_PAGES * PAGE).unwrap();
        let mem = MappedMemory::map(file.as_fd(), (RAM_PAGES * PAGE) as usize).unwrap();
        Ram {
            file: Arc::new(file),
            mem: Arc::new(mem),
        }
    }
}

/// A completion as the guest received it.
#[derive(Clone, Debug)]
pub struct Reply {
    pub trans_id: u64,
    pub packet_type: PacketType,
    pub len: usize,
    pub packet: VstorPacket,
}

impl Reply {
    pub fn status(&self) -> u32 {
        self.packet.header.status
    }
    pub fn srb(&self) -> VmscsiRequest {
        self.packet.srb()
    }
    pub fn operation(&self) -> u32 {
        self.packet.header.operation
    }
}

/// One channel, guest side.
pub struct GuestChannel {
    pub info: OpenChannelInfo,
    tx: RingWriter<MappedRing>,
    rx: RingReader<MappedRing>,
    /// Guest → host signal.
    pub kick: Doorbell,
    /// Host → guest signal.
    pub call: Doorbell,
    /// Unsolicited packets (id 0) received while waiting for something else.
    pub unsolicited: Vec<Reply>,
    /// Completions received while waiting for another id.
    pub early: HashMap<u64, Reply>,
    /// Trans ids in the order their completions arrived.
    pub arrival: Vec<u64>,
}

impl GuestChannel {
    /// Rings at `first_pfn..` (scattered: every other page, reversed within each ring), both control
    /// pages initialised as Linux does before OPENCHANNEL.
    pub fn new(ram: &Ram, relid: u32, subchannel_index: u16, first_pfn: u64) -> Self {
        let up: Vec<u64> = (0..RING_PAGES).rev().map(|i| first_pfn + 2 * i).collect();
        let down: Vec<u64> = (0..RING_PAGES).map(|i| first_pfn + 1 + 2 * i).collect();
        let at = |p: &[u64]| p.iter().map(|pfn| pfn * PAGE).collect::<Vec<u64>>();
        let guest_up = MappedRing::map_pages(ram.file.as_fd(), &at(&up)).unwrap();
        let guest_down = MappedRing::map_pages(ram.file.as_fd(), &at(&down)).unwrap();
        init_control(&guest_up);
        init_control(&guest_down);
        let mut ring_pages = up;
        ring_pages.extend_from_slice(&down);
        let info = OpenChannelInfo {
            relid,
            subchannel_index,
            ring_pages,
            downstream_offset: RING_PAGES as u32,
            target_vp: 0,
            connection_id: 0x10000 + relid,
            user_data: [0; USER_DEFINED_SIZE],
        };
        let rx = RingReader::new(guest_down).unwrap();
        rx.mask_interrupts();
        GuestChannel {
            info,
            tx: RingWriter::new(guest_up).unwrap(),
            rx,
            kick: Doorbell::new().unwrap(),
            call: Doorbell::new().unwrap(),
            unsolicited: Vec::new(),
            early: HashMap::new(),
            arrival: Vec::new(),
        }
    }

    /// Sends raw payload bytes (in-band, or GPA-direct with the given header bytes).
    pub fn send_raw(
        &mut self,
        trans_id: u64,
        payload: &[u8],
        gpa_header: Option<Vec<u8>>,
        completion: bool,
    ) {
        let parts: [&[u8]; 1] = [payload];
        let headers = gpa_header.unwrap_or_default();
        let pkt = OutgoingPacket {
            packet_type: if headers.is_empty() {
                PacketType::InBand
            } else {
                PacketType::GpaDirect
            },
            completion_requested: completion,
            trans_id,
            headers: &headers,
            payload: &parts,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.tx.try_write(&pkt) {
                Ok(signal) => {
                    if signal {
                        self.kick.ring().unwrap();
                    }
                    return;
                }
                Err(WriteError::Full { .. }) => {
                    assert!(Instant::now() < deadline, "request ring stayed full");
                    // Make room: take completions off our inbound ring meanwhile.
                    self.kick.ring().unwrap();
                    self.poll(Duration::from_millis(5));
                }
                Err(e) => panic!("guest send: {e}"),
            }
        }
    }

    /// Sends a vstor packet (64 bytes unless `len` says otherwise), with one data range if given.
    pub fn send(
        &mut self,
        trans_id: u64,
        p: &VstorPacket,
        len: usize,
        range: Option<(u32, u32, &[u64])>,
    ) {
        let header = range.map(|(offset, count, pfns)| gpa_header(&[(offset, count, pfns)]));
        self.send_raw(trans_id, p.wire_bytes(len), header, true);
    }

    /// Reads what arrived, waiting up to `wait` for the first packet. Returns how many arrived.
    pub fn poll(&mut self, wait: Duration) -> usize {
        let mut n = 0;
        let deadline = Instant::now() + wait;
        loop {
            while let Some(pkt) = self.rx.peek().unwrap() {
                let mut buf = [0u8; 64];
                let len = pkt.payload_len();
                pkt.copy_payload(0, &mut buf[..len.min(64)]).unwrap();
                let reply = Reply {
                    trans_id: pkt.trans_id(),
                    packet_type: pkt.packet_type(),
                    len,
                    packet: VstorPacket::from_prefix_zero_filled(&buf[..len.min(64)])
                        .unwrap_or_default(),
                };
                pkt.consume();
                n += 1;
                if reply.trans_id == 0 {
                    self.unsolicited.push(reply);
                } else {
                    self.arrival.push(reply.trans_id);
                    assert!(
                        self.early.insert(reply.trans_id, reply).is_none(),
                        "duplicate completion"
                    );
                }
            }
            if self.rx.commit().unwrap() {
                self.kick.ring().unwrap();
            }
            if n > 0 || Instant::now() >= deadline {
                return n;
            }
            if self.rx.unmask_interrupts().unwrap() {
                self.rx.mask_interrupts();
                continue;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            self.call
                .wait(Some(left.min(Duration::from_millis(50))))
                .unwrap();
            self.rx.mask_interrupts();
        }
    }

    /// Waits for the completion of `trans_id`.
    pub fn wait(&mut self, trans_id: u64) -> Reply {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(r) = self.early.remove(&trans_id) {
                return r;
            }
            assert!(Instant::now() < deadline, "no completion for {trans_id:#x}");
            self.poll(Duration::from_millis(100));
        }
    }

    /// Whether a completion for `trans_id` arrives within `wait`.
    pub fn arrives(&mut self, trans_id: u64, wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            if self.early.contains_key(&trans_id) {
                return true;
            }
            self.poll(Duration::from_millis(20));
        }
        self.early.contains_key(&trans_id)
    }

    /// One init-phase operation, as `storvsc_execute_vstor_op` sends it.
    pub fn init_op(&mut self, p: &VstorPacket) -> Reply {
        self.send(LINUX_INIT_TRANS_ID, p, 64, None);
        let r = self.wait(LINUX_INIT_TRANS_ID);
        assert_eq!(r.packet_type, PacketType::Completion);
        assert_eq!(r.len, 64, "Linux drops completions shorter than 64 bytes");
        r
    }

    /// `storvsc_channel_init` of Linux 6.1: returns the version and the channel properties.
    pub fn linux_init(&mut self) -> (ProtocolVersion, vstor::ChannelProperties) {
        self.init_with(&ProtocolVersion::LINUX_ORDER).unwrap()
    }

    pub fn init_with(
        &mut self,
        order: &[ProtocolVersion],
    ) -> Option<(ProtocolVersion, vstor::ChannelProperties)> {
        let flag = vstor::FLAG_REQUEST_COMPLETION;
        let r = self.init_op(&VstorPacket::new(Operation::BeginInitialization, flag, 0));
        assert_eq!(
            (r.operation(), r.status()),
            (Operation::CompleteIo.raw(), 0)
        );
        let mut chosen = None;
        for v in order {
            let mut p = VstorPacket::new(Operation::QueryProtocolVersion, flag, 0);
            p.set_version(&vstor::ProtocolVersionBody {
                major_minor: v.raw(),
                revision: 0,
            });
            let r = self.init_op(&p);
            assert_eq!(r.operation(), Operation::CompleteIo.raw());
            if r.status() == 0 {
                chosen = Some(*v);
                break;
            }
        }
        let v = chosen?;
        let r = self.init_op(&VstorPacket::new(Operation::QueryProperties, flag, 0));
        assert_eq!(r.status(), 0);
        let props = r.packet.properties();
        let r = self.init_op(&VstorPacket::new(Operation::EndInitialization, flag, 0));
        assert_eq!(r.status(), 0);
        Some((v, props))
    }
}

/// GPA-direct header bytes for `ranges` `(byte_offset, byte_count, pfns)`.
pub fn gpa_header(ranges: &[(u32, u32, &[u64])]) -> Vec<u8> {
    let h = GpaDirectHeader {
        range_count: (ranges.len() as u32).into(),
        ..Default::default()
    };
    let mut out = h.as_bytes().to_vec();
    for (offset, count, pfns) in ranges {
        let r = GpaRangeHeader {
            byte_count: (*count).into(),
            byte_offset: (*offset).into(),
        };
        out.extend_from_slice(r.as_bytes());
        for p in *pfns {
            out.extend_from_slice(&p.to_le_bytes());
        }
    }
    out
}

/// An SRB as `storvsc_queuecommand` fills it.
pub fn srb(lun: (u8, u8, u8), cdb: &[u8], data_in: u8, len: u32) -> VstorPacket {
    let mut r = VmscsiRequest {
        length: vstor::VMSCSI_REQUEST_SIZE as u16,
        port_number: 2,
        path_id: lun.0,
        target_id: lun.1,
        lun: lun.2,
        cdb_length: cdb.len().min(255) as u8,
        sense_info_length: vstor::SENSE_BUFFER_SIZE as u8,
        data_in,
        data_transfer_length: len,
        queue_tag: vstor::QUEUE_TAG_UNTAGGED,
        queue_action: vstor::QUEUE_ACTION_SIMPLE_TAG,
        srb_flags: vstor::srb_flags::DISABLE_SYNCH_TRANSFER
            | match data_in {
                0 => vstor::srb_flags::DATA_OUT,
                1 => vstor::srb_flags::DATA_IN,
                _ => 0,
            },
        time_out_value: 60,
        ..VmscsiRequest::default()
    };
    let mut cdb16 = [0u8; vstor::SENSE_BUFFER_SIZE];
    cdb16[..cdb.len().min(16)].copy_from_slice(&cdb[..cdb.len().min(16)]);
    r.cdb_or_sense = cdb16;
    let mut p = VstorPacket::new(Operation::ExecuteSrb, vstor::FLAG_REQUEST_COMPLETION, 0);
    p.set_srb(&r);
    p
}

/// A data buffer in guest RAM: `len` bytes from `byte_offset` into the first of `pfns`.
pub struct Buf {
    pub offset: u32,
    pub len: u32,
    pub pfns: Vec<u64>,
}

impl Buf {
    /// Pages from `first_pfn` on, in reverse order (a scattered PFN list).
    pub fn new(first_pfn: u64, offset: u32, len: u32) -> Self {
        let pages = (offset as u64 + len as u64).div_ceil(PAGE);
        Buf {
            offset,
            len,
            pfns: (0..pages).rev().map(|i| first_pfn + i).collect(),
        }
    }

    pub fn range(&self) -> Option<(u32, u32, &[u64])> {
        Some((self.offset, self.len, &self.pfns))
    }

    pub fn write(&self, mem: &dyn GuestMemory, data: &[u8]) {
        let r = vmbus_core::memory::PagedRange::new(self.offset, self.len, &self.pfns).unwrap();
        mem.write_paged(&r, 0, data).unwrap();
    }

    pub fn read(&self, mem: &dyn GuestMemory) -> Vec<u8> {
        let r = vmbus_core::memory::PagedRange::new(self.offset, self.len, &self.pfns).unwrap();
        let mut v = vec![0u8; self.len as usize];
        mem.read_paged(&r, 0, &mut v).unwrap();
        v
    }
}

/// Payload of a host packet through the guest-side parser (as Linux 6.1 would accept it).
pub fn parse(r: &Reply) -> HostPacket {
    vstor::parse_host_packet(&r.packet.as_bytes()[..r.len.min(64)], 64).unwrap()
}

/// Deterministic bytes for block `lba` of generation `generation`.
pub fn pattern(lba: u64, generation: u64, len: usize) -> Vec<u8> {
    let mut x = lba.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ generation.wrapping_mul(0xD1B5_4A32_D192_ED03)
        | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn read10(lba: u32, blocks: u16) -> [u8; 10] {
    let mut c = [0x28, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&blocks.to_be_bytes());
    c
}

pub fn write10(lba: u32, blocks: u16, fua: bool) -> [u8; 10] {
    let mut c = read10(lba, blocks);
    c[0] = 0x2A;
    if fua {
        c[1] = 0x08;
    }
    c
}
