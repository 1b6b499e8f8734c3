//! kiln-boot: the UEFI application at `EFI/BOOT/BOOTX64.EFI` of an A/B
//! disk. It reads the GPT of the disk it was loaded from, picks the slot
//! to boot by its attribute bits ([`kiln_boot::choose`]), writes back
//! the try it uses, and starts that slot's UKI from the slot partition.
#![cfg_attr(target_os = "uefi", no_std, no_main)]

#[cfg(target_os = "uefi")]
mod efi;

#[cfg(not(target_os = "uefi"))]
fn main() {
    eprintln!("kiln-boot is a UEFI application: build it with --target x86_64-unknown-uefi");
    std::process::exit(2);
}
