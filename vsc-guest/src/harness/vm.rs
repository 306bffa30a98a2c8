//! [`StorHarness`] bring-up and servicing: the VMBus control plane, channel rings, the storvsc
//! handshake, sub-channels and the SCSI probe.

use super::HarnessError;
use super::host::{ChildProcess, DeviceHost, HostedInProcess, VmbusInProcess, Vsp};
use super::io::Ops;
use super::memory::GuestRam;
use crate::control_plane::HostOp;
use crate::storvsc::{
    Direction, Disk, DriverState, LunInfo, ProbeConfig, ProbeStep, Prober, RingChannel,
    ScsiAddress, Storvsc, StorvscConfig, StorvscError, StorvscEvent, probe::PROBE_BUFFER_LEN,
};
use ringbuf::init_control;
use ringbuf::mmap::MappedRing;
use ringbuf::signal::Doorbell;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use vmbus_core::device::DeviceDescription;
use vmbus_core::gpadl::RamRanges;
use vmbus_core::guest::{Client, ClientConfig, ClientEvent, OfferInfo, OpenParams};
use vmbus_core::host::{Server, ServerConfig};
use vmbus_core::oop::Supervisor;
use vmbus_core::wire::{Guid, class};

/// Sizes and settings of a harness VM (defaults: Linux 6.1's storvsc).
#[derive(Clone, Debug)]
pub struct HarnessConfig {
    /// Guest RAM in 4 KiB pages (a sparse memfd).
    pub ram_pages: u64,
    /// Pages per ring direction, control page included (Linux: 32 = 128 KiB).
    pub ring_pages: u32,
    /// Channels wanted (primary included): `queues − 1` sub-channels are asked for.
    pub queues: u16,
    /// Driver settings (`subchannels` is set from `queues`).
    pub driver: StorvscConfig,
    /// (path, target) pairs to scan; `None` = Linux's 8 × 2.
    pub targets: Option<Vec<(u8, u8)>>,
    /// The offer for `Vsp::InProcess` and `Vsp::Child` (an in-process `VmbusDevice` describes
    /// itself). `max_subchannels` must cover `queues − 1`.
    pub description: DeviceDescription,
    /// How long any one wait (a bus reply, an I/O) may take.
    pub timeout: Duration,
    /// Child-process VSP: restart it when it dies (as the VMM does) and send the requests it
    /// may have lost again (the driver then ignores whichever completion comes second).
    pub supervise: bool,
}

impl Default for HarnessConfig {
    fn default() -> Self {
        let mut description = DeviceDescription::new(
            class::SCSI,
            Guid::from_u128(0x5c5c_0001_0000_4000_8000_0000_0000_0001),
        );
        description.max_subchannels = 64;
        HarnessConfig {
            ram_pages: 65536,
            ring_pages: 32,
            queues: 1,
            driver: StorvscConfig::default(),
            targets: None,
            description,
            timeout: Duration::from_secs(30),
            supervise: true,
        }
    }
}

pub(super) struct GuestChannel {
    pub(super) relid: u32,
    pub(super) chan: RingChannel<MappedRing>,
    pub(super) kick: Doorbell,
}

/// One guest with one storvsc controller, driven from this process.
pub struct StorHarness {
    pub(super) cfg: HarnessConfig,
    pub(super) ram: GuestRam,
    client: Client,
    server: Server,
    host: Box<dyn DeviceHost>,
    /// Interrupts from every channel (one eventfd shared by all, like one vector).
    call: Doorbell,
    kicks: HashMap<u32, Doorbell>,
    primary: Option<u32>,
    bus_events: Vec<ClientEvent>,
    pub(super) driver: Storvsc,
    /// Open channels by driver channel index.
    pub(super) channels: Vec<GuestChannel>,
    pub(super) ops: Ops,
    luns: Vec<LunInfo>,
    pub(super) disk: Option<Disk>,
    /// Driver events after bring-up (rescans, resets), oldest first.
    pub events: Vec<StorvscEvent>,
    /// Host packets the driver refused (most recent last, bounded).
    pub refused: Vec<StorvscError>,
    /// Sub-channel offers the device itself asked for (counted, see the module docs).
    pub device_subchannel_requests: u64,
    pub(super) per_channel: Vec<u64>,
    /// Times the child-process VSP was found dead and restarted.
    pub vsp_restarts: u64,
    last_check: Instant,
}

fn bus_err<E: std::fmt::Display>(e: E) -> HarnessError {
    HarnessError::Bus(e.to_string())
}

impl StorHarness {
    /// Brings up a VM with `vsp` behind it: VMBus, the SCSI channel, the storvsc handshake,
    /// sub-channels, the SCSI probe. I/O goes to the first disk found.
    pub fn start(cfg: HarnessConfig, vsp: Vsp) -> Result<Self, HarnessError> {
        let mut h = Self::connect(cfg, vsp)?;
        h.init_driver()?;
        h.probe()?;
        Ok(h)
    }

    /// Like [`Self::start`] but stops once the primary channel is open, before the vstor
    /// handshake: for tests that drive the controller themselves ([`Self::init_driver`],
    /// [`Self::probe`]).
    pub fn start_uninitialized(cfg: HarnessConfig, vsp: Vsp) -> Result<Self, HarnessError> {
        Self::connect(cfg, vsp)
    }

    fn connect(mut cfg: HarnessConfig, vsp: Vsp) -> Result<Self, HarnessError> {
        cfg.driver.subchannels = cfg.queues.saturating_sub(1);
        if matches!(vsp, Vsp::Child(_)) && cfg.supervise {
            cfg.driver.retain_packets = true;
        }
        let ram = GuestRam::new(cfg.ram_pages)?;
        let (host, desc): (Box<dyn DeviceHost>, DeviceDescription) = match vsp {
            Vsp::InProcess(d) => (
                Box::new(HostedInProcess::new(d, &ram)?),
                cfg.description.clone(),
            ),
            Vsp::InProcessVmbus(make) => {
                let h = VmbusInProcess::new(make, &ram)?;
                let d = h.description();
                (Box::new(h), d)
            }
            Vsp::Child(cmd) => (
                Box::new(ChildProcess::start(cmd, &ram, cfg.timeout)?),
                cfg.description.clone(),
            ),
        };
        let mut server = Server::new(
            ServerConfig {
                vp_count: 8,
                ..ServerConfig::default()
            },
            RamRanges(vec![(0, ram.pages())]),
        );
        server.add_device(desc).map_err(bus_err)?;
        let driver = Storvsc::new(cfg.driver.clone());
        let mut h = StorHarness {
            cfg,
            ram,
            client: Client::new(ClientConfig::default()),
            server,
            host,
            call: Doorbell::new()?,
            kicks: HashMap::new(),
            primary: None,
            bus_events: Vec::new(),
            driver,
            channels: Vec::new(),
            ops: Ops::default(),
            luns: Vec::new(),
            disk: None,
            events: Vec::new(),
            refused: Vec::new(),
            device_subchannel_requests: 0,
            per_channel: Vec::new(),
            vsp_restarts: 0,
            last_check: Instant::now(),
        };
        h.client.connect().map_err(bus_err)?;
        h.wait_bus("VERSION_RESPONSE", |e| {
            matches!(e, ClientEvent::Connected { .. })
        })?;
        h.client.request_offers().map_err(bus_err)?;
        h.wait_bus("ALLOFFERS_DELIVERED", |e| {
            matches!(e, ClientEvent::AllOffersDelivered)
        })?;
        let primary = h
            .client
            .offers()
            .find(|o| (o.class_id == class::SCSI || o.class_id == class::IDE) && !o.is_subchannel())
            .map(|o| o.relid)
            .ok_or(HarnessError::Bus("no storage offer".into()))?;
        h.primary = Some(primary);
        h.open_channel(primary)?;
        Ok(h)
    }

    /// Guest RAM.
    pub fn ram(&mut self) -> &mut GuestRam {
        &mut self.ram
    }

    /// The driver (state, stats, negotiated version).
    pub fn driver(&self) -> &Storvsc {
        &self.driver
    }

    /// The driver, for tests that submit raw requests.
    pub fn driver_mut(&mut self) -> &mut Storvsc {
        &mut self.driver
    }

    /// Every LUN the probe found.
    pub fn luns(&self) -> &[LunInfo] {
        &self.luns
    }

    /// The disk I/O goes to.
    pub fn disk(&self) -> Result<&Disk, HarnessError> {
        self.disk.as_ref().ok_or(HarnessError::NoDisk)
    }

    /// Sends I/O to the disk at `addr` instead.
    pub fn select(&mut self, addr: ScsiAddress) -> Result<&Disk, HarnessError> {
        let lun = self
            .luns
            .iter()
            .find(|l| l.addr == addr)
            .ok_or(HarnessError::NoDisk)?;
        let n = self
            .driver
            .negotiated()
            .copied()
            .ok_or(HarnessError::Driver(StorvscError::NotReady(
                self.driver.state(),
            )))?;
        self.disk = Some(Disk::from_lun(lun, n.max_transfer_bytes, n.version)?);
        self.disk()
    }

    /// The supervisor of a child-process VSP (kill / restart tests).
    pub fn supervisor(&mut self) -> Option<&mut Supervisor> {
        self.host.supervisor()
    }

    /// Completed commands per channel (driver channel index), since the start.
    pub fn completions_per_channel(&self) -> &[u64] {
        &self.per_channel
    }

    /// Relids of the open channels, by driver channel index.
    pub fn channel_relids(&self) -> Vec<u32> {
        self.channels.iter().map(|c| c.relid).collect()
    }

    /// Moves VMBus channel messages both ways until nothing moves.
    fn pump(&mut self) -> Result<(), HarnessError> {
        for _ in 0..10_000 {
            let host = &mut self.host;
            let mut moved = crate::control_plane::exchange(
                &mut self.client,
                &mut self.server,
                &self.kicks,
                &self.call,
                &mut |op| match op {
                    HostOp::Open(info, kick, call) => host.open(info, kick, call),
                    HostOp::Close(relid) => {
                        host.close(relid);
                        Ok(())
                    }
                },
            )
            .map_err(HarnessError::Bus)?;
            while let Some(e) = self.client.poll_event() {
                moved = true;
                self.bus_events.push(e);
            }
            for n in self.host.take_subchannel_requests() {
                self.device_subchannel_requests += u64::from(n);
            }
            if !moved {
                return Ok(());
            }
        }
        Err(HarnessError::Bus(
            "the control plane never went quiet".into(),
        ))
    }

    /// Pumps until a bus event matching `want` arrives (and takes it).
    fn wait_bus(
        &mut self,
        what: &'static str,
        want: impl Fn(&ClientEvent) -> bool,
    ) -> Result<ClientEvent, HarnessError> {
        let deadline = Instant::now() + self.cfg.timeout;
        loop {
            self.pump()?;
            if let Some(i) = self.bus_events.iter().position(&want) {
                return Ok(self.bus_events.remove(i));
            }
            if Instant::now() > deadline {
                return Err(HarnessError::Timeout(what));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Opens channel `relid` with Linux-sized rings in fresh guest pages: the next driver channel.
    fn open_channel(&mut self, relid: u32) -> Result<(), HarnessError> {
        let rp = u64::from(self.cfg.ring_pages);
        let first = self.ram.alloc_pages(2 * rp)?;
        let pfns: Vec<u64> = (first..first + 2 * rp).collect();
        let gpadl = self.client.create_gpadl(relid, &pfns).map_err(bus_err)?;
        match self.wait_bus(
            "GPADL_CREATED",
            |e| matches!(e, ClientEvent::GpadlCreated { handle, .. } if *handle == gpadl),
        )? {
            ClientEvent::GpadlCreated { status: 0, .. } => {}
            other => return Err(HarnessError::Bus(format!("GPADL refused: {other:?}"))),
        }
        let (up, down) = pfns.split_at(rp as usize);
        let (up, down) = (self.ram.map_ring(up)?, self.ram.map_ring(down)?);
        // Linux initialises both control pages before OPENCHANNEL.
        init_control(&up);
        init_control(&down);
        self.kicks.insert(relid, Doorbell::new()?);
        self.client
            .open_channel(relid, OpenParams::new(gpadl, self.cfg.ring_pages, 0))
            .map_err(bus_err)?;
        match self.wait_bus(
            "OPENCHANNEL_RESULT",
            |e| matches!(e, ClientEvent::OpenResult { relid: r, .. } if *r == relid),
        )? {
            ClientEvent::OpenResult { status: 0, .. } => {}
            other => return Err(HarnessError::Bus(format!("open refused: {other:?}"))),
        }
        let kick = self
            .kicks
            .get(&relid)
            .ok_or(HarnessError::Bus("kick doorbell lost".into()))?
            .try_clone()?;
        let index = self.channels.len() as u16;
        let mut chan =
            RingChannel::new(index, up, down).map_err(crate::storvsc::ChannelError::Ring)?;
        if self.driver.config().retain_packets {
            chan.track_positions();
        }
        self.channels.push(GuestChannel { relid, chan, kick });
        self.per_channel.push(0);
        Ok(())
    }

    /// Runs the vstor handshake on the primary channel and opens the granted sub-channels.
    pub fn init_driver(&mut self) -> Result<(), HarnessError> {
        self.driver.start()?;
        let deadline = Instant::now() + self.cfg.timeout;
        let negotiated = loop {
            self.service()?;
            if let Some(i) = self
                .events
                .iter()
                .position(|e| matches!(e, StorvscEvent::Ready(_) | StorvscEvent::InitFailed(_)))
            {
                match self.events.remove(i) {
                    StorvscEvent::Ready(n) => break n,
                    StorvscEvent::InitFailed(e) => return Err(e.into()),
                    _ => {}
                }
            }
            if Instant::now() > deadline {
                return Err(HarnessError::Timeout("storvsc initialization"));
            }
            self.wait(Duration::from_millis(5))?;
        };
        let want = negotiated.subchannels;
        if want == 0 {
            return Ok(());
        }
        let primary = self.primary.ok_or(HarnessError::Bus("no primary".into()))?;
        let existing = self.subchannel_offers(primary).len() as u16;
        if existing < want {
            self.server.add_subchannels(primary, want - existing);
        }
        let deadline = Instant::now() + self.cfg.timeout;
        let subs = loop {
            self.pump()?;
            let subs = self.subchannel_offers(primary);
            if subs.len() >= usize::from(want) {
                break subs;
            }
            if Instant::now() > deadline {
                return Err(HarnessError::Timeout("sub-channel offers"));
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        for o in subs.into_iter().take(usize::from(want)) {
            self.open_channel(o.relid)?;
            self.driver.add_channel()?;
        }
        Ok(())
    }

    fn subchannel_offers(&self, primary: u32) -> Vec<OfferInfo> {
        let mut subs: Vec<OfferInfo> = self
            .client
            .offers()
            .filter(|o| o.is_subchannel() && self.client.primary_of(o.relid) == Some(primary))
            .copied()
            .collect();
        subs.sort_by_key(|o| o.sub_channel_index);
        subs
    }

    /// Runs the SCSI probe (again, e.g. after a rescan event) and selects the first disk.
    pub fn probe(&mut self) -> Result<&[LunInfo], HarnessError> {
        let n = self
            .driver
            .negotiated()
            .copied()
            .ok_or(HarnessError::Driver(StorvscError::NotReady(
                self.driver.state(),
            )))?;
        let mut pcfg = ProbeConfig::linux(n.version);
        if let Some(t) = &self.cfg.targets {
            pcfg.targets = t.clone();
        }
        let scratch = self.ram.alloc(u64::from(PROBE_BUFFER_LEN))?;
        let mut p = Prober::new(pcfg);
        let mut data = Vec::new();
        let outcome = loop {
            let cmd = match p.next_step() {
                ProbeStep::Done => break Ok(()),
                ProbeStep::Run(cmd) => cmd,
            };
            let buf = if cmd.alloc > 0 {
                self.ram.zero(&scratch)?;
                Some((Direction::In, &scratch, cmd.alloc))
            } else {
                None
            };
            let c = match self.run_scsi(cmd.addr, cmd.cdb, buf, cmd.tagged) {
                Ok(c) => c,
                Err(e) => break Err(e),
            };
            match c.result() {
                Ok(got) => {
                    data.resize(got as usize, 0);
                    self.ram.read(&scratch, 0, &mut data)?;
                    p.complete(Ok(&data));
                }
                Err(e) => p.complete(Err(e)),
            }
        };
        self.ram.free(scratch);
        outcome?;
        self.luns = p.into_luns();
        self.disk = self
            .luns
            .iter()
            .find_map(|l| Disk::from_lun(l, n.max_transfer_bytes, n.version).ok());
        Ok(&self.luns)
    }

    /// Services every channel once: host packets into the driver, queued packets into the
    /// rings, signals, completions and events. `true` when something moved.
    pub fn service(&mut self) -> Result<bool, HarnessError> {
        self.pump()?;
        if self.cfg.supervise && self.last_check.elapsed() >= Duration::from_millis(20) {
            self.last_check = Instant::now();
            self.check_vsp()?;
        }
        let mut active = false;
        for c in &mut self.channels {
            let rx = c.chan.receive(&mut self.driver, 256)?;
            if rx.signal {
                c.kick.ring()?;
            }
            if !rx.refused.is_empty() {
                if self.refused.len() > 1000 {
                    self.refused.drain(..500);
                }
                self.refused.extend(rx.refused);
            }
            let tx = c.chan.transmit(&mut self.driver)?;
            if tx.signal {
                c.kick.ring()?;
            }
            active |= rx.packets > 0 || tx.written > 0;
        }
        while let Some(c) = self.driver.poll_completion() {
            self.complete(c);
        }
        while let Some(e) = self.driver.poll_event() {
            self.events.push(e);
        }
        Ok(active)
    }

    /// Restarts a dead child-process VSP (the supervisor re-sends the memory table and re-opens
    /// every channel) and sends again the requests it had taken from the rings and not answered.
    /// `Ok(true)` when it restarted one.
    pub fn check_vsp(&mut self) -> Result<bool, HarnessError> {
        let Some(sup) = self.host.supervisor() else {
            return Ok(false);
        };
        if sup.is_alive() {
            return Ok(false);
        }
        // The dead VSP's ring positions are final now: take what it answered, then see what it
        // took and did not answer, before its successor starts reading.
        let mut lost = Vec::new();
        for c in &mut self.channels {
            let rx = c.chan.receive(&mut self.driver, usize::MAX)?;
            self.refused.extend(rx.refused);
            lost.push(c.chan.lost_requests(&self.driver));
        }
        let sup = self
            .host
            .supervisor()
            .ok_or(HarnessError::Device("supervisor gone".into()))?;
        sup.ensure_running()
            .map_err(|e| HarnessError::Device(e.to_string()))?;
        self.vsp_restarts += 1;
        let mut resent = 0;
        for (i, ids) in lost.iter().enumerate() {
            resent += self.driver.resend(i as u16, ids);
        }
        tracing::info!(resent, "harness: VSP restarted; lost requests sent again");
        for c in &mut self.channels {
            c.chan.transmit(&mut self.driver)?;
            c.kick.ring()?;
        }
        while let Some(c) = self.driver.poll_completion() {
            self.complete(c);
        }
        Ok(true)
    }

    /// Sleeps until a channel interrupts the guest or `timeout` passes (not at all when a
    /// channel has data waiting).
    pub fn wait(&mut self, timeout: Duration) -> Result<(), HarnessError> {
        for c in &mut self.channels {
            if c.chan.arm().map_err(crate::storvsc::ChannelError::Ring)? {
                return Ok(());
            }
        }
        self.call.wait(Some(timeout))?;
        Ok(())
    }

    /// The driver is ready for I/O.
    pub fn ready(&self) -> bool {
        self.driver.state() == DriverState::Ready
    }
}
