//! Builds the static `kiln-init` and embeds it in `kiln`, so that one
//! binary is all a user installs.
//!
//! The init is built by a nested cargo into its own target directory (no
//! lock shared with the outer build) for x86_64-unknown-linux-musl, or for
//! glibc with `+crt-static` when the musl target is not installed.
//! `KILN_INIT_BIN=/path/to/kiln-init` skips the nested build. kiln-boot,
//! the A/B slot chooser, is built the same way for x86_64-unknown-uefi
//! (`KILN_BOOT_BIN` skips it), and kiln-update, the in-guest update
//! service, as the init is (`KILN_UPDATE_BIN` skips it).

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const MUSL: &str = "x86_64-unknown-linux-musl";
const GNU: &str = "x86_64-unknown-linux-gnu";
const UEFI: &str = "x86_64-unknown-uefi";

fn main() {
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let workspace = manifest.parent().expect("cli/ is inside the workspace");
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());

    // The init links kiln-formats (its GPT reader), kiln-boot (the A/B
    // contract) and kiln-update (writing a slot); the chooser is
    // kiln-boot's binary.
    let init = embed("KILN_INIT_BIN", &out.join("kiln-init"), || {
        watch(workspace, &["init", "formats", "boot", "update"]);
        let (target, rustflags) = static_target(&rustc, "kiln-init");
        nested_build(workspace, &out, "kiln-init", target, rustflags).join("kiln-init")
    });
    println!("cargo:rustc-env=KILN_INIT_PATH={}", init.display());
    // The update service images with `[update] source` run; its C crypto
    // (aws-lc) builds for musl with musl-gcc (Debian's musl-tools).
    let updater = embed("KILN_UPDATE_BIN", &out.join("kiln-update"), || {
        watch(workspace, &["update", "boot"]);
        let (target, rustflags) = static_target(&rustc, "kiln-update");
        nested_build(workspace, &out, "kiln-update", target, rustflags).join("kiln-update")
    });
    println!("cargo:rustc-env=KILN_UPDATE_PATH={}", updater.display());
    let chooser = embed("KILN_BOOT_BIN", &out.join("kiln-boot.efi"), || {
        watch(workspace, &["boot"]);
        if !target_installed(&rustc, UEFI) {
            panic!("kiln-boot, the A/B slot chooser, is a UEFI application: `rustup target add {UEFI}` (or set KILN_BOOT_BIN to a built kiln-boot.efi)");
        }
        nested_build(workspace, &out, "kiln-boot", UEFI, "").join("kiln-boot.efi")
    });
    println!("cargo:rustc-env=KILN_BOOT_PATH={}", chooser.display());
}

/// musl when its target is installed, else glibc linked statically; the
/// binaries stripped (the profile's `strip` does not reach a nested
/// build's binary: 230 KB of symbols in every image otherwise).
fn static_target(rustc: &std::ffi::OsStr, what: &str) -> (&'static str, &'static str) {
    if target_installed(rustc, MUSL) {
        (MUSL, "-C strip=symbols")
    } else {
        println!("cargo:warning=musl target not installed; building {what} with glibc +crt-static (`rustup target add {MUSL}` for a smaller binary)");
        (GNU, "-C target-feature=+crt-static -C strip=symbols")
    }
}

/// `dest`, copied from the file `var` names if set, else from `build()`.
fn embed(var: &str, dest: &Path, build: impl FnOnce() -> PathBuf) -> PathBuf {
    println!("cargo:rerun-if-env-changed={var}");
    let from = match env::var_os(var) {
        Some(bin) => {
            let bin = PathBuf::from(bin);
            println!("cargo:rerun-if-changed={}", bin.display());
            bin
        }
        None => build(),
    };
    copy(&from, dest);
    dest.to_path_buf()
}

fn watch(workspace: &Path, crates: &[&str]) {
    for c in crates {
        for p in ["src", "Cargo.toml"] {
            println!(
                "cargo:rerun-if-changed={}",
                workspace.join(c).join(p).display()
            );
        }
    }
    println!(
        "cargo:rerun-if-changed={}",
        workspace.join("Cargo.lock").display()
    );
}

/// Builds `package`'s binary for `target` with a nested cargo in its own
/// target directory: the directory the binary lands in.
fn nested_build(
    workspace: &Path,
    out: &Path,
    package: &str,
    target: &str,
    rustflags: &str,
) -> PathBuf {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let target_dir = out.join(format!("{package}-target"));
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(workspace)
        .args(["build", "--release", "-p", package, "--bin", package])
        .args(["--target", target])
        .arg("--target-dir")
        .arg(&target_dir);
    // The outer build's settings are for the host binary, not for these.
    for var in [
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_BUILD_RUSTFLAGS",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("RUSTFLAGS", rustflags);
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("running {cargo:?} to build {package}: {e}"));
    if !status.success() {
        panic!("building {package} for {target} failed ({status})");
    }
    target_dir.join(target).join("release")
}

fn target_installed(rustc: &std::ffi::OsStr, target: &str) -> bool {
    Command::new(rustc)
        .args(["--print", "target-libdir", "--target", target])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        .is_some_and(|dir| dir.join("libstd").exists() || has_std(&dir))
}

fn has_std(dir: &Path) -> bool {
    fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("libstd-"))
        })
        .unwrap_or(false)
}

fn copy(from: &Path, to: &Path) {
    fs::copy(from, to).unwrap_or_else(|e| panic!("copying {}: {e}", from.display()));
}
