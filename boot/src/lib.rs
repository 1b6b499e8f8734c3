//! The A/B contract shared by the builder, the init and the UEFI slot
//! chooser (this crate's binary): which partitions are slots, the boot
//! state in their GPT attribute bits, the header that says what a slot
//! holds, and the rule that picks the slot to boot.
//!
//! Disk layout, version 1 (`[disk] update = "ab"`):
//!
//! | # | GPT name | type | holds |
//! |---|----------|------|-------|
//! | 1 | `esp`    | EFI system | `EFI/BOOT/BOOTX64.EFI`: kiln-boot |
//! | 2 | `slot-a` | [`SLOT_TYPE`] | root squashfs, its dm-verity tree, the UKI, a [`SlotHeader`] in the last 4 KiB |
//! | 3 | `slot-b` | [`SLOT_TYPE`] | the same for the other build; empty (no header) until the first update |
//! | 4 | `data`   | [`DATA_TYPE`] | ext4 mounted at `/var/lib/kiln`, kept across updates |
//!
//! No_std (with `alloc`), so the chooser links it.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

#[cfg(feature = "std")]
pub mod disk;
pub mod gpt;
pub mod slot;
pub mod version;

pub use slot::{choose, Choice, Slot, SlotHeader, SlotState};

/// Partition type of an A/B slot (kiln's own, so nothing else mounts it).
pub const SLOT_TYPE: [u8; 16] = guid(0x555c9764, 0xdac5, 0x47ac, 0xba44_d5ea243fadeb);
/// Partition type of the data partition.
pub const DATA_TYPE: [u8; 16] = guid(0xc8185426, 0x88fa, 0x4b1c, 0x8298_a7cb13c8e2b7);
/// The disk layout version this crate describes.
pub const LAYOUT_VERSION: u32 = 1;

/// A GUID in text order (`xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` as bytes).
const fn guid(a: u32, b: u16, c: u16, d: u64) -> [u8; 16] {
    let a = a.to_be_bytes();
    let b = b.to_be_bytes();
    let c = c.to_be_bytes();
    let d = d.to_be_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], d[2], d[3], d[4], d[5], d[6],
        d[7],
    ]
}
