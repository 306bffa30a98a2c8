//! Scenario 3: VMBus end to end — connect, offers, a SCSI disk through vsc-guest's storvsc (init,
//! the Linux probe with INQUIRY and READ CAPACITY, write a pattern and read it back) and a NIC
//! through vsc-guest's netvsc (NVSP, buffers, RNDIS bring-up, ARP and ping to the host's endpoint on
//! the virtual switch), then close everything and UNLOAD. Each step reports its time (from the
//! TIME_REF_COUNT MSR) as `… in <ms> ms`.

use core::fmt;

use vmbus_core::guest::{ClientEvent, OfferInfo};
use vmbus_core::wire::class;

use crate::arch::{self, SINT_VECTOR, rdmsr};
use crate::bus::Bus;
use crate::chan::{self, Error};
use crate::frames;
use crate::net::Net;
use crate::storage::Storage;
use crate::{check, hv, mem, println};

/// Ring pages per direction (control page included): small, the emulator copies every byte.
const RING_PAGES: usize = 4;
/// Where the pattern goes on the disk, and how much (8 sectors).
const TEST_LBA: u32 = 2048;
const TEST_BYTES: u32 = 4096;
const PING_PAYLOAD: &[u8] = b"kvm-test-guest ping over netvsc";

/// Milliseconds since `t0` (TIME_REF_COUNT units of 100 ns).
pub struct Ms(pub u64);

impl fmt::Display for Ms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        Dur(rdmsr(hv::TIME_REF_COUNT).saturating_sub(self.0)).fmt(f)
    }
}

/// A duration in TIME_REF_COUNT units, shown in milliseconds.
struct Dur(u64);

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{} ms", self.0 / 10_000, (self.0 / 1000) % 10)
    }
}

/// The reference counter (100 ns units).
pub fn now() -> u64 {
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

fn fail(step: &str, e: Error) {
    check(step, false, format_args!("{e}"));
}

/// Hypercalls, SynIC, VMBus connect and offers (steps `hv-setup`, `vmbus-connect`,
/// `vmbus-offers`). `None` when a step failed.
pub fn connect() -> Option<(Bus, alloc::vec::Vec<OfferInfo>)> {
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
        return None;
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
            return None;
        }
    }

    let t = now();
    if bus.client.request_offers().is_err() {
        check("vmbus-offers", false, format_args!("REQUESTOFFERS refused"));
        return None;
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
    Some((bus, offers))
}

pub fn run() {
    let Some((mut bus, offers)) = connect() else {
        return;
    };
    // (relid, ring GPADL) of every channel opened, for the teardown.
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
    for (relid, gpadl) in open {
        closed &= chan::close(&mut bus, relid, gpadl).is_ok();
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

/// Opens the SCSI controller and runs the checks; returns (relid, ring GPADL) for the teardown.
fn storage(bus: &mut Bus, o: &OfferInfo) -> Option<(u32, u32)> {
    let t = now();
    let opened = match chan::open(bus, o, RING_PAGES) {
        Ok(c) => c,
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
    let ids = (opened.relid, opened.ring_gpadl);
    match Storage::new(opened) {
        Ok(mut s) => {
            if let Err(e) = scsi_steps(&mut s) {
                fail("storage-io", e);
            }
        }
        Err(e) => fail("storvsc-init", e),
    }
    Some(ids)
}

fn scsi_steps(s: &mut Storage) -> Result<(), Error> {
    let t = now();
    let n = s.init()?;
    check(
        "storvsc-init",
        true,
        format_args!(
            "vstor {:?}, max transfer {} KiB, {} sub-channel(s) in {}",
            n.version,
            n.max_transfer_bytes / 1024,
            n.subchannels,
            Ms(t)
        ),
    );

    let t = now();
    let (luns, times) = s.probe(&n)?;
    let lun = luns.iter().find(|l| l.is_disk());
    check(
        "scsi-probe",
        lun.is_some(),
        format_args!(
            "{} LUN(s) at 0:0, {} commands in {}",
            luns.len(),
            times.commands,
            Ms(t)
        ),
    );
    let lun = lun.ok_or("no disk found by the probe")?;
    let q = &lun.inquiry;
    check(
        "scsi-inquiry",
        q.device_type == 0,
        format_args!(
            "type {} vendor \"{}\" product \"{}\" rev \"{}\", {} VPD pages in {}",
            q.device_type,
            text(&q.vendor),
            text(&q.product),
            text(&q.revision),
            lun.vpd_pages.len(),
            Dur(times.inquiry)
        ),
    );
    let cap = lun.capacity.ok_or("no capacity")?;
    check(
        "scsi-read-capacity",
        cap.block_size == 512 && cap.blocks() > u64::from(TEST_LBA) + 8,
        format_args!(
            "{} blocks of {} bytes ({} MiB) in {}",
            cap.blocks(),
            cap.block_size,
            (cap.blocks() * u64::from(cap.block_size)) >> 20,
            Dur(times.read_capacity)
        ),
    );
    let disk = vsc_guest::storvsc::Disk::from_lun(lun, n.max_transfer_bytes, n.version)
        .map_err(|e| alloc::format!("disk: {e}"))?;

    let buf = mem::pages(2).ok_or("out of memory")?;
    let (wbuf, rbuf) = (buf, buf + 4096);
    let mut pattern = [0u8; TEST_BYTES as usize];
    let seed = (now() & 0xFF) as u8;
    for (i, b) in pattern.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8;
    }
    mem::write(wbuf, &pattern);
    let t = now();
    let wrote = s.io(&disk, true, u64::from(TEST_LBA), wbuf, TEST_BYTES, 1)?;
    check(
        "disk-write",
        wrote == TEST_BYTES,
        format_args!("{wrote} bytes at LBA {TEST_LBA} (seed {seed}) in {}", Ms(t)),
    );

    mem::write(rbuf, &[0xA5; TEST_BYTES as usize]);
    let t = now();
    let read = s.io(&disk, false, u64::from(TEST_LBA), rbuf, TEST_BYTES, 2)?;
    let mut back = [0u8; TEST_BYTES as usize];
    mem::read(rbuf, &mut back);
    let same = back == pattern;
    check(
        "disk-read-verify",
        read == TEST_BYTES && same,
        format_args!(
            "{read} bytes read back, pattern matches={same} in {}",
            Ms(t)
        ),
    );
    let st = s.drv.stats();
    println!(
        "storvsc stats submitted={} completed={} refused={}",
        st.submitted, st.completed, s.refused
    );
    Ok(())
}

/// Opens the NIC and runs the checks; returns (relid, ring GPADL) for the teardown.
fn network(bus: &mut Bus, o: &OfferInfo) -> Option<(u32, u32)> {
    let t = now();
    let opened = match chan::open(bus, o, RING_PAGES) {
        Ok(c) => c,
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
    let ids = (opened.relid, opened.ring_gpadl);
    match Net::new(opened) {
        Ok(mut n) => {
            if let Err(e) = net_steps(bus, &mut n) {
                fail("net-io", e);
            }
        }
        Err(e) => fail("netvsc-bringup", e),
    }
    Some(ids)
}

fn mac_str(m: [u8; 6]) -> alloc::string::String {
    alloc::format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0],
        m[1],
        m[2],
        m[3],
        m[4],
        m[5]
    )
}

fn net_steps(bus: &mut Bus, n: &mut Net) -> Result<(), Error> {
    let t = now();
    n.bring_up(bus)?;
    let i = n.drv.info();
    check(
        "netvsc-bringup",
        true,
        format_args!(
            "NVSP 0x{:x}, {} receive sections of {} B, {} send sections of {} B, mac {}, mtu {:?}, link {} in {}",
            i.nvsp_version,
            i.recv_section_count,
            i.recv_section_size,
            i.send_section_count,
            i.send_section_size,
            mac_str(i.mac),
            i.host_mtu,
            if i.link_up { "up" } else { "down" },
            Ms(t)
        ),
    );
    let mac = i.mac;

    let t = now();
    n.send(&frames::arp_request(mac, frames::PEER_IP))?;
    let reply = n.recv(16, |f| frames::arp_reply_from(f, frames::PEER_IP).is_some())?;
    let peer = frames::arp_reply_from(&reply.data, frames::PEER_IP).unwrap_or([0; 6]);
    check(
        "net-arp",
        true,
        format_args!("10.0.0.1 is at {} in {}", mac_str(peer), Ms(t)),
    );

    let t = now();
    let (id, seq) = (0x4b56, 1);
    n.send(&frames::echo_request(mac, peer, id, seq, PING_PAYLOAD))?;
    let got = n.recv(16, |f| frames::is_echo_reply(f, id, seq, PING_PAYLOAD));
    let st = n.drv.stats();
    check(
        "net-ping",
        got.is_ok(),
        format_args!(
            "echo reply from 10.0.0.1, {} payload bytes in {}",
            PING_PAYLOAD.len(),
            Ms(t)
        ),
    );
    println!("netvsc stats {st:?} refused={}", n.refused);
    Ok(())
}
