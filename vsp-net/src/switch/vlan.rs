//! Port VLAN modes: access ports (one VLAN, frames untagged on the port) and trunk ports (tagged
//! frames for a set of VLANs plus an optional native VLAN carried untagged).
//!
//! Inside the switch every frame belongs to exactly one VLAN id and is stored untagged; the tag
//! (with its priority) travels in [`FrameMeta::vlan`](crate::tap::FrameMeta) and is handed to a
//! trunk port out of band (RNDIS 802.1Q PPI, or in-band by the TAP backend).

use crate::tap::VlanTag;

/// Highest usable VLAN id (4095 is reserved).
pub const VLAN_MAX: u16 = 4094;
/// VLAN of ports that are not configured otherwise.
pub const DEFAULT_VLAN: u16 = 1;

/// A set of VLAN ids (4096-bit bitmap, boxed to keep [`VlanMode`] small).
#[derive(Clone, PartialEq, Eq)]
pub struct VlanSet(Box<[u64; 64]>);

impl std::fmt::Debug for VlanSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n: u32 = self.0.iter().map(|w| w.count_ones()).sum();
        write!(f, "VlanSet({n} ids)")
    }
}

impl Default for VlanSet {
    fn default() -> Self {
        Self::empty()
    }
}

impl VlanSet {
    /// No VLAN.
    pub fn empty() -> Self {
        Self(Box::new([0; 64]))
    }

    /// VLANs 1..=4094.
    pub fn all() -> Self {
        let mut s = Self(Box::new([u64::MAX; 64]));
        s.remove(0);
        s.remove(4095);
        s
    }

    /// Adds `vid` (ids above 4094 and 0 are ignored).
    pub fn insert(&mut self, vid: u16) {
        if (1..=VLAN_MAX).contains(&vid) {
            self.0[usize::from(vid / 64)] |= 1 << (vid % 64);
        }
    }

    /// Removes `vid`.
    pub fn remove(&mut self, vid: u16) {
        if let Some(w) = self.0.get_mut(usize::from(vid / 64)) {
            *w &= !(1 << (vid % 64));
        }
    }

    /// Whether `vid` is in the set.
    pub fn contains(&self, vid: u16) -> bool {
        self.0
            .get(usize::from(vid / 64))
            .is_some_and(|w| w & (1 << (vid % 64)) != 0)
    }

    /// Iterates over the ids in the set.
    pub fn iter(&self) -> impl Iterator<Item = u16> + '_ {
        (1..=VLAN_MAX).filter(|&v| self.contains(v))
    }
}

impl FromIterator<u16> for VlanSet {
    fn from_iter<I: IntoIterator<Item = u16>>(iter: I) -> Self {
        let mut s = Self::empty();
        for v in iter {
            s.insert(v);
        }
        s
    }
}

/// How a port takes part in VLANs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VlanMode {
    /// Member of one VLAN; frames are untagged on the port. Frames arriving tagged with this VLAN
    /// (or priority-tagged, VLAN 0) are accepted; other tags are dropped.
    Access(u16),
    /// Member of `allowed` (tagged) and of `native` (untagged, if set). Untagged frames arriving
    /// without a native VLAN are dropped.
    Trunk {
        /// VLAN for untagged frames.
        native: Option<u16>,
        /// VLANs carried tagged.
        allowed: VlanSet,
    },
}

impl Default for VlanMode {
    fn default() -> Self {
        Self::Access(DEFAULT_VLAN)
    }
}

impl VlanMode {
    /// Trunk carrying `vids` tagged, no native VLAN.
    pub fn trunk(vids: impl IntoIterator<Item = u16>) -> Self {
        Self::Trunk {
            native: None,
            allowed: vids.into_iter().collect(),
        }
    }

    /// Every VLAN id this mode names is in 1..=4094.
    pub fn is_valid(&self) -> bool {
        let ok = |v: u16| (1..=VLAN_MAX).contains(&v);
        match self {
            Self::Access(v) => ok(*v),
            Self::Trunk { native, .. } => native.is_none_or(ok),
        }
    }

    /// VLAN of a frame arriving on the port with this tag; `None` drops it.
    pub fn ingress_vid(&self, tag: Option<VlanTag>) -> Option<u16> {
        let vid = tag.map_or(0, |t| t.vid);
        match self {
            Self::Access(a) => (vid == 0 || vid == *a).then_some(*a),
            Self::Trunk { native, allowed } => {
                if vid == 0 {
                    *native
                } else if allowed.contains(vid) || *native == Some(vid) {
                    Some(vid)
                } else {
                    None
                }
            }
        }
    }

    /// Whether frames of `vid` go out of this port.
    pub fn is_member(&self, vid: u16) -> bool {
        match self {
            Self::Access(a) => *a == vid,
            Self::Trunk { native, allowed } => *native == Some(vid) || allowed.contains(vid),
        }
    }

    /// Tag to hand out with a frame of `vid` (priority `pcp`) on this port: `None` = not a member,
    /// `Some(None)` = untagged, `Some(Some(tag))` = tagged.
    pub fn egress_tag(&self, vid: u16, pcp: u8) -> Option<Option<VlanTag>> {
        if !self.is_member(vid) {
            return None;
        }
        match self {
            Self::Access(_) => Some(None),
            Self::Trunk { native, .. } if *native == Some(vid) => Some(None),
            Self::Trunk { .. } => Some(Some(VlanTag {
                vid,
                pcp,
                dei: false,
            })),
        }
    }
}
