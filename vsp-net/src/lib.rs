//! Network VSP (netvsp): NVSP and RNDIS, TAP and virtual-switch backends, offloads and the vhost-user-net bridge (not yet built; see issue 7).

pub mod backend;
pub mod netvsp;
pub mod switch;
pub mod tap;
