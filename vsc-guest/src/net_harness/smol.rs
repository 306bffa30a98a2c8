//! A smoltcp interface on a harness VM's synthetic NIC, so tests speak real ARP, ICMP and TCP.
//!
//! [`SmolStack`] owns the [`NetVm`], a smoltcp [`Interface`] and its sockets. With
//! [`SmolStack::tcp_checksum_offload`] on, smoltcp leaves TCP checksums to the "hardware" and every
//! TCP frame goes out with a checksum PPI: the host (netvsp, the switch, the peer's netvsp or the
//! TAP) computes it, and the receiving stack verifies it.

use super::{HarnessError, NetVm};
use crate::netvsc::{TxChecksum, TxMeta};
use smoltcp::iface::{Config, Interface, SocketSet};
use smoltcp::phy::{self, Checksum, Device, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, IpAddress, IpCidr};
use std::time::Duration;

/// The TX offload metadata for a frame smoltcp built without a TCP checksum: IPv4 + TCP →
/// checksum PPI with the transport offset; anything else → none.
pub fn tcp_checksum_meta(frame: &[u8]) -> TxMeta {
    let mut meta = TxMeta::default();
    if frame.len() >= 34 && frame[12..14] == [0x08, 0x00] && frame[23] == 6 {
        let ihl = usize::from(frame[14] & 0x0F) * 4;
        meta.csum = Some(TxChecksum {
            ipv4: true,
            tcp: true,
            transport_offset: (14 + ihl) as u16,
            ..TxChecksum::default()
        });
    }
    meta
}

/// A cheap flow hash (for the queue choice when there are several queues).
pub fn flow_hash(frame: &[u8]) -> u32 {
    let key = frame.get(26..38).unwrap_or_default();
    key.iter().fold(0x811C_9DC5u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// The device smoltcp polls: a borrowed VM.
pub struct Nic<'a> {
    pub vm: &'a mut NetVm,
    pub tcp_offload: bool,
}

/// A received frame.
pub struct RxToken(Vec<u8>);

impl phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

/// Room to send one frame.
pub struct TxToken<'a> {
    vm: &'a mut NetVm,
    tcp_offload: bool,
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0u8; len];
        let r = f(&mut buf);
        let mut meta = if self.tcp_offload {
            tcp_checksum_meta(&buf)
        } else {
            TxMeta::default()
        };
        if self.vm.driver.queue_count() > 1 {
            meta.hash = Some(flow_hash(&buf));
        }
        if let Err(e) = self.vm.send(&buf, &meta) {
            // Like a NIC dropping under pressure: TCP retransmits.
            tracing::debug!(error = %e, "harness: frame dropped");
        }
        r
    }
}

impl Device for Nic<'_> {
    type RxToken<'b>
        = RxToken
    where
        Self: 'b;
    type TxToken<'b>
        = TxToken<'b>
    where
        Self: 'b;

    fn receive(&mut self, _: Instant) -> Option<(RxToken, TxToken<'_>)> {
        let frame = self.vm.driver.poll_receive()?;
        Some((
            RxToken(frame.data),
            TxToken {
                vm: self.vm,
                tcp_offload: self.tcp_offload,
            },
        ))
    }

    fn transmit(&mut self, _: Instant) -> Option<TxToken<'_>> {
        Some(TxToken {
            vm: self.vm,
            tcp_offload: self.tcp_offload,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = 1514;
        if self.tcp_offload {
            caps.checksum.tcp = Checksum::Rx;
        }
        caps
    }
}

/// A VM with a smoltcp interface and its sockets.
pub struct SmolStack {
    pub vm: NetVm,
    pub iface: Interface,
    pub sockets: SocketSet<'static>,
    /// Leave TCP checksums to the host (checksum PPI); on by default.
    pub tcp_checksum_offload: bool,
    start: std::time::Instant,
}

impl SmolStack {
    /// An interface with `ip`/`prefix` on a VM that finished its bring-up.
    pub fn new(mut vm: NetVm, ip: [u8; 4], prefix: u8) -> Self {
        let mac = vm.driver.info().mac;
        let mut config = Config::new(EthernetAddress(mac).into());
        config.random_seed =
            u64::from_le_bytes([mac[0], mac[1], mac[2], mac[3], mac[4], mac[5], 7, 1]);
        let start = std::time::Instant::now();
        let mut nic = Nic {
            vm: &mut vm,
            tcp_offload: true,
        };
        let mut iface = Interface::new(config, &mut nic, Instant::from_millis(0));
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(
                IpAddress::v4(ip[0], ip[1], ip[2], ip[3]),
                prefix,
            ));
        });
        SmolStack {
            vm,
            iface,
            sockets: SocketSet::new(Vec::new()),
            tcp_checksum_offload: true,
            start,
        }
    }

    /// smoltcp time (milliseconds since the stack was made).
    pub fn now(&self) -> Instant {
        Instant::from_micros(self.start.elapsed().as_micros() as i64)
    }

    /// Services the rings and runs the stack once. True when anything moved.
    pub fn poll(&mut self) -> Result<bool, HarnessError> {
        let mut moved = self.vm.service()?;
        let now = self.now();
        let mut nic = Nic {
            vm: &mut self.vm,
            tcp_offload: self.tcp_checksum_offload,
        };
        moved |= self.iface.poll(now, &mut nic, &mut self.sockets)
            == smoltcp::iface::PollResult::SocketStateChanged;
        moved |= self.vm.service()?;
        Ok(moved)
    }

    /// How long the stack may sleep before it has timers to run (capped at `max`).
    pub fn delay(&mut self, max: Duration) -> Duration {
        let now = self.now();
        self.iface
            .poll_delay(now, &self.sockets)
            .map_or(max, |d| Duration::from_micros(d.total_micros()).min(max))
    }
}
