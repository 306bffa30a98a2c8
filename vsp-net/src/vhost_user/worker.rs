//! What a queue-pair worker does on a kick or when the port has frames: TX chains to the port,
//! port frames into RX buffers (mergeable or not), control commands.

use std::sync::atomic::{AtomicU64, Ordering};

use tracing::{debug, warn};
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard};
use zerocopy::IntoBytes;
use zerocopy::little_endian::U16;

use super::chain::{self, Mem, WritableBuf};
use super::config::feat;
use super::ctrl::{self, CtrlCommand, CtrlError, CtrlFeatures};
use super::device::{NetStats, PairState, VhostUserNet, lock, port_event};
use super::hdr::{self, MAX_FRAME};
use crate::tap::offload;
use crate::tap::vnet::VirtioNetHdr;
use crate::tap::{Checksum, FrameMeta, GsoKind};

type Vring = VringRwLock<GuestMemoryAtomic<Mem>>;
type Guard = GuestMemoryLoadGuard<Mem>;

/// Local vring indexes of a worker: RX, TX, then (worker 0) control.
const RX: u16 = 0;
const TX: u16 = 1;
const CTRL: u16 = 2;

fn ready(v: &Vring) -> bool {
    let s = v.get_ref();
    s.is_enabled() && s.get_queue().ready()
}

fn pop(v: &Vring, mem: &Guard) -> Option<virtio_queue::DescriptorChain<Guard>> {
    v.get_mut()
        .get_queue_mut()
        .pop_descriptor_chain(mem.clone())
}

/// Publishes used entries and interrupts the driver if it asked for it.
fn complete(v: &Vring, mem: &Mem, elems: &[(u16, u32)]) {
    if elems.is_empty() {
        return;
    }
    let signal = {
        let mut s = v.get_mut();
        let q = s.get_queue_mut();
        let old = q.next_used();
        if let Err(e) = chain::publish_used(mem, q, elems) {
            warn!(error = %e, "vhost-user-net: cannot write the used ring");
            return;
        }
        chain::needs_signal(mem, q, old)
    };
    if signal && let Err(e) = v.signal_used_queue() {
        debug!(error = %e, "vhost-user-net: call eventfd");
    }
}

fn count(a: &AtomicU64) -> u64 {
    a.fetch_add(1, Ordering::Relaxed) + 1
}

/// A hostile driver can produce bad chains at line rate: log the first ones, then every time the
/// count doubles (the counters have the full numbers).
fn noisy(n: u64) -> bool {
    n <= 16 || n.is_power_of_two()
}

impl VhostUserNet {
    pub(crate) fn dispatch(&self, ev: u16, vrings: &[Vring], worker: usize) {
        let Some(mem) = self.memory() else {
            return;
        };
        let mem = mem.memory();
        let (Some(rx), Some(tx)) = (vrings.get(usize::from(RX)), vrings.get(usize::from(TX)))
        else {
            return;
        };
        match ev {
            TX => {
                self.process_tx(&mem, tx, worker);
                // Frames the TX just caused (a reply from the switch) go out in the same wakeup.
                self.pump_rx(&mem, rx, worker);
            }
            CTRL if worker == 0 => {
                if let Some(c) = vrings.get(usize::from(CTRL)) {
                    self.process_ctrl(&mem, c);
                }
            }
            RX => self.pump_rx(&mem, rx, worker),
            e if e == port_event(2 * self.pairs.len() + 1) => self.pump_rx(&mem, rx, worker),
            _ => {}
        }
    }

    fn process_tx(&self, mem: &Guard, tx: &Vring, worker: usize) {
        if !ready(tx) {
            return;
        }
        let acked = self.acked();
        let Some(pair) = self.pairs.get(worker) else {
            return;
        };
        let mut st = lock(pair);
        let hl = hdr::hdr_len(acked);
        loop {
            let _ = tx.disable_notification();
            let mut used = Vec::new();
            while let Some(c) = pop(tx, mem) {
                let head = c.head_index();
                used.push((head, 0));
                let r = chain::walk(c, mem, &mut st.scratch, hl + MAX_FRAME, 0);
                if let Err(e) = r {
                    let n = count(&self.stats.tx_bad);
                    if noisy(n) {
                        warn!(head, error = %e, total = n, "vhost-user-net: bad TX chain dropped");
                    }
                    continue;
                }
                match hdr::parse_tx(&st.scratch, acked) {
                    Ok((meta, frame)) => {
                        let len = frame.len() as u64;
                        match self.port.lock().send(frame, &meta) {
                            Ok(()) => {
                                count(&self.stats.tx_frames);
                                NetStats::add(&self.stats.tx_bytes, len);
                            }
                            Err(e) => {
                                count(&self.stats.tx_dropped);
                                debug!(error = %e, "vhost-user-net: port refused a frame");
                            }
                        }
                    }
                    Err(e) => {
                        let n = count(&self.stats.tx_bad);
                        if noisy(n) {
                            warn!(head, error = %e, total = n, "vhost-user-net: bad TX frame dropped");
                        }
                    }
                }
                if used.len() >= 64 {
                    complete(tx, mem, &used);
                    used.clear();
                }
            }
            complete(tx, mem, &used);
            // Another chain may have arrived after the last pop: loop until notifications are
            // back on with nothing pending.
            match tx.enable_notification() {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    warn!(error = %e, "vhost-user-net: TX queue unreadable");
                    break;
                }
            }
        }
    }

    /// Moves frames from the port into RX buffers until the port is empty or the driver has no
    /// buffer left; then the frame in hand is kept (not dropped) and reading stops until the
    /// driver adds buffers (its kick lands here).
    fn pump_rx(&self, mem: &Guard, rx: &Vring, worker: usize) {
        if !ready(rx) {
            return;
        }
        let Some(pair) = self.pairs.get(worker) else {
            return;
        };
        let acked = self.acked();
        let mut st = lock(pair);
        let mut used: Vec<(u16, u32)> = Vec::new();
        loop {
            if st.backlog.is_empty() {
                let backlog = &mut st.backlog;
                let r = self
                    .port
                    .lock()
                    .recv(&mut |f, m| backlog.push_back((f.to_vec(), *m)));
                match r {
                    Ok(true) if !st.backlog.is_empty() => {}
                    Ok(_) => break,
                    Err(e) => {
                        // The port re-signals while frames remain; come back on that.
                        count(&self.stats.rx_dropped);
                        debug!(error = %e, "vhost-user-net: port receive failed");
                        break;
                    }
                }
            }
            match self.deliver(mem, rx, &mut st, acked, &mut used) {
                Deliver::Done => {}
                Deliver::Dropped => {
                    count(&self.stats.rx_dropped);
                }
                Deliver::NoBuffers => {
                    complete(rx, mem, &used);
                    used.clear();
                    match rx.enable_notification() {
                        Ok(true) => continue,
                        _ => {
                            count(&self.stats.rx_stalls);
                            break;
                        }
                    }
                }
            }
            if used.len() >= 64 {
                complete(rx, mem, &used);
                used.clear();
            }
        }
        complete(rx, mem, &used);
    }

    fn deliver(
        &self,
        mem: &Guard,
        rx: &Vring,
        st: &mut PairState,
        acked: u64,
        used: &mut Vec<(u16, u32)>,
    ) -> Deliver {
        let Some((mut frame, mut meta)) = st.backlog.pop_front() else {
            return Deliver::Done;
        };
        // Transform in place once; a frame put back for lack of buffers keeps the result.
        if let Some(tagged) = offload::insert_vlan(&frame, &mut meta) {
            frame = tagged;
        }
        if let Some(g) = meta.gso {
            let ok = match g.kind {
                GsoKind::TcpV4 => acked & feat::GUEST_TSO4 != 0,
                GsoKind::TcpV6 => acked & feat::GUEST_TSO6 != 0,
                GsoKind::UdpL4 => false,
            };
            if !ok || (g.ecn && acked & feat::GUEST_ECN == 0) {
                debug!(?g, "vhost-user-net: super-frame the driver did not accept");
                return Deliver::Dropped;
            }
        }
        if matches!(meta.csum, Checksum::Partial { .. })
            && acked & feat::GUEST_CSUM == 0
            && offload::complete_checksum(&mut frame, &mut meta).is_err()
        {
            return Deliver::Dropped;
        }
        let r = self.place(mem, rx, st, acked, used, &frame, &meta);
        if matches!(r, Deliver::NoBuffers) {
            st.backlog.push_front((frame, meta));
        }
        r
    }

    /// Writes one frame into staged/popped RX buffers.
    #[allow(clippy::too_many_arguments)]
    fn place(
        &self,
        mem: &Guard,
        rx: &Vring,
        st: &mut PairState,
        acked: u64,
        used: &mut Vec<(u16, u32)>,
        frame: &[u8],
        meta: &FrameMeta,
    ) -> Deliver {
        let mrg = acked & feat::MRG_RXBUF != 0;
        let hl = hdr::hdr_len(acked);
        let total = hl + frame.len();
        // Stage buffers until the frame fits (one buffer without MRG_RXBUF).
        loop {
            let have: usize = st.staged.iter().map(|b| b.cap).sum();
            if (mrg && have >= total) || (!mrg && !st.staged.is_empty()) {
                break;
            }
            let Some(c) = pop(rx, mem) else {
                return Deliver::NoBuffers;
            };
            let head = c.head_index();
            match chain::walk(c, mem, &mut st.scratch, 0, MAX_FRAME + 64) {
                Ok(b) if b.cap >= hl => st.staged.push(b),
                Ok(_) => {
                    let n = count(&self.stats.rx_bad);
                    if noisy(n) {
                        warn!(
                            head,
                            total = n,
                            "vhost-user-net: RX buffer smaller than the header"
                        );
                    }
                    used.push((head, 0));
                }
                Err(e) => {
                    let n = count(&self.stats.rx_bad);
                    if noisy(n) {
                        warn!(head, error = %e, total = n, "vhost-user-net: bad RX chain");
                    }
                    used.push((head, 0));
                }
            }
        }
        let mut h = VirtioNetHdr::from_meta(meta);
        if !mrg {
            if st.staged[0].cap < total {
                debug!(
                    len = frame.len(),
                    cap = st.staged[0].cap,
                    "frame larger than the RX buffer"
                );
                return Deliver::Dropped;
            }
            h.num_buffers = U16::new(1);
            let b = st.staged.remove(0);
            return self.fill(mem, &b, &h.as_bytes()[..hl], frame, used);
        }
        let mut n = 0;
        let mut have = 0;
        while have < total {
            have += st.staged[n].cap;
            n += 1;
        }
        h.num_buffers = U16::new(n as u16);
        let bufs: Vec<WritableBuf> = st.staged.drain(..n).collect();
        let hb = h.as_bytes();
        let mut off = 0usize;
        let data_len = frame.len();
        let mut mine = Vec::with_capacity(n);
        for (i, b) in bufs.iter().enumerate() {
            let parts: [&[u8]; 2] = if i == 0 {
                [&hb[..hl], &frame[..(b.cap - hl).min(data_len)]]
            } else {
                let end = (off + b.cap).min(data_len);
                [&[], &frame[off..end]]
            };
            let len = parts[0].len() + parts[1].len();
            if let Err(e) = chain::write_into(mem, b, 0, &parts) {
                warn!(error = %e, "vhost-user-net: RX buffer vanished");
                // Every buffer of this frame goes back empty, each once.
                used.extend(bufs.iter().map(|b| (b.head, 0)));
                return Deliver::Dropped;
            }
            off += parts[1].len();
            mine.push((b.head, len as u32));
        }
        used.extend(mine);
        count(&self.stats.rx_frames);
        NetStats::add(&self.stats.rx_bytes, data_len as u64);
        Deliver::Done
    }

    fn fill(
        &self,
        mem: &Guard,
        b: &WritableBuf,
        h: &[u8],
        frame: &[u8],
        used: &mut Vec<(u16, u32)>,
    ) -> Deliver {
        match chain::write_into(mem, b, 0, &[h, frame]) {
            Ok(n) => {
                used.push((b.head, n as u32));
                count(&self.stats.rx_frames);
                NetStats::add(&self.stats.rx_bytes, frame.len() as u64);
                Deliver::Done
            }
            Err(e) => {
                warn!(error = %e, "vhost-user-net: RX buffer vanished");
                used.push((b.head, 0));
                Deliver::Dropped
            }
        }
    }

    fn process_ctrl(&self, mem: &Guard, cq: &Vring) {
        if !ready(cq) {
            return;
        }
        let mut buf = Vec::new();
        loop {
            let mut used = Vec::new();
            while let Some(c) = pop(cq, mem) {
                let head = c.head_index();
                let ack = match chain::walk(c, mem, &mut buf, ctrl::MAX_CTRL_LEN, 4096) {
                    Ok(w) if w.cap >= 1 => w,
                    Ok(_) => {
                        let n = count(&self.stats.ctrl_err);
                        if noisy(n) {
                            warn!(
                                head,
                                total = n,
                                "vhost-user-net: control chain without an ack byte"
                            );
                        }
                        used.push((head, 0));
                        continue;
                    }
                    Err(e) => {
                        let n = count(&self.stats.ctrl_err);
                        if noisy(n) {
                            warn!(head, error = %e, total = n, "vhost-user-net: bad control chain");
                        }
                        used.push((head, 0));
                        continue;
                    }
                };
                let status = match self.apply_ctrl(&buf) {
                    Ok(()) => {
                        count(&self.stats.ctrl_ok);
                        ctrl::VIRTIO_NET_OK
                    }
                    Err(e) => {
                        let n = count(&self.stats.ctrl_err);
                        if noisy(n) {
                            warn!(error = %e, total = n, "vhost-user-net: control command refused");
                        }
                        ctrl::VIRTIO_NET_ERR
                    }
                };
                let n = chain::write_into(mem, &ack, 0, &[&[status]]).unwrap_or(0);
                used.push((head, n as u32));
            }
            complete(cq, mem, &used);
            if !matches!(cq.enable_notification(), Ok(true)) {
                break;
            }
        }
    }

    fn apply_ctrl(&self, buf: &[u8]) -> Result<(), CtrlError> {
        let acked = self.acked();
        let f = CtrlFeatures {
            rx: acked & feat::CTRL_RX != 0,
            rx_extra: acked & feat::CTRL_RX_EXTRA != 0,
            mac_addr: acked & feat::CTRL_MAC_ADDR != 0,
            mq: acked & feat::MQ != 0,
        };
        let cmd = ctrl::parse(buf, f)?;
        debug!(?cmd, "vhost-user-net control command");
        let mut s = lock(&self.state);
        match cmd {
            CtrlCommand::RxMode { cmd, on } => {
                s.filter.set_mode(cmd, on);
                self.port.lock().set_rx_filter(&s.filter);
            }
            CtrlCommand::MacTable { unicast, multicast } => {
                s.filter.unicast = unicast;
                s.filter.multicast = multicast;
                self.port.lock().set_rx_filter(&s.filter);
            }
            CtrlCommand::MacAddr(mac) => {
                let mut p = self.port.lock();
                let changed = p.set_mac(mac).map_err(|e| {
                    warn!(error = %e, "vhost-user-net: MAC change failed");
                    CtrlError::Malformed {
                        class: ctrl::CLASS_MAC,
                        cmd: ctrl::MAC_ADDR_SET,
                        why: "the port refused the address",
                    }
                })?;
                s.mac = mac;
                if changed {
                    p.set_rx_filter(&s.filter);
                    let fd = p.rx_fd();
                    drop(p);
                    self.reattach(fd);
                }
            }
            CtrlCommand::VqPairs(n) => {
                if n == 0 || usize::from(n) > self.pairs.len() {
                    return Err(CtrlError::Malformed {
                        class: ctrl::CLASS_MQ,
                        cmd: ctrl::MQ_VQ_PAIRS_SET,
                        why: "queue pairs outside 1..=max_virtqueue_pairs",
                    });
                }
                s.active_pairs = n;
            }
        }
        Ok(())
    }
}

enum Deliver {
    Done,
    Dropped,
    NoBuffers,
}
