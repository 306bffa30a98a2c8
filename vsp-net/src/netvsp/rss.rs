//! Receive-side scaling: the Toeplitz hash over a frame's addresses and ports, as NDIS defines it.

use vmbus_core::devices::rndis::ndis::hash_info;

/// Toeplitz hash of `input` under `key` (the key must be at least `input.len() + 4` bytes).
pub fn toeplitz_hash(key: &[u8], input: &[u8]) -> u32 {
    let mut result = 0u32;
    let mut window = key
        .get(..4)
        .map_or(0, |k| u32::from_be_bytes([k[0], k[1], k[2], k[3]]));
    for (i, byte) in input.iter().enumerate() {
        let next = key.get(i + 4).copied().unwrap_or(0);
        for bit in 0..8 {
            if byte & (0x80 >> bit) != 0 {
                result ^= window;
            }
            window = (window << 1) | u32::from((next >> (7 - bit)) & 1);
        }
    }
    result
}

/// The RSS hash of a frame under the guest's hash types, or `None` when the frame is not of a
/// hashed type (the frame then goes to queue 0 without a hash).
pub fn frame_hash(key: &[u8], types: u32, frame: &[u8]) -> Option<u32> {
    let mut l3 = 14;
    let mut ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    if ethertype == 0x8100 {
        ethertype = u16::from_be_bytes([*frame.get(16)?, *frame.get(17)?]);
        l3 = 18;
    }
    let mut input = [0u8; 36];
    let (addr_len, proto, l4, is_v4) = match ethertype {
        0x0800 => {
            let ihl = usize::from(frame.get(l3)? & 0xF) * 4;
            let flags_frag = u16::from_be_bytes([*frame.get(l3 + 6)?, *frame.get(l3 + 7)?]);
            input[..8].copy_from_slice(frame.get(l3 + 12..l3 + 20)?);
            // Fragments carry no ports (first fragment included, so all pieces hash alike).
            let proto = if flags_frag & 0x3FFF != 0 {
                0
            } else {
                *frame.get(l3 + 9)?
            };
            (8, proto, l3 + ihl, true)
        }
        0x86DD => {
            input[..32].copy_from_slice(frame.get(l3 + 8..l3 + 40)?);
            (32, *frame.get(l3 + 6)?, l3 + 40, false)
        }
        _ => return None,
    };
    let (ip_bit, tcp_bit) = if is_v4 {
        (hash_info::IPV4, hash_info::TCP_IPV4)
    } else {
        (hash_info::IPV6, hash_info::TCP_IPV6)
    };
    let udp_bit = if is_v4 {
        hash_info::UDP_IPV4
    } else {
        hash_info::UDP_IPV6
    };
    let ports = match proto {
        6 if types & tcp_bit != 0 => frame.get(l4..l4 + 4),
        17 if types & udp_bit != 0 => frame.get(l4..l4 + 4),
        _ => None,
    };
    if let Some(p) = ports {
        input[addr_len..addr_len + 4].copy_from_slice(p);
        return Some(toeplitz_hash(key, &input[..addr_len + 4]));
    }
    (types & ip_bit != 0).then(|| toeplitz_hash(key, &input[..addr_len]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmbus_core::devices::rndis::ndis::LINUX_RSS_KEY;

    /// The Microsoft RSS verification suite (IPv4 and IPv4+TCP), with the default key Linux uses.
    #[test]
    fn toeplitz_matches_the_ndis_verification_vectors() {
        let cases = [
            (
                [66, 9, 149, 187],
                [161, 142, 100, 80],
                2794u16,
                1766u16,
                0x323e_8fc2u32,
                0x51cc_c178u32,
            ),
            (
                [199, 92, 111, 2],
                [65, 69, 140, 83],
                14230,
                4739,
                0xd718_262a,
                0xc626_b0ea,
            ),
            (
                [24, 19, 198, 95],
                [12, 22, 207, 184],
                12898,
                38024,
                0xd2d0_a5de,
                0x5c2b_394a,
            ),
            (
                [38, 27, 205, 30],
                [209, 142, 163, 6],
                48228,
                2217,
                0x8298_9176,
                0xafc7_327f,
            ),
            (
                [153, 39, 163, 191],
                [202, 188, 127, 2],
                44251,
                1303,
                0x5d18_09c5,
                0x10e8_28a2,
            ),
        ];
        // (source, destination, source port, destination port, IPv4 hash, IPv4+TCP hash)
        for (src, dst, sport, dport, ip_hash, tcp_hash) in cases {
            let mut input = Vec::new();
            input.extend_from_slice(&src);
            input.extend_from_slice(&dst);
            assert_eq!(toeplitz_hash(&LINUX_RSS_KEY, &input), ip_hash);
            input.extend_from_slice(&sport.to_be_bytes());
            input.extend_from_slice(&dport.to_be_bytes());
            assert_eq!(toeplitz_hash(&LINUX_RSS_KEY, &input), tcp_hash);
        }
    }

    #[test]
    fn frames_hash_by_type() {
        let mut f = vec![0u8; 14 + 20 + 20];
        f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        f[14] = 0x45;
        f[14 + 9] = 6;
        f[14 + 12..14 + 16].copy_from_slice(&[66, 9, 149, 187]);
        f[14 + 16..14 + 20].copy_from_slice(&[161, 142, 100, 80]);
        f[34..36].copy_from_slice(&2794u16.to_be_bytes());
        f[36..38].copy_from_slice(&1766u16.to_be_bytes());
        assert_eq!(
            frame_hash(&LINUX_RSS_KEY, hash_info::LINUX, &f),
            Some(0x51cc_c178)
        );
        assert_eq!(
            frame_hash(&LINUX_RSS_KEY, hash_info::IPV4, &f),
            Some(0x323e_8fc2)
        );
        assert_eq!(frame_hash(&LINUX_RSS_KEY, 0, &f), None);
        assert_eq!(frame_hash(&LINUX_RSS_KEY, hash_info::LINUX, &f[..20]), None);
        f[12] = 0x08;
        f[13] = 0x06; // ARP
        assert_eq!(frame_hash(&LINUX_RSS_KEY, hash_info::LINUX, &f), None);
    }
}
