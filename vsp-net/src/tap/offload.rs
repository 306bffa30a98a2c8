//! Frame metadata that travels next to an Ethernet frame (checksum offload, segmentation offload,
//! 802.1Q tag) and the software fallbacks: header parsing, checksum completion, fixing up NDIS-style
//! LSO headers (reference §3.7: IP total length 0, pseudo-header sum without length) and TCP/UDP
//! segmentation for destinations that cannot take super-frames.
//!
//! Offsets in the metadata always count from the first byte of the frame as it is passed next to the
//! metadata (so an in-band VLAN tag, if present, is included in them).

use thiserror::Error;

/// Ethernet header length without VLAN tags.
pub const ETH_HLEN: usize = 14;
/// 802.1Q tag protocol identifier.
pub const ETH_P_8021Q: u16 = 0x8100;
/// 802.1ad (QinQ) tag protocol identifier.
pub const ETH_P_8021AD: u16 = 0x88a8;
/// IPv4 ethertype.
pub const ETH_P_IPV4: u16 = 0x0800;
/// IPv6 ethertype.
pub const ETH_P_IPV6: u16 = 0x86dd;
/// ARP ethertype.
pub const ETH_P_ARP: u16 = 0x0806;
/// Largest header block (L2 + L3 + L4 headers) the offload code rewrites in place.
pub const MAX_HEADERS: usize = 256;

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const TCP_CSUM_OFFSET: u16 = 16;
const UDP_CSUM_OFFSET: u16 = 6;

/// Errors from parsing headers or applying an offload to a frame.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum OffloadError {
    /// The frame ends before a header does.
    #[error("frame too short for the {what}: need {need} bytes, have {have}")]
    Truncated {
        /// Which header.
        what: &'static str,
        /// Bytes needed.
        need: usize,
        /// Bytes available.
        have: usize,
    },
    /// Checksum/segmentation offload requested on a frame that is not IPv4/IPv6.
    #[error("ethertype {0:#06x} cannot carry a checksum or segmentation offload")]
    UnsupportedEthertype(u16),
    /// IPv4 header length field below 5 words.
    #[error("IPv4 header length {0} is invalid")]
    BadIpv4HeaderLen(usize),
    /// IP version nibble does not match the ethertype.
    #[error("IP version {0} does not match the ethertype")]
    BadIpVersion(u8),
    /// Transport protocol is neither TCP nor UDP.
    #[error("IP protocol {0} is neither TCP nor UDP")]
    UnsupportedL4(u8),
    /// TCP data offset below 5 words.
    #[error("TCP data offset {0} is invalid")]
    BadTcpHeaderLen(usize),
    /// The caller's transport-header offset disagrees with the headers.
    #[error("transport header offset {given} does not match the parsed offset {parsed}")]
    L4OffsetMismatch {
        /// Offset from the metadata (e.g. the RNDIS checksum/LSO PPI).
        given: usize,
        /// Offset found by walking the headers.
        parsed: usize,
    },
    /// The segmentation metadata is unusable.
    #[error("segmentation offload: {0}")]
    BadGso(&'static str),
    /// Headers longer than [`MAX_HEADERS`].
    #[error("headers of {0} bytes exceed the {MAX_HEADERS}-byte header buffer")]
    HeadersTooLong(usize),
    /// Partial-checksum start/offset point outside the frame.
    #[error("checksum start {start} + offset {offset} lies outside the {len}-byte frame")]
    BadCsumOffset {
        /// Checksum start.
        start: usize,
        /// Offset of the checksum field from `start`.
        offset: usize,
        /// Frame length.
        len: usize,
    },
    /// IPv6 extension headers that never reach a transport header.
    #[error("IPv6 extension header chain is too long or malformed")]
    Ipv6ExtChain,
    /// A fragment cannot carry a transport checksum offload.
    #[error("IP fragments cannot carry a transport offload")]
    Fragment,
}

/// An 802.1Q tag (TCI fields).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VlanTag {
    /// VLAN id, 0..=4095 (0 = priority tag only).
    pub vid: u16,
    /// Priority code point, 0..=7.
    pub pcp: u8,
    /// Drop eligible indicator (the old CFI bit).
    pub dei: bool,
}

impl VlanTag {
    /// A tag with this VLAN id and priority 0.
    pub fn new(vid: u16) -> Self {
        Self {
            vid: vid & 0x0fff,
            pcp: 0,
            dei: false,
        }
    }

    /// The 16-bit tag control information as it sits on the wire.
    pub fn tci(self) -> u16 {
        (u16::from(self.pcp & 7) << 13) | (u16::from(self.dei) << 12) | (self.vid & 0x0fff)
    }

    /// Decodes a wire TCI.
    pub fn from_tci(tci: u16) -> Self {
        Self {
            vid: tci & 0x0fff,
            pcp: (tci >> 13) as u8,
            dei: tci & 0x1000 != 0,
        }
    }

    /// Decodes the RNDIS 802.1Q PPI payload (bits 0–2 priority, bit 3 CFI, bits 4–15 VLAN id).
    pub fn from_ndis_ppi(v: u32) -> Self {
        Self {
            vid: ((v >> 4) & 0x0fff) as u16,
            pcp: (v & 7) as u8,
            dei: v & 8 != 0,
        }
    }

    /// Encodes the RNDIS 802.1Q PPI payload.
    pub fn to_ndis_ppi(self) -> u32 {
        u32::from(self.pcp & 7) | (u32::from(self.dei) << 3) | (u32::from(self.vid & 0x0fff) << 4)
    }
}

/// Network-layer protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum L3Proto {
    /// IPv4.
    Ipv4,
    /// IPv6.
    Ipv6,
}

/// Transport protocol with an offloadable checksum.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum L4Proto {
    /// TCP (checksum at offset 16).
    Tcp,
    /// UDP (checksum at offset 6).
    Udp,
}

/// Checksum state of a frame.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Checksum {
    /// Nothing to do on transmit; on receive, not verified (the receiver checks).
    #[default]
    None,
    /// Receive: checksums verified, or the frame was generated locally with complete checksums.
    Valid,
    /// Checksum still to be computed (virtio `NEEDS_CSUM` semantics): the 16-bit field at
    /// `start + offset` holds the folded pseudo-header sum; the final value is the complement of the
    /// ones'-complement sum from `start` to the end of the L3 payload.
    Partial {
        /// First byte the checksum covers (the transport header).
        start: u16,
        /// Offset of the checksum field from `start`.
        offset: u16,
    },
    /// Transmit request in NDIS terms (RNDIS TCP/IP checksum PPI, §3.7): nothing is precomputed; the
    /// host fills the IPv4 header checksum (`ip_header`) and the transport checksum (`l4`).
    Offload {
        /// Network protocol from the PPI.
        l3: L3Proto,
        /// Transport checksum to compute, if any.
        l4: Option<L4Proto>,
        /// Compute the IPv4 header checksum.
        ip_header: bool,
        /// Transport header offset from the PPI (checked against the headers).
        l4_offset: u16,
    },
}

/// Segmentation kind of a super-frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GsoKind {
    /// TCP over IPv4 (TSO4 / LSOv2 IPv4).
    TcpV4,
    /// TCP over IPv6 (TSO6 / LSOv2 IPv6).
    TcpV6,
    /// UDP segmentation (USO, `VIRTIO_NET_HDR_GSO_UDP_L4`), IPv4 or IPv6.
    UdpL4,
}

/// Segmentation request/description of a super-frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Gso {
    /// Protocol to segment.
    pub kind: GsoKind,
    /// Payload bytes per segment (MSS); never 0.
    pub mss: u16,
    /// Bytes of headers (L2 through L4) repeated in each segment; 0 = unknown (computed).
    pub hdr_len: u16,
    /// TCP ECN: the CWR flag is set and must only go on the first segment.
    pub ecn: bool,
}

/// Metadata travelling with a frame: what the sender offloaded, or what the receiver may assume.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FrameMeta {
    /// Checksum state / request.
    pub csum: Checksum,
    /// Segmentation, if this is a super-frame.
    pub gso: Option<Gso>,
    /// Out-of-band 802.1Q tag (RNDIS 802.1Q PPI); `None` = untagged or tag in-band.
    pub vlan: Option<VlanTag>,
}

/// Where the headers of a frame are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Headers {
    /// Offset of the L3 header (14, or more with in-band VLAN tags).
    pub l3_off: usize,
    /// Ethertype after any VLAN tags.
    pub ethertype: u16,
    /// IP version, if IPv4/IPv6.
    pub l3: Option<L3Proto>,
    /// End of the IP packet as its length field says (`None` when the field is 0, as in LSO).
    pub l3_end: Option<usize>,
    /// IP protocol / IPv6 next header of the transport header.
    pub ip_proto: u8,
    /// Offset of the transport header.
    pub l4_off: usize,
    /// Transport protocol, if TCP/UDP.
    pub l4: Option<L4Proto>,
    /// Transport header length (TCP data offset × 4, or 8 for UDP); 0 if unknown.
    pub l4_hdr_len: usize,
    /// The IP packet is a fragment (IPv4 MF/offset, or an IPv6 fragment header).
    pub fragment: bool,
}

impl Headers {
    /// Offset just past the transport header.
    pub fn hdr_end(&self) -> usize {
        self.l4_off + self.l4_hdr_len
    }
}

fn be16(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(off)?, *b.get(off + 1)?]))
}

fn need(b: &[u8], n: usize, what: &'static str) -> Result<(), OffloadError> {
    if b.len() < n {
        Err(OffloadError::Truncated {
            what,
            need: n,
            have: b.len(),
        })
    } else {
        Ok(())
    }
}

fn put16(b: &mut [u8], off: usize, v: u16) -> Result<(), OffloadError> {
    let dst = b.get_mut(off..off + 2).ok_or(OffloadError::Truncated {
        what: "16-bit header field",
        need: off + 2,
        have: 0,
    })?;
    dst.copy_from_slice(&v.to_be_bytes());
    Ok(())
}

/// Returns the ethertype after any in-band VLAN tags and the L3 offset. `buf` may be a prefix.
pub fn l2_info(buf: &[u8]) -> Result<(u16, usize), OffloadError> {
    need(buf, ETH_HLEN, "Ethernet header")?;
    let mut off = 12;
    let mut et = be16(buf, off).unwrap_or(0);
    let mut tags = 0;
    while (et == ETH_P_8021Q || et == ETH_P_8021AD) && tags < 2 {
        off += 4;
        need(buf, off + 2, "VLAN tag")?;
        et = be16(buf, off).unwrap_or(0);
        tags += 1;
    }
    Ok((et, off + 2))
}

/// Walks the Ethernet, IP and TCP/UDP headers found in `buf` (which may be just a prefix of the
/// frame: only headers must be inside it). Non-IP frames return `l3: None`.
pub fn parse(buf: &[u8]) -> Result<Headers, OffloadError> {
    let (ethertype, l3_off) = l2_info(buf)?;
    let mut h = Headers {
        l3_off,
        ethertype,
        l3: None,
        l3_end: None,
        ip_proto: 0,
        l4_off: 0,
        l4: None,
        l4_hdr_len: 0,
        fragment: false,
    };
    match ethertype {
        ETH_P_IPV4 => {
            need(buf, l3_off + 20, "IPv4 header")?;
            let vihl = buf[l3_off];
            if vihl >> 4 != 4 {
                return Err(OffloadError::BadIpVersion(vihl >> 4));
            }
            let ihl = usize::from(vihl & 0x0f) * 4;
            if ihl < 20 {
                return Err(OffloadError::BadIpv4HeaderLen(ihl));
            }
            need(buf, l3_off + ihl, "IPv4 options")?;
            let tot = usize::from(be16(buf, l3_off + 2).unwrap_or(0));
            h.l3 = Some(L3Proto::Ipv4);
            h.l3_end = (tot != 0).then_some(l3_off + tot);
            let frag = be16(buf, l3_off + 6).unwrap_or(0);
            h.fragment = frag & 0x3fff != 0;
            h.ip_proto = buf[l3_off + 9];
            h.l4_off = l3_off + ihl;
        }
        ETH_P_IPV6 => {
            need(buf, l3_off + 40, "IPv6 header")?;
            if buf[l3_off] >> 4 != 6 {
                return Err(OffloadError::BadIpVersion(buf[l3_off] >> 4));
            }
            let plen = usize::from(be16(buf, l3_off + 4).unwrap_or(0));
            h.l3 = Some(L3Proto::Ipv6);
            h.l3_end = (plen != 0).then_some(l3_off + 40 + plen);
            let mut next = buf[l3_off + 6];
            let mut off = l3_off + 40;
            let mut hops = 0;
            // Hop-by-hop, routing, fragment, destination options.
            while matches!(next, 0 | 43 | 44 | 60) {
                hops += 1;
                if hops > 8 {
                    return Err(OffloadError::Ipv6ExtChain);
                }
                need(buf, off + 8, "IPv6 extension header")?;
                if next == 44 {
                    h.fragment = true;
                    next = buf[off];
                    off += 8;
                } else {
                    let len = (usize::from(buf[off + 1]) + 1) * 8;
                    next = buf[off];
                    off += len;
                }
            }
            h.ip_proto = next;
            h.l4_off = off;
        }
        _ => return Ok(h),
    }
    match h.ip_proto {
        IPPROTO_TCP if !h.fragment => {
            need(buf, h.l4_off + 20, "TCP header")?;
            let doff = usize::from(buf[h.l4_off + 12] >> 4) * 4;
            if doff < 20 {
                return Err(OffloadError::BadTcpHeaderLen(doff));
            }
            need(buf, h.l4_off + doff, "TCP options")?;
            h.l4 = Some(L4Proto::Tcp);
            h.l4_hdr_len = doff;
        }
        IPPROTO_UDP if !h.fragment => {
            need(buf, h.l4_off + 8, "UDP header")?;
            h.l4 = Some(L4Proto::Udp);
            h.l4_hdr_len = 8;
        }
        _ => {}
    }
    Ok(h)
}

/// Adds `data` to a ones'-complement accumulator (big-endian 16-bit words; an odd tail byte is
/// padded with zero). Fold with [`fold`].
pub fn ones_sum(data: &[u8], mut acc: u64) -> u64 {
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        acc += u64::from(u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
    }
    let rest = chunks.remainder();
    let mut tail = [0u8; 4];
    tail[..rest.len()].copy_from_slice(rest);
    acc + u64::from(u32::from_be_bytes(tail))
}

/// Folds an accumulator to 16 bits (not complemented).
pub fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The Internet checksum (complemented fold) of `data`.
pub fn internet_checksum(data: &[u8]) -> u16 {
    !fold(ones_sum(data, 0))
}

/// Pseudo-header sum for a transport segment of `l4_len` bytes.
fn pseudo_sum(buf: &[u8], h: &Headers, l4_len: usize) -> u64 {
    let mut acc = u64::from(h.ip_proto) + l4_len as u64;
    match h.l3 {
        Some(L3Proto::Ipv4) => acc = ones_sum(&buf[h.l3_off + 12..h.l3_off + 20], acc),
        Some(L3Proto::Ipv6) => acc = ones_sum(&buf[h.l3_off + 8..h.l3_off + 40], acc),
        None => {}
    }
    acc
}

fn csum_field_offset(l4: L4Proto) -> u16 {
    match l4 {
        L4Proto::Tcp => TCP_CSUM_OFFSET,
        L4Proto::Udp => UDP_CSUM_OFFSET,
    }
}

fn set_ipv4_header_csum(buf: &mut [u8], h: &Headers) -> Result<(), OffloadError> {
    let ihl = h.l4_off - h.l3_off;
    put16(buf, h.l3_off + 10, 0)?;
    let c = internet_checksum(&buf[h.l3_off..h.l3_off + ihl]);
    put16(buf, h.l3_off + 10, c)
}

/// Sets the IP length fields for an IP packet ending at `l3_end` (IPv4 total length, IPv6 payload
/// length) and the IPv4 header checksum.
fn set_ip_len(buf: &mut [u8], h: &Headers, l3_end: usize) -> Result<(), OffloadError> {
    match h.l3 {
        Some(L3Proto::Ipv4) => {
            let tot = u16::try_from(l3_end - h.l3_off)
                .map_err(|_| OffloadError::BadGso("IPv4 packet longer than 65535"))?;
            put16(buf, h.l3_off + 2, tot)?;
            set_ipv4_header_csum(buf, h)
        }
        Some(L3Proto::Ipv6) => {
            // Payload length counts extension headers too.
            let plen = u16::try_from(l3_end - h.l3_off - 40)
                .map_err(|_| OffloadError::BadGso("IPv6 payload longer than 65535"))?;
            put16(buf, h.l3_off + 4, plen)
        }
        None => Ok(()),
    }
}

/// Rewrites the headers of a frame about to be sent so that its metadata uses only
/// [`Checksum::Partial`] (virtio semantics) and a complete [`Gso`]:
/// * NDIS checksum request → IPv4 header checksum filled if asked, pseudo-header sum written into
///   the transport checksum field, `csum` becomes `Partial`;
/// * segmentation → IP length fields set for the whole super-frame (NDIS LSO leaves them 0), IPv4
///   header checksum recomputed, pseudo-header sum *with* length written (NDIS puts it without),
///   UDP length set for USO, `hdr_len` filled, `csum` becomes `Partial`.
///
/// `hdr` is a writable copy of the frame's first bytes (at least through the transport header);
/// `frame_len` is the length of the whole frame. Frames without offloads are left alone.
pub fn finalize_tx(
    hdr: &mut [u8],
    frame_len: usize,
    meta: &mut FrameMeta,
) -> Result<(), OffloadError> {
    if meta.gso.is_none() && !matches!(meta.csum, Checksum::Offload { .. }) {
        return Ok(());
    }
    let h = parse(hdr)?;
    if h.l3.is_none() {
        return Err(OffloadError::UnsupportedEthertype(h.ethertype));
    }
    if let Checksum::Offload { l4_offset, l4, .. } = meta.csum
        && l4.is_some()
        && usize::from(l4_offset) != h.l4_off
    {
        return Err(OffloadError::L4OffsetMismatch {
            given: usize::from(l4_offset),
            parsed: h.l4_off,
        });
    }
    if let Some(gso) = meta.gso.as_mut() {
        if h.fragment {
            return Err(OffloadError::Fragment);
        }
        let want = match gso.kind {
            GsoKind::TcpV4 => (Some(L3Proto::Ipv4), Some(L4Proto::Tcp)),
            GsoKind::TcpV6 => (Some(L3Proto::Ipv6), Some(L4Proto::Tcp)),
            GsoKind::UdpL4 => (h.l3, Some(L4Proto::Udp)),
        };
        if (h.l3, h.l4) != want {
            return Err(OffloadError::BadGso(
                "headers do not match the segmentation kind",
            ));
        }
        if gso.mss == 0 {
            return Err(OffloadError::BadGso("MSS is 0"));
        }
        let hdr_end = h.hdr_end();
        if hdr_end >= frame_len {
            return Err(OffloadError::BadGso("no payload after the headers"));
        }
        gso.hdr_len = u16::try_from(hdr_end).map_err(|_| OffloadError::HeadersTooLong(hdr_end))?;
        if h.l4 == Some(L4Proto::Tcp) && hdr[h.l4_off + 13] & 0x80 != 0 {
            gso.ecn = true; // CWR set: the segmenter must keep it on the first segment only
        }
        set_ip_len(hdr, &h, frame_len)?;
        let l4 = h.l4.unwrap_or(L4Proto::Tcp);
        let l4_len = frame_len - h.l4_off;
        if l4 == L4Proto::Udp {
            let ulen = u16::try_from(l4_len)
                .map_err(|_| OffloadError::BadGso("UDP super-frame longer than 65535"))?;
            put16(hdr, h.l4_off + 4, ulen)?;
        }
        let off = csum_field_offset(l4);
        put16(
            hdr,
            h.l4_off + usize::from(off),
            fold(pseudo_sum(hdr, &h, l4_len)),
        )?;
        meta.csum = Checksum::Partial {
            start: h.l4_off as u16,
            offset: off,
        };
        return Ok(());
    }
    if let Checksum::Offload { l4, ip_header, .. } = meta.csum {
        if ip_header && h.l3 == Some(L3Proto::Ipv4) {
            set_ipv4_header_csum(hdr, &h)?;
        }
        meta.csum = Checksum::None;
        if let Some(l4) = l4 {
            if h.fragment {
                return Err(OffloadError::Fragment);
            }
            if h.l4 != Some(l4) {
                return Err(OffloadError::UnsupportedL4(h.ip_proto));
            }
            let end = h.l3_end.unwrap_or(frame_len).min(frame_len);
            let l4_len = end.saturating_sub(h.l4_off);
            let off = csum_field_offset(l4);
            put16(
                hdr,
                h.l4_off + usize::from(off),
                fold(pseudo_sum(hdr, &h, l4_len)),
            )?;
            meta.csum = Checksum::Partial {
                start: h.l4_off as u16,
                offset: off,
            };
        }
    }
    Ok(())
}

/// Completes a checksum in software so that the frame carries no pending checksum work: runs
/// [`finalize_tx`] for NDIS requests, then computes a `Partial` checksum and marks the frame
/// [`Checksum::Valid`]. Super-frames are refused (segment them with [`segment`] instead).
pub fn complete_checksum(frame: &mut [u8], meta: &mut FrameMeta) -> Result<(), OffloadError> {
    if meta.gso.is_some() {
        return Err(OffloadError::BadGso(
            "cannot complete the checksum of a super-frame",
        ));
    }
    if matches!(meta.csum, Checksum::Offload { .. }) {
        let len = frame.len();
        finalize_tx(frame, len, meta)?;
    }
    if let Checksum::Partial { start, offset } = meta.csum {
        let (start, offset) = (usize::from(start), usize::from(offset));
        if start + offset + 2 > frame.len() {
            return Err(OffloadError::BadCsumOffset {
                start,
                offset,
                len: frame.len(),
            });
        }
        // The checksum covers up to the end of the IP packet (not Ethernet padding).
        let end = parse(frame)
            .ok()
            .and_then(|h| h.l3_end)
            .filter(|&e| e <= frame.len() && e >= start + offset + 2)
            .unwrap_or(frame.len());
        let is_udp = offset == usize::from(UDP_CSUM_OFFSET);
        let mut c = internet_checksum(&frame[start..end]);
        if is_udp && c == 0 {
            c = 0xffff;
        }
        put16(frame, start + offset, c)?;
        meta.csum = Checksum::Valid;
    }
    Ok(())
}

/// Splits a super-frame into wire-sized frames and hands each to `out` with its metadata (no
/// `gso`; `csum` is `Valid` when `complete_csum`, else `Partial`). Works for NDIS-style and virtio
/// style metadata. A frame without `gso` is passed through (checksum completed if asked).
/// Returns the number of frames produced.
pub fn segment(
    frame: &[u8],
    meta: &FrameMeta,
    complete_csum: bool,
    out: &mut dyn FnMut(&[u8], &FrameMeta),
) -> Result<usize, OffloadError> {
    let Some(mut gso) = meta.gso else {
        if complete_csum && !matches!(meta.csum, Checksum::None | Checksum::Valid) {
            let mut copy = frame.to_vec();
            let mut m = *meta;
            complete_checksum(&mut copy, &mut m)?;
            out(&copy, &m);
        } else {
            out(frame, meta);
        }
        return Ok(1);
    };
    let n = frame.len().min(MAX_HEADERS);
    let mut hdr = [0u8; MAX_HEADERS];
    hdr[..n].copy_from_slice(&frame[..n]);
    let mut m = *meta;
    finalize_tx(&mut hdr[..n], frame.len(), &mut m)?;
    if let Some(g) = m.gso {
        gso = g;
    }
    let h = parse(&hdr[..n])?;
    let hdr_len = usize::from(gso.hdr_len);
    let hdr = &hdr[..hdr_len];
    let payload = &frame[hdr_len..];
    let mss = usize::from(gso.mss);
    let l4 = h.l4.ok_or(OffloadError::UnsupportedL4(h.ip_proto))?;
    let off = usize::from(csum_field_offset(l4));
    // TCP sequence number and flags (hdr_len covers the whole TCP header, so both are inside).
    let (seq0, flags0) = match l4 {
        L4Proto::Tcp => (
            u32::from_be_bytes([
                hdr[h.l4_off + 4],
                hdr[h.l4_off + 5],
                hdr[h.l4_off + 6],
                hdr[h.l4_off + 7],
            ]),
            hdr[h.l4_off + 13],
        ),
        L4Proto::Udp => (0, 0),
    };
    let id0 = be16(hdr, h.l3_off + 4).unwrap_or(0);
    let count = payload.len().div_ceil(mss);
    let mut seg = Vec::with_capacity(hdr_len + mss.min(payload.len()));
    for (i, chunk) in payload.chunks(mss).enumerate() {
        seg.clear();
        seg.extend_from_slice(hdr);
        seg.extend_from_slice(chunk);
        let len = seg.len();
        set_ip_len(&mut seg, &h, len)?;
        if h.l3 == Some(L3Proto::Ipv4) {
            put16(&mut seg, h.l3_off + 4, id0.wrapping_add(i as u16))?;
            set_ipv4_header_csum(&mut seg, &h)?;
        }
        match l4 {
            L4Proto::Tcp => {
                let seq = seq0.wrapping_add((i * mss) as u32);
                seg[h.l4_off + 4..h.l4_off + 8].copy_from_slice(&seq.to_be_bytes());
                let mut flags = flags0;
                if i + 1 < count {
                    flags &= !0x09; // FIN, PSH only on the last segment
                }
                if i > 0 {
                    flags &= !0x80; // CWR only on the first
                }
                seg[h.l4_off + 13] = flags;
            }
            L4Proto::Udp => {
                put16(&mut seg, h.l4_off + 4, (len - h.l4_off) as u16)?;
            }
        }
        let pseudo = fold(pseudo_sum(&seg, &h, len - h.l4_off));
        put16(&mut seg, h.l4_off + off, pseudo)?;
        let mut sm = FrameMeta {
            csum: Checksum::Partial {
                start: h.l4_off as u16,
                offset: off as u16,
            },
            gso: None,
            vlan: meta.vlan,
        };
        if complete_csum {
            complete_checksum(&mut seg, &mut sm)?;
        }
        out(&seg, &sm);
    }
    Ok(count)
}

/// Verifies the IPv4 header checksum and the TCP/UDP checksum of a complete frame. Returns
/// `Ok(true)` when every present checksum is right (a zero UDP-over-IPv4 checksum counts as right).
pub fn verify_checksums(frame: &[u8]) -> Result<bool, OffloadError> {
    let h = parse(frame)?;
    if h.l3 == Some(L3Proto::Ipv4) && internet_checksum(&frame[h.l3_off..h.l4_off]) != 0 {
        return Ok(false);
    }
    let Some(l4) = h.l4 else { return Ok(true) };
    let end = h.l3_end.unwrap_or(frame.len()).min(frame.len());
    if end < h.hdr_end() {
        return Err(OffloadError::Truncated {
            what: "transport segment",
            need: h.hdr_end(),
            have: end,
        });
    }
    if l4 == L4Proto::Udp && h.l3 == Some(L3Proto::Ipv4) && be16(frame, h.l4_off + 6) == Some(0) {
        return Ok(true);
    }
    let acc = ones_sum(&frame[h.l4_off..end], pseudo_sum(frame, &h, end - h.l4_off));
    Ok(fold(acc) == 0xffff)
}

/// Strips one in-band 802.1Q tag into the metadata (when the metadata has none), adjusting offsets.
/// Returns the untagged copy, or `None` when the frame carries no in-band tag to move.
pub fn strip_vlan(frame: &[u8], meta: &mut FrameMeta) -> Option<Vec<u8>> {
    if meta.vlan.is_some() || frame.len() < ETH_HLEN + 4 || be16(frame, 12) != Some(ETH_P_8021Q) {
        return None;
    }
    let tci = be16(frame, 14)?;
    let mut out = Vec::with_capacity(frame.len() - 4);
    out.extend_from_slice(&frame[..12]);
    out.extend_from_slice(&frame[16..]);
    meta.vlan = Some(VlanTag::from_tci(tci));
    shift_offsets(meta, -4);
    Some(out)
}

/// Moves the checksum start and GSO header length after inserting (+4) or removing (−4) a tag.
pub fn shift_offsets(meta: &mut FrameMeta, delta: i32) {
    let sh = |v: u16| (i32::from(v) + delta).clamp(0, i32::from(u16::MAX)) as u16;
    if let Checksum::Partial { start, .. } = &mut meta.csum {
        *start = sh(*start);
    }
    if let Checksum::Offload { l4_offset, .. } = &mut meta.csum {
        *l4_offset = sh(*l4_offset);
    }
    if let Some(g) = meta.gso.as_mut()
        && g.hdr_len != 0
    {
        g.hdr_len = sh(g.hdr_len);
    }
}

/// Builds the frame with the metadata's VLAN tag inserted in-band (dst, src, 0x8100, TCI, rest) and
/// clears the tag from the metadata, adjusting offsets.
pub fn insert_vlan(frame: &[u8], meta: &mut FrameMeta) -> Option<Vec<u8>> {
    let tag = meta.vlan?;
    if frame.len() < ETH_HLEN {
        return None;
    }
    let mut out = Vec::with_capacity(frame.len() + 4);
    out.extend_from_slice(&frame[..12]);
    out.extend_from_slice(&ETH_P_8021Q.to_be_bytes());
    out.extend_from_slice(&tag.tci().to_be_bytes());
    out.extend_from_slice(&frame[12..]);
    meta.vlan = None;
    shift_offsets(meta, 4);
    Some(out)
}

#[cfg(test)]
mod tests;
