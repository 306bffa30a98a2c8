//! What a restarted netvsp process needs to continue the guest's session without the guest
//! initialising again: the NVSP session (versions, NDIS config, MTU, sub-channels), the receive and
//! send buffers (GPADL handle, id, section layout; the GPADLs themselves are re-sent by the VMM),
//! and the RNDIS state (phase, packet filter, MAC, receive-checksum reporting, RSS, link state the
//! guest was told). Which receive sections the guest holds is not here: it changes with every
//! packet and lives in the in-flight journal (see [`super::journal`]).
//!
//! Encoding: little-endian fields in a fixed order behind a magic and a format version. The bytes
//! come back from the VMM, so [`SavedState::decode`] checks every length and range.

use super::buffers::{MIN_SECTION_SIZE, ReceiveBuffer, SendBuffer};
use super::core::{Core, RndisPhase, RndisState, Rss, Session};
use ringbuf::RingMem;
use vmbus_core::device::DeviceError;
use vmbus_core::devices::nvsp::{self, version};
use vmbus_core::savestate::{StateReader, StateWriter};

const MAGIC: u32 = 0x5353_564e; // "NVSS"
const FORMAT: u32 = 1;
/// Longest RSS indirection table kept (NDIS allows 128 entries for Linux guests).
const MAX_RSS_TABLE: usize = 1024;
/// How long a resumed session ignores a backend link that looks down (see `Core::link_grace_until`).
const LINK_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// A registered guest buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SavedBuffer {
    pub handle: u32,
    pub id: u16,
    /// Receive: sub-allocation size; send: section size.
    pub section_size: u32,
}

/// netvsp's session state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SavedState {
    pub nvsp_version: Option<u32>,
    pub ndis_version: Option<(u32, u32)>,
    /// `(mtu, reserved, capabilities)` of SEND_NDIS_CONFIG.
    pub ndis_config: Option<(u32, u32, u64)>,
    pub mtu: u32,
    pub granted: u16,
    pub table_pending: bool,
    pub offered: u16,
    pub rx: Option<SavedBuffer>,
    pub tx: Option<SavedBuffer>,
    /// 0 uninitialized, 1 initialized, 2 halted.
    pub rndis_phase: u8,
    pub filter: u32,
    pub mac: [u8; 6],
    pub rx_csum: (bool, bool, bool),
    /// `(key, hash_info, table)`.
    pub rss: Option<([u8; 40], u32, Vec<u32>)>,
    pub reported_link: Option<bool>,
}

fn bad(why: impl Into<String>) -> DeviceError {
    DeviceError::BadSavedState(why.into())
}

fn put_buffer(w: &mut StateWriter, b: Option<SavedBuffer>) {
    w.u8(u8::from(b.is_some()));
    let b = b.unwrap_or(SavedBuffer {
        handle: 0,
        id: 0,
        section_size: 0,
    });
    w.u32(b.handle);
    w.u16(b.id);
    w.u32(b.section_size);
}

fn get_flag(r: &mut StateReader<'_>) -> Result<bool, DeviceError> {
    match r.u8()? {
        0 => Ok(false),
        1 => Ok(true),
        v => Err(bad(format!("netvsp state: flag byte {v}"))),
    }
}

fn get_buffer(r: &mut StateReader<'_>) -> Result<Option<SavedBuffer>, DeviceError> {
    let present = get_flag(r)?;
    let b = SavedBuffer {
        handle: r.u32()?,
        id: r.u16()?,
        section_size: r.u32()?,
    };
    Ok(present.then_some(b))
}

impl SavedState {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = StateWriter::new();
        w.u32(MAGIC);
        w.u32(FORMAT);
        w.u32(self.nvsp_version.unwrap_or(0));
        let (maj, min) = self.ndis_version.unwrap_or((0, 0));
        w.u8(u8::from(self.ndis_version.is_some()));
        w.u32(maj);
        w.u32(min);
        let (mtu, reserved, caps) = self.ndis_config.unwrap_or((0, 0, 0));
        w.u8(u8::from(self.ndis_config.is_some()));
        w.u32(mtu);
        w.u32(reserved);
        w.u64(caps);
        w.u32(self.mtu);
        w.u16(self.granted);
        w.u8(u8::from(self.table_pending));
        w.u16(self.offered);
        put_buffer(&mut w, self.rx);
        put_buffer(&mut w, self.tx);
        w.u8(self.rndis_phase);
        w.u32(self.filter);
        w.bytes(&self.mac);
        w.u8(u8::from(self.rx_csum.0));
        w.u8(u8::from(self.rx_csum.1));
        w.u8(u8::from(self.rx_csum.2));
        w.u8(match self.reported_link {
            None => 0,
            Some(false) => 1,
            Some(true) => 2,
        });
        w.u8(u8::from(self.rss.is_some()));
        if let Some((key, hash_info, table)) = &self.rss {
            w.bytes(key);
            w.u32(*hash_info);
            w.u16(table.len() as u16);
            for &e in table {
                w.u32(e);
            }
        }
        w.into_bytes()
    }

    /// Parses and range-checks a saved state for a device whose most queues is `max_queues`.
    pub fn decode(bytes: &[u8], max_queues: u16) -> Result<Self, DeviceError> {
        let mut r = StateReader::new(bytes);
        if r.u32()? != MAGIC {
            return Err(bad("not a netvsp state"));
        }
        let format = r.u32()?;
        if format != FORMAT {
            return Err(bad(format!("netvsp state format {format}")));
        }
        let v = r.u32()?;
        let nvsp_version = match v {
            0 => None,
            v if version::ALL.contains(&v) => Some(v),
            v => return Err(bad(format!("NVSP version {v:#x}"))),
        };
        let has = get_flag(&mut r)?;
        let ndis = (r.u32()?, r.u32()?);
        let ndis_version = has.then_some(ndis);
        let has = get_flag(&mut r)?;
        let cfg = (r.u32()?, r.u32()?, r.u64()?);
        let ndis_config = has.then_some(cfg);
        let mtu = r.u32()?;
        if !(68 + 14..=65535).contains(&mtu) {
            return Err(bad(format!("MTU {mtu}")));
        }
        let granted = r.u16()?;
        let table_pending = get_flag(&mut r)?;
        let offered = r.u16()?;
        let max_sub = max_queues.saturating_sub(1);
        if granted > max_sub || offered > max_sub || granted > offered {
            return Err(bad(format!("sub-channels {granted}/{offered}")));
        }
        let rx = get_buffer(&mut r)?;
        let tx = get_buffer(&mut r)?;
        for b in rx.iter().chain(&tx) {
            if b.section_size < MIN_SECTION_SIZE {
                return Err(bad(format!("section size {}", b.section_size)));
            }
        }
        let rndis_phase = r.u8()?;
        if rndis_phase > 2 {
            return Err(bad(format!("RNDIS phase {rndis_phase}")));
        }
        let filter = r.u32()?;
        let mac = r.take::<6>()?;
        let rx_csum = (get_flag(&mut r)?, get_flag(&mut r)?, get_flag(&mut r)?);
        let reported_link = match r.u8()? {
            0 => None,
            1 => Some(false),
            2 => Some(true),
            v => return Err(bad(format!("link state {v}"))),
        };
        let rss = if get_flag(&mut r)? {
            let key = r.take::<40>()?;
            let hash_info = r.u32()?;
            let n = usize::from(r.u16()?);
            if n == 0 || n > MAX_RSS_TABLE {
                return Err(bad(format!("RSS table of {n} entries")));
            }
            let mut table = Vec::with_capacity(n);
            for _ in 0..n {
                let q = r.u32()?;
                if q > u32::from(granted) {
                    return Err(bad(format!("RSS entry {q} beyond {granted} sub-channels")));
                }
                table.push(q);
            }
            Some((key, hash_info, table))
        } else {
            None
        };
        if r.remaining() != 0 {
            return Err(bad("trailing bytes after netvsp state"));
        }
        Ok(SavedState {
            nvsp_version,
            ndis_version,
            ndis_config,
            mtu,
            granted,
            table_pending,
            offered,
            rx,
            tx,
            rndis_phase,
            filter,
            mac,
            rx_csum,
            rss,
            reported_link,
        })
    }
}

impl<R: RingMem> Core<R> {
    pub(crate) fn save_state(&self) -> SavedState {
        let s = &self.session;
        SavedState {
            nvsp_version: s.version,
            ndis_version: s.ndis_version,
            ndis_config: s.ndis_config.map(|c| (c.mtu, c.reserved, c.capabilities)),
            mtu: s.mtu,
            granted: s.granted,
            table_pending: s.table_pending,
            offered: self.offered,
            rx: self.rx.as_ref().map(|rx| SavedBuffer {
                handle: rx.buf.handle,
                id: rx.buf.id,
                section_size: rx.sub_size,
            }),
            tx: self.tx.as_ref().map(|tx| SavedBuffer {
                handle: tx.buf.handle,
                id: tx.buf.id,
                section_size: tx.section_size,
            }),
            rndis_phase: match self.rndis.phase {
                RndisPhase::Uninitialized => 0,
                RndisPhase::Initialized => 1,
                RndisPhase::Halted => 2,
            },
            filter: self.rndis.filter,
            mac: self.rndis.mac,
            rx_csum: self.rndis.rx_csum,
            rss: self
                .rndis
                .rss
                .as_ref()
                .map(|r| (r.key, r.hash_info, r.table.clone())),
            reported_link: self.rndis.reported_link,
        }
    }

    /// Resumes a predecessor's session before any channel is open: the buffers are rebuilt from
    /// the GPADLs the VMM re-sent (the same handles) and the receive sections the guest holds from
    /// the journal. Returns the number of sections inherited as lent.
    pub(crate) fn restore_state(&mut self, st: &SavedState) -> Result<usize, DeviceError> {
        if !self.channels.is_empty() {
            return Err(bad("netvsp state restored with channels open"));
        }
        if st
            .nvsp_version
            .is_some_and(|v| v > self.cfg.max_nvsp_version)
        {
            return Err(bad("NVSP version above this device's maximum"));
        }
        let gpadl = |h: u32| {
            self.gpadls
                .gpadl(h)
                .ok_or_else(|| bad(format!("buffer GPADL {h:#x} was not re-sent")))
        };
        let (rx, inherited) = match st.rx {
            Some(b) => {
                let g = gpadl(b.handle)?;
                let (rx, n) = ReceiveBuffer::resume(&g, b.id, b.section_size, self.journal.clone())
                    .map_err(|e| bad(e.to_string()))?;
                (Some(rx), n)
            }
            None => (None, 0),
        };
        let tx = match st.tx {
            Some(b) => Some(
                SendBuffer::new(&gpadl(b.handle)?, b.id, b.section_size)
                    .map_err(|e| bad(e.to_string()))?,
            ),
            None => None,
        };
        self.session = Session {
            version: st.nvsp_version,
            ndis_version: st.ndis_version,
            ndis_config: st
                .ndis_config
                .map(|(mtu, reserved, capabilities)| nvsp::SendNdisConfig {
                    mtu,
                    reserved,
                    capabilities,
                }),
            mtu: st.mtu,
            granted: st.granted,
            table_pending: st.table_pending,
        };
        self.offered = st.offered;
        self.rx = rx;
        self.tx = tx;
        let mut rndis = RndisState::new(st.mac);
        rndis.phase = match st.rndis_phase {
            0 => RndisPhase::Uninitialized,
            1 => RndisPhase::Initialized,
            _ => RndisPhase::Halted,
        };
        rndis.filter = st.filter;
        rndis.rx_csum = st.rx_csum;
        rndis.rss = st.rss.as_ref().map(|(key, hash_info, table)| Rss {
            key: *key,
            hash_info: *hash_info,
            table: table.clone(),
        });
        rndis.reported_link = st.reported_link;
        self.rndis = rndis;
        self.link_grace_until = Some(std::time::Instant::now() + LINK_GRACE);
        Ok(inherited)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SavedState {
        SavedState {
            nvsp_version: Some(version::V61),
            ndis_version: Some((6, 30)),
            ndis_config: Some((1514, 0, 5)),
            mtu: 1514,
            granted: 1,
            table_pending: false,
            offered: 1,
            rx: Some(SavedBuffer {
                handle: 0xe1,
                id: 0xcafe,
                section_size: 1806,
            }),
            tx: Some(SavedBuffer {
                handle: 0xe2,
                id: 0,
                section_size: 6144,
            }),
            rndis_phase: 1,
            filter: 0x2b,
            mac: [0, 0x15, 0x5d, 1, 2, 3],
            rx_csum: (true, false, true),
            rss: Some(([7; 40], 0x301, (0..128).map(|i| i % 2).collect())),
            reported_link: Some(true),
        }
    }

    #[test]
    fn round_trips() {
        let s = sample();
        assert_eq!(SavedState::decode(&s.encode(), 8).unwrap(), s);
        let mut t = sample();
        t.rss = None;
        t.rx = None;
        t.nvsp_version = None;
        t.reported_link = None;
        assert_eq!(SavedState::decode(&t.encode(), 8).unwrap(), t);
    }

    #[test]
    fn hostile_states_are_refused_not_trusted() {
        let good = sample().encode();
        // Every truncation fails cleanly.
        for n in 0..good.len() {
            assert!(SavedState::decode(&good[..n], 8).is_err(), "prefix {n}");
        }
        let mut long = good.clone();
        long.push(0);
        assert!(SavedState::decode(&long, 8).is_err());
        // More sub-channels than the device has queues.
        assert!(SavedState::decode(&good, 1).is_err());
        let patch = |at: usize, v: &[u8]| {
            let mut b = good.clone();
            b[at..at + v.len()].copy_from_slice(v);
            SavedState::decode(&b, 8)
        };
        assert!(patch(0, &[0; 4]).is_err(), "magic");
        assert!(
            patch(8, &7u32.to_le_bytes()).is_err(),
            "unknown NVSP version"
        );
        assert!(patch(12, &[2]).is_err(), "flag byte");
        // RSS table entry naming a queue that does not exist.
        let mut s = sample();
        s.rss = Some(([0; 40], 0, vec![0, 5]));
        assert!(SavedState::decode(&s.encode(), 8).is_err());
        // Random bytes never panic.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..2000 {
            let mut b = good.clone();
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let i = (x as usize) % b.len();
            b[i] ^= (x >> 32) as u8 | 1;
            let _ = SavedState::decode(&b, 8);
        }
    }
}
