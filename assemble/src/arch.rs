//! The target architecture's names in each namespace kiln deals with, in
//! one place: another architecture is another value here, not edits across
//! the Debian, OCI, GPT and UEFI code.

use kiln_formats::gpt::{Guid, LINUX_ROOT_X86_64_TYPE};

/// One target architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arch {
    /// Debian's name (`Architecture:` in the Packages index).
    pub debian: &'static str,
    /// The OCI platform's `architecture`.
    pub oci: &'static str,
    /// GPT partition type of the root (Discoverable Partitions Spec).
    pub root_type: Guid,
    /// The removable-media boot path on the ESP (UEFI spec).
    pub efi_boot_path: &'static str,
    /// systemd-stub inside Debian's `systemd-boot-efi`.
    pub stub_path: &'static str,
}

/// x86-64: what kiln builds for today.
pub const X86_64: Arch = Arch {
    debian: "amd64",
    oci: "amd64",
    root_type: LINUX_ROOT_X86_64_TYPE,
    efi_boot_path: "/EFI/BOOT/BOOTX64.EFI",
    stub_path: "/usr/lib/systemd/boot/efi/linuxx64.efi.stub",
};

/// The architecture images are built for.
pub const TARGET: Arch = X86_64;
