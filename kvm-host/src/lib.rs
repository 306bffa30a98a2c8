//! The KVM parent partition: VMs, vCPUs, Hyper-V enlightenments in userspace, loaders, ACPI, the VSP supervisor and management API (not yet built; see issue 9).
