//! The frames the guest exchanges with the host's endpoint on the virtual switch: ARP request /
//! reply and ICMP echo request / reply over IPv4.

use alloc::vec::Vec;

/// The guest's and the host endpoint's IPv4 addresses.
pub const GUEST_IP: [u8; 4] = [10, 0, 0, 2];
pub const PEER_IP: [u8; 4] = [10, 0, 0, 1];

/// An ARP request from `mac`/GUEST_IP for `target`.
pub fn arp_request(mac: [u8; 6], target: [u8; 4]) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&[0xFF; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&GUEST_IP);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target);
    f.resize(60, 0);
    f
}

/// The sender MAC of an ARP reply from `ip`, if `f` is one.
pub fn arp_reply_from(f: &[u8], ip: [u8; 4]) -> Option<[u8; 6]> {
    if f.get(12..14)? != [0x08, 0x06] || f.get(20..22)? != [0, 2] || f.get(28..32)? != ip {
        return None;
    }
    let mut m = [0u8; 6];
    m.copy_from_slice(f.get(22..28)?);
    Some(m)
}

/// The Internet checksum.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in data.chunks(2) {
        let w = u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)]);
        sum = sum.wrapping_add(u32::from(w));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    !(sum as u16)
}

/// An ICMP echo request with `id`/`seq` and `payload`.
pub fn echo_request(src: [u8; 6], dst: [u8; 6], id: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let mut icmp = Vec::with_capacity(8 + payload.len());
    icmp.extend_from_slice(&[8, 0, 0, 0]);
    icmp.extend_from_slice(&id.to_be_bytes());
    icmp.extend_from_slice(&seq.to_be_bytes());
    icmp.extend_from_slice(payload);
    let c = checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let total = (20 + icmp.len()) as u16;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[4..6].copy_from_slice(&seq.to_be_bytes());
    ip[8] = 64;
    ip[9] = 1;
    ip[12..16].copy_from_slice(&GUEST_IP);
    ip[16..20].copy_from_slice(&PEER_IP);
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut f = Vec::with_capacity(14 + total as usize);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&icmp);
    f
}

/// Whether `f` is the echo reply to (`id`, `seq`) carrying `payload` with valid checksums.
pub fn is_echo_reply(f: &[u8], id: u16, seq: u16, payload: &[u8]) -> bool {
    let ok = || -> Option<bool> {
        let ip = f.get(14..34)?;
        let icmp = f.get(34..)?;
        Some(
            f.get(12..14)? == [0x08, 0x00]
                && ip[9] == 1
                && ip[12..16] == PEER_IP
                && ip[16..20] == GUEST_IP
                && checksum(ip) == 0
                && icmp.first() == Some(&0)
                && icmp.get(4..6)? == id.to_be_bytes()
                && icmp.get(6..8)? == seq.to_be_bytes()
                && icmp.get(8..)? == payload
                && checksum(icmp) == 0,
        )
    };
    ok().unwrap_or(false)
}
