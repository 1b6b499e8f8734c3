//! Pure encoders and decoders used by kiln: no network, no recipes.
//!
//! Every encoder is deterministic: the same input yields the same bytes
//! (sorted directory entries, no clock, no randomness).

#![forbid(unsafe_code)]

pub mod cpio;
pub mod disk;
pub mod ext4;
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
pub mod verity;

/// Civil date and time (UTC) of `secs` since 1970: (year, month, day,
/// hour, minute, second), by Howard Hinnant's days-to-civil.
pub(crate) fn civil(secs: u64) -> (i64, u32, u32, u32, u32, u32) {
    let days = i64::try_from(secs / 86400).unwrap_or(0);
    let rem = secs % 86400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let small = |v: i64| u32::try_from(v).unwrap_or(0);
    let part = |v: u64| u32::try_from(v).unwrap_or(0);
    (
        y,
        small(m),
        small(d),
        part(rem / 3600),
        part(rem / 60 % 60),
        part(rem % 60),
    )
}
