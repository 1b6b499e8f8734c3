//! Slots: their boot state (ChromeOS's GPT bits, as Bottlerocket's
//! signpost names them), the header that says what a slot holds, and the
//! choice of the slot to boot.

/// A named range of GPT partition attribute bits.
#[derive(Debug, Clone, Copy)]
struct Bits {
    shift: u32,
    width: u32,
}

impl Bits {
    fn mask(self) -> u64 {
        ((1u64 << self.width) - 1) << self.shift
    }
    fn get(self, attrs: u64) -> u8 {
        // At most 4 bits wide: fits.
        u8::try_from((attrs & self.mask()) >> self.shift).unwrap_or(u8::MAX)
    }
    fn set(self, attrs: u64, value: u8) -> u64 {
        (attrs & !self.mask()) | ((u64::from(value) << self.shift) & self.mask())
    }
}

/// Higher boots first; 0: never.
const PRIORITY: Bits = Bits {
    shift: 48,
    width: 4,
};
/// Boots left before a slot not yet successful is given up.
const TRIES: Bits = Bits {
    shift: 52,
    width: 4,
};
/// The slot has booted healthy; tries no longer count.
const SUCCESSFUL: Bits = Bits {
    shift: 56,
    width: 1,
};
/// The largest priority and tries the bits hold.
pub const MAX: u8 = 15;

/// One of the two slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Slot {
    /// The first slot (partition 2).
    A,
    /// The second slot (partition 3).
    B,
}

impl Slot {
    /// The partition's GPT name.
    pub fn partition_name(self) -> &'static str {
        match self {
            Slot::A => "slot-a",
            Slot::B => "slot-b",
        }
    }
    /// The slot a GPT name is, if any.
    pub fn from_partition_name(name: &str) -> Option<Slot> {
        match name {
            "slot-a" => Some(Slot::A),
            "slot-b" => Some(Slot::B),
            _ => None,
        }
    }
    /// The other slot.
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }
    /// `a` or `b`.
    pub fn letter(self) -> char {
        match self {
            Slot::A => 'a',
            Slot::B => 'b',
        }
    }
}

/// A slot's boot state, as its GPT attribute bits hold it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SlotState {
    /// Higher boots first; 0 never.
    pub priority: u8,
    /// Boots left until it is marked successful.
    pub tries: u8,
    /// It booted healthy once.
    pub successful: bool,
}

impl SlotState {
    /// The state in a partition's attribute bits.
    pub fn from_attributes(attrs: u64) -> SlotState {
        SlotState {
            priority: PRIORITY.get(attrs),
            tries: TRIES.get(attrs),
            successful: SUCCESSFUL.get(attrs) == 1,
        }
    }

    /// `attrs` with these bits in place, the others kept.
    pub fn to_attributes(self, attrs: u64) -> u64 {
        let a = PRIORITY.set(attrs, self.priority.min(MAX));
        let a = TRIES.set(a, self.tries.min(MAX));
        SUCCESSFUL.set(a, u8::from(self.successful))
    }

    /// Whether the chooser may boot it (given it holds an image).
    pub fn bootable(self) -> bool {
        self.priority > 0 && (self.successful || self.tries > 0)
    }

    /// Given up: booted its tries without ever being marked successful.
    pub fn failed(self) -> bool {
        !self.successful && self.tries == 0
    }

    /// What a boot that went well leaves.
    pub fn marked_good(self) -> SlotState {
        SlotState {
            priority: self.priority.max(1),
            tries: 0,
            successful: true,
        }
    }
}

/// Arms a slot just written to boot next, ahead of `other`, for `tries`
/// boots unless one is marked good first: the new states of both
/// (priorities are renumbered to stay in range).
pub fn arm(other: SlotState, tries: u8) -> (SlotState, SlotState) {
    let (other_priority, priority) = if other.priority >= MAX {
        (MAX - 1, MAX)
    } else {
        (other.priority, other.priority + 1)
    };
    (
        SlotState {
            priority,
            tries: tries.clamp(1, MAX),
            successful: false,
        },
        SlotState {
            priority: other_priority.max(1),
            ..other
        },
    )
}

/// Makes `target` boot next, ahead of `other`, by an operator's choice
/// (a rollback): a slot that once booted healthy stays trusted, one that
/// never did gets `tries` boots to prove itself.
pub fn prefer(target: SlotState, other: SlotState, tries: u8) -> (SlotState, SlotState) {
    let (armed, other) = arm(other, tries);
    if target.successful {
        (
            SlotState {
                successful: true,
                tries: 0,
                ..armed
            },
            other,
        )
    } else {
        (armed, other)
    }
}

/// What the chooser decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    /// The slot to boot.
    pub slot: Slot,
    /// The slot's state to write before booting it (a try used up).
    pub state: SlotState,
    /// No slot was bootable by the rules: this one holds an image and
    /// boots rather than none.
    pub fallback: bool,
}

/// Picks the slot to boot from each slot's state and whether it holds a
/// valid image: the highest priority among the bootable (A on a tie),
/// using up one try if it is not yet successful. With none bootable, the
/// highest-priority slot holding an image, unchanged.
pub fn choose(slots: &[(Slot, SlotState, bool)]) -> Option<Choice> {
    let best = |ok: &dyn Fn(&SlotState) -> bool| {
        slots
            .iter()
            .filter(|(_, s, image)| *image && ok(s))
            // Highest priority; on a tie the first slot (A).
            .min_by_key(|(slot, s, _)| (core::cmp::Reverse(s.priority), *slot))
            .copied()
    };
    if let Some((slot, s, _)) = best(&|s| s.bootable()) {
        let state = if s.successful {
            s
        } else {
            SlotState {
                tries: s.tries - 1,
                ..s
            }
        };
        return Some(Choice {
            slot,
            state,
            fallback: false,
        });
    }
    best(&|_| true).map(|(slot, state, _)| Choice {
        slot,
        state,
        fallback: true,
    })
}

/// The last 4 KiB of a slot partition: what the slot holds. Written last
/// when a slot is filled, so a slot whose writing was cut short has no
/// valid header and is never booted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotHeader {
    /// Bytes from the partition's start: the root squashfs, then (if
    /// verified) its dm-verity tree.
    pub root_len: u64,
    /// Where the UKI starts in the partition (4 KiB aligned) and its size.
    pub uki_offset: u64,
    /// The UKI's size in bytes.
    pub uki_len: u64,
    /// sha256 of the UKI.
    pub uki_sha256: [u8; 32],
    /// sha256 of the root squashfs: which build this is (the init finds
    /// its own slot by it).
    pub build_id: [u8; 32],
    /// The dm-verity root hash; zero if the root is not verified.
    pub root_hash: [u8; 32],
    /// The recipe's name and version (at most 63 bytes each).
    pub name: alloc::string::String,
    /// See `name`.
    pub version: alloc::string::String,
    /// Boots this build gets to prove itself once written as an update
    /// (the recipe's `[update] tries`).
    pub tries: u8,
}

/// Size of the header.
pub const HEADER_LEN: usize = 4096;
const MAGIC: &[u8; 8] = b"KILNSLOT";
const TEXT: usize = 64;

impl SlotHeader {
    /// The 4 KiB header, CRC32 in its last 4 bytes.
    pub fn encode(&self) -> alloc::vec::Vec<u8> {
        let mut b = alloc::vec![0u8; HEADER_LEN];
        b[..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&crate::LAYOUT_VERSION.to_le_bytes());
        b[12] = self.tries;
        b[16..24].copy_from_slice(&self.root_len.to_le_bytes());
        b[24..32].copy_from_slice(&self.uki_offset.to_le_bytes());
        b[32..40].copy_from_slice(&self.uki_len.to_le_bytes());
        b[40..72].copy_from_slice(&self.uki_sha256);
        b[72..104].copy_from_slice(&self.build_id);
        b[104..136].copy_from_slice(&self.root_hash);
        for (at, s) in [(136, &self.name), (136 + TEXT, &self.version)] {
            let s = s.as_bytes();
            let n = s.len().min(TEXT - 1);
            b[at..at + n].copy_from_slice(&s[..n]);
        }
        let crc = crc32fast::hash(&b[..HEADER_LEN - 4]);
        b[HEADER_LEN - 4..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// The header in `b` (a slot's last 4 KiB), if it is one, intact and
    /// of this layout version.
    pub fn decode(b: &[u8]) -> Option<SlotHeader> {
        if b.len() != HEADER_LEN || &b[..8] != MAGIC {
            return None;
        }
        let crc = u32::from_le_bytes(b[HEADER_LEN - 4..].try_into().ok()?);
        if crc != crc32fast::hash(&b[..HEADER_LEN - 4]) {
            return None;
        }
        if u32::from_le_bytes(b[8..12].try_into().ok()?) != crate::LAYOUT_VERSION {
            return None;
        }
        let u64_at = |at: usize| b[at..at + 8].try_into().ok().map(u64::from_le_bytes);
        let hash_at = |at: usize| -> Option<[u8; 32]> { b[at..at + 32].try_into().ok() };
        let text_at = |at: usize| {
            let raw = &b[at..at + TEXT];
            let end = raw.iter().position(|&c| c == 0).unwrap_or(TEXT);
            core::str::from_utf8(&raw[..end])
                .ok()
                .map(alloc::string::String::from)
        };
        let h = SlotHeader {
            root_len: u64_at(16)?,
            uki_offset: u64_at(24)?,
            uki_len: u64_at(32)?,
            uki_sha256: hash_at(40)?,
            build_id: hash_at(72)?,
            root_hash: hash_at(104)?,
            name: text_at(136)?,
            version: text_at(136 + TEXT)?,
            tries: b[12],
        };
        // The UKI lies after the root.
        (h.uki_offset.is_multiple_of(4096) && h.uki_offset >= h.root_len && h.uki_len > 0)
            .then_some(h)
    }

    /// Whether it fits a slot partition of `len` bytes (header included).
    pub fn fits(&self, len: u64) -> bool {
        self.uki_offset
            .checked_add(self.uki_len)
            .is_some_and(|end| end <= len.saturating_sub(HEADER_LEN as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(priority: u8, tries: u8, successful: bool) -> SlotState {
        SlotState {
            priority,
            tries,
            successful,
        }
    }

    #[test]
    fn attribute_bits_are_chromeos_ones() {
        // Priority 48-51, tries 52-55, successful 56; other bits kept.
        let attrs = st(3, 2, true).to_attributes(1 << 60 | 1);
        assert_eq!(attrs, 1 << 60 | 1 | 3 << 48 | 2 << 52 | 1 << 56);
        assert_eq!(SlotState::from_attributes(attrs), st(3, 2, true));
        // Values beyond the bits are clamped, never spill into others.
        assert_eq!(st(99, 99, false).to_attributes(0), 15 << 48 | 15 << 52);
    }

    #[test]
    fn the_chooser_prefers_priority_and_uses_tries() {
        let good = st(1, 0, true);
        // A new build armed in B boots first, using a try.
        let c = choose(&[(Slot::A, good, true), (Slot::B, st(2, 3, false), true)]).unwrap();
        assert_eq!(
            (c.slot, c.state, c.fallback),
            (Slot::B, st(2, 2, false), false)
        );
        // Its last try used, A boots again: rollback.
        let c = choose(&[(Slot::A, good, true), (Slot::B, st(2, 0, false), true)]).unwrap();
        assert_eq!((c.slot, c.state), (Slot::A, good));
        // An armed slot without a valid image is never booted.
        let c = choose(&[(Slot::A, good, true), (Slot::B, st(2, 3, false), false)]).unwrap();
        assert_eq!(c.slot, Slot::A);
        // Ties go to A; priority 0 never boots.
        let c = choose(&[(Slot::B, good, true), (Slot::A, good, true)]).unwrap();
        assert_eq!(c.slot, Slot::A);
        let c = choose(&[(Slot::A, st(0, 0, true), true), (Slot::B, good, true)]).unwrap();
        assert_eq!(c.slot, Slot::B);
        // Nothing bootable by the rules: the best image rather than none.
        let c = choose(&[
            (Slot::A, st(1, 0, false), true),
            (Slot::B, st(2, 0, false), true),
        ])
        .unwrap();
        assert_eq!((c.slot, c.fallback), (Slot::B, true));
        assert_eq!(c.state, st(2, 0, false));
        assert_eq!(choose(&[(Slot::A, good, false)]), None);
    }

    #[test]
    fn arming_and_preferring() {
        let (b, a) = arm(st(1, 0, true), 3);
        assert_eq!((b, a), (st(2, 3, false), st(1, 0, true)));
        // Priorities stay in range.
        let (b, a) = arm(st(15, 0, true), 0);
        assert_eq!((b, a), (st(15, 1, false), st(14, 0, true)));
        // Rolling back to a slot that was good keeps it trusted; to one
        // that never was gives it tries.
        let (a, b) = prefer(st(1, 0, true), st(2, 0, true), 3);
        assert_eq!((a, b), (st(3, 0, true), st(2, 0, true)));
        let (a, _) = prefer(st(1, 0, false), st(2, 0, true), 3);
        assert_eq!(a, st(3, 3, false));
        assert!(st(2, 0, false).failed());
        assert_eq!(st(2, 1, false).marked_good(), st(2, 0, true));
    }

    #[test]
    fn header_round_trips_and_refuses_damage() {
        let h = SlotHeader {
            root_len: 10 << 20,
            uki_offset: 10 << 20,
            uki_len: 12345,
            uki_sha256: [1; 32],
            build_id: [2; 32],
            root_hash: [3; 32],
            name: "hello".into(),
            version: "1.2.3".into(),
            tries: 3,
        };
        let b = h.encode();
        assert_eq!(b.len(), HEADER_LEN);
        assert_eq!(SlotHeader::decode(&b), Some(h.clone()));
        assert!(h.fits((10 << 20) + 12345 + 4096));
        assert!(!h.fits((10 << 20) + 12345));
        for at in [0, 9, 20, 80, 140, 4000, 4095] {
            let mut bad = b.clone();
            bad[at] ^= 1;
            assert_eq!(SlotHeader::decode(&bad), None, "byte {at}");
        }
        assert_eq!(SlotHeader::decode(&[0; HEADER_LEN]), None);
        // A UKI overlapping the root is refused.
        let overlap = SlotHeader {
            uki_offset: 4096,
            ..h
        };
        assert_eq!(SlotHeader::decode(&overlap.encode()), None);
    }
}
