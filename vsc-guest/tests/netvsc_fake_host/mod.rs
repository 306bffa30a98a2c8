//! A scripted fake host for the netvsc driver: it reads what the driver queues, checks it, and
//! answers the way the reference (§3.3, §3.9) says a host does — replies written into the receive
//! buffer and announced by transfer-page packets.
#![allow(dead_code, clippy::unwrap_used)]

use std::sync::Arc;
use vmbus_core::memory::{GuestMemory, MemoryError, VecMemory};
use vsc_guest::netvsc::{
    BufferKind, DmaRegion, DriverState, HostPacket, NO_RESPONSE_TRANS_ID, Netvsc, NetvscConfig,
    NetvscError, NetvscEvent, OutKind, OutPacket,
};

pub const RECV: DmaRegion = DmaRegion::new(0x10_0000, 0x10_0000);
pub const SEND: DmaRegion = DmaRegion::new(0x20_0000, 0x4_0000);
pub const CONTROL: DmaRegion = DmaRegion::new(0x24_0000, 0x4000);
pub const BOUNCE: DmaRegion = DmaRegion::new(0x25_0000, 2 * 68 * 1024);
pub const MEM: usize = 0x30_0000;
pub const SUB: u32 = 1806;
pub const MAC: [u8; 6] = [0x00, 0x15, 0x5d, 0xaa, 0xbb, 0xcc];

#[derive(Clone)]
pub struct Mem(pub Arc<VecMemory>);

impl GuestMemory for Mem {
    fn read_at(&self, gpa: u64, dst: &mut [u8]) -> Result<(), MemoryError> {
        self.0.read_at(gpa, dst)
    }
    fn write_at(&self, gpa: u64, src: &[u8]) -> Result<(), MemoryError> {
        self.0.write_at(gpa, src)
    }
}

/// Little-endian u32 words.
pub fn words(w: &[u32]) -> Vec<u8> {
    w.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// `w` padded to the 40-byte NVSP message Linux sends.
pub fn nvsp40(w: &[u32]) -> Vec<u8> {
    let mut v = words(w);
    v.resize(40, 0);
    v
}

pub fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

pub struct FakeHost {
    pub mem: Mem,
    /// Next receive sub-allocation to write into.
    pub section: u32,
    pub next_trans: u64,
}

impl FakeHost {
    pub fn new() -> (Self, Netvsc<Mem>) {
        Self::with_config(|_| {})
    }

    pub fn with_config(tweak: impl FnOnce(&mut NetvscConfig)) -> (Self, Netvsc<Mem>) {
        let mem = Mem(Arc::new(VecMemory::new(MEM)));
        let mut cfg = NetvscConfig::linux(RECV, SEND, CONTROL, Some(BOUNCE));
        tweak(&mut cfg);
        let drv = Netvsc::new(cfg, mem.clone()).unwrap();
        (
            FakeHost {
                mem,
                section: 0,
                next_trans: 0x1000,
            },
            drv,
        )
    }

    /// The next packet the driver queued on `q` (panics when there is none).
    pub fn take(&self, drv: &mut Netvsc<Mem>, q: u16) -> OutPacket {
        drv.pop_transmit(q).expect("the driver queued a packet")
    }

    /// Sends a completion with `payload` for `trans_id`.
    pub fn complete(
        &self,
        drv: &mut Netvsc<Mem>,
        trans_id: u64,
        payload: &[u8],
    ) -> Result<(), NetvscError> {
        drv.handle_packet(
            0,
            &HostPacket {
                packet_type: ringbuf::PacketType::Completion,
                trans_id,
                completion_requested: false,
                transfer: None,
                payload,
            },
        )
    }

    /// Takes an RNDIS control request: checks the NVSP wrapper (GPA direct, one range from a
    /// control page, channel type control, no section) and returns the RNDIS bytes; completes
    /// the send.
    pub fn rndis_request(&self, drv: &mut Netvsc<Mem>) -> Vec<u8> {
        let p = self.take(drv, 0);
        assert!(p.completion_requested);
        assert_eq!(p.payload, nvsp40(&[107, 1, 0xFFFF_FFFF, 0]));
        let OutKind::GpaDirect(ranges) = &p.kind else {
            panic!("control request not GPA direct: {p:?}")
        };
        assert_eq!(ranges.len(), 1);
        let r = ranges[0];
        let gpa = r.pfn * 4096 + u64::from(r.offset);
        assert!((CONTROL.gpa..CONTROL.gpa + CONTROL.len).contains(&gpa));
        let mut msg = vec![0u8; r.len as usize];
        self.mem.read_at(gpa, &mut msg).unwrap();
        assert_eq!(
            u32_at(&msg, 4) as usize,
            msg.len(),
            "msg_len = range length"
        );
        self.complete(drv, p.trans_id, &words(&[108, 1])).unwrap();
        msg
    }

    /// Writes `msgs` into receive sections and announces them in one transfer-page packet on
    /// `q` with the given set id; returns the driver's verdict and checks its completion.
    pub fn deliver_on(
        &mut self,
        drv: &mut Netvsc<Mem>,
        q: u16,
        set_id: u16,
        msgs: &[&[u8]],
        channel_type: u32,
    ) -> Result<(), NetvscError> {
        let mut ranges = Vec::new();
        for m in msgs {
            let off = (self.section % 64) * SUB;
            self.section += 1;
            self.mem.write_at(RECV.gpa + u64::from(off), m).unwrap();
            ranges.push((off, m.len() as u32));
        }
        self.transfer(drv, q, set_id, &ranges, channel_type)
    }

    /// A transfer-page packet with raw ranges; checks the completion the driver sends back.
    pub fn transfer(
        &mut self,
        drv: &mut Netvsc<Mem>,
        q: u16,
        set_id: u16,
        ranges: &[(u32, u32)],
        channel_type: u32,
    ) -> Result<(), NetvscError> {
        let trans_id = self.next_trans;
        self.next_trans += 1;
        let mut payload = words(&[107, channel_type, 0xFFFF_FFFF, 0]);
        payload.resize(40, 0);
        let r = drv.handle_packet(
            q,
            &HostPacket {
                packet_type: ringbuf::PacketType::TransferPages,
                trans_id,
                completion_requested: true,
                transfer: Some((set_id, ranges)),
                payload: &payload,
            },
        );
        // Exactly one completion, on the same queue, whatever happened.
        let c = drv.pop_transmit(q).expect("transfer-page packet completed");
        assert_eq!(c.kind, OutKind::Completion);
        assert_eq!(c.trans_id, trans_id);
        let status = if r.is_ok() { 1 } else { 2 };
        assert_eq!(c.payload, words(&[108, status]));
        r
    }

    pub fn deliver(&mut self, drv: &mut Netvsc<Mem>, msg: &[u8]) -> Result<(), NetvscError> {
        self.deliver_on(drv, 0, 0xCAFE, &[msg], 1)
    }
}

/// An RNDIS message: type, msg_len, body words, then raw bytes.
pub fn rndis(ty: u32, body: &[u32], tail: &[u8]) -> Vec<u8> {
    let len = 8 + body.len() * 4 + tail.len();
    let mut v = words(&[ty, len as u32]);
    v.extend(words(body));
    v.extend_from_slice(tail);
    v
}

/// QUERY_CMPLT with `info` at offset 16.
pub fn query_cmplt(req: u32, status: u32, info: &[u8]) -> Vec<u8> {
    rndis(0x8000_0004, &[req, status, info.len() as u32, 16], info)
}

pub fn set_cmplt(req: u32, status: u32) -> Vec<u8> {
    rndis(0x8000_0005, &[req, status], &[])
}

/// The `ndis_offload` OpenVMM reports (checksums, LSO v2 62780 bytes, revision 3, 156 bytes).
pub fn offload_caps() -> Vec<u8> {
    let mut v = vec![0u8; 156];
    v[..4].copy_from_slice(&[0xA7, 3, 156, 0]);
    let put =
        |v: &mut Vec<u8>, off: usize, x: u32| v[off..off + 4].copy_from_slice(&x.to_le_bytes());
    // csum @4: ip4 tx encap, ip4 tx, ip4 rx encap, ip4 rx, ip6 ×4.
    for (i, x) in [2, 0x155, 2, 0x155, 2, 0x55, 2, 0x55]
        .into_iter()
        .enumerate()
    {
        put(&mut v, 4 + 4 * i, x);
    }
    // LSO v2 @80.
    for (i, x) in [2, 62780, 2, 2, 62780, 2, 5].into_iter().enumerate() {
        put(&mut v, 80 + 4 * i, x);
    }
    v
}

/// Runs the whole bring-up with `queues` wanted (the host offers 8 RSS queues); returns the
/// events the driver produced.
pub fn bring_up(h: &mut FakeHost, drv: &mut Netvsc<Mem>, queues: u16) -> Vec<NetvscEvent> {
    let mut events = Vec::new();
    let drain = |drv: &mut Netvsc<Mem>, events: &mut Vec<NetvscEvent>| {
        while let Some(e) = drv.poll_event() {
            events.push(e);
        }
    };
    drv.start().unwrap();
    // INIT 6.1: refused (after a too-short completion, which Linux ignores).
    let p = h.take(drv, 0);
    assert_eq!(p.kind, OutKind::InBand);
    assert!(p.completion_requested);
    assert_eq!(p.payload, nvsp40(&[1, 0x0006_0001, 0x0006_0001]));
    assert!(matches!(
        h.complete(drv, p.trans_id, &words(&[2, 0xFFFF_FFFF, 34, 1])),
        Err(NetvscError::ShortCompletion { .. })
    ));
    let mut refuse = words(&[2, 0xFFFF_FFFF, 34, 2]);
    refuse.resize(28, 0);
    h.complete(drv, p.trans_id, &refuse).unwrap();
    // INIT 6: granted.
    let p = h.take(drv, 0);
    assert_eq!(p.payload, nvsp40(&[1, 0x0006_0000, 0x0006_0000]));
    let mut ok = words(&[2, 0xFFFF_FFFF, 34, 1]);
    ok.resize(28, 0);
    h.complete(drv, p.trans_id, &ok).unwrap();
    // SEND_NDIS_CONFIG: MTU 1514, 802.1Q + SR-IOV + teaming (no RSC below 6.1); no completion.
    let p = h.take(drv, 0);
    assert_eq!(p.payload, nvsp40(&[125, 1514, 0, 0x2C, 0]));
    assert!(!p.completion_requested);
    assert_eq!(p.trans_id, NO_RESPONSE_TRANS_ID);
    // SEND_NDIS_VER 6.30.
    let p = h.take(drv, 0);
    assert_eq!(p.payload, nvsp40(&[100, 6, 30]));
    assert!(!p.completion_requested);
    assert!(drv.pop_transmit(0).is_none());
    // Receive buffer: GPADL first, then SEND_RECV_BUF id 0xCAFE.
    drain(drv, &mut events);
    assert_eq!(
        events.last(),
        Some(&NetvscEvent::CreateGpadl {
            buffer: BufferKind::Receive,
            pfns: RECV.pfns()
        })
    );
    drv.gpadl_created(BufferKind::Receive, 0xE1E10).unwrap();
    let p = h.take(drv, 0);
    assert_eq!(p.payload, nvsp40(&[101, 0xE1E10, 0xCAFE]));
    assert!(p.completion_requested);
    let count = (RECV.len / u64::from(SUB)) as u32;
    let mut c = words(&[102, 1, 1, 0, SUB, count, SUB * count]);
    c.resize(28, 0);
    h.complete(drv, p.trans_id, &c).unwrap();
    // Send buffer id 0.
    drain(drv, &mut events);
    assert_eq!(
        events.last(),
        Some(&NetvscEvent::CreateGpadl {
            buffer: BufferKind::Send,
            pfns: SEND.pfns()
        })
    );
    drv.gpadl_created(BufferKind::Send, 0xE1E11).unwrap();
    let p = h.take(drv, 0);
    assert_eq!(p.payload, nvsp40(&[104, 0xE1E11, 0]));
    h.complete(drv, p.trans_id, &nvsp40(&[105, 1, 6144]))
        .unwrap();
    // RNDIS INITIALIZE (req 1, version 1.0, max transfer 0x4000).
    let m = h.rndis_request(drv);
    assert_eq!(m, words(&[2, 24, 1, 1, 0, 0x4000]));
    h.deliver(
        drv,
        &rndis(
            0x8000_0002,
            &[1, 0, 1, 0, 1, 0, 8, 0xEFFF_FFFF, 3, 0, 0],
            &[],
        ),
    )
    .unwrap();
    // Queries in Linux's order, each answered.
    let q = |req: u32, oid: u32, info: &[u8]| {
        let mut v = words(&[
            4,
            (28 + info.len()) as u32,
            req,
            oid,
            info.len() as u32,
            20,
            0,
        ]);
        v.extend_from_slice(info);
        v
    };
    assert_eq!(h.rndis_request(drv), q(2, 0x0001_0106, &[]));
    h.deliver(drv, &query_cmplt(2, 0, &1500u32.to_le_bytes()))
        .unwrap();
    assert_eq!(h.rndis_request(drv), q(3, 0x0101_0101, &[]));
    h.deliver(drv, &query_cmplt(3, 0, &MAC)).unwrap();
    assert_eq!(h.rndis_request(drv), q(4, 0x0002_0216, &[]));
    h.deliver(drv, &query_cmplt(4, 0, &[b'N', 0, b'e', 0, b't', 0, 0, 0]))
        .unwrap();
    let mut caps_req = vec![0u8; 156];
    caps_req[..4].copy_from_slice(&[0xA7, 3, 156, 0]);
    assert_eq!(h.rndis_request(drv), q(5, 0xFC01_020D, &caps_req));
    h.deliver(drv, &query_cmplt(5, 0, &offload_caps())).unwrap();
    // TCP_OFFLOAD_PARAMETERS: IPv4 header checksum off, TCP/UDP v4/v6 TX+RX, LSO v2 both.
    let params = [
        0x80, 3, 28, 0, 1, 4, 4, 4, 4, 0, 0, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    let mut set = words(&[5, 56, 6, 0xFC01_020C, 28, 20, 0]);
    set.extend_from_slice(&params);
    assert_eq!(h.rndis_request(drv), set);
    h.deliver(drv, &set_cmplt(6, 0)).unwrap();
    assert_eq!(h.rndis_request(drv), q(7, 0x0001_0114, &[]));
    h.deliver(drv, &query_cmplt(7, 0, &0u32.to_le_bytes()))
        .unwrap();
    assert_eq!(h.rndis_request(drv), q(8, 0x0001_0107, &[]));
    h.deliver(drv, &query_cmplt(8, 0, &100_000_000u32.to_le_bytes()))
        .unwrap();
    let mut rss_req = vec![0u8; 18];
    rss_req[..4].copy_from_slice(&[0x88, 2, 18, 0]);
    assert_eq!(h.rndis_request(drv), q(9, 0x0001_0203, &rss_req));
    let mut rss = vec![0x88, 2, 18, 0];
    rss.extend(words(&[0, 0, 8]));
    rss.extend(128u16.to_le_bytes());
    h.deliver(drv, &query_cmplt(9, 0, &rss)).unwrap();
    let mut next_req = 10;
    if queues > 1 {
        let p = h.take(drv, 0);
        assert_eq!(p.payload, nvsp40(&[133, 1, u32::from(queues) - 1]));
        assert!(p.completion_requested);
        let mut c = words(&[133, 1, u32::from(queues) - 1]);
        c.resize(28, 0);
        h.complete(drv, p.trans_id, &c).unwrap();
        drain(drv, &mut events);
        assert_eq!(
            events.last(),
            Some(&NetvscEvent::OpenSubchannels { count: queues - 1 })
        );
        for i in 1..queues {
            drv.subchannel_opened(i).unwrap();
        }
        // RSS parameters twice: disabled, then enabled; 128 entries `i mod queues`, Linux key.
        for (flags, req) in [(0x10u32, 10u32), (0, 11)] {
            let m = h.rndis_request(drv);
            assert_eq!(m[..28], words(&[5, 620, req, 0x0001_0204, 592, 20, 0])[..]);
            let p = &m[28..];
            assert_eq!(p[..4], [0x89, 2, 40, 0]);
            assert_eq!(u32_at(p, 4), flags);
            assert_eq!(u32_at(p, 8), 0x1701);
            assert_eq!(u32_at(p, 12), 512);
            assert_eq!(u32_at(p, 16), 40);
            assert_eq!(u32_at(p, 20), 40);
            assert_eq!(u32_at(p, 24), 552);
            for i in 0..128 {
                assert_eq!(u32_at(p, 40 + 4 * i), i as u32 % u32::from(queues));
            }
            assert_eq!(p[552..556], [0x6d, 0x5a, 0x56, 0xda]);
            h.deliver(drv, &set_cmplt(req, 0)).unwrap();
        }
        next_req = 12;
    }
    // ifup: packet filter directed + all-multicast + broadcast.
    let mut f = words(&[5, 32, next_req, 0x0001_010E, 4, 20, 0]);
    f.extend(words(&[0x0D]));
    assert_eq!(h.rndis_request(drv), f);
    h.deliver(drv, &set_cmplt(next_req, 0)).unwrap();
    drain(drv, &mut events);
    assert_eq!(drv.state(), DriverState::Ready);
    events
}
