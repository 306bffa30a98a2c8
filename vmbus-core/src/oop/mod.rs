//! The VMM ↔ VSP process protocol: VSPs run as their own processes, vhost-user style, and survive
//! crashes without a guest reboot.
//!
//! # Protocol (version 1)
//! A `SOCK_SEQPACKET` Unix socket, one message per datagram ([`wire`]), file descriptors as
//! `SCM_RIGHTS`:
//!
//! 1. Both sides send `Hello {version, features}`; a version mismatch ends the connection.
//! 2. VMM → VSP `SetMemory {regions}` with one memfd per region (`gpa`, `size`, `fd_offset`, all
//!    page aligned, non-overlapping, inside the file). The VSP maps every region
//!    ([`GuestRegions`]); reply status 0 or 1.
//!
//!    Then VMM → VSP `Inflight {size}` with one memfd: the in-flight request journal, created once
//!    per supervised VSP and handed to every (re)started process ([`InflightRegion`]; size a page
//!    multiple of at most 1 MiB, equal to the file's). Reply status 0 or 1.
//! 3. VMM → VSP `Open {relid, subchannel_index, target_vp, connection_id, downstream_offset,
//!    user_data, ring_pages}` with two eventfds: *kick* (the guest signalled the channel) and *call*
//!    (interrupt the guest). The VSP maps both rings from the ring pages (control page first, data
//!    pages twice for wrap-around) and hands them to its device ([`HostedDevice`]). Ring positions
//!    live in the rings' control pages, so a restarted VSP continues where the old one stopped.
//! 4. `Gpadl {relid, handle, ranges, pfns}` / `GpadlRevoke {handle}`: the GPADLs of the VSP's
//!    channels other than rings (netvsp's receive and send buffers), validated against guest memory
//!    and shared with the device ([`GpadlTable`]).
//! 5. `Close {relid}`, `Retarget`, `Save` / `State`, `Restore`; VSP → VMM `OfferSubchannels`.
//! 6. With feature [`wire::FEATURE_SIGNAL_TARGET`] (both Hellos): `SignalTarget {relid, target}` —
//!    the GPA and bit of the channel's SynIC event flag, which the VSP sets before writing *call*
//!    (a KVM irqfd then), or none (the VMM delivers). The VSP refuses a word outside its memory
//!    table; the VMM resends the targets after a restart ([`irqflag`]).
//!
//! Every request is answered by `Reply {request, relid, status}`. Each side validates everything it
//! receives; a peer that breaks the protocol is disconnected (the VMM then restarts the VSP).

pub mod inflight;
pub mod irqflag;
pub mod regions;
pub mod seccomp;
pub mod socket;
pub mod supervisor;
pub mod vmm;
pub mod vsp;
pub mod wire;

pub use inflight::{InflightError, InflightRegion};
pub use irqflag::{FlagSetter, FlagTarget};
pub use regions::{GuestRegions, RegionError};
pub use socket::{Connection, RecvError};
pub use supervisor::{SOCKET_FD_ENV, Supervisor, SupervisorError, connection_from_env};
pub use vmm::{VmmError, VspClient};
pub use vsp::{ChannelResources, GpadlTable, HostedDevice, ServeError, serve};
pub use wire::{Message, ProtocolError, Region};
