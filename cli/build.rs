//! Builds the static `kiln-init` and embeds it in `kiln`, so that one
//! binary is all a user installs.
//!
//! The init is built by a nested cargo into its own target directory (no
//! lock shared with the outer build) for x86_64-unknown-linux-musl, or for
//! glibc with `+crt-static` when the musl target is not installed.
//! `KILN_INIT_BIN=/path/to/kiln-init` skips the nested build.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const MUSL: &str = "x86_64-unknown-linux-musl";
const GNU: &str = "x86_64-unknown-linux-gnu";

fn main() {
    println!("cargo:rerun-if-env-changed=KILN_INIT_BIN");
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let dest = out.join("kiln-init");

    if let Some(bin) = env::var_os("KILN_INIT_BIN") {
        let bin = PathBuf::from(bin);
        println!("cargo:rerun-if-changed={}", bin.display());
        copy(&bin, &dest);
        finish(&dest);
        return;
    }

    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let workspace = manifest.parent().expect("cli/ is inside the workspace");
    // init links kiln-formats (its GPT reader).
    for p in [
        "init/src",
        "init/Cargo.toml",
        "formats/src",
        "formats/Cargo.toml",
        "Cargo.lock",
    ] {
        println!("cargo:rerun-if-changed={}", workspace.join(p).display());
    }

    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    // Stripped here: the profile's `strip` does not reach this nested
    // build's binary (230 KB of symbols in every image otherwise).
    let (target, rustflags) = if target_installed(&rustc, MUSL) {
        (MUSL, "-C strip=symbols")
    } else {
        println!("cargo:warning=musl target not installed; building kiln-init with glibc +crt-static (`rustup target add {MUSL}` for a smaller init)");
        (GNU, "-C target-feature=+crt-static -C strip=symbols")
    };
    let target_dir = out.join("init-target");
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(workspace)
        .args([
            "build",
            "--release",
            "-p",
            "kiln-init",
            "--bin",
            "kiln-init",
        ])
        .args(["--target", target])
        .arg("--target-dir")
        .arg(&target_dir);
    // The outer build's settings are for the host binary, not for the init.
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
        .unwrap_or_else(|e| panic!("running {cargo:?} to build kiln-init: {e}"));
    if !status.success() {
        panic!("building kiln-init for {target} failed ({status})");
    }
    let built = target_dir.join(target).join("release").join("kiln-init");
    copy(&built, &dest);
    finish(&dest);
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

fn finish(dest: &Path) {
    println!("cargo:rustc-env=KILN_INIT_PATH={}", dest.display());
}
