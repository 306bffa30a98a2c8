//! The SCSI probe Linux runs on a storvsc controller (`scsi_scan.c` then `sd.c`), as a sans-IO
//! state machine: [`Prober::next_step`] says which command to run (a CDB and a data-in length), the
//! caller runs it and hands the data back through [`Prober::complete`].
//!
//! Order, per (path, target): standard INQUIRY of LUN 0 (36 bytes, then `additional_length + 5`
//! if longer); for a LUN that is there, VPD page 0x00 and every listed page among 0x00, 0x80,
//! 0x83, 0x89, 0xB0, 0xB1, 0xB2 (each a 4-byte header probe, then the whole page:
//! `scsi_attach_vpd`); REPORT LUNS (4096 bytes, larger if the list is longer); the same for each
//! reported LUN. Then, for each disk found (`sd_revalidate_disk`): TEST UNIT READY, READ
//! CAPACITY(16) when the device claims SPC-3 or later (or is "Msft" on WIN8/WIN8.1) else READ
//! CAPACITY(10) (RC16 after it for > 2³² blocks), MODE SENSE(6) page 0x3F for write protect
//! (4 bytes; page 0, then 255 bytes on failure), MODE SENSE(6) caching page 0x08 (4 bytes, then the
//! whole mode data). UNIT ATTENTION is retried up to three times, as Linux does.
//!
//! Differences from Linux: no sequential LUN scan when REPORT LUNS fails (only LUN 0 is used);
//! failed INQUIRY / MODE SENSE stay failures (Linux's storvsc turns them into zero-length
//! successes, which only hides errors).

use super::cdb::{self, Cdb};
use super::driver::ScsiAddress;
use super::parse::{
    BlockLimits, Caching, Capacity, Designator, InquiryData, LunList, ModeHeader, ParseError,
    Provisioning, TYPE_DISK, caching, designators, rotation_rate, vpd_body, vpd_len,
};
use super::sense::IoError;
use alloc::collections::VecDeque;
use alloc::vec::Vec;
use vmbus_core::devices::vstor::ProtocolVersion;

/// VPD pages Linux 6.1 caches when listed (`scsi_attach_vpd`).
pub const LINUX_VPD_PAGES: [u8; 7] = [0x00, 0x80, 0x83, 0x89, 0xB0, 0xB1, 0xB2];
/// Attempts per command on UNIT ATTENTION and other retryable errors.
pub const RETRIES: u8 = 3;
/// Largest data-in buffer the probe asks for.
pub const PROBE_BUFFER_LEN: u32 = 8192;

/// What to scan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeConfig {
    /// (path, target) pairs, scanned in order. Linux: paths 0..8 × targets 0..2.
    pub targets: Vec<(u8, u8)>,
    /// Highest LUN accepted from REPORT LUNS (Linux storvsc: 255).
    pub max_lun: u8,
    /// Data-in buffer the caller provides (bytes; at least 4096).
    pub buffer_len: u32,
    /// Negotiated vstor version (Linux's "Msft" SPC-3 rule depends on it).
    pub version: ProtocolVersion,
}

impl ProbeConfig {
    /// Linux's scan of a SCSI controller: 8 paths × 2 targets.
    pub fn linux(version: ProtocolVersion) -> Self {
        ProbeConfig {
            targets: (0..8u8)
                .flat_map(|p| (0..2u8).map(move |t| (p, t)))
                .collect(),
            max_lun: 255,
            buffer_len: PROBE_BUFFER_LEN,
            version,
        }
    }

    /// Just one path/target.
    pub fn single(path: u8, target: u8, version: ProtocolVersion) -> Self {
        ProbeConfig {
            targets: alloc::vec![(path, target)],
            ..ProbeConfig::linux(version)
        }
    }
}

/// Everything the probe learned about one LUN.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LunInfo {
    pub addr: ScsiAddress,
    pub inquiry: InquiryData,
    /// Pages VPD 0x00 lists (empty: no VPD).
    pub vpd_pages: Vec<u8>,
    pub serial: Option<Vec<u8>>,
    pub designators: Vec<Designator>,
    pub block_limits: Option<BlockLimits>,
    pub rotation_rate: Option<u16>,
    pub provisioning: Option<Provisioning>,
    /// TEST UNIT READY did not report "medium not present".
    pub media_present: bool,
    pub capacity: Option<Capacity>,
    pub write_protected: bool,
    /// Caching page; `None` = not reported (Linux assumes write through).
    pub caching: Option<Caching>,
    /// Header DPOFUA: FUA writes are honoured.
    pub dpofua: bool,
    /// Errors met on the way that Linux tolerates (logged, defaults used).
    pub warnings: Vec<ProbeWarning>,
}

impl LunInfo {
    fn new(addr: ScsiAddress, inquiry: InquiryData) -> Self {
        LunInfo {
            addr,
            inquiry,
            vpd_pages: Vec::new(),
            serial: None,
            designators: Vec::new(),
            block_limits: None,
            rotation_rate: None,
            provisioning: None,
            media_present: true,
            capacity: None,
            write_protected: false,
            caching: None,
            dpofua: false,
            warnings: Vec::new(),
        }
    }

    /// A direct-access block device.
    pub fn is_disk(&self) -> bool {
        self.inquiry.device_type == TYPE_DISK
    }

    /// Linux sends tagged SRBs to LUNs with CmdQue at SCSI-2 or later.
    pub fn tagged(&self) -> bool {
        self.inquiry.cmd_que && self.inquiry.scsi_level() >= 3
    }

    /// Linux `scsi_level` after storvsc's `slave_configure` ("Msft" on WIN8/WIN8.1 → SPC-3).
    pub fn effective_scsi_level(&self, version: ProtocolVersion) -> u8 {
        if self.inquiry.vendor.starts_with(b"Msft")
            && matches!(version, ProtocolVersion::Win8 | ProtocolVersion::Win8_1)
        {
            6
        } else {
            self.inquiry.scsi_level()
        }
    }
}

/// A tolerated failure during the probe.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ProbeWarning {
    Command {
        opcode: u8,
        page: u8,
        error: IoError,
    },
    Parse {
        opcode: u8,
        page: u8,
        error: ParseError,
    },
}

/// A command the probe wants run.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct ProbeCommand {
    pub addr: ScsiAddress,
    pub cdb: Cdb,
    /// Data-in bytes (0: no data).
    pub alloc: u32,
    /// Send as a tagged request.
    pub tagged: bool,
}

/// What to do next.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ProbeStep {
    Run(ProbeCommand),
    Done,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Phase {
    NextTarget,
    Inquiry { alloc: u8, second: bool },
    VpdHeader { page: u8 },
    VpdPage { page: u8, alloc: u16, again: bool },
    ReportLuns { alloc: u32, again: bool },
    NextLun,
    NextDisk,
    Tur,
    Rc16 { after_rc10: bool },
    Rc10,
    WriteProtect { stage: u8 },
    CacheFirst,
    CacheFull { alloc: u8 },
    Done,
}

/// The probe state machine.
pub struct Prober {
    config: ProbeConfig,
    targets: VecDeque<(u8, u8)>,
    phase: Phase,
    attempt: u8,
    /// Address being probed.
    addr: ScsiAddress,
    /// LUN 0 of the current target was present or answered (target exists).
    scanning_lun0: bool,
    luns: VecDeque<u8>,
    /// The LUN whose scan (INQUIRY, VPD) is in progress.
    current: Option<LunInfo>,
    vpd_queue: VecDeque<u8>,
    found: Vec<LunInfo>,
    /// Index into `found` of the disk in the sd phase.
    disk: usize,
}

impl Prober {
    pub fn new(config: ProbeConfig) -> Self {
        let targets = config.targets.iter().copied().collect();
        Prober {
            config,
            targets,
            phase: Phase::NextTarget,
            attempt: 0,
            addr: ScsiAddress::default(),
            scanning_lun0: false,
            luns: VecDeque::new(),
            current: None,
            vpd_queue: VecDeque::new(),
            found: Vec::new(),
            disk: 0,
        }
    }

    /// LUNs found so far (all of them once [`ProbeStep::Done`]).
    pub fn luns(&self) -> &[LunInfo] {
        &self.found
    }

    pub fn into_luns(self) -> Vec<LunInfo> {
        self.found
    }

    fn tagged(&self) -> bool {
        match self.phase {
            Phase::Inquiry { .. } => false,
            Phase::VpdHeader { .. } | Phase::VpdPage { .. } | Phase::ReportLuns { .. } => {
                self.current.as_ref().is_some_and(LunInfo::tagged)
            }
            _ => self.found.get(self.disk).is_some_and(LunInfo::tagged),
        }
    }

    /// Allocation length for a VPD page of `len` bytes: bounded by the buffer and the CDB field.
    fn vpd_alloc(&self, len: usize) -> u16 {
        let max = self.config.buffer_len.min(u32::from(u16::MAX)) as usize;
        len.min(max) as u16
    }

    /// The command to run now (the same until [`Self::complete`] is called), or `Done`.
    pub fn next_step(&mut self) -> ProbeStep {
        loop {
            let (cdb, alloc) = match self.phase {
                Phase::NextTarget => {
                    self.advance_target();
                    continue;
                }
                Phase::NextLun => {
                    self.advance_lun();
                    continue;
                }
                Phase::NextDisk => {
                    self.advance_disk();
                    continue;
                }
                Phase::Done => return ProbeStep::Done,
                Phase::Inquiry { alloc, .. } => (cdb::inquiry(alloc), u32::from(alloc)),
                Phase::VpdHeader { page } => (cdb::inquiry_vpd(page, 4), 4),
                Phase::VpdPage { page, alloc, .. } => {
                    (cdb::inquiry_vpd(page, alloc), u32::from(alloc))
                }
                Phase::ReportLuns { alloc, .. } => (cdb::report_luns(alloc), alloc),
                Phase::Tur => (cdb::test_unit_ready(), 0),
                Phase::Rc16 { .. } => (cdb::read_capacity_16(), cdb::RC16_LEN),
                Phase::Rc10 => (cdb::read_capacity_10(), cdb::RC10_LEN),
                Phase::WriteProtect { stage } => match stage {
                    0 => (cdb::mode_sense_6(false, 0x3F, 0, 4), 4),
                    1 => (cdb::mode_sense_6(false, 0x00, 0, 4), 4),
                    _ => (cdb::mode_sense_6(false, 0x3F, 0, 255), 255),
                },
                Phase::CacheFirst => (cdb::mode_sense_6(false, 0x08, 0, 4), 4),
                Phase::CacheFull { alloc } => {
                    (cdb::mode_sense_6(false, 0x08, 0, alloc), u32::from(alloc))
                }
            };
            return ProbeStep::Run(ProbeCommand {
                addr: self.addr,
                cdb,
                alloc,
                tagged: self.tagged(),
            });
        }
    }

    fn advance_target(&mut self) {
        self.current = None;
        self.luns.clear();
        match self.targets.pop_front() {
            Some((path, target)) => {
                self.addr = ScsiAddress::new(path, target, 0);
                self.scanning_lun0 = true;
                self.start_inquiry();
            }
            None => {
                // `advance_disk` moves to index 0 first.
                self.disk = usize::MAX;
                self.phase = Phase::NextDisk;
            }
        }
    }

    fn advance_lun(&mut self) {
        match self.luns.pop_front() {
            Some(lun) => {
                self.addr.lun = lun;
                self.scanning_lun0 = false;
                self.start_inquiry();
            }
            None => self.phase = Phase::NextTarget,
        }
    }

    fn advance_disk(&mut self) {
        self.disk = self.disk.wrapping_add(1);
        while let Some(l) = self.found.get(self.disk) {
            if l.is_disk() {
                self.addr = l.addr;
                self.attempt = 0;
                self.phase = Phase::Tur;
                return;
            }
            self.disk = self.disk.saturating_add(1);
        }
        self.phase = Phase::Done;
    }

    fn start_inquiry(&mut self) {
        self.attempt = 0;
        self.phase = Phase::Inquiry {
            alloc: 36,
            second: false,
        };
    }

    fn set(&mut self, phase: Phase) {
        self.attempt = 0;
        self.phase = phase;
    }

    /// Retry the current command if the error allows and attempts remain.
    fn retry(&mut self, e: &IoError) -> bool {
        if e.is_retryable() && self.attempt.saturating_add(1) < RETRIES {
            self.attempt = self.attempt.saturating_add(1);
            return true;
        }
        false
    }

    fn warn(&mut self, w: ProbeWarning) {
        let target = if matches!(
            self.phase,
            Phase::VpdHeader { .. } | Phase::VpdPage { .. } | Phase::ReportLuns { .. }
        ) {
            self.current.as_mut()
        } else {
            self.found.get_mut(self.disk)
        };
        if let Some(l) = target {
            l.warnings.push(w);
        }
    }

    fn disk_mut(&mut self) -> Option<&mut LunInfo> {
        self.found.get_mut(self.disk)
    }

    /// The result of the command [`Self::next_step`] returned: the data received (the first
    /// `transferred` bytes of the buffer) or the error.
    pub fn complete(&mut self, result: Result<&[u8], IoError>) {
        let cmd = self.phase;
        let (opcode, page) = match self.next_step() {
            ProbeStep::Run(c) => (c.cdb.opcode(), c.cdb.byte(2)),
            ProbeStep::Done => return,
        };
        let data = match result {
            Ok(d) => d,
            Err(e) => {
                if self.retry(&e) {
                    return;
                }
                self.on_error(cmd, opcode, page, e);
                return;
            }
        };
        if let Err(error) = self.on_data(cmd, data) {
            self.warn(ProbeWarning::Parse {
                opcode,
                page,
                error,
            });
            self.after_parse_error(cmd);
        }
    }

    fn on_error(&mut self, cmd: Phase, opcode: u8, page: u8, error: IoError) {
        match cmd {
            Phase::Inquiry { .. } => {
                // No answer: the LUN (or, for LUN 0, the target) is not there.
                self.current = None;
                self.phase = if self.scanning_lun0 {
                    Phase::NextTarget
                } else {
                    Phase::NextLun
                };
            }
            Phase::VpdHeader { .. } | Phase::VpdPage { .. } => {
                self.warn(ProbeWarning::Command {
                    opcode,
                    page,
                    error,
                });
                self.next_vpd_page();
            }
            Phase::ReportLuns { .. } => {
                self.warn(ProbeWarning::Command {
                    opcode,
                    page,
                    error,
                });
                self.phase = Phase::NextLun;
            }
            Phase::Tur => {
                if let IoError::NoMedium { .. } = error {
                    // Linux reads nothing else from a disk without medium.
                    if let Some(d) = self.disk_mut() {
                        d.media_present = false;
                    }
                    self.phase = Phase::NextDisk;
                } else {
                    self.warn(ProbeWarning::Command {
                        opcode,
                        page,
                        error,
                    });
                    self.start_capacity();
                }
            }
            Phase::Rc16 { after_rc10: false } => self.set(Phase::Rc10),
            Phase::Rc16 { after_rc10: true } | Phase::Rc10 => {
                self.warn(ProbeWarning::Command {
                    opcode,
                    page,
                    error,
                });
                self.set(Phase::WriteProtect { stage: 0 });
            }
            Phase::WriteProtect { stage } if stage < 2 => self.set(Phase::WriteProtect {
                stage: stage.saturating_add(1),
            }),
            Phase::WriteProtect { .. } => {
                // "Test WP failed, assume Write Enabled".
                self.warn(ProbeWarning::Command {
                    opcode,
                    page,
                    error,
                });
                self.set(Phase::CacheFirst);
            }
            Phase::CacheFirst | Phase::CacheFull { .. } => {
                // "Asking for cache data failed" → write through.
                self.warn(ProbeWarning::Command {
                    opcode,
                    page,
                    error,
                });
                self.phase = Phase::NextDisk;
            }
            Phase::NextTarget | Phase::NextLun | Phase::NextDisk | Phase::Done => {}
        }
    }

    fn after_parse_error(&mut self, cmd: Phase) {
        match cmd {
            Phase::Inquiry { .. } => {
                self.current = None;
                self.phase = if self.scanning_lun0 {
                    Phase::NextTarget
                } else {
                    Phase::NextLun
                };
            }
            Phase::VpdHeader { .. } | Phase::VpdPage { .. } => self.next_vpd_page(),
            Phase::ReportLuns { .. } => self.phase = Phase::NextLun,
            Phase::Tur => self.start_capacity(),
            Phase::Rc16 { after_rc10: false } => self.set(Phase::Rc10),
            Phase::Rc16 { .. } | Phase::Rc10 => {
                if let Some(d) = self.disk_mut() {
                    d.capacity = None;
                }
                self.set(Phase::WriteProtect { stage: 0 });
            }
            Phase::WriteProtect { .. } => self.set(Phase::CacheFirst),
            Phase::CacheFirst | Phase::CacheFull { .. } => self.phase = Phase::NextDisk,
            Phase::NextTarget | Phase::NextLun | Phase::NextDisk | Phase::Done => {}
        }
    }

    fn on_data(&mut self, cmd: Phase, data: &[u8]) -> Result<(), ParseError> {
        match cmd {
            Phase::Inquiry { alloc, second } => {
                let inq = InquiryData::parse(data)?;
                let want = inq.response_len();
                if !second && want > alloc {
                    self.phase = Phase::Inquiry {
                        alloc: want,
                        second: true,
                    };
                    return Ok(());
                }
                if inq.is_present() {
                    self.current = Some(LunInfo::new(self.addr, inq));
                    self.vpd_queue.clear();
                    self.set(Phase::VpdHeader { page: 0 });
                } else if self.scanning_lun0 {
                    // Target present, no LUN 0: still ask for its LUNs.
                    self.set(Phase::ReportLuns {
                        alloc: cdb::REPORT_LUNS_INITIAL_LEN,
                        again: false,
                    });
                } else {
                    self.phase = Phase::NextLun;
                }
            }
            Phase::VpdHeader { page } => {
                let len = vpd_len(data, page)?;
                let alloc = self.vpd_alloc(len);
                self.set(Phase::VpdPage {
                    page,
                    alloc,
                    again: false,
                });
            }
            Phase::VpdPage { page, alloc, again } => {
                let len = vpd_len(data, page)?;
                if len > usize::from(alloc) && !again && self.vpd_alloc(len) > alloc {
                    self.phase = Phase::VpdPage {
                        page,
                        alloc: self.vpd_alloc(len),
                        again: true,
                    };
                    return Ok(());
                }
                self.store_vpd(page, data)?;
                self.next_vpd_page();
            }
            Phase::ReportLuns { alloc, again } => {
                let list = LunList::parse(data)?;
                let needed = list.needed_alloc();
                if needed > u64::from(alloc)
                    && !again
                    && needed <= u64::from(self.config.buffer_len)
                {
                    self.phase = Phase::ReportLuns {
                        alloc: needed as u32,
                        again: true,
                    };
                    return Ok(());
                }
                for lun in list.luns {
                    if lun == 0 || lun > u64::from(self.config.max_lun) {
                        continue;
                    }
                    let lun = lun as u8;
                    if !self.luns.contains(&lun) {
                        self.luns.push_back(lun);
                    }
                }
                self.phase = Phase::NextLun;
            }
            Phase::Tur => self.start_capacity(),
            Phase::Rc16 { after_rc10 } => {
                let cap = Capacity::parse_16(data);
                match (cap, after_rc10) {
                    (Ok(c), _) => {
                        if let Some(d) = self.disk_mut() {
                            d.capacity = Some(c);
                        }
                    }
                    // Keep READ CAPACITY(10)'s answer when RC16 data is unusable.
                    (Err(e), true) => {
                        self.warn(ProbeWarning::Parse {
                            opcode: cdb::op::SERVICE_ACTION_IN_16,
                            page: 0,
                            error: e,
                        });
                    }
                    (Err(e), false) => return Err(e),
                }
                self.set(Phase::WriteProtect { stage: 0 });
            }
            Phase::Rc10 => {
                let c = Capacity::parse_10(data)?;
                if let Some(d) = self.disk_mut() {
                    d.capacity = Some(c);
                }
                if c.last_lba == u64::from(u32::MAX) {
                    self.set(Phase::Rc16 { after_rc10: true });
                } else {
                    self.set(Phase::WriteProtect { stage: 0 });
                }
            }
            Phase::WriteProtect { .. } => {
                let h = ModeHeader::parse_6(data)?;
                if let Some(d) = self.disk_mut() {
                    d.write_protected = h.write_protected();
                }
                self.set(Phase::CacheFirst);
            }
            Phase::CacheFirst => {
                let h = ModeHeader::parse_6(data)?;
                if h.length < 3 {
                    return Err(ParseError::TooShort {
                        what: "MODE SENSE mode data",
                        len: h.length,
                        need: 3,
                    });
                }
                if h.length > 4 {
                    let alloc = h.length.min(255) as u8;
                    self.set(Phase::CacheFull { alloc });
                } else {
                    self.store_caching(data)?;
                }
            }
            Phase::CacheFull { .. } => self.store_caching(data)?,
            Phase::NextTarget | Phase::NextLun | Phase::NextDisk | Phase::Done => {}
        }
        Ok(())
    }

    fn store_caching(&mut self, data: &[u8]) -> Result<(), ParseError> {
        let h = ModeHeader::parse_6(data)?;
        let c = caching(data)?;
        if let Some(d) = self.disk_mut() {
            d.caching = c;
            d.dpofua = h.dpofua();
        }
        self.phase = Phase::NextDisk;
        Ok(())
    }

    fn store_vpd(&mut self, page: u8, data: &[u8]) -> Result<(), ParseError> {
        let first_page0 = page == 0
            && self
                .current
                .as_ref()
                .is_some_and(|c| c.vpd_pages.is_empty());
        let Some(cur) = self.current.as_mut() else {
            return Ok(());
        };
        match page {
            0x00 => {
                let body = vpd_body(data, 0)?;
                cur.vpd_pages = body.to_vec();
                if first_page0 {
                    self.vpd_queue = body
                        .iter()
                        .copied()
                        .filter(|p| LINUX_VPD_PAGES.contains(p))
                        .collect();
                }
            }
            0x80 => cur.serial = Some(vpd_body(data, 0x80)?.to_vec()),
            0x83 => cur.designators = designators(data)?,
            0xB0 => cur.block_limits = Some(BlockLimits::parse(data)?),
            0xB1 => cur.rotation_rate = Some(rotation_rate(data)?),
            0xB2 => cur.provisioning = Some(Provisioning::parse(data)?),
            _ => {}
        }
        Ok(())
    }

    fn next_vpd_page(&mut self) {
        if let Some(page) = self.vpd_queue.pop_front() {
            self.set(Phase::VpdHeader { page });
            return;
        }
        // VPD done: the LUN is scanned.
        if let Some(l) = self.current.take() {
            self.found.push(l);
        }
        if self.scanning_lun0 {
            self.set(Phase::ReportLuns {
                alloc: cdb::REPORT_LUNS_INITIAL_LEN,
                again: false,
            });
        } else {
            self.phase = Phase::NextLun;
        }
    }

    fn start_capacity(&mut self) {
        let version = self.config.version;
        let rc16_first = self
            .found
            .get(self.disk)
            .is_some_and(|d| d.effective_scsi_level(version) > 5);
        self.set(if rc16_first {
            Phase::Rc16 { after_rc10: false }
        } else {
            Phase::Rc10
        });
    }
}
