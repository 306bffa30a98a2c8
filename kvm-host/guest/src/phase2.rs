//! Scenario 3: VMBus end to end — connect, offers, a SCSI disk (init, INQUIRY, READ CAPACITY,
//! write a pattern and read it back) and a NIC (NVSP, RNDIS, ARP and ping to the host's endpoint on
//! the virtual switch), then close everything and UNLOAD. Each step reports its time (from the
//! TIME_REF_COUNT MSR) as `… in <ms> ms`.

use core::fmt;

use vmbus_core::guest::{ClientEvent, OfferInfo};
use vmbus_core::wire::class;

use crate::arch::{self, SINT_VECTOR, rdmsr};
use crate::bus::Bus;
use crate::chan::{ChanError, Channel};
use crate::net::{self, Netvsc};
use crate::storage::{Storvsc, rw10};
use crate::{check, hv, mem, println};

/// Ring pages per direction (control page included): small, the emulator copies every byte.
const RING_PAGES: usize = 4;
/// Where the pattern goes on the disk, and how much (8 sectors).
const TEST_LBA: u32 = 2048;
const TEST_BYTES: u32 = 4096;
const PING_PAYLOAD: &[u8] = b"kvm-test-guest ping over netvsc";

/// Milliseconds since `t0` (TIME_REF_COUNT units of 100 ns).
struct Ms(u64);

impl fmt::Display for Ms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = rdmsr(hv::TIME_REF_COUNT).saturating_sub(self.0);
        write!(f, "{}.{} ms", d / 10_000, (d / 1000) % 10)
    }
}

fn now() -> u64 {
    rdmsr(hv::TIME_REF_COUNT)
}

fn class_name(o: &OfferInfo) -> &'static str {
    if o.class_id == class::SCSI {
        "scsi"
    } else if o.class_id == class::NETWORK {
        "network"
    } else {
        "other"
    }
}

fn text(b: &[u8]) -> &str {
    core::str::from_utf8(b).unwrap_or("?").trim_end()
}

fn fail(step: &str, e: ChanError) {
    check(step, false, format_args!("{e}"));
}

pub fn run() {
    mem::init();
    let t = now();
    let hc = hv::enable_hypercalls();
    arch::enable_lapic();
    hv::enable_synic(SINT_VECTOR);
    check(
        "hv-setup",
        hc && rdmsr(hv::SCONTROL) == 1,
        format_args!(
            "hypercall page + SynIC (SINT2 vector 0x{SINT_VECTOR:x}) in {}",
            Ms(t)
        ),
    );

    let mut bus = Bus::new();
    let t = now();
    if bus.client.connect().is_err() {
        check(
            "vmbus-connect",
            false,
            format_args!("client refused to connect"),
        );
        return;
    }
    match bus.wait(|e| {
        matches!(
            e,
            ClientEvent::Connected { .. } | ClientEvent::ConnectFailed
        )
    }) {
        ClientEvent::Connected {
            version,
            msg_conn_id,
        } => check(
            "vmbus-connect",
            true,
            format_args!("version {version} msg_conn_id {msg_conn_id} in {}", Ms(t)),
        ),
        _ => {
            check(
                "vmbus-connect",
                false,
                format_args!("host refused every version"),
            );
            return;
        }
    }

    let t = now();
    if bus.client.request_offers().is_err() {
        check("vmbus-offers", false, format_args!("REQUESTOFFERS refused"));
        return;
    }
    bus.wait(|e| matches!(e, ClientEvent::AllOffersDelivered));
    let offers: alloc::vec::Vec<OfferInfo> = bus.client.offers().copied().collect();
    for o in &offers {
        println!(
            "offer relid={} class={} ({}) instance={} conn=0x{:x}",
            o.relid,
            class_name(o),
            o.class_id,
            o.instance_id,
            o.connection_id
        );
    }
    check(
        "vmbus-offers",
        !offers.is_empty(),
        format_args!("{} offer(s) in {}", offers.len(), Ms(t)),
    );

    let mut open = alloc::vec::Vec::new();
    match offers.iter().find(|o| o.class_id == class::SCSI) {
        Some(o) => {
            if let Some(ch) = storage(&mut bus, o) {
                open.push(ch);
            }
        }
        None => check("storage-open", false, format_args!("no SCSI offer")),
    }
    match offers.iter().find(|o| o.class_id == class::NETWORK) {
        Some(o) => {
            if let Some(ch) = network(&mut bus, o) {
                open.push(ch);
            }
        }
        None => check("net-open", false, format_args!("no network offer")),
    }

    let t = now();
    let n = open.len();
    let mut closed = true;
    for ch in open {
        closed &= ch.close(&mut bus).is_ok();
    }
    let unloaded = bus.client.unload().is_ok()
        && matches!(
            bus.wait(|e| matches!(e, ClientEvent::Unloaded)),
            ClientEvent::Unloaded
        );
    check(
        "vmbus-teardown",
        closed && unloaded,
        format_args!(
            "{n} channel(s) closed, GPADLs torn down, UNLOAD answered in {}",
            Ms(t)
        ),
    );
    println!(
        "stats posts={} host-messages={} post-retries={} refused={} heap-used={}",
        bus.posted,
        bus.received,
        bus.retried,
        bus.refused,
        mem::used()
    );
}

/// Opens the SCSI controller, runs the checks; returns the channel for teardown.
fn storage(bus: &mut Bus, o: &OfferInfo) -> Option<Channel> {
    let t = now();
    let ch = match Channel::open(bus, o, RING_PAGES) {
        Ok(ch) => ch,
        Err(e) => {
            fail("storage-open", e);
            return None;
        }
    };
    check(
        "storage-open",
        true,
        format_args!(
            "relid {} ring {}+{} pages in {}",
            o.relid,
            RING_PAGES,
            RING_PAGES,
            Ms(t)
        ),
    );
    let mut s = Storvsc::new(ch);
    if let Err(e) = scsi_steps(&mut s) {
        fail("storage-io", e);
    }
    Some(s.ch)
}

fn scsi_steps(s: &mut Storvsc) -> Result<(), ChanError> {
    let t = now();
    s.init()?;
    check(
        "storvsc-init",
        true,
        format_args!(
            "vstor {:?} max transfer {} KiB in {}",
            s.version,
            s.max_transfer / 1024,
            Ms(t)
        ),
    );

    let buf = mem::pages(2).ok_or(ChanError::NoMemory)?;
    let t = now();
    let r = s.command(&[0x12, 0, 0, 0, 36, 0], true, Some((buf, 36)))?;
    let mut inq = [0u8; 36];
    mem::read(buf, &mut inq);
    check(
        "scsi-inquiry",
        r.ok() && inq[0] & 0x1F == 0,
        format_args!(
            "type {} vendor \"{}\" product \"{}\" rev \"{}\" in {}",
            inq[0] & 0x1F,
            text(&inq[8..16]),
            text(&inq[16..32]),
            text(&inq[32..36]),
            Ms(t)
        ),
    );

    let t = now();
    let r = s.command(&[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], true, Some((buf, 8)))?;
    let mut cap = [0u8; 8];
    mem::read(buf, &mut cap);
    let last = u32::from_be_bytes([cap[0], cap[1], cap[2], cap[3]]);
    let block = u32::from_be_bytes([cap[4], cap[5], cap[6], cap[7]]);
    let bytes = (u64::from(last) + 1) * u64::from(block);
    check(
        "scsi-read-capacity",
        r.ok() && block == 512 && last >= TEST_LBA + 8,
        format_args!(
            "{} blocks of {} bytes ({} MiB) in {}",
            u64::from(last) + 1,
            block,
            bytes >> 20,
            Ms(t)
        ),
    );

    let wbuf = buf;
    let rbuf = buf + 4096;
    let mut pattern = [0u8; TEST_BYTES as usize];
    let seed = (now() & 0xFF) as u8;
    for (i, b) in pattern.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8;
    }
    mem::write(wbuf, &pattern);
    let blocks = (TEST_BYTES / 512) as u16;
    let t = now();
    let r = s.command(
        &rw10(true, TEST_LBA, blocks),
        false,
        Some((wbuf, TEST_BYTES)),
    )?;
    check(
        "disk-write",
        r.ok() && r.transferred == TEST_BYTES,
        format_args!(
            "{} bytes at LBA {} (seed {}) in {}",
            r.transferred,
            TEST_LBA,
            seed,
            Ms(t)
        ),
    );

    mem::write(rbuf, &[0xA5; TEST_BYTES as usize]);
    let t = now();
    let r = s.command(
        &rw10(false, TEST_LBA, blocks),
        true,
        Some((rbuf, TEST_BYTES)),
    )?;
    let mut back = [0u8; TEST_BYTES as usize];
    mem::read(rbuf, &mut back);
    let same = back == pattern;
    check(
        "disk-read-verify",
        r.ok() && r.transferred == TEST_BYTES && same,
        format_args!(
            "{} bytes read back, pattern matches={} in {}",
            r.transferred,
            same,
            Ms(t)
        ),
    );
    Ok(())
}

/// Opens the NIC, runs the checks; returns the channel for teardown.
fn network(bus: &mut Bus, o: &OfferInfo) -> Option<Channel> {
    let t = now();
    let ch = match Channel::open(bus, o, RING_PAGES) {
        Ok(ch) => ch,
        Err(e) => {
            fail("net-open", e);
            return None;
        }
    };
    check(
        "net-open",
        true,
        format_args!(
            "relid {} ring {}+{} pages in {}",
            o.relid,
            RING_PAGES,
            RING_PAGES,
            Ms(t)
        ),
    );
    let mut n = match Netvsc::new(ch) {
        Ok(n) => n,
        Err(e) => {
            fail("nvsp-init", e);
            return None;
        }
    };
    if let Err(e) = net_steps(bus, &mut n) {
        fail("net-io", e);
    }
    Some(n.ch)
}

fn net_steps(bus: &mut Bus, n: &mut Netvsc) -> Result<(), ChanError> {
    let t = now();
    n.init(bus)?;
    check(
        "nvsp-init",
        true,
        format_args!(
            "NVSP 0x{:x}, receive buffer {} KiB in {}",
            n.version,
            net::RECV_PAGES * 4,
            Ms(t)
        ),
    );

    let t = now();
    let mac = n.rndis_up()?;
    check(
        "rndis-init",
        true,
        format_args!(
            "mac {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x} in {}",
            mac[0],
            mac[1],
            mac[2],
            mac[3],
            mac[4],
            mac[5],
            Ms(t)
        ),
    );

    let t = now();
    n.send_frame(&net::arp_request(mac, net::PEER_IP))?;
    let reply = n.recv_frame(16, |f| net::arp_reply_from(f, net::PEER_IP).is_some())?;
    let peer = net::arp_reply_from(&reply, net::PEER_IP).unwrap_or([0; 6]);
    check(
        "net-arp",
        true,
        format_args!(
            "10.0.0.1 is at {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x} in {}",
            peer[0],
            peer[1],
            peer[2],
            peer[3],
            peer[4],
            peer[5],
            Ms(t)
        ),
    );

    let t = now();
    let (id, seq) = (0x4b56, 1);
    n.send_frame(&net::echo_request(mac, peer, id, seq, PING_PAYLOAD))?;
    let got = n.recv_frame(16, |f| net::is_echo_reply(f, id, seq, PING_PAYLOAD));
    check(
        "net-ping",
        got.is_ok(),
        format_args!(
            "echo reply from 10.0.0.1, {} bytes, {} rx packets, link status 0x{:x} in {}",
            PING_PAYLOAD.len(),
            n.rx_packets,
            n.last_status.unwrap_or(0),
            Ms(t)
        ),
    );
    Ok(())
}
