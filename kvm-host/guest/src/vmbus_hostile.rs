//! Scenario 4: a guest that misuses VMBus. Malformed channel messages, a GPADL outside its RAM,
//! OPENCHANNELs the host must refuse, a corrupted ring index, a signal flood and an UNLOAD with a
//! channel open — after each, the host must still serve it (the storage controller re-opens and
//! answers), and the partition keeps running.

use alloc::format;

use vmbus_core::guest::{ClientEvent, OfferInfo, OpenParams};
use vmbus_core::wire::class;
use vsc_guest::storvsc::Cdb;

use crate::bus::Bus;
use crate::chan::{self, Error};
use crate::phase2::{Ms, connect, now};
use crate::storage::Storage;
use crate::{check, hv, mem};

const RING_PAGES: usize = 4;

fn ok_or_fail(step: &str, r: Result<alloc::string::String, Error>) {
    match r {
        Ok(detail) => check(step, true, format_args!("{detail}")),
        Err(e) => check(step, false, format_args!("{e}")),
    }
}

/// Waits `ms` milliseconds of reference time (lets the host act on something unanswered).
fn pause(ms: u64) {
    let end = now() + ms * 10_000;
    while now() < end {
        core::hint::spin_loop();
    }
}

/// GPADL_CREATED status of a GPADL over `pfns` (the client itself does not check the pages).
fn gpadl_status(bus: &mut Bus, relid: u32, pfns: &[u64]) -> Result<(u32, u32), Error> {
    let h = bus
        .client
        .create_gpadl(relid, pfns)
        .map_err(|e| format!("{e}"))?;
    match bus.wait(|e| matches!(e, ClientEvent::GpadlCreated { handle, .. } if *handle == h)) {
        ClientEvent::GpadlCreated { status, .. } => Ok((h, status)),
        e => Err(format!("{e:?}")),
    }
}

fn open_status(bus: &mut Bus, relid: u32, p: OpenParams) -> Result<u32, Error> {
    bus.client
        .open_channel(relid, p)
        .map_err(|e| format!("{e}"))?;
    match bus.wait(|e| matches!(e, ClientEvent::OpenResult { relid: r, .. } if *r == relid)) {
        ClientEvent::OpenResult { status, .. } => Ok(status),
        e => Err(format!("{e:?}")),
    }
}

/// The storage controller works: init and READ CAPACITY(10) on a freshly opened channel.
fn storage_works(bus: &mut Bus, o: &OfferInfo) -> Result<(u32, u32, u64), Error> {
    let opened = chan::open(bus, o, RING_PAGES)?;
    let ids = (opened.relid, opened.ring_gpadl);
    let mut s = Storage::new(opened)?;
    s.init()?;
    let buf = mem::pages(1).ok_or("out of memory")?;
    let cdb = Cdb::from_bytes(&[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0]).ok_or("CDB")?;
    let c = s.run(
        vsc_guest::storvsc::ScsiAddress::new(0, 0, 0),
        cdb,
        Some((vsc_guest::storvsc::Direction::In, buf, 8)),
        false,
        7,
    )?;
    c.result().map_err(|e| format!("READ CAPACITY: {e}"))?;
    let mut cap = [0u8; 4];
    mem::read(buf, &mut cap);
    Ok((ids.0, ids.1, u64::from(u32::from_be_bytes(cap)) + 1))
}

pub fn run() {
    let Some((mut bus, offers)) = connect() else {
        return;
    };
    let Some(stor) = offers.iter().find(|o| o.class_id == class::SCSI).copied() else {
        check("garbage-messages", false, format_args!("no SCSI offer"));
        return;
    };

    // Malformed channel messages: an unknown type, a truncated OPENCHANNEL, a host-to-guest
    // OFFERCHANNEL. The post itself succeeds; the server drops them.
    let t = now();
    let mut junk = [0u8; 200];
    junk[0] = 0xEE;
    let a = hv::post_message(1, &junk[..16]);
    let b = hv::post_message(1, &[5, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]);
    junk[0] = 1;
    let c = hv::post_message(1, &junk);
    let r = gpadl_status(&mut bus, stor.relid, &[0x300, 0x301]).and_then(|(h, st)| {
        bus.client
            .teardown_gpadl(stor.relid, h)
            .map_err(|e| format!("{e}"))?;
        bus.wait(|e| matches!(e, ClientEvent::GpadlTorndown { handle } if *handle == h));
        if (a, b, c, st) == (0, 0, 0, 0) {
            Ok(format!(
                "3 posts accepted and dropped, bus still answers in {}",
                Ms(t)
            ))
        } else {
            Err(format!(
                "posts 0x{a:x} 0x{b:x} 0x{c:x}, next GPADL status 0x{st:x}"
            ))
        }
    });
    ok_or_fail("garbage-messages", r);

    let t = now();
    let r = gpadl_status(&mut bus, stor.relid, &[0x40_0000, 0x40_0001]).and_then(|(_, st)| {
        (st != 0)
            .then(|| format!("GPADL_CREATED status 0x{st:x} in {}", Ms(t)))
            .ok_or_else(|| "GPADL over pages beyond RAM accepted".into())
    });
    ok_or_fail("gpadl-outside-ram", r);

    // A valid ring GPADL, opened with a downstream offset of 1 (no room for a control page and
    // a data page on the way up) and then with a VP that does not exist.
    let ring = mem::pages(2 * RING_PAGES).unwrap_or(0);
    let pfns: alloc::vec::Vec<u64> = (0..2 * RING_PAGES as u64)
        .map(|i| ring / 4096 + i)
        .collect();
    let t = now();
    let r = gpadl_status(&mut bus, stor.relid, &pfns).and_then(|(h, st)| {
        if st != 0 {
            return Err(format!("ring GPADL refused: 0x{st:x}"));
        }
        let bad_offset = open_status(&mut bus, stor.relid, OpenParams::new(h, 1, 0))?;
        let bad_vp = open_status(
            &mut bus,
            stor.relid,
            OpenParams::new(h, RING_PAGES as u32, 7),
        )?;
        bus.client
            .teardown_gpadl(stor.relid, h)
            .map_err(|e| format!("{e}"))?;
        bus.wait(|e| matches!(e, ClientEvent::GpadlTorndown { handle } if *handle == h));
        if bad_offset != 0 && bad_vp != 0 {
            Ok(format!(
                "offset 1 -> 0x{bad_offset:x}, target VP 7 -> 0x{bad_vp:x} in {}",
                Ms(t)
            ))
        } else {
            Err(format!(
                "accepted: offset 0x{bad_offset:x}, vp 0x{bad_vp:x}"
            ))
        }
    });
    ok_or_fail("open-refused", r);

    // Open for real, then corrupt our ring's write index and signal: the device finds a broken
    // ring; the channel still closes cleanly.
    let t = now();
    let r = chan::open(&mut bus, &stor, RING_PAGES).and_then(|o| {
        use ringbuf::RingMem;
        o.up.control(ringbuf::ControlWord::WriteIndex)
            .store(0x7FFF_FFF1, core::sync::atomic::Ordering::SeqCst);
        let st = hv::signal_event(o.connection_id, 0);
        pause(20);
        chan::close(&mut bus, o.relid, o.ring_gpadl)?;
        Ok(format!(
            "write_index 0x7ffffff1 signalled (0x{st:x}), channel closed in {}",
            Ms(t)
        ))
    });
    ok_or_fail("ring-corruption", r);

    let t = now();
    let mut open = None;
    let r = storage_works(&mut bus, &stor).map(|(relid, gpadl, blocks)| {
        open = Some((relid, gpadl));
        format!(
            "re-opened, storvsc init + READ CAPACITY ({blocks} blocks) in {}",
            Ms(t)
        )
    });
    ok_or_fail("reopen-after-corruption", r);

    let t = now();
    let conn = stor.connection_id;
    let bad = (0..200).filter(|_| hv::signal_event(conn, 0) != 0).count();
    check(
        "signal-flood",
        bad == 0 && open.is_some(),
        format_args!("200 HvSignalEvents, {bad} refused, in {}", Ms(t)),
    );

    let t = now();
    let unloaded = bus.client.unload().is_ok()
        && matches!(
            bus.wait(|e| matches!(e, ClientEvent::Unloaded)),
            ClientEvent::Unloaded
        );
    let after = hv::signal_event(conn, 0);
    check(
        "unload-with-open-channel",
        unloaded && after == 0x12,
        format_args!(
            "UNLOAD answered, the channel's port is gone (0x{after:x}) in {}",
            Ms(t)
        ),
    );
}
