//! Device → guest SynIC interrupts without the VMM: a call eventfd registered as a KVM irqfd on a
//! GSI routed as an MSI (fixed delivery, edge) to one VP's LAPIC with the SINT's vector.
//!
//! KVM_SET_GSI_ROUTING replaces the whole table, so every update writes KVM's default routes
//! (GSI 0–15: IOAPIC pin + PIC pin, 16–23: IOAPIC pin; COM1's irqfd sits on GSI 4) followed by one
//! MSI route per attached eventfd, on GSIs from 24 up.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, FromRawFd, IntoRawFd};
use std::sync::{Arc, Mutex, PoisonError};

use kvm_bindings::{
    KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KvmIrqRouting, kvm_irq_routing_entry,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

/// First GSI for MSI routes (after the IOAPIC's 24 pins).
const FIRST_MSI_GSI: u32 = 24;
/// Most irqfd routes at a time.
const MAX_MSI_ROUTES: usize = 1024;

struct Route {
    efd: EventFd,
    vp: u32,
    vector: u8,
}

/// The partition's MSI irqfds.
pub(crate) struct MsiIrqfds {
    vm: Arc<VmFd>,
    routes: Mutex<BTreeMap<u32, Route>>,
}

fn io_err(e: kvm_ioctls::Error) -> io::Error {
    io::Error::from_raw_os_error(e.errno())
}

fn irqchip(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = chip;
    e.u.irqchip.pin = pin;
    e
}

impl MsiIrqfds {
    pub(crate) fn new(vm: Arc<VmFd>) -> Self {
        MsiIrqfds {
            vm,
            routes: Mutex::new(BTreeMap::new()),
        }
    }

    fn apply(&self, routes: &BTreeMap<u32, Route>) -> io::Result<()> {
        let mut entries = Vec::with_capacity(40 + routes.len());
        for gsi in 0..24u32 {
            if gsi < 16 {
                let chip = if gsi < 8 {
                    KVM_IRQCHIP_PIC_MASTER
                } else {
                    KVM_IRQCHIP_PIC_SLAVE
                };
                entries.push(irqchip(gsi, chip, gsi % 8));
            }
            entries.push(irqchip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        }
        for (&gsi, r) in routes {
            let mut e = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            e.u.msi.address_lo = 0xFEE0_0000 | ((r.vp & 0xFF) << 12);
            e.u.msi.data = u32::from(r.vector);
            entries.push(e);
        }
        let table = KvmIrqRouting::from_entries(&entries)
            .map_err(|e| io::Error::other(format!("routing table: {e:?}")))?;
        self.vm.set_gsi_routing(&table).map_err(io_err)
    }

    /// Routes a new GSI to (`vp`, `vector`) and makes `call` its irqfd; returns the GSI.
    pub(crate) fn attach(
        &self,
        call: &ringbuf::signal::Doorbell,
        vp: u32,
        vector: u8,
    ) -> io::Result<u32> {
        let fd = call.as_fd().try_clone_to_owned()?;
        // SAFETY: `fd` is a freshly duplicated, owned eventfd descriptor; EventFd takes ownership.
        let efd = unsafe { EventFd::from_raw_fd(fd.into_raw_fd()) };
        let mut routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
        if routes.len() >= MAX_MSI_ROUTES {
            return Err(io::Error::other("out of irqfd routes"));
        }
        let gsi = (FIRST_MSI_GSI..)
            .find(|g| !routes.contains_key(g))
            .ok_or_else(|| io::Error::other("out of GSIs"))?;
        routes.insert(gsi, Route { efd, vp, vector });
        let registered = self.apply(&routes).and_then(|()| {
            let r = routes.get(&gsi).ok_or_else(|| io::Error::other("route"))?;
            self.vm.register_irqfd(&r.efd, gsi).map_err(io_err)
        });
        if let Err(e) = registered {
            routes.remove(&gsi);
            let _ = self.apply(&routes);
            return Err(e);
        }
        Ok(gsi)
    }

    /// Unregisters the irqfd on `gsi` and drops its route. When this returns, KVM no longer
    /// consumes the eventfd.
    pub(crate) fn detach(&self, gsi: u32) {
        let mut routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(r) = routes.remove(&gsi) else {
            return;
        };
        if let Err(e) = self.vm.unregister_irqfd(&r.efd, gsi) {
            tracing::warn!(gsi, "KVM_IRQFD deassign: {e}");
        }
        if let Err(e) = self.apply(&routes) {
            tracing::warn!(gsi, "KVM_SET_GSI_ROUTING: {e}");
        }
    }
}
