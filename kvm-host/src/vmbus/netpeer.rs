//! A host-side endpoint on the virtual switch: answers ARP requests for its IPv4 address and ICMP
//! echo requests to it — the far end of the test guest's network check.
#![warn(clippy::arithmetic_side_effects, clippy::indexing_slicing)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use vsp_net::switch::PortHandle;
use vsp_net::tap::FrameMeta;

const ETH_HLEN: usize = 14;
const ETHERTYPE_ARP: u16 = 0x0806;
const ETHERTYPE_IPV4: u16 = 0x0800;

/// Address of the endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerAddr {
    pub mac: [u8; 6],
    pub ip: [u8; 4],
}

/// What the endpoint saw and answered.
#[derive(Debug, Default)]
pub struct PeerStats {
    pub frames_in: AtomicU64,
    pub arp_replies: AtomicU64,
    pub echo_replies: AtomicU64,
    pub ignored: AtomicU64,
}

/// The endpoint's thread.
#[derive(Debug)]
pub struct NetPeer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    pub stats: Arc<PeerStats>,
    pub addr: PeerAddr,
}

impl NetPeer {
    /// Serves `port` (a NIC port with `addr.mac`) until dropped.
    pub fn start(mut port: PortHandle, addr: PeerAddr) -> std::io::Result<NetPeer> {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(PeerStats::default());
        let (s, st) = (stop.clone(), stats.clone());
        let thread = std::thread::Builder::new()
            .name("netpeer".into())
            .spawn(move || {
                while !s.load(Ordering::Acquire) {
                    if !port.wait(Some(Duration::from_millis(50))) {
                        continue;
                    }
                    while let Some(f) = port.recv() {
                        st.frames_in.fetch_add(1, Ordering::Relaxed);
                        match respond(&f.data, &addr) {
                            Some((reply, kind)) => {
                                let counter = match kind {
                                    Reply::Arp => &st.arp_replies,
                                    Reply::Echo => &st.echo_replies,
                                };
                                counter.fetch_add(1, Ordering::Relaxed);
                                let r = port.send(&reply, &FrameMeta::default());
                                if r.delivered == 0 {
                                    tracing::debug!(?r, "netpeer: reply not delivered");
                                }
                            }
                            None => {
                                st.ignored.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }
            })?;
        Ok(NetPeer {
            stop,
            thread: Some(thread),
            stats,
            addr,
        })
    }
}

impl Drop for NetPeer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::error!("netpeer thread panicked");
        }
    }
}

/// Which kind of answer [`respond`] built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reply {
    Arp,
    Echo,
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([
        *b.get(at)?,
        *b.get(at.checked_add(1)?)?,
    ]))
}

/// The Internet checksum of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in data.chunks(2) {
        let hi = c.first().copied().unwrap_or(0);
        let lo = c.get(1).copied().unwrap_or(0);
        sum = sum.wrapping_add(u32::from(u16::from_be_bytes([hi, lo])));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xFFFF).wrapping_add(sum >> 16);
    }
    !(sum as u16)
}

/// The answer to `frame`, if it is an ARP request for `me.ip` or an ICMP echo request to it.
pub fn respond(frame: &[u8], me: &PeerAddr) -> Option<(Vec<u8>, Reply)> {
    let src_mac = frame.get(6..12)?;
    match be16(frame, 12)? {
        ETHERTYPE_ARP => {
            let arp = frame.get(ETH_HLEN..ETH_HLEN.checked_add(28)?)?;
            // Ethernet/IPv4, request.
            if arp.get(0..8)? != [0, 1, 8, 0, 6, 4, 0, 1] || arp.get(24..28)? != me.ip {
                return None;
            }
            let mut out = Vec::with_capacity(60);
            out.extend_from_slice(src_mac);
            out.extend_from_slice(&me.mac);
            out.extend_from_slice(&ETHERTYPE_ARP.to_be_bytes());
            out.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 2]);
            out.extend_from_slice(&me.mac);
            out.extend_from_slice(&me.ip);
            out.extend_from_slice(arp.get(8..18)?); // requester's MAC + IP
            out.resize(60, 0);
            Some((out, Reply::Arp))
        }
        ETHERTYPE_IPV4 => {
            let ip = frame.get(ETH_HLEN..)?;
            let ihl = usize::from(ip.first()? & 0x0F).checked_mul(4)?;
            let total = usize::from(be16(ip, 2)?);
            if ip.first()? >> 4 != 4 || ihl < 20 || total < ihl || total > ip.len() {
                return None;
            }
            if *ip.get(9)? != 1 || ip.get(16..20)? != me.ip {
                return None;
            }
            let icmp = ip.get(ihl..total)?;
            if icmp.len() < 8 || *icmp.first()? != 8 || checksum(icmp) != 0 {
                return None;
            }
            let mut out = Vec::with_capacity(ETH_HLEN.checked_add(total)?);
            out.extend_from_slice(src_mac);
            out.extend_from_slice(&me.mac);
            out.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
            let mut hdr = [0u8; 20];
            hdr.copy_from_slice(ip.get(..20)?);
            hdr[0] = 0x45;
            hdr[2..4].copy_from_slice(
                &u16::try_from(total.checked_sub(ihl)?.checked_add(20)?)
                    .ok()?
                    .to_be_bytes(),
            );
            hdr[8] = 64;
            hdr[10..12].copy_from_slice(&[0, 0]);
            hdr[12..16].copy_from_slice(&me.ip);
            hdr[16..20].copy_from_slice(ip.get(12..16)?);
            let c = checksum(&hdr);
            hdr[10..12].copy_from_slice(&c.to_be_bytes());
            out.extend_from_slice(&hdr);
            let mut reply = icmp.to_vec();
            *reply.first_mut()? = 0;
            *reply.get_mut(2)? = 0;
            *reply.get_mut(3)? = 0;
            let c = checksum(&reply);
            reply.get_mut(2..4)?.copy_from_slice(&c.to_be_bytes());
            out.extend_from_slice(&reply);
            Some((out, Reply::Echo))
        }
        _ => None,
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    const ME: PeerAddr = PeerAddr {
        mac: [2, 0, 0, 0, 0, 1],
        ip: [10, 0, 0, 1],
    };
    const GUEST: [u8; 6] = [0, 0x15, 0x5d, 0, 0, 2];

    fn arp_request(target: [u8; 4]) -> Vec<u8> {
        let mut f = vec![0xFF; 6];
        f.extend_from_slice(&GUEST);
        f.extend_from_slice(&[8, 6, 0, 1, 8, 0, 6, 4, 0, 1]);
        f.extend_from_slice(&GUEST);
        f.extend_from_slice(&[10, 0, 0, 2, 0, 0, 0, 0, 0, 0]);
        f.extend_from_slice(&target);
        f
    }

    #[test]
    fn answers_arp_for_its_address_only() {
        let (r, kind) = respond(&arp_request([10, 0, 0, 1]), &ME).unwrap();
        assert_eq!(kind, Reply::Arp);
        assert_eq!(&r[0..6], &GUEST);
        assert_eq!(&r[20..22], &[0, 2]);
        assert_eq!(&r[22..28], &ME.mac);
        assert_eq!(&r[28..32], &ME.ip);
        assert_eq!(&r[38..42], &[10, 0, 0, 2]);
        assert!(respond(&arp_request([10, 0, 0, 9]), &ME).is_none());
        assert!(respond(&arp_request([10, 0, 0, 1])[..30], &ME).is_none());
    }

    #[test]
    fn answers_echo_requests_with_valid_checksums() {
        let mut icmp = vec![8, 0, 0, 0, 0x12, 0x34, 0, 1];
        icmp.extend_from_slice(b"ping payload");
        let c = checksum(&icmp);
        icmp[2..4].copy_from_slice(&c.to_be_bytes());
        let mut ip = vec![
            0x45, 0, 0, 0, 0, 1, 0, 0, 64, 1, 0, 0, 10, 0, 0, 2, 10, 0, 0, 1,
        ];
        let total = (20 + icmp.len()) as u16;
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        let c = checksum(&ip);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        let mut f = ME.mac.to_vec();
        f.extend_from_slice(&GUEST);
        f.extend_from_slice(&[8, 0]);
        f.extend_from_slice(&ip);
        f.extend_from_slice(&icmp);
        let (r, kind) = respond(&f, &ME).unwrap();
        assert_eq!(kind, Reply::Echo);
        assert_eq!(checksum(&r[14..34]), 0);
        assert_eq!(&r[26..30], &ME.ip);
        assert_eq!(&r[30..34], &[10, 0, 0, 2]);
        assert_eq!(r[34], 0);
        assert_eq!(checksum(&r[34..]), 0);
        assert_eq!(&r[42..], b"ping payload");
        // A bad ICMP checksum or another destination: no answer.
        let mut bad = f.clone();
        bad[40] ^= 1;
        assert!(respond(&bad, &ME).is_none());
        let mut other = f;
        other[33] = 7;
        assert!(respond(&other, &ME).is_none());
    }
}
