//! A minimal storvsc: the vstor init handshake as Linux 6.1 sends it, then SCSI commands as SRBs
//! with GPA-direct data buffers. (vsc-guest's storvsc was not committed when this was written; this
//! is the test program's own sequence, built on vmbus-core's vstor wire types.)

use vmbus_core::devices::vstor::{
    self, HostPacket, Operation, ProtocolVersion, ProtocolVersionBody, VmscsiRequest, VstorPacket,
};

use crate::chan::{ChanError, Channel};
use ringbuf::PacketType;

/// What an SRB came back with.
#[derive(Clone, Copy, Debug)]
pub struct SrbResult {
    pub nt_status: u32,
    pub srb_status: u8,
    pub scsi_status: u8,
    pub transferred: u32,
    /// Sense key / ASC / ASCQ (fixed-format sense), when the SCSI status is CHECK CONDITION.
    pub sense: (u8, u8, u8),
}

impl SrbResult {
    pub fn ok(&self) -> bool {
        self.nt_status == 0
            && self.scsi_status == vstor::scsi_status::GOOD
            && vstor::srb_status::code(self.srb_status) == vstor::srb_status::SUCCESS
    }
}

pub struct Storvsc {
    pub ch: Channel,
    next_id: u64,
    pub version: Option<ProtocolVersion>,
    pub max_transfer: u32,
}

impl Storvsc {
    pub fn new(ch: Channel) -> Storvsc {
        Storvsc {
            ch,
            next_id: 1,
            version: None,
            max_transfer: 0,
        }
    }

    /// Sends `p` (64 bytes) with an optional data buffer and waits for its completion.
    fn exec(
        &mut self,
        p: &VstorPacket,
        data: Option<(u64, u32)>,
    ) -> Result<VstorPacket, ChanError> {
        let id = self.next_id;
        self.next_id += 1;
        let bytes = p.wire_bytes(vstor::PACKET_SIZE);
        match data {
            Some((gpa, len)) => self.ch.send_gpa(id, bytes, gpa, 0, len)?,
            None => self.ch.send_inband(id, bytes, true)?,
        }
        loop {
            let pkt = self.ch.recv()?;
            if pkt.ty != PacketType::Completion || pkt.trans_id != id {
                // ENUMERATE_BUS and friends: nothing to rescan in this test.
                continue;
            }
            return match vstor::parse_host_packet(&pkt.payload, vstor::PACKET_SIZE) {
                Ok(HostPacket::Completion(c)) => Ok(c),
                _ => Err(ChanError::Status("vstor completion", u32::MAX)),
            };
        }
    }

    fn init_op(&mut self, p: &VstorPacket, what: &'static str) -> Result<VstorPacket, ChanError> {
        let c = self.exec(p, None)?;
        let status = { c.header.status };
        if status != 0 {
            return Err(ChanError::Status(what, status));
        }
        Ok(c)
    }

    /// `storvsc_channel_init`: BEGIN_INITIALIZATION, QUERY_PROTOCOL_VERSION (newest first),
    /// QUERY_PROPERTIES, END_INITIALIZATION.
    pub fn init(&mut self) -> Result<(), ChanError> {
        let flag = vstor::FLAG_REQUEST_COMPLETION;
        self.init_op(
            &VstorPacket::new(Operation::BeginInitialization, flag, 0),
            "BEGIN_INITIALIZATION",
        )?;
        for v in ProtocolVersion::LINUX_ORDER {
            let mut p = VstorPacket::new(Operation::QueryProtocolVersion, flag, 0);
            p.set_version(&ProtocolVersionBody {
                major_minor: v.raw(),
                revision: 0,
            });
            let c = self.exec(&p, None)?;
            if { c.header.status } == 0 {
                self.version = Some(v);
                break;
            }
        }
        if self.version.is_none() {
            return Err(ChanError::Status("QUERY_PROTOCOL_VERSION", u32::MAX));
        }
        let c = self.init_op(
            &VstorPacket::new(Operation::QueryProperties, flag, 0),
            "QUERY_PROPERTIES",
        )?;
        self.max_transfer = c.properties().max_transfer_bytes;
        self.init_op(
            &VstorPacket::new(Operation::EndInitialization, flag, 0),
            "END_INITIALIZATION",
        )?;
        Ok(())
    }

    /// One SCSI command to LUN 0:0:0; `data` is `(gpa, len)` of a page-aligned buffer.
    pub fn scsi(
        &mut self,
        cdb: &[u8],
        read: bool,
        data: Option<(u64, u32)>,
    ) -> Result<SrbResult, ChanError> {
        let len = data.map_or(0, |d| d.1);
        let data_in = match (data, read) {
            (None, _) => 2,
            (Some(_), true) => 1,
            (Some(_), false) => 0,
        };
        let mut cdb16 = [0u8; vstor::SENSE_BUFFER_SIZE];
        let n = cdb.len().min(16);
        cdb16[..n].copy_from_slice(&cdb[..n]);
        let r = VmscsiRequest {
            length: vstor::VMSCSI_REQUEST_SIZE as u16,
            port_number: 2,
            cdb_length: n as u8,
            sense_info_length: vstor::SENSE_BUFFER_SIZE as u8,
            data_in,
            data_transfer_length: len,
            cdb_or_sense: cdb16,
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
        let mut p = VstorPacket::new(Operation::ExecuteSrb, vstor::FLAG_REQUEST_COMPLETION, 0);
        p.set_srb(&r);
        let c = self.exec(&p, data)?;
        let srb = c.srb();
        let sense = srb.cdb_or_sense;
        Ok(SrbResult {
            nt_status: { c.header.status },
            srb_status: srb.srb_status,
            scsi_status: srb.scsi_status,
            transferred: { srb.data_transfer_length },
            sense: (sense[2] & 0x0F, sense[12], sense[13]),
        })
    }

    /// A command retried (up to 3 times) while the device reports UNIT ATTENTION.
    pub fn command(
        &mut self,
        cdb: &[u8],
        read: bool,
        data: Option<(u64, u32)>,
    ) -> Result<SrbResult, ChanError> {
        let mut r = self.scsi(cdb, read, data)?;
        for _ in 0..3 {
            if r.ok() || r.sense.0 != 6 {
                break;
            }
            r = self.scsi(cdb, read, data)?;
        }
        Ok(r)
    }
}

/// READ(10) / WRITE(10) CDBs.
pub fn rw10(write: bool, lba: u32, blocks: u16) -> [u8; 10] {
    let l = lba.to_be_bytes();
    let b = blocks.to_be_bytes();
    [
        if write { 0x2A } else { 0x28 },
        0,
        l[0],
        l[1],
        l[2],
        l[3],
        0,
        b[0],
        b[1],
        0,
    ]
}
