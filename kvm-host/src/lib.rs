//! The KVM parent partition: guest RAM, vCPUs, 64-bit boot, ACPI, COM1 and the Hyper-V
//! enlightenments (CPUID leaves, synthetic MSRs, hypercalls, SynIC) in userspace, on a KVM without
//! in-kernel Hyper-V support (see `../shared/reference/kvm-here.md`).
//!
//! - [`partition::Partition`]: build a VM, load an image, [`partition::Partition::run`] it.
//! - [`synic::Synic`] + [`synic::SynicHandler`]: where the VMBus host server plugs in — it receives
//!   `HvPostMessage` / `HvSignalEvent` from the guest and answers with
//!   [`synic::HostPort::post_to_guest`] / [`synic::HostPort::signal_guest`].
//! - [`vmbus::VmbusHost`]: vmbus-core's host `Server` on that SynIC, with the devices behind the
//!   channels (in process, or in supervised VSP processes) and the kick / call eventfd bridges.
//! - [`devices`]: the storage controller (storvsp on a raw image or VHD) and the NIC (netvsp on a
//!   virtual switch with a host endpoint that answers ARP and ping).
//! - [`netvsp_process`]: the NIC, its switch and the host endpoint in a VSP process.
//! - [`demo`]: the demo partition (`kvm-host demo`) and [`rss`], its memory accounting.
//! - [`testguest`]: the bare-metal Rust test guest (built from `kvm-host/guest`) and its host side.

pub mod acpi;
pub mod boot;
pub mod demo;
pub mod devices;
pub mod hyperv;
mod irqfd;
pub mod linux_boot;
pub mod linux_guest;
pub mod memory;
pub mod netvsp_process;
pub mod partition;
pub mod rss;
pub mod serial;
pub mod synic;
pub mod testguest;
pub mod vcpu;
pub mod vmbus;

pub use partition::{Partition, PartitionConfig, PartitionError, RunReport, kvm_available};
pub use vcpu::{EXIT_PORT, ExitReason};
