//! [`NetVm`]: one guest with one synthetic NIC, its VMBus control plane pumped in-process.

use super::host::{DeviceHost, DeviceResources, InProcessHost, ProcessHost};
use super::{GuestRam, HarnessError, SharedMem};
use crate::control_plane::HostOp;
use crate::netvsc::ring::NetChannel;
use crate::netvsc::{
    DriverState, Netvsc, NetvscConfig, NetvscError, NetvscEvent, RxFrame, SendError, TxMeta,
};
use ringbuf::init_control;
use ringbuf::mmap::MappedRing;
use ringbuf::signal::Doorbell;
use std::collections::{BTreeMap, HashMap};
use std::process::Command;
use std::time::{Duration, Instant};
use vmbus_core::device::{DeviceDescription, VmbusDevice};
use vmbus_core::gpadl::RamRanges;
use vmbus_core::guest::{Client, ClientConfig, ClientEvent, OfferInfo, OpenParams};
use vmbus_core::host::{Server, ServerConfig};
use vmbus_core::wire::class;

/// Sizes and driver settings of a harness VM (defaults: Linux 6.1's).
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Guest RAM in 4 KiB pages (a sparse memfd).
    pub ram_pages: u64,
    /// Pages per ring direction, control page included (Linux: 128 = 512 KiB).
    pub ring_pages: u32,
    pub recv_buffer_bytes: u64,
    pub send_buffer_bytes: u64,
    /// Bounce slots for GPA-direct frames (68 KiB each).
    pub bounce_slots: u64,
    /// Control pages (RNDIS requests in flight).
    pub control_pages: u64,
    /// Queues wanted (primary included).
    pub queues: u16,
    /// Driver overrides applied last.
    pub tweak: Option<fn(&mut NetvscConfig)>,
    /// How long any one wait (bring-up step, VMBus reply) may take.
    pub timeout: Duration,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            ram_pages: 16384,
            ring_pages: 128,
            recv_buffer_bytes: 16 << 20,
            send_buffer_bytes: 1_044_480,
            bounce_slots: 32,
            control_pages: 4,
            queues: 1,
            tweak: None,
            timeout: Duration::from_secs(20),
        }
    }
}

struct GuestChannel {
    relid: u32,
    ring_gpadl: u32,
    chan: NetChannel<MappedRing>,
    kick: Doorbell,
}

/// One guest: RAM, VMBus client and server, the netvsc driver and its channels, the device host.
pub struct NetVm {
    cfg: VmConfig,
    ram: GuestRam,
    client: Client,
    server: Server,
    host: Box<dyn DeviceHost>,
    /// Interrupts from every channel of this VM (one eventfd shared by all).
    call: Doorbell,
    kicks: HashMap<u32, Doorbell>,
    primary: Option<u32>,
    bus_events: Vec<ClientEvent>,
    /// The driver (public for tests that look inside).
    pub driver: Netvsc<SharedMem>,
    channels: BTreeMap<u16, GuestChannel>,
    /// Driver events seen after the bring-up (link, speed, tables), oldest first.
    pub events: Vec<NetvscEvent>,
    /// Host packets the driver refused, most recent last (bounded).
    pub refused: Vec<NetvscError>,
}

impl NetVm {
    /// A VM whose device `make` builds runs in this process.
    pub fn in_process(
        cfg: VmConfig,
        make: impl FnOnce(DeviceResources) -> Result<Box<dyn VmbusDevice + Send>, HarnessError>,
    ) -> Result<Self, HarnessError> {
        let ram = GuestRam::new(cfg.ram_pages)?;
        let res = DeviceResources::new(ram.memory(), ram.file());
        let device = make(res.clone())?;
        let desc = device.description();
        Self::build(cfg, ram, desc, Box::new(InProcessHost::new(device, res)))
    }

    /// A VM whose device runs in a child process started by `command` (re-started on death). The
    /// child finds the GPADL side table's GPA in [`GPADL_TABLE_ENV`].
    pub fn in_child(
        cfg: VmConfig,
        desc: DeviceDescription,
        mut command: impl FnMut() -> Command + Send + 'static,
    ) -> Result<Self, HarnessError> {
        let ram = GuestRam::new(cfg.ram_pages)?;
        let table = ram.side_table_gpa();
        let host = ProcessHost::start(
            move || {
                let mut c = command();
                c.env(GPADL_TABLE_ENV, table.to_string());
                c
            },
            &ram,
            cfg.timeout,
        )?;
        Self::build(cfg, ram, desc, Box::new(host))
    }

    fn build(
        cfg: VmConfig,
        mut ram: GuestRam,
        desc: DeviceDescription,
        host: Box<dyn DeviceHost>,
    ) -> Result<Self, HarnessError> {
        let recv = ram.region(cfg.recv_buffer_bytes)?;
        let send = ram.region(cfg.send_buffer_bytes)?;
        let control = ram.region(cfg.control_pages * 4096)?;
        let bounce = ram.region(cfg.bounce_slots * 68 * 1024)?;
        let mut dcfg = NetvscConfig::linux(recv, send, control, Some(bounce));
        dcfg.queues = cfg.queues;
        if let Some(t) = cfg.tweak {
            t(&mut dcfg);
        }
        let driver = Netvsc::new(dcfg, SharedMem(ram.memory()))?;
        let mut server = Server::new(
            ServerConfig {
                vp_count: 8,
                ..ServerConfig::default()
            },
            RamRanges(vec![(0, ram.pages())]),
        );
        server
            .add_device(desc)
            .map_err(|e| HarnessError::Bus(e.to_string()))?;
        Ok(NetVm {
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
            channels: BTreeMap::new(),
            events: Vec::new(),
            refused: Vec::new(),
        })
    }

    /// Guest RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// The device host (e.g. to reach the supervisor of a child-process VSP).
    pub fn host_mut(&mut self) -> &mut dyn DeviceHost {
        self.host.as_mut()
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
                if let ClientEvent::GpadlCreated {
                    handle, status: 0, ..
                } = e
                    && let Some(g) = self.server.gpadl(handle).cloned()
                {
                    self.host.gpadl_created(&g)?;
                }
                self.bus_events.push(e);
            }
            if let Some(p) = self.primary {
                for count in self.host.take_subchannel_requests() {
                    self.server.add_subchannels(p, count);
                    moved = true;
                }
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

    fn bus<T>(r: Result<T, vmbus_core::guest::ClientError>) -> Result<T, HarnessError> {
        r.map_err(|e| HarnessError::Bus(e.to_string()))
    }

    /// Creates a GPADL over `pfns` on `relid` and waits for it.
    fn create_gpadl(&mut self, relid: u32, pfns: &[u64]) -> Result<u32, HarnessError> {
        let handle = Self::bus(self.client.create_gpadl(relid, pfns))?;
        match self.wait_bus(
            "GPADL_CREATED",
            |e| matches!(e, ClientEvent::GpadlCreated { handle: h, .. } if *h == handle),
        )? {
            ClientEvent::GpadlCreated { status: 0, .. } => Ok(handle),
            other => Err(HarnessError::Bus(format!("GPADL refused: {other:?}"))),
        }
    }

    /// Opens channel `relid` as queue `index` with Linux-sized rings.
    fn open_channel(&mut self, relid: u32, index: u16) -> Result<(), HarnessError> {
        let rp = u64::from(self.cfg.ring_pages);
        let first = self.ram.alloc(2 * rp)?;
        let pfns: Vec<u64> = (first..first + 2 * rp).collect();
        let gpadl = self.create_gpadl(relid, &pfns)?;
        let (up, down) = pfns.split_at(rp as usize);
        let (up, down) = (self.ram.map_ring(up)?, self.ram.map_ring(down)?);
        init_control(&up);
        init_control(&down);
        self.kicks.insert(relid, Doorbell::new()?);
        Self::bus(
            self.client
                .open_channel(relid, OpenParams::new(gpadl, self.cfg.ring_pages, 0)),
        )?;
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
        let chan = NetChannel::new(index, up, down)
            .map_err(|e| HarnessError::Ring(crate::netvsc::ring::ChannelError::Ring(e)))?;
        self.channels.insert(
            index,
            GuestChannel {
                relid,
                ring_gpadl: gpadl,
                chan,
                kick,
            },
        );
        Ok(())
    }

    fn offers(&self) -> Vec<OfferInfo> {
        self.client.offers().copied().collect()
    }

    /// Connects VMBus, opens the network device and runs the driver's bring-up to Ready.
    pub fn bring_up(&mut self) -> Result<(), HarnessError> {
        Self::bus(self.client.connect())?;
        self.wait_bus("VERSION_RESPONSE", |e| {
            matches!(e, ClientEvent::Connected { .. })
        })?;
        Self::bus(self.client.request_offers())?;
        self.wait_bus("ALLOFFERS_DELIVERED", |e| {
            matches!(e, ClientEvent::AllOffersDelivered)
        })?;
        let primary = self
            .offers()
            .into_iter()
            .find(|o| o.class_id == class::NETWORK && !o.is_subchannel())
            .ok_or(HarnessError::Bus("no network offer".into()))?;
        self.primary = Some(primary.relid);
        self.open_channel(primary.relid, 0)?;
        self.driver.start()?;
        let deadline = Instant::now() + self.cfg.timeout;
        while self.driver.state() != DriverState::Ready {
            if Instant::now() > deadline {
                return Err(HarnessError::Timeout("netvsc bring-up"));
            }
            self.service()?;
            if let Some(NetvscEvent::Failed(e)) = self
                .events
                .iter()
                .find(|e| matches!(e, NetvscEvent::Failed(_)))
            {
                return Err(e.clone().into());
            }
            self.wait(Duration::from_millis(2));
        }
        Ok(())
    }

    fn driver_event(&mut self, e: NetvscEvent) -> Result<(), HarnessError> {
        match e {
            NetvscEvent::CreateGpadl { buffer, pfns } => {
                let primary = self.primary.ok_or(HarnessError::Bus("no primary".into()))?;
                let handle = self.create_gpadl(primary, &pfns)?;
                self.driver.gpadl_created(buffer, handle)?;
            }
            NetvscEvent::OpenSubchannels { count } => {
                let primary = self.primary.ok_or(HarnessError::Bus("no primary".into()))?;
                let deadline = Instant::now() + self.cfg.timeout;
                let subs = loop {
                    self.pump()?;
                    let mut subs: Vec<OfferInfo> = self
                        .offers()
                        .into_iter()
                        .filter(|o| self.client.primary_of(o.relid) == Some(primary))
                        .filter(|o| o.is_subchannel() && o.sub_channel_index <= count)
                        .collect();
                    if subs.len() >= usize::from(count) {
                        subs.sort_by_key(|o| o.sub_channel_index);
                        break subs;
                    }
                    if Instant::now() > deadline {
                        return Err(HarnessError::Timeout("sub-channel offers"));
                    }
                    std::thread::sleep(Duration::from_millis(1));
                };
                for o in subs {
                    self.open_channel(o.relid, o.sub_channel_index)?;
                    self.driver.subchannel_opened(o.sub_channel_index)?;
                }
            }
            other => self.events.push(other),
        }
        Ok(())
    }

    /// Services every channel once: host packets into the driver, queued packets into the rings,
    /// signals, driver events. True when something moved.
    pub fn service(&mut self) -> Result<bool, HarnessError> {
        self.pump()?;
        let mut active = false;
        for c in self.channels.values_mut() {
            let rx = c.chan.receive(&mut self.driver, 1024)?;
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
        while let Some(e) = self.driver.poll_event() {
            self.driver_event(e)?;
        }
        Ok(active)
    }

    /// Sleeps until a channel interrupts the guest or `timeout` passes.
    pub fn wait(&self, timeout: Duration) -> bool {
        self.call.wait(Some(timeout)).unwrap_or(false)
    }

    /// Sends a frame (queue chosen from `meta.hash`, else 0), servicing the rings while the
    /// driver is out of send resources, up to the VM timeout.
    pub fn send(&mut self, frame: &[u8], meta: &TxMeta) -> Result<(), HarnessError> {
        let q = meta.hash.map_or(0, |h| self.driver.queue_for_hash(h));
        let deadline = Instant::now() + self.cfg.timeout;
        loop {
            match self.driver.send(q, frame, meta, false) {
                Ok(()) => {
                    self.service()?;
                    return Ok(());
                }
                Err(SendError::Busy) if Instant::now() < deadline => {
                    if !self.service()? {
                        self.wait(Duration::from_millis(1));
                    }
                }
                Err(e) => return Err(HarnessError::Device(format!("send: {e}"))),
            }
        }
    }

    /// The next received frame, waiting up to `timeout`.
    pub fn recv(&mut self, timeout: Duration) -> Result<Option<RxFrame>, HarnessError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(f) = self.driver.poll_receive() {
                return Ok(Some(f));
            }
            if self.service()? {
                continue;
            }
            if Instant::now() > deadline {
                return Ok(None);
            }
            self.wait(Duration::from_millis(1));
        }
    }

    /// Services the VM until `done(self)` holds or `timeout` passes.
    pub fn run_until(
        &mut self,
        timeout: Duration,
        mut done: impl FnMut(&mut NetVm) -> bool,
    ) -> Result<bool, HarnessError> {
        let deadline = Instant::now() + timeout;
        loop {
            let active = self.service()?;
            if done(self) {
                return Ok(true);
            }
            if Instant::now() > deadline {
                return Ok(false);
            }
            if !active {
                self.wait(Duration::from_millis(1));
            }
        }
    }

    /// Removes the NIC the way Linux `netvsc_remove` does: RNDIS HALT and buffer revokes
    /// ([`Netvsc::halt`]), then every channel closed (sub-channels first), then the buffer and ring
    /// GPADLs torn down.
    pub fn shutdown(&mut self) -> Result<(), HarnessError> {
        self.driver.halt()?;
        let deadline = Instant::now() + self.cfg.timeout;
        while self.driver.queued_packets() > 0 {
            if Instant::now() > deadline {
                return Err(HarnessError::Timeout("halt messages into the ring"));
            }
            if !self.service()? {
                self.wait(Duration::from_millis(1));
            }
        }
        let primary = self.primary.ok_or(HarnessError::Bus("no primary".into()))?;
        let mut gpadls = Vec::new();
        while let Some((_, c)) = self.channels.pop_last() {
            Self::bus(self.client.close_channel(c.relid))?;
            self.pump()?;
            gpadls.push((c.relid, c.ring_gpadl));
        }
        let (recv, send) = self.driver.gpadls();
        gpadls.extend(recv.into_iter().chain(send).map(|h| (primary, h)));
        for (relid, handle) in gpadls {
            Self::bus(self.client.teardown_gpadl(relid, handle))?;
            self.wait_bus(
                "GPADL_TORNDOWN",
                |e| matches!(e, ClientEvent::GpadlTorndown { handle: h } if *h == handle),
            )?;
        }
        Ok(())
    }

    /// Relids of the open channels by queue.
    pub fn channel_relids(&self) -> Vec<(u16, u32)> {
        self.channels.iter().map(|(q, c)| (*q, c.relid)).collect()
    }
}

/// Environment variable telling a child-process VSP where the GPADL side table is (a GPA).
pub const GPADL_TABLE_ENV: &str = "NETVSC_HARNESS_GPADL_TABLE";
