//! Backend → guest: frames are written into free receive sections (RNDIS_PACKET header, PPIs,
//! frame) and announced in transfer-page packets, several sections per packet, on the queue RSS
//! picks. The backend is asked for at most as many frames as there are free sections, so when the
//! guest stops completing receives the frames wait in the backend (bounded there) instead of here.

use super::core::{Core, Pending, RndisPhase};
use crate::backend::RxMeta;
use ringbuf::RingMem;
use ringbuf::layout::TransferPageRange;
use std::collections::BTreeMap;
use vmbus_core::devices::nvsp;
use vmbus_core::devices::rndis::{self, packet_filter, ppi};

/// Frames drained (and dropped) per poll while the guest cannot receive.
const DRAIN_BUDGET: usize = 256;

/// Whether the guest's packet filter lets `frame` in.
pub fn filter_accepts(filter: u32, mac: &[u8; 6], frame: &[u8]) -> bool {
    let Some(dst) = frame.get(..6) else {
        return false;
    };
    if filter & packet_filter::PROMISCUOUS != 0 {
        return true;
    }
    if dst == [0xFF; 6] {
        return filter & packet_filter::BROADCAST != 0;
    }
    if dst[0] & 1 != 0 {
        return filter & (packet_filter::MULTICAST | packet_filter::ALL_MULTICAST) != 0;
    }
    filter & packet_filter::DIRECTED != 0 && dst == mac
}

impl<R: RingMem> Core<R> {
    fn can_receive(&self) -> bool {
        self.rx.is_some()
            && self.rndis.phase == RndisPhase::Initialized
            && self.rndis.filter != 0
            && self.channels.contains_key(&0)
    }

    /// Moves frames from the backend into the guest. True if the budget was used up (more may be
    /// waiting).
    pub(crate) fn receive_from_backend(&mut self) -> bool {
        if !self.can_receive() {
            let stats = &mut self.stats;
            match self
                .backend
                .poll_recv(DRAIN_BUDGET, &mut |_, _| stats.rx_filtered += 1)
            {
                Ok(n) => return n == DRAIN_BUDGET,
                Err(e) => {
                    tracing::debug!(error = %e, "netvsp: backend receive failed");
                    return false;
                }
            }
        }
        let free = self.rx.as_ref().map_or(0, |rx| rx.free_sections());
        let budget = free.min(self.cfg.rx_poll_budget);
        if budget == 0 {
            return false;
        }
        let queues = self.channels.len();
        let Core {
            backend,
            rx: Some(rx),
            mem,
            rndis,
            stats,
            channels,
            ..
        } = self
        else {
            return false;
        };
        let mut batches: BTreeMap<u16, Vec<(u32, u32)>> = BTreeMap::new();
        let mut ppis = Vec::with_capacity(64);
        let result = backend.poll_recv(budget, &mut |frame: &[u8], meta: &RxMeta| {
            if !filter_accepts(rndis.filter, &rndis.mac, frame) {
                stats.rx_filtered += 1;
                return;
            }
            ppis.clear();
            let (ip_ok, tcp_ok, udp_ok) = rndis.rx_csum;
            let mut csum = 0;
            if meta.csum.ip_ok && ip_ok {
                csum |= ppi::RxChecksumInfo::IP_SUCCEEDED;
            }
            if meta.csum.tcp_ok && tcp_ok {
                csum |= ppi::RxChecksumInfo::TCP_SUCCEEDED;
            }
            if meta.csum.udp_ok && udp_ok {
                csum |= ppi::RxChecksumInfo::UDP_SUCCEEDED;
            }
            if csum != 0 {
                ppi::write(
                    &mut ppis,
                    ppi::ty::TCPIP_CHECKSUM,
                    false,
                    &u32::to_le_bytes(csum),
                );
            }
            if let Some(tci) = meta.vlan_tci {
                ppi::write(
                    &mut ppis,
                    ppi::ty::IEEE_8021Q,
                    false,
                    &ppi::Ieee8021qInfo::from_tci(tci).0.to_le_bytes(),
                );
            }
            let mut queue = 0u16;
            if let Some(rss) = &rndis.rss {
                let hash = meta
                    .hash
                    .or_else(|| super::rss::frame_hash(&rss.key, rss.hash_info, frame));
                if let Some(h) = hash {
                    ppi::write(&mut ppis, ppi::ty::NBL_HASH_VALUE, false, &h.to_le_bytes());
                    if let Some(&q) = rss.table.get(h as usize % rss.table.len().max(1)) {
                        queue = u16::try_from(q)
                            .ok()
                            .filter(|q| usize::from(*q) < queues && channels.contains_key(q))
                            .unwrap_or(0);
                    }
                }
            }
            let header = rndis::packet_header(frame.len(), &ppis);
            if header.len() + frame.len() > rx.sub_size as usize {
                stats.rx_dropped_no_buffer += 1;
                return;
            }
            let Some(section) = rx.alloc() else {
                stats.rx_dropped_no_buffer += 1;
                return;
            };
            match rx.write_section(mem.as_ref(), section, &[&header, frame]) {
                Ok(len) => {
                    stats.rx_frames += 1;
                    stats.rx_bytes += frame.len() as u64;
                    batches.entry(queue).or_default().push((section, len));
                }
                Err(e) => {
                    rx.free_unsent([section]);
                    stats.rx_dropped_no_buffer += 1;
                    tracing::debug!(error = %e, "netvsp: receive buffer not writable");
                }
            }
        });
        let delivered = match result {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(error = %e, "netvsp: backend receive failed");
                0
            }
        };
        let max_ranges = self.cfg.max_rx_ranges.clamp(1, nvsp::MAX_RECEIVE_RANGES);
        for (queue, items) in batches {
            for chunk in items.chunks(max_ranges) {
                let Some(rx) = self.rx.as_mut() else {
                    return false;
                };
                let ranges = chunk
                    .iter()
                    .map(|&(s, len)| TransferPageRange {
                        byte_count: len.into(),
                        byte_offset: (rx.offset(s) as u32).into(),
                    })
                    .collect();
                let trans_id = rx.lend(chunk.iter().map(|&(s, _)| s).collect());
                self.emit(
                    queue,
                    Pending::Transfer {
                        trans_id,
                        ranges,
                        channel_type: nvsp::CHANNEL_TYPE_DATA,
                    },
                );
            }
        }
        delivered == budget
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_filter() {
        let mac = [2, 0, 0, 0, 0, 1];
        let mut f = vec![0u8; 60];
        f[..6].copy_from_slice(&mac);
        assert!(filter_accepts(packet_filter::DIRECTED, &mac, &f));
        assert!(!filter_accepts(packet_filter::BROADCAST, &mac, &f));
        f[5] = 2;
        assert!(!filter_accepts(packet_filter::LINUX_DEFAULT, &mac, &f));
        assert!(filter_accepts(packet_filter::PROMISCUOUS, &mac, &f));
        f[..6].copy_from_slice(&[0xFF; 6]);
        assert!(filter_accepts(packet_filter::LINUX_DEFAULT, &mac, &f));
        f[..6].copy_from_slice(&[0x01, 0, 0x5e, 0, 0, 1]);
        assert!(filter_accepts(packet_filter::LINUX_DEFAULT, &mac, &f));
        assert!(!filter_accepts(
            packet_filter::DIRECTED | packet_filter::BROADCAST,
            &mac,
            &f
        ));
        assert!(!filter_accepts(0, &mac, &f));
        assert!(!filter_accepts(packet_filter::PROMISCUOUS, &mac, &f[..5]));
    }
}
