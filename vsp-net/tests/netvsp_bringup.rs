//! The Linux 6.1 `hv_netvsc` bring-up sequence against netvsp, every reply byte-checked against
//! the reference (vmbus-devices.md §3.3, §3.6, §3.8, §3.9, §3.10).
#![allow(clippy::unwrap_used)]

mod netvsp_guest;

use netvsp_guest::*;
use ringbuf::PacketType;
use vmbus_core::devices::nvsp::{self, NvspMessage, version};
use vmbus_core::devices::rndis::ndis::*;
use vmbus_core::devices::rndis::{self, oid, status};
use vsp_net::backend::MemoryBackend;
use vsp_net::netvsp::NetvspConfig;
use zerocopy::{FromBytes, IntoBytes};

fn words(b: &[u8]) -> Vec<u32> {
    b.chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn init(v: u32) -> NvspMessage {
    NvspMessage::Init(nvsp::Init {
        min_protocol_version: v,
        max_protocol_version: v,
    })
}

#[test]
fn linux_version_negotiation_against_an_older_host() {
    let (b, h) = MemoryBackend::new(MAC, 8);
    let cfg = NetvspConfig {
        max_nvsp_version: version::V5,
        ..NetvspConfig::default()
    };
    let mut g = Guest::new(cfg, b, h);
    g.open(0);
    // Linux tries 6.1 then 6 then 5: the first two fail (FAIL = 2), 5 succeeds.
    let r = g.nvsp_reply(init(version::V61));
    assert_eq!(r.len(), 40, "6.1-sized reply to a 6.1 INIT");
    assert_eq!(words(&r), [2, u32::MAX, 34, 2, 0, 0, 0, 0, 0, 0]);
    let r = g.nvsp_reply(init(version::V6));
    assert_eq!(r.len(), 32, "28 bytes padded to 8");
    assert_eq!(words(&r[..16]), [2, u32::MAX, 34, 2]);
    let r = g.nvsp_reply(init(version::V5));
    assert_eq!(words(&r[..16]), [2, u32::MAX, 34, 1]);
    assert!(r[16..].iter().all(|&b| b == 0));
    assert_eq!(g.dev.nvsp_version(), Some(version::V5));
    // A second successful INIT is refused.
    let r = g.nvsp_reply(init(version::V5));
    assert_eq!(words(&r[..16])[3], nvsp::status::FAIL);
    assert_eq!(g.dev.nvsp_version(), Some(version::V5));
}

#[test]
fn every_linux_version_is_granted() {
    for v in version::LINUX_ORDER {
        let mut g = Guest::default_pair();
        g.connect(v, 64, 3);
        assert_eq!(g.dev.nvsp_version(), Some(v));
        // Version 1 is answered with the legacy value in the deprecated field.
        let mut g = Guest::default_pair();
        g.open(0);
        let r = g.nvsp_reply(init(v));
        let want_ver = if v == version::V1 { 2 } else { u32::MAX };
        assert_eq!(words(&r[..16]), [2, want_ver, 34, 1], "{v:#x}");
        assert_eq!(r.len(), if v == version::V61 { 40 } else { 32 });
    }
}

#[test]
fn linux_61_bring_up_byte_exact() {
    let (b, h) = MemoryBackend::new(MAC, 64);
    let mut g = Guest::new(NetvspConfig::default(), b, h);
    g.open(0);

    // 1. INIT 6.1 → INIT_COMPLETE {deprecated 0xFFFFFFFF, max MDL 34, SUCCESS}, 40 bytes.
    let r = g.nvsp_reply(init(version::V61));
    assert_eq!(words(&r), [2, u32::MAX, 34, 1, 0, 0, 0, 0, 0, 0]);
    g.version = version::V61;

    // 2. SEND_NDIS_CONFIG (MTU 1514, caps 0xAC) and 3. SEND_NDIS_VER 6.30: no completion asked,
    // nothing comes back.
    let cfg = NvspMessage::SendNdisConfig(nvsp::SendNdisConfig {
        mtu: 1514,
        reserved: 0,
        capabilities: 0xAC,
    });
    assert!(g.nvsp(cfg, false).is_empty());
    let ver = NvspMessage::SendNdisVersion(nvsp::SendNdisVersion {
        ndis_major_version: 6,
        ndis_minor_version: 0x1E,
    });
    assert!(g.nvsp(ver, false).is_empty());

    // 4. Receive buffer: 16 MiB, id 0xCAFE → one section of 1806-byte sub-allocations.
    let (h, pfn) = g.gpadl(4096);
    let r = g.nvsp_reply(NvspMessage::SendReceiveBuffer(nvsp::SendBuffer {
        gpadl_handle: h,
        id: 0xCAFE,
    }));
    let count = 16_777_216 / 1806;
    assert_eq!(
        words(&r),
        [102, 1, 1, 0, 1806, count, 1806 * count, 0, 0, 0]
    );
    // Linux's checks: one section at offset 0, sub-allocation >= 68, size × count <= buffer.
    assert!(1806 * count <= 16_777_216);
    g.recv_buf = Some((pfn, 4096 * 4096));

    // 5. Send buffer: 1 044 480 bytes (255 pages), id 0 → section size 6144.
    let (h, spfn) = g.gpadl(255);
    let r = g.nvsp_reply(NvspMessage::SendSendBuffer(nvsp::SendBuffer {
        gpadl_handle: h,
        id: 0,
    }));
    assert_eq!(words(&r), [105, 1, 6144, 0, 0, 0, 0, 0, 0, 0]);
    g.send_buf = Some((spfn, 255 * 4096, 6144));

    // 6. RNDIS INITIALIZE (req 1, max transfer 0x4000) → INITIALIZE_CMPLT, 52 bytes.
    let r = g.rndis(&rndis::initialize_request(1, 0x4000)).unwrap();
    assert_eq!(
        words(&r),
        [0x8000_0002, 52, 1, 0, 1, 0, 1, 0, 8, 0xEFFF_FFFF, 3, 0, 0]
    );

    // 7. The OID queries Linux makes, in its order.
    let (st, data, raw) = g.query(oid::GEN_MAXIMUM_FRAME_SIZE, &[]);
    assert_eq!((st, words(&data)), (0, vec![1500]));
    assert_eq!(words(&raw[..24]), [0x8000_0004, 28, g.next_req, 0, 4, 16]);

    let (st, data, _) = g.query(oid::_802_3_PERMANENT_ADDRESS, &[]);
    assert_eq!(
        (st, data),
        (0, MAC.to_vec()),
        "exactly 6 bytes (Linux refuses more)"
    );

    let (st, data, raw) = g.query(oid::GEN_FRIENDLY_NAME, &[]);
    assert_eq!((st, data.len(), raw.len()), (status::NOT_SUPPORTED, 0, 24));

    // Hardware offload capabilities: Linux sends an ndis_offload header rev 3 / size 156.
    let probe = Offload {
        header: ObjectHeader {
            ty: 0xA7,
            revision: 3,
            size: 156,
        },
        ..Offload::default()
    };
    let (st, data, _) = g.query(oid::TCP_OFFLOAD_HARDWARE_CAPABILITIES, probe.as_bytes());
    assert_eq!(st, 0);
    assert_eq!(data.len(), 156);
    let caps = Offload::read_from_bytes(&data).unwrap();
    assert_eq!(
        (caps.header.ty, caps.header.revision, { caps.header.size }),
        (0xA7, 3, 156)
    );
    // What Linux derives from it (rndis_netdev_set_hwcaps).
    let (c, l) = (caps.csum, caps.lsov2);
    assert_eq!({ c.ip4_tx_csum } & 0x14, 0x14, "IPv4 TCP checksum");
    assert_ne!({ c.ip4_tx_csum } & 0x40, 0, "IPv4 UDP checksum");
    assert_ne!({ l.ip4_encap } & 2, 0, "TSO");
    assert_eq!({ c.ip6_tx_csum } & 0x15, 0x15, "IPv6 TCP checksum");
    assert_ne!({ l.ip6_encap } & 2, 0);
    assert_eq!({ l.ip6_options } & 5, 5, "TSO6");
    assert_eq!(({ l.ip4_max_size }, { l.ip6_max_size }), (62780, 62780));
    assert_eq!(
        (caps.rsc.ip4, caps.rsc.ip6),
        (0, 0),
        "no LRO: receive frames are not coalesced"
    );

    // SET TCP_OFFLOAD_PARAMETERS as Linux builds it.
    let params = OffloadParams {
        header: ObjectHeader {
            ty: 0x80,
            revision: 3,
            size: 28,
        },
        ip4_csum: 1,
        tcp4_csum: 4,
        udp4_csum: 4,
        tcp6_csum: 4,
        udp6_csum: 4,
        lsov2_ip4: 2,
        lsov2_ip6: 2,
        ..OffloadParams::default()
    };
    assert_eq!(g.set(oid::TCP_OFFLOAD_PARAMETERS, params.as_bytes()), 0);

    let (st, data, _) = g.query(oid::GEN_MEDIA_CONNECT_STATUS, &[]);
    assert_eq!((st, words(&data)), (0, vec![0]), "0 = connected");
    let (st, data, _) = g.query(oid::GEN_LINK_SPEED, &[]);
    assert_eq!((st, words(&data)), (0, vec![100_000_000]));

    // RSS capabilities: Linux sends an 18-byte header and accepts 18 bytes back.
    let probe = RecvScaleCapabilities {
        header: ObjectHeader {
            ty: 0x88,
            revision: 2,
            size: 18,
        },
        ..Default::default()
    };
    let (st, data, _) = g.query(oid::GEN_RECEIVE_SCALE_CAPABILITIES, probe.as_bytes());
    assert_eq!(st, 0);
    assert_eq!(data.len(), 18);
    let rc = RecvScaleCapabilities::read_from_bytes(&data).unwrap();
    assert_eq!(
        (rc.header.ty, rc.header.revision, { rc.header.size }),
        (0x88, 2, 18)
    );
    assert_eq!(
        ({ rc.num_receive_queues }, { rc.num_indirection_entries }),
        (8, 128)
    );

    // 8. Sub-channels: Linux asks for n − 1 = 3 (4 vCPUs) and waits for the offers.
    let r = g.nvsp_reply(NvspMessage::SubchannelRequest(nvsp::SubchannelRequest {
        operation: 1,
        num_subchannels: 3,
    }));
    assert_eq!(words(&r), [133, 1, 3, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(*g.offers.0.lock().unwrap(), [3]);
    for i in 1..=3 {
        g.open(i);
    }
    g.pump();
    // Once all sub-channels are open: the send indirection table, in-band on the primary.
    let got = g.take();
    assert_eq!(got.len(), 1, "{got:?}");
    let t = &got[0];
    assert_eq!(
        (t.queue, t.ty, t.trans_id, t.completion_requested),
        (0, PacketType::InBand, 0, false)
    );
    assert_eq!(t.payload.len(), 80, "76 bytes padded to 8");
    let table = nvsp::indirection_table(&t.payload[..76], version::V61).unwrap();
    assert_eq!(table, std::array::from_fn(|i| (i % 4) as u32));
    assert_eq!(&t.payload[..12], &[134, 0, 0, 0, 16, 0, 0, 0, 12, 0, 0, 0]);

    // RSS parameters: first disable, then the real table (128 entries i % 4) and key.
    for flags in [rss_flags::DISABLE_RSS, 0] {
        let p = RecvScaleParameters {
            header: ObjectHeader {
                ty: 0x89,
                revision: 2,
                size: 40,
            },
            flags,
            hash_info: hash_info::LINUX,
            indirection_table_size: 512,
            indirection_table_offset: 40,
            hash_key_size: 40,
            hash_key_offset: 552,
            ..Default::default()
        };
        let mut info = p.as_bytes().to_vec();
        for i in 0..128u32 {
            info.extend_from_slice(&(i % 4).to_le_bytes());
        }
        info.extend_from_slice(&LINUX_RSS_KEY);
        assert_eq!(g.set(oid::GEN_RECEIVE_SCALE_PARAMETERS, &info), 0);
    }

    // ifup: packet filter 0x0D.
    assert_eq!(
        g.set(oid::GEN_CURRENT_PACKET_FILTER, &0x0Du32.to_le_bytes()),
        0
    );

    // Frames now reach the guest, spread over the 4 queues by the Toeplitz hash.
    for port in 0..32u16 {
        let mut f = tcp4_frame(MAC, 10);
        f[34..36].copy_from_slice(&(1000 + port).to_be_bytes());
        assert!(g.backend.inject(&f, Default::default()));
    }
    let frames = g.receive_frames();
    assert_eq!(frames.len(), 32);
    let mut per_queue = [0; 4];
    for (q, f, info) in &frames {
        per_queue[*q as usize] += 1;
        let hash = info.hash.expect("RSS hash PPI");
        assert_eq!(u32::from(*q), hash % 128 % 4, "queue = table[hash % 128]");
        assert_eq!(
            vsp_net::netvsp::toeplitz_hash(&LINUX_RSS_KEY, &[&f[26..34], &f[34..38]].concat()),
            hash
        );
    }
    assert!(per_queue.iter().all(|&n| n > 0), "{per_queue:?}");

    // Link changes follow the backend: MEDIA_DISCONNECT, then MEDIA_CONNECT.
    for (up, st) in [
        (false, status::MEDIA_DISCONNECT),
        (true, status::MEDIA_CONNECT),
    ] {
        g.backend.set_link(up);
        g.pump();
        let got = g.take();
        assert_eq!(got.len(), 1);
        g.check_control_packet(&got[0]);
        let (off, len) = got[0].ranges[0];
        let m = g.read_range(off, len);
        assert_eq!(words(&m), [7, 20, st, 0, 12]);
        g.complete_rx(&got[0]);
    }

    // HALT: no reply; afterwards data is not forwarded.
    assert_eq!(g.rndis(&rndis::halt_request(99)), None);
    assert_eq!(g.dev.stats().bad_packets, 0);
    g.pump();
    let (free, outstanding) = g.dev.receive_buffer_state().unwrap();
    assert_eq!(
        (free, outstanding),
        (count as usize, 0),
        "every section came back"
    );
}

#[test]
fn keepalive_reset_unknown_oids_and_mac_change() {
    let mut g = Guest::default_pair();
    g.bring_up();
    let r = g.rndis(&rndis::keepalive_request(77)).unwrap();
    assert_eq!(words(&r), [0x8000_0008, 16, 77, 0]);
    let r = g
        .rndis(&[6u32.to_le_bytes(), 12u32.to_le_bytes(), 0u32.to_le_bytes()].concat())
        .unwrap();
    assert_eq!(words(&r), [0x8000_0006, 16, 0, 0]);
    let (st, data, raw) = g.query(0x0102_0304, &[]);
    assert_eq!((st, data.len(), raw.len()), (status::NOT_SUPPORTED, 0, 24));
    assert_eq!(g.set(0x0102_0304, &[1, 2, 3, 4]), status::NOT_SUPPORTED);
    // A second INITIALIZE fails gently.
    let r = g.rndis(&rndis::initialize_request(5, 0x4000)).unwrap();
    assert_eq!(words(&r)[3], status::FAILURE);
    // GEN_RNDIS_CONFIG_PARAMETER "NetworkAddress" as Linux sends for `ip link set address`.
    let mut info = ConfigParameterInfo {
        name_offset: 20,
        name_length: 28,
        param_type: 2,
        value_offset: 48,
        value_length: 24,
    }
    .as_bytes()
    .to_vec();
    for c in "NetworkAddress".bytes().chain("020000aabbcc".bytes()) {
        info.extend_from_slice(&[c, 0]);
    }
    assert_eq!(g.set(oid::GEN_RNDIS_CONFIG_PARAMETER, &info), 0);
    let (_, cur, _) = g.query(oid::_802_3_CURRENT_ADDRESS, &[]);
    assert_eq!(cur, [2, 0, 0, 0xaa, 0xbb, 0xcc]);
    let (_, perm, _) = g.query(oid::_802_3_PERMANENT_ADDRESS, &[]);
    assert_eq!(perm, MAC);
    // Frames to the new address pass the filter; to the old one they do not.
    g.backend.inject(
        &tcp4_frame([2, 0, 0, 0xaa, 0xbb, 0xcc], 4),
        Default::default(),
    );
    g.backend.inject(&tcp4_frame(MAC, 4), Default::default());
    assert_eq!(g.receive_frames().len(), 1);
    assert_eq!(g.dev.stats().rx_filtered, 1);
}

#[test]
fn friendly_name_and_old_versions() {
    let (b, h) = MemoryBackend::new(MAC, 8);
    let cfg = NetvspConfig {
        friendly_name: Some("uplink0".into()),
        ..NetvspConfig::default()
    };
    let mut g = Guest::new(cfg, b, h);
    g.connect(version::V4, 64, 3);
    let id = g.req_id();
    assert!(g.rndis(&rndis::initialize_request(id, 0x4000)).is_some());
    let (st, name, _) = g.query(oid::GEN_FRIENDLY_NAME, &[]);
    assert_eq!(st, 0);
    let units: Vec<u16> = name
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    assert_eq!(
        String::from_utf16(&units).unwrap(),
        "uplink0\0",
        "NUL-terminated for ucs2_as_utf8"
    );
    // NVSP 4: offload capabilities revision 2, 144 bytes.
    let (_, caps, _) = g.query(oid::TCP_OFFLOAD_HARDWARE_CAPABILITIES, &[]);
    assert_eq!(caps.len(), 144);
    assert_eq!(&caps[..4], &[0xA7, 2, 144, 0]);
    // NVSP 4 has no sub-channels.
    let r = g.nvsp_reply(NvspMessage::SubchannelRequest(nvsp::SubchannelRequest {
        operation: 1,
        num_subchannels: 1,
    }));
    assert_eq!(words(&r[..12]), [133, 2, 0]);
    // NVSP 1: revision 1, 112 bytes; NDIS config is not part of v1.
    let mut g = Guest::default_pair();
    g.connect(version::V1, 64, 3);
    let id = g.req_id();
    g.rndis(&rndis::initialize_request(id, 0x4000)).unwrap();
    let (_, caps, _) = g.query(oid::TCP_OFFLOAD_HARDWARE_CAPABILITIES, &[]);
    assert_eq!(&caps[..4], &[0xA7, 1, 112, 0]);
}
