//! Pure encoders and decoders used by kiln: no network, no recipes.
//!
//! Every encoder is deterministic: the same input yields the same bytes
//! (sorted directory entries, no clock, no randomness).

#![forbid(unsafe_code)]

pub mod cpio;
pub mod disk;
pub mod fat;
pub mod gpt;
#[cfg(feature = "vdisk")]
pub mod iso;
#[cfg(feature = "squashfs")]
pub mod squashfs;
pub mod tree;
pub mod uki;
#[cfg(feature = "vdisk")]
pub mod vdisk;
