//! Storage VSP (storvsp): vstor protocol, SCSI emulation, raw/VHD backends over io_uring, VHD tools and the vhost-user-blk bridge (not yet built; see issue 6).
