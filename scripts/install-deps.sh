#!/bin/sh
# Installs what building, booting and testing kiln needs on Debian/Ubuntu.
# Building itself needs only the Rust toolchain and the Debian archive keyring;
# the rest is QEMU/OVMF to boot images and the standard tools tests check with.
set -eu
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends \
  debian-archive-keyring ca-certificates gcc musl-tools \
  qemu-system-x86 qemu-utils ovmf \
  docker-registry busybox-static \
  gdisk dosfstools mtools squashfs-tools cpio binutils util-linux bsdutils iproute2 uidmap \
  xorriso curl cryptsetup-bin openssl zstd \
  >/dev/null
if ! command -v cargo >/dev/null; then
  echo "install Rust first: https://rustup.rs (or apt-get install cargo)" >&2
  exit 1
fi
# The init and the update service are static musl binaries (musl-gcc builds the
# latter's C crypto); without this target they fall back to glibc +crt-static.
# kiln-boot, the A/B slot chooser, is a UEFI application: its target is required.
if command -v rustup >/dev/null; then
  rustup target add x86_64-unknown-linux-musl >/dev/null 2>&1 || true
  rustup target add x86_64-unknown-uefi >/dev/null
else
  echo "kiln builds its UEFI slot chooser with rustup's x86_64-unknown-uefi target: install Rust with rustup (https://rustup.rs)" >&2
  exit 1
fi
# The reproducibility test builds as nobody, whose maintainer-script sandbox
# maps these subordinate ids (as rootless podman would).
if ! grep -q '^nobody:' /etc/subuid 2>/dev/null; then
  $SUDO usermod --add-subuids 300000-365535 --add-subgids 300000-365535 nobody
fi
