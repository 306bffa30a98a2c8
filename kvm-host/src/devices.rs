//! Building the partition's VMBus devices: a storage controller with one disk (raw image or VHD),
//! in process or in a VSP process, and a NIC on a virtual switch with a host endpoint.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmbus_core::device::{DeviceDescription, VmbusDevice};
use vmbus_core::gpadl::Gpadl;
use vmbus_core::host::Server;
use vmbus_core::memory::GuestMemory;
use vmbus_core::oop::Supervisor;
use vmbus_core::wire::Guid;
use vsp_net::netvsp::{Netvsp, NetvspConfig, NetvspResources};
use vsp_net::switch::{PortConfig, PortHandle, Switch, SwitchConfig};
use vsp_storage::backend::raw::{RawDisk, RawOptions};
use vsp_storage::block::BlockDevice;
use vsp_storage::storvsp::{LunAddr, StorVsp, StorVspConfig};
use vsp_storage::vhd::{self, Vhd};

use crate::memory::GuestRam;
use crate::vmbus::device::{
    Hosted, NetvspDevice, NoSubchannels, OutOfProcess, RingSlot, memory_table, netvsp_ring_mapper,
};
use crate::vmbus::netpeer::{NetPeer, PeerAddr};

/// Instance GUID of the demo's SCSI controller.
pub const STORAGE_INSTANCE: Guid = Guid::from_u128(0x6b1f_0d5e_3c2a_4e8f_9a7b_0000_0000_0001);
/// Instance GUID of the demo's NIC.
pub const NIC_INSTANCE: Guid = Guid::from_u128(0x9a3f_8c52_0d1e_4b6a_8f00_0000_0000_0001);
/// The guest NIC's MAC (Hyper-V's OUI).
pub const GUEST_MAC: [u8; 6] = [0x00, 0x15, 0x5d, 0x00, 0x00, 0x02];
/// The host endpoint on the switch.
pub const PEER: PeerAddr = PeerAddr {
    mac: [0x02, 0x00, 0x00, 0x00, 0x00, 0x01],
    ip: [10, 0, 0, 1],
};

/// Device set-up errors.
#[derive(Debug, thiserror::Error)]
pub enum DeviceSetupError {
    #[error("disk {path}: {detail}")]
    Disk { path: PathBuf, detail: String },
    #[error("storvsp: {0}")]
    Storvsp(std::io::Error),
    #[error("starting a VSP process: {0}")]
    Vsp(#[from] vmbus_core::oop::SupervisorError),
    #[error("switch: {0}")]
    Switch(#[from] vsp_net::switch::SwitchError),
    #[error("netvsp: {0}")]
    Netvsp(std::io::Error),
    #[error("guest memory table: {0}")]
    Memory(std::io::Error),
}

/// Opens `path` as a disk: `.vhd` files as VHD images, anything else as a raw image.
pub fn open_disk(path: &Path) -> Result<(Arc<dyn BlockDevice>, &'static str), DeviceSetupError> {
    let err = |detail: String| DeviceSetupError::Disk {
        path: path.to_path_buf(),
        detail,
    };
    let is_vhd = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("vhd"));
    if is_vhd {
        let v = Vhd::open(path, &vhd::OpenOptions::default()).map_err(|e| err(e.to_string()))?;
        Ok((Arc::new(v), "VHD"))
    } else {
        let opts = RawOptions {
            // One thread, few requests: pread/pwrite is enough and keeps the VMM small.
            io_uring: false,
            ..RawOptions::default()
        };
        let r = RawDisk::open(path, &opts).map_err(|e| err(e.to_string()))?;
        Ok((Arc::new(r), "raw"))
    }
}

/// Creates a dynamic VHD of `size` bytes at `path`.
pub fn create_dynamic_vhd(path: &Path, size: u64) -> Result<(), DeviceSetupError> {
    vhd::create(path, &vhd::CreateOptions::new(size, vhd::DiskKind::Dynamic))
        .map(drop)
        .map_err(|e| DeviceSetupError::Disk {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })
}

/// A storvsp controller with `disk` at LUN 0:0:0.
pub fn storvsp(disk: Arc<dyn BlockDevice>) -> Result<StorVsp, DeviceSetupError> {
    let mut cfg = StorVspConfig::new(STORAGE_INSTANCE);
    cfg.io_threads = 1;
    cfg.max_in_flight = 64;
    let dev = StorVsp::new(cfg, None).map_err(DeviceSetupError::Storvsp)?;
    dev.add_lun(LunAddr::new(0, 0, 0), disk, None, None);
    Ok(dev)
}

/// What the storage controller offers (without building one).
pub fn storage_description() -> DeviceDescription {
    DeviceDescription::new(vmbus_core::wire::class::SCSI, STORAGE_INSTANCE)
}

/// The storage controller served in this process.
pub fn storage_in_process(
    disk: &Path,
) -> Result<(Hosted<StorVsp>, &'static str), DeviceSetupError> {
    let (d, kind) = open_disk(disk)?;
    let dev = storvsp(d)?;
    let desc = VmbusDevice::description(&dev);
    Ok((Hosted::new(dev, desc), kind))
}

/// The storage controller in a VSP process: `exe vsp storage --disk <disk>`, supervised.
pub fn storage_out_of_process(
    exe: &Path,
    disk: &Path,
    ram: &GuestRam,
) -> Result<OutOfProcess, DeviceSetupError> {
    // Opened here once too, so a bad path or image fails with its own message rather than as a
    // VSP process that exits at once.
    drop(open_disk(disk)?);
    let (exe, disk) = (exe.to_path_buf(), disk.to_path_buf());
    let memory = memory_table(ram).map_err(DeviceSetupError::Memory)?;
    let sup = Supervisor::start(
        move || {
            let mut c = std::process::Command::new(&exe);
            c.arg("vsp").arg("storage").arg("--disk").arg(&disk);
            c
        },
        memory,
        Duration::from_secs(10),
    )?;
    Ok(OutOfProcess::new(sup, storage_description()))
}

/// The NIC, its switch and the host endpoint (which answers ARP and ping for 10.0.0.1).
pub struct Network {
    pub device: NetvspDevice,
    pub switch: Switch,
    pub peer: NetPeer,
}

/// The demo's switch: port `guest0` for the NIC (returned) and port `host0` with the host endpoint.
pub fn switch_with_peer() -> Result<(Switch, PortHandle, NetPeer), DeviceSetupError> {
    let switch = Switch::new(SwitchConfig {
        name: "demo".into(),
        ..SwitchConfig::default()
    });
    let guest_port =
        switch.add_port(PortConfig::nic("guest0", GUEST_MAC).with_queue(64, 256 << 10))?;
    let peer_port =
        switch.add_port(PortConfig::nic("host0", PEER.mac).with_queue(64, 256 << 10))?;
    let peer = NetPeer::start(peer_port, PEER).map_err(DeviceSetupError::Netvsp)?;
    Ok((switch, guest_port, peer))
}

/// The demo NIC's netvsp configuration (one queue: the bus offers no sub-channels).
pub fn netvsp_config() -> NetvspConfig {
    NetvspConfig {
        instance: NIC_INSTANCE,
        max_queues: 1,
        mac: Some(GUEST_MAC),
        friendly_name: Some("kvm-host demo NIC".into()),
        ..NetvspConfig::default()
    }
}

/// What the NIC offers (without building one): as netvsp describes itself with [`netvsp_config`].
pub fn network_description() -> DeviceDescription {
    let mut d = DeviceDescription::new(vmbus_core::wire::class::NETWORK, NIC_INSTANCE);
    d.max_subchannels = 0;
    d
}

/// netvsp on a switch port, a second port with the host endpoint; GPADLs come from `server`.
pub fn network(
    ram: Arc<GuestRam>,
    server: Arc<Mutex<Server>>,
) -> Result<Network, DeviceSetupError> {
    let (switch, guest_port, peer) = switch_with_peer()?;
    let slot: RingSlot = Arc::default();
    let memory: Arc<dyn GuestMemory> = ram;
    let gpadls = move |h: u32| -> Option<Gpadl> {
        server
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .gpadl(h)
            .cloned()
    };
    let mut dev = Netvsp::new(
        netvsp_config(),
        Box::new(guest_port),
        NetvspResources {
            memory,
            gpadls: Arc::new(gpadls),
            map_rings: netvsp_ring_mapper(slot.clone()),
            subchannels: Box::new(NoSubchannels),
        },
    )
    .map_err(DeviceSetupError::Netvsp)?;
    dev.spawn_worker().map_err(DeviceSetupError::Netvsp)?;
    Ok(Network {
        device: NetvspDevice { device: dev, slot },
        switch,
        peer,
    })
}
