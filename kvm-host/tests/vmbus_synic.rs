//! vmbus-core's host `Server` and guest `Client` talking through the KVM partition's SynIC code: the
//! guest side goes through the real hypercall decoder (HvPostMessage input block in guest RAM) and
//! the real MSR handlers (SIMP/SIEFP/SINT/SCONTROL/EOM); the host side uses the SynIC only through
//! vmbus-core's `HostPort` + `HostInbox` traits — exactly how the VMBus server plugs into a
//! running partition. No /dev/kvm needed: the "vCPU" is this thread.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use kvm_host::hyperv::hypercall::{HVCALL_POST_MESSAGE, HypercallInput};
use kvm_host::hyperv::{HvPartition, msr};
use kvm_host::memory::GuestRam;
use kvm_host::synic::{HostInbox, HostPort, InterruptSink, PortKind, Sint, Synic, SynicError};
use vmbus_core::device::DeviceDescription;
use vmbus_core::gpadl::RamRanges;
use vmbus_core::guest::{Client, ClientConfig, ClientEvent};
use vmbus_core::host::{HostAction, Server, ServerConfig};
use vmbus_core::synic::SlotReader;
use vmbus_core::wire::{Guid, Version, class};

const RAM: u64 = 16 << 20;
const INPUT: u64 = 0x10_000;
const SIMP: u64 = 0x11_000;
const SIEFP: u64 = 0x12_000;
const VECTOR: u64 = 0xF3;

#[derive(Default)]
struct Interrupts(Mutex<Vec<(u32, u8)>>);

impl InterruptSink for Interrupts {
    fn raise(&self, vp: u32, vector: u8) {
        self.0.lock().unwrap().push((vp, vector));
    }
}

/// The guest's view of VP 0: what Linux's hv_vmbus does with MSRs and hypercalls.
struct GuestVp<'a> {
    hv: &'a HvPartition,
}

impl GuestVp<'_> {
    fn enable_synic(&self) {
        self.hv
            .write_msr(0, msr::GUEST_OS_ID, 0x8100_0006_0100_0000)
            .unwrap();
        self.hv.write_msr(0, msr::HYPERCALL, 0x13_000 | 1).unwrap();
        self.hv.write_msr(0, msr::SIMP, SIMP | 1).unwrap();
        self.hv.write_msr(0, msr::SIEFP, SIEFP | 1).unwrap();
        self.hv.write_msr(0, msr::SINT0 + 2, VECTOR).unwrap();
        self.hv.write_msr(0, msr::SCONTROL, 1).unwrap();
    }

    /// HvPostMessage through the hypercall decoder; returns the status.
    fn post(&self, connection_id: u32, payload: &[u8]) -> u16 {
        let mut input = vec![0u8; 16];
        input[0..4].copy_from_slice(&connection_id.to_le_bytes());
        input[8..12].copy_from_slice(&1u32.to_le_bytes());
        input[12..16].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        input.extend_from_slice(payload);
        self.hv.ram().write(INPUT, &input).unwrap();
        let rax = self.hv.hypercall(
            0,
            HypercallInput {
                control: u64::from(HVCALL_POST_MESSAGE),
                input: INPUT,
                output: 0,
            },
        );
        (rax & 0xFFFF) as u16
    }

    /// Takes the SINT 2 message: copy, free, EOM (an MSR write) when the host flagged more.
    fn take(&self) -> Option<Vec<u8>> {
        let taken = SlotReader::new(self.hv.ram().page_words(SIMP).unwrap()).take(Sint::VMBUS)?;
        if taken.eom_needed {
            self.hv.write_msr(0, msr::EOM, 0).unwrap();
        }
        Some(taken.message.unwrap().payload.to_vec())
    }
}

#[test]
fn vmbus_control_plane_over_the_kvm_synic() {
    let ram = Arc::new(GuestRam::new(RAM).unwrap());
    let irqs = Arc::new(Interrupts::default());
    // A small host queue so the slot-busy / pending / EOM path carries most of the offers.
    let synic = Arc::new(Synic::new(ram.clone(), 2, irqs.clone(), 4));
    let hv = HvPartition::new(ram, synic.clone(), 1_000_000_000);
    let guest = GuestVp { hv: &hv };
    guest.enable_synic();

    // The host server listens on message connection ids 1 and 4 (as OpenVMM does).
    synic.register_port(1, PortKind::Message).unwrap();
    synic.register_port(4, PortKind::Message).unwrap();
    let mut server = Server::new(
        ServerConfig {
            vp_count: 2,
            ..ServerConfig::default()
        },
        RamRanges(vec![(0, RAM / 4096)]),
    );
    for n in 0..24u128 {
        server
            .add_device(DeviceDescription::new(
                class::SCSI,
                Guid::from_u128(0xabc0 + n),
            ))
            .unwrap();
    }
    let mut client = Client::new(ClientConfig::default());
    let mut events = Vec::new();
    let mut backlog: VecDeque<(u32, u8, Vec<u8>)> = VecDeque::new();

    let mut pump = |client: &mut Client, server: &mut Server, events: &mut Vec<ClientEvent>| {
        for _ in 0..10_000 {
            let mut moved = false;
            while let Some(p) = client.poll_post() {
                let status = guest.post(p.connection_id, &p.msg);
                if status != 0 {
                    client.post_failed(status).unwrap();
                }
                moved = true;
            }
            // The VMBus server thread's loop: inbox → server → HostPort.
            while let Some(m) = synic.recv_message().unwrap() {
                let _ = server.handle_message(m.connection_id, &m.payload);
                moved = true;
            }
            while let Some(a) = server.poll_action() {
                if let HostAction::Send { vp, sint, msg } = a {
                    backlog.push_back((vp, sint, msg.to_vec()));
                }
            }
            while let Some((vp, sint, msg)) = backlog.front() {
                match synic.post_to_guest(*vp, Sint::new(*sint).unwrap(), msg) {
                    Ok(_) => {
                        backlog.pop_front();
                        moved = true;
                    }
                    Err(SynicError::QueueFull { .. }) => break,
                    Err(e) => panic!("{e}"),
                }
            }
            while let Some(m) = guest.take() {
                client.handle_message(&m).unwrap();
                moved = true;
            }
            events.extend(std::iter::from_fn(|| client.poll_event()));
            if !moved {
                return;
            }
        }
        panic!("the bus never went quiet");
    };

    client.connect().unwrap();
    pump(&mut client, &mut server, &mut events);
    assert!(
        matches!(
            events[..],
            [ClientEvent::Connected {
                version: Version::Win10V5_3,
                ..
            }]
        ),
        "{events:?}"
    );
    client.request_offers().unwrap();
    pump(&mut client, &mut server, &mut events);
    let offers = events
        .iter()
        .filter(|e| matches!(e, ClientEvent::Offer(_)))
        .count();
    assert_eq!(offers, 24);
    assert_eq!(events.last(), Some(&ClientEvent::AllOffersDelivered));
    // Every delivery raised the SINT 2 vector on VP 0.
    let raised = irqs.0.lock().unwrap().clone();
    assert!(raised.len() >= 26, "{} interrupts", raised.len());
    assert!(
        raised
            .iter()
            .all(|&(vp, v)| vp == 0 && u64::from(v) == VECTOR)
    );
    // A connection id nobody registered: HV_STATUS_INVALID_CONNECTION_ID.
    assert_eq!(guest.post(9, &[0u8; 16]), 0x12);
    // Host → guest channel signal lands in the SIEF page, SINT 2 area, bit = relid.
    assert!(synic.signal_guest(0, Sint::VMBUS, 7).unwrap());
    let mut b = [0u8; 1];
    hv.ram().read(SIEFP + 0x200, &mut b).unwrap();
    assert_eq!(b[0], 1 << 7);
}
