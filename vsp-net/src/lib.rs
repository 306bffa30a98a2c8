//! Network VSP (netvsp): NVSP and RNDIS, TAP and virtual-switch backends, offloads, and the vhost-user-net device ([`vhost_user`]) over the same backends.

pub mod backend;
pub mod netvsp;
pub mod switch;
pub mod tap;
pub mod vhost_user;
