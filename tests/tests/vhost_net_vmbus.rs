//! A VMBus NIC (netvsc driver ↔ netvsp, in process) and a virtio NIC (this test as the vhost-user
//! frontend ↔ the vhost-user-net device) on ports of one virtual switch, exchanging frames both
//! ways: both front doors end in the same switch type.
#![allow(clippy::unwrap_used)]

#[path = "../../vsp-net/tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Daemon, DrvCfg, NetDrv, T, same};
use vmbus_core::wire::Guid;
use vsc_guest::net_harness::{DeviceResources, HarnessError, NetVm, VmConfig, VmbusDevice};
use vsc_guest::netvsc::TxMeta;
use vsp_net::backend::NetBackend;
use vsp_net::netvsp::{ChannelRings, Netvsp, NetvspConfig, NetvspResources};
use vsp_net::switch::{PortConfig, Switch};
use vsp_net::vhost_user::{NetDeviceConfig, SwitchPort};

const VMBUS_MAC: [u8; 6] = [0x00, 0x15, 0x5d, 0x00, 0x00, 0x01];
const VIRTIO_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x00, 0x00, 0x02];

fn netvsp(
    res: DeviceResources,
    cfg: NetvspConfig,
    backend: Box<dyn NetBackend>,
) -> Result<Box<dyn VmbusDevice + Send>, HarnessError> {
    let mapper = res.clone();
    let resources = NetvspResources {
        memory: res.memory.clone(),
        gpadls: Arc::new(res.gpadl_lookup()),
        map_rings: Box::new(move |info| {
            let m = mapper.map_channel(info)?;
            Ok(ChannelRings {
                inbound: m.inbound,
                outbound: m.outbound,
                kick: Some(m.kick),
                call: Some(m.call),
            })
        }),
        subchannels: Box::new(res.subchannel_control()),
    };
    let mut dev = Netvsp::new(cfg, backend, resources)?;
    dev.spawn_worker()?;
    Ok(Box::new(dev))
}

fn frame(dst: [u8; 6], src: [u8; 6], len: usize, tag: u8) -> Vec<u8> {
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&0x88b5u16.to_be_bytes());
    f.extend((0..len - 14).map(|i| (i as u8).wrapping_mul(13) ^ tag));
    f
}

#[test]
fn vmbus_nic_and_virtio_nic_exchange_frames_through_one_switch() {
    let sw = Switch::default();
    let vport = SwitchPort::new(&sw, "virtio", VIRTIO_MAC).unwrap();
    let d = Daemon::start(
        NetDeviceConfig {
            mac: VIRTIO_MAC,
            ..NetDeviceConfig::default()
        },
        Box::new(vport),
        1,
    );
    let mut drv = NetDrv::start(&d.socket, DrvCfg::default());

    let nport = sw.add_port(PortConfig::nic("vmbus", VMBUS_MAC)).unwrap();
    let mut vm = NetVm::in_process(VmConfig::default(), move |res| {
        let cfg = NetvspConfig {
            instance: Guid::from_u128(0x5eed_0000_0000_0000_0000_0000_0000_00ee),
            ..NetvspConfig::default()
        };
        netvsp(res, cfg, Box::new(nport))
    })
    .unwrap();
    vm.bring_up().unwrap();

    // Broadcast from the VMBus NIC, then unicast both ways (the switch learned both MACs).
    let bcast = frame([0xff; 6], VMBUS_MAC, 60, 1);
    vm.send(&bcast, &TxMeta::default()).unwrap();
    let r = drv
        .recv(0, T)
        .expect("broadcast from netvsc reaches the virtio NIC");
    same(&r.frame, &bcast);
    for (i, len) in [60usize, 1514, 600].into_iter().enumerate() {
        let tag = 0x10 + i as u8;
        let to_virtio = frame(VIRTIO_MAC, VMBUS_MAC, len, tag);
        vm.send(&to_virtio, &TxMeta::default()).unwrap();
        same(&drv.recv(0, T).unwrap().frame, &to_virtio);
        let to_vmbus = frame(VMBUS_MAC, VIRTIO_MAC, len, tag ^ 0x80);
        drv.send(0, &to_vmbus);
        let got = vm
            .recv(T)
            .unwrap()
            .expect("frame from the virtio NIC reaches netvsc");
        same(&got.data, &to_vmbus);
    }
    assert!(vm.recv(Duration::from_millis(100)).unwrap().is_none());
    let s = d.stats.snapshot();
    assert_eq!(
        (s.tx_frames, s.rx_frames, s.tx_dropped, s.rx_dropped),
        (3, 4, 0, 0)
    );
    vm.shutdown().unwrap();
}
