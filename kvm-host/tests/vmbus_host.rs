//! The VMBus host (`kvm_host::vmbus::VmbusHost`) against vmbus-core's guest `Client`, without
//! /dev/kvm: the "vCPU" is this thread making hypercalls and MSR writes through the partition's
//! Hyper-V code, the bus runs on its own thread as in a partition. Checks the event bridges
//! (HvSignalEvent → kick eventfd, call eventfd → SIEF bit + SINT interrupt), device open / refusal /
//! close, rescind of an open channel, a GPADL outside guest RAM, and UNLOAD.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_host::hyperv::hypercall::HypercallInput;
use kvm_host::hyperv::hypercall::{CONTROL_FAST, HVCALL_POST_MESSAGE, HVCALL_SIGNAL_EVENT};
use kvm_host::hyperv::{HvPartition, msr};
use kvm_host::memory::GuestRam;
use kvm_host::synic::{InterruptSink, Sint, Synic};
use kvm_host::vmbus::{BusDevice, ChannelSetup, VmbusHost};
use ringbuf::signal::Doorbell;
use vmbus_core::device::{DeviceDescription, DeviceError, OpenChannelInfo};
use vmbus_core::guest::{Client, ClientConfig, ClientEvent, OfferInfo, OpenParams};
use vmbus_core::synic::SlotReader;
use vmbus_core::wire::{Guid, class};

const RAM: u64 = 16 << 20;
const INPUT: u64 = 0x10_000;
const SIMP: u64 = 0x11_000;
const SIEFP: u64 = 0x12_000;
const VECTOR: u8 = 0xF3;
const WAIT: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Interrupts(Mutex<Vec<(u32, u8)>>);

impl InterruptSink for Interrupts {
    fn raise(&self, vp: u32, vector: u8) {
        self.0.lock().unwrap().push((vp, vector));
    }
}

/// What the test device saw.
#[derive(Default)]
struct Seen {
    opens: Vec<OpenChannelInfo>,
    closes: Vec<u32>,
    /// (kick, call) of the last open channel.
    bells: Option<(Doorbell, Doorbell)>,
}

struct TestDevice {
    instance: u128,
    refuse: bool,
    seen: Arc<Mutex<Seen>>,
}

impl BusDevice for TestDevice {
    fn description(&self) -> DeviceDescription {
        DeviceDescription::new(class::SCSI, Guid::from_u128(self.instance))
    }

    fn open(&mut self, ch: ChannelSetup<'_>) -> Result<(), DeviceError> {
        if self.refuse {
            return Err(DeviceError::NoResources);
        }
        let (up, down) = ch.map_rings()?;
        drop((up, down));
        let mut s = self.seen.lock().unwrap();
        s.opens.push(ch.info);
        s.bells = Some((ch.kick, ch.call));
        Ok(())
    }

    fn close(&mut self, relid: u32) {
        self.seen.lock().unwrap().closes.push(relid);
    }
}

struct Guest {
    hv: HvPartition,
    client: Client,
    events: Vec<ClientEvent>,
}

impl Guest {
    fn hypercall(&self, control: u64, input: u64) -> u16 {
        let rax = self.hv.hypercall(
            0,
            HypercallInput {
                control,
                input,
                output: 0,
            },
        );
        (rax & 0xFFFF) as u16
    }

    fn signal(&self, connection_id: u32) -> u16 {
        self.hypercall(
            u64::from(HVCALL_SIGNAL_EVENT) | CONTROL_FAST,
            u64::from(connection_id),
        )
    }

    /// Posts what the client queued, reads the slot, until `want` matches an event (or panics).
    fn wait(&mut self, want: impl Fn(&ClientEvent) -> bool) -> ClientEvent {
        let deadline = Instant::now() + WAIT;
        loop {
            while let Some(p) = self.client.poll_post() {
                let mut input = vec![0u8; 16];
                input[0..4].copy_from_slice(&p.connection_id.to_le_bytes());
                input[8..12].copy_from_slice(&1u32.to_le_bytes());
                input[12..16].copy_from_slice(&(p.msg.len() as u32).to_le_bytes());
                input.extend_from_slice(&p.msg);
                self.hv.ram().write(INPUT, &input).unwrap();
                assert_eq!(self.hypercall(u64::from(HVCALL_POST_MESSAGE), INPUT), 0);
            }
            let words = self.hv.ram().page_words(SIMP).unwrap();
            while let Some(t) = SlotReader::new(words).take(Sint::VMBUS) {
                if t.eom_needed {
                    self.hv.write_msr(0, msr::EOM, 0).unwrap();
                }
                let m = t.message.unwrap();
                self.client.handle_message(&m.payload).unwrap();
            }
            self.events
                .extend(std::iter::from_fn(|| self.client.poll_event()));
            if let Some(i) = self.events.iter().position(&want) {
                return self.events.remove(i);
            }
            assert!(
                Instant::now() < deadline,
                "no such event; have {:?}",
                self.events
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn gpadl(&mut self, relid: u32, pfns: &[u64]) -> u32 {
        let h = self.client.create_gpadl(relid, pfns).unwrap();
        match self.wait(|e| matches!(e, ClientEvent::GpadlCreated { handle, .. } if *handle == h)) {
            ClientEvent::GpadlCreated { status, .. } => {
                assert_eq!(status, 0);
                h
            }
            _ => unreachable!(),
        }
    }

    fn open(&mut self, relid: u32, pfns: &[u64]) -> u32 {
        let h = self.gpadl(relid, pfns);
        self.client
            .open_channel(relid, OpenParams::new(h, (pfns.len() / 2) as u32, 0))
            .unwrap();
        match self.wait(|e| matches!(e, ClientEvent::OpenResult { relid: r, .. } if *r == relid)) {
            ClientEvent::OpenResult { status, .. } => status,
            _ => unreachable!(),
        }
    }

    fn event_flag(&self, relid: u32) -> bool {
        let mut b = [0u8; 1];
        let at = SIEFP + 2 * 256 + u64::from(relid / 8);
        self.hv.ram().read(at, &mut b).unwrap();
        b[0] & (1 << (relid % 8)) != 0
    }
}

fn until(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn bus_bridges_events_opens_refuses_rescinds_and_unloads() {
    let ram = Arc::new(GuestRam::new(RAM).unwrap());
    let irqs = Arc::new(Interrupts::default());
    let synic = Arc::new(Synic::new(ram.clone(), 2, irqs.clone(), 4));
    let hv = HvPartition::new(ram.clone(), synic.clone(), 1_000_000_000);
    hv.write_msr(0, msr::GUEST_OS_ID, 0x8100_0006_0100_0000)
        .unwrap();
    hv.write_msr(0, msr::HYPERCALL, 0x13_000 | 1).unwrap();
    hv.write_msr(0, msr::SIMP, SIMP | 1).unwrap();
    hv.write_msr(0, msr::SIEFP, SIEFP | 1).unwrap();
    hv.write_msr(0, msr::SINT0 + 2, u64::from(VECTOR)).unwrap();
    hv.write_msr(0, msr::SCONTROL, 1).unwrap();

    let good = Arc::new(Mutex::new(Seen::default()));
    let bad = Arc::new(Mutex::new(Seen::default()));
    let mut host = VmbusHost::new(synic.clone(), ram.clone(), 2).unwrap();
    let r1 = host
        .add_device(
            "good",
            Box::new(TestDevice {
                instance: 1,
                refuse: false,
                seen: good.clone(),
            }),
        )
        .unwrap();
    let r2 = host
        .add_device(
            "refusing",
            Box::new(TestDevice {
                instance: 2,
                refuse: true,
                seen: bad.clone(),
            }),
        )
        .unwrap();
    host.start().unwrap();

    let mut g = Guest {
        hv,
        client: Client::new(ClientConfig::default()),
        events: Vec::new(),
    };
    g.client.connect().unwrap();
    g.wait(|e| matches!(e, ClientEvent::Connected { .. }));
    g.client.request_offers().unwrap();
    g.wait(|e| matches!(e, ClientEvent::AllOffersDelivered));
    let offers: Vec<OfferInfo> = g.client.offers().copied().collect();
    assert_eq!(offers.iter().map(|o| o.relid).collect::<Vec<_>>(), [r1, r2]);
    let conn1 = offers[0].connection_id;
    let conn2 = offers[1].connection_id;

    // Open: the device gets the ring pages; its event port appears.
    let ring: Vec<u64> = (0x100..0x108).collect();
    assert_eq!(g.signal(conn1), 0x12, "no port before the open");
    assert_eq!(g.open(r1, &ring), 0);
    {
        let s = good.lock().unwrap();
        assert_eq!(s.opens.len(), 1);
        assert_eq!(s.opens[0].ring_pages, ring);
        assert_eq!(s.opens[0].downstream_offset, 4);
        assert_eq!(s.opens[0].connection_id, conn1);
    }

    // Guest → device: HvSignalEvent rings the kick eventfd.
    assert_eq!(g.signal(conn1), 0);
    {
        let s = good.lock().unwrap();
        let (kick, _) = s.bells.as_ref().unwrap();
        assert!(kick.wait(Some(WAIT)).unwrap(), "kick not rung");
    }
    // Device → guest: the call eventfd becomes event flag `relid` of SINT 2 plus the vector.
    irqs.0.lock().unwrap().clear();
    good.lock()
        .unwrap()
        .bells
        .as_ref()
        .unwrap()
        .1
        .ring()
        .unwrap();
    until("the channel's event flag", || g.event_flag(r1));
    until("the SINT 2 interrupt", || {
        irqs.0.lock().unwrap().contains(&(0, VECTOR))
    });

    // A device that refuses: OPENCHANNEL_RESULT fails, no event port.
    assert_ne!(g.open(r2, &(0x200..0x208).collect::<Vec<u64>>()), 0);
    assert!(bad.lock().unwrap().opens.is_empty());
    assert_eq!(g.signal(conn2), 0x12);

    // A GPADL naming pages beyond guest RAM is refused.
    let beyond = RAM / 4096 + 10;
    let h = g.client.create_gpadl(r2, &[beyond, beyond + 1]).unwrap();
    match g.wait(|e| matches!(e, ClientEvent::GpadlCreated { handle, .. } if *handle == h)) {
        ClientEvent::GpadlCreated { status, .. } => assert_ne!(status, 0),
        _ => unreachable!(),
    }

    // Hot remove of the open channel: the device closes it, the guest hears RESCIND, the
    // port is gone.
    host.rescind(r1);
    g.wait(|e| matches!(e, ClientEvent::Rescinded { relid } if *relid == r1));
    until("the device close", || good.lock().unwrap().closes == [r1]);
    assert_eq!(g.signal(conn1), 0x12);

    g.client.close_channel(r1).unwrap();
    g.client.release_relid(r1).unwrap();
    g.client.unload().unwrap();
    g.wait(|e| matches!(e, ClientEvent::Unloaded));

    let st = host.stats();
    host.stop();
    assert_eq!((st.opens, st.closes, st.open_failures), (1, 1, 1));
    assert_eq!(st.kicks, 1);
    assert!(st.interrupts >= 1);
    assert!(st.refused >= 1, "the bad GPADL is refused: {st:?}");
    assert!(
        st.messages_in >= 10 && st.messages_out > st.messages_in,
        "{st:?}"
    );
}
