//! The forwarding database: (VLAN, MAC) → port, learned from source addresses, with aging and a
//! hard size limit. Sharded read-write locks: the hot path (lookup, refresh of a known address)
//! takes only a read lock and updates atomics; only new or moved addresses take a write lock.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::{MacAddr, PortId};

const SHARDS: usize = 16;

#[derive(Debug)]
struct Entry {
    port: AtomicU32,
    last_seen: AtomicU64,
    is_static: bool,
}

/// One row of [`Fdb::entries`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FdbEntry {
    /// VLAN id.
    pub vid: u16,
    /// MAC address.
    pub mac: MacAddr,
    /// Port the address lives behind.
    pub port: PortId,
    /// Milliseconds since the address was last seen (0 for static entries).
    pub age_ms: u64,
    /// Configured (a NIC's own address), never aged or moved.
    pub is_static: bool,
}

/// Result of [`Fdb::learn`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Learn {
    /// Known on this port; timestamp refreshed.
    Refreshed,
    /// New entry.
    Learned,
    /// The address moved here from another port.
    Moved(PortId),
    /// The table is full; not learned.
    Full,
    /// A static entry owns this address on another port; not moved.
    StaticConflict(PortId),
}

/// Sharded MAC table.
#[derive(Debug)]
pub struct Fdb {
    shards: [RwLock<HashMap<(u16, MacAddr), Entry>>; SHARDS],
    len: AtomicUsize,
    max: usize,
    aging_ms: u64,
}

fn shard_of(vid: u16, mac: &MacAddr) -> usize {
    let h = mac.iter().fold(u32::from(vid), |h, &b| {
        h.wrapping_mul(31).wrapping_add(u32::from(b))
    });
    h as usize % SHARDS
}

impl Fdb {
    /// A table of at most `max` entries whose dynamic entries expire after `aging_ms`.
    pub fn new(max: usize, aging_ms: u64) -> Self {
        Self {
            shards: std::array::from_fn(|_| RwLock::new(HashMap::new())),
            len: AtomicUsize::new(0),
            max,
            aging_ms,
        }
    }

    fn read(&self, i: usize) -> RwLockReadGuard<'_, HashMap<(u16, MacAddr), Entry>> {
        self.shards[i]
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self, i: usize) -> RwLockWriteGuard<'_, HashMap<(u16, MacAddr), Entry>> {
        self.shards[i]
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn expired(&self, e: &Entry, now: u64) -> bool {
        !e.is_static && now.saturating_sub(e.last_seen.load(Ordering::Relaxed)) > self.aging_ms
    }

    /// Number of entries (including expired ones not yet swept).
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Port of `(vid, mac)`, ignoring expired entries.
    pub fn lookup(&self, vid: u16, mac: &MacAddr, now: u64) -> Option<PortId> {
        let g = self.read(shard_of(vid, mac));
        let e = g.get(&(vid, *mac))?;
        (!self.expired(e, now)).then(|| e.port.load(Ordering::Relaxed))
    }

    /// Records that `mac` on `vid` was seen on `port`.
    pub fn learn(&self, vid: u16, mac: &MacAddr, port: PortId, now: u64) -> Learn {
        let i = shard_of(vid, mac);
        {
            let g = self.read(i);
            if let Some(e) = g.get(&(vid, *mac)) {
                let cur = e.port.load(Ordering::Relaxed);
                if cur == port {
                    e.last_seen.store(now, Ordering::Relaxed);
                    return Learn::Refreshed;
                }
                if e.is_static {
                    return Learn::StaticConflict(cur);
                }
            }
        }
        let mut g = self.write(i);
        match g.get(&(vid, *mac)) {
            Some(e) if e.is_static => {
                let cur = e.port.load(Ordering::Relaxed);
                if cur == port {
                    Learn::Refreshed
                } else {
                    Learn::StaticConflict(cur)
                }
            }
            Some(e) => {
                let old = e.port.swap(port, Ordering::Relaxed);
                let was_expired = self.expired(e, now);
                e.last_seen.store(now, Ordering::Relaxed);
                if old == port {
                    Learn::Refreshed
                } else if was_expired {
                    Learn::Learned
                } else {
                    Learn::Moved(old)
                }
            }
            None => {
                if self.len.load(Ordering::Relaxed) >= self.max {
                    return Learn::Full;
                }
                self.len.fetch_add(1, Ordering::Relaxed);
                g.insert(
                    (vid, *mac),
                    Entry {
                        port: AtomicU32::new(port),
                        last_seen: AtomicU64::new(now),
                        is_static: false,
                    },
                );
                Learn::Learned
            }
        }
    }

    /// Pins `(vid, mac)` to `port` (replaces any dynamic entry; ignores the size limit).
    pub fn add_static(&self, vid: u16, mac: &MacAddr, port: PortId) {
        let prev = self.write(shard_of(vid, mac)).insert(
            (vid, *mac),
            Entry {
                port: AtomicU32::new(port),
                last_seen: AtomicU64::new(0),
                is_static: true,
            },
        );
        if prev.is_none() {
            self.len.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Removes expired dynamic entries; returns how many.
    pub fn sweep(&self, now: u64) -> usize {
        self.remove_where(|e| self.expired(e, now))
    }

    /// Removes every entry (static ones too) that points at `port`; returns how many.
    pub fn flush_port(&self, port: PortId) -> usize {
        self.remove_where(|e| e.port.load(Ordering::Relaxed) == port)
    }

    /// Removes all dynamic entries.
    pub fn flush_dynamic(&self) -> usize {
        self.remove_where(|e| !e.is_static)
    }

    fn remove_where(&self, pred: impl Fn(&Entry) -> bool) -> usize {
        let mut removed = 0;
        for i in 0..SHARDS {
            // Skip shards with nothing to remove without taking the write lock.
            if !self.read(i).values().any(&pred) {
                continue;
            }
            let mut g = self.write(i);
            let before = g.len();
            g.retain(|_, e| !pred(e));
            removed += before - g.len();
        }
        self.len.fetch_sub(removed, Ordering::Relaxed);
        removed
    }

    /// Snapshot of the live (non-expired) entries, sorted by VLAN and MAC.
    pub fn entries(&self, now: u64) -> Vec<FdbEntry> {
        let mut v: Vec<FdbEntry> = (0..SHARDS)
            .flat_map(|i| {
                self.read(i)
                    .iter()
                    .filter(|(_, e)| !self.expired(e, now))
                    .map(|(&(vid, mac), e)| FdbEntry {
                        vid,
                        mac,
                        port: e.port.load(Ordering::Relaxed),
                        age_ms: if e.is_static {
                            0
                        } else {
                            now.saturating_sub(e.last_seen.load(Ordering::Relaxed))
                        },
                        is_static: e.is_static,
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        v.sort_by_key(|e| (e.vid, e.mac));
        v
    }
}
