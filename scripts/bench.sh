#!/bin/bash
# Benchmarks, each printed as a ratio against the standard tools on the
# same input (below 1: kiln is faster or smaller).
#
#   scripts/bench.sh            encoders (cargo bench) and the pipeline
#   scripts/bench.sh formats    only the encoders: squashfs, FAT32, cpio, GPT
#   scripts/bench.sh boot       /init to the first container line: kiln-init
#                               against a busybox /init doing the same
#   scripts/bench.sh net        forwarded throughput: a download from a
#                               container on the bridge (published port)
#                               against one on the host network
#   scripts/bench.sh update     a one-line change to hello.toml as a signed
#                               update: the bytes a host fetches (kiln's
#                               chunks, manifest and metadata) against the
#                               zstd -19 slot a whole-image update ships,
#                               and applying it to a disk (kiln update
#                               --from) against zstd -d | dd of the slot
#   scripts/bench.sh pipeline   only the whole build:
#     - hello.toml, warm cache and lock, against the shell pipeline a user
#       would script from the same unpacked inputs (mksquashfs, objcopy UKI,
#       mkfs.vfat + mcopy, sgdisk, dd);
#     - a 112-package Debian image (python3, postgresql-17, nginx): kiln
#       from unpacked layers against `mksquashfs -comp zstd` (level 15,
#       128 KiB, as kiln) on the unpacked tree; unpacking the .debs (kiln's
#       share of its first build against dpkg-deb -x) and the whole first
#       build as their own rows; a rebuild with nothing changed; adding one
#       small package; root_compression zstd:3; peak RSS at two tree sizes;
#       the 112-package image in every output format.
#
# KILN_BENCH_MB and KILN_BENCH_RUNS tune the encoder bench (see
# formats/benches/formats.rs). Needs the packages of scripts/install-deps.sh
# and network access to the Debian archive for the first run.
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-all}"

if [ "$what" = all ] || [ "$what" = formats ]; then
  cargo bench -p kiln-formats --bench formats
fi
ratio() { awk "BEGIN { printf \"%.2f\", $1 / $2 }"; }
# IMG N OUT: the UKI A/B slot N of IMG holds, where the slot header (the
# partition's last 4 KiB) says: offset at byte 24, length at 32.
slot_uki() {
  local s e hdr off len
  read -r s e < <(sgdisk -i"$2" "$1" | awk '/First sector/ {f=$3} /Last sector/ {l=$3} END {print f, l}')
  hdr=$(((e + 1) * 512 - 4096))
  off=$(od -An -t u8 -j $((hdr + 24)) -N 8 "$1" | tr -d ' ')
  len=$(od -An -t u8 -j $((hdr + 32)) -N 8 "$1" | tr -d ' ')
  dd if="$1" of="$3" bs=1M iflag=skip_bytes,count_bytes skip=$((s * 512 + off)) count="$len" status=none
}
row() { printf "| %-46s | %8s | %8s | %6s |\n" "$1" "$2" "$3" "$4"; }

# Boot: /init to the first container output line of hello.toml under TCG,
# kiln-init against a busybox /init that loads the same root modules,
# mounts the same root and runs the same container's echo (same kernel,
# initramfs modules, disk and QEMU; both booted directly, best of five).
if [ "$what" = all ] || [ "$what" = boot ]; then
  cargo build --release -p kiln >/dev/null 2>&1 || cargo build --release -p kiln
  b="$(mktemp -d /var/tmp/kiln-boot.XXXXXX)"
  "$PWD/target/release/kiln" build -q recipes/hello.toml -o "$b/out"
  slot_uki "$b/out/hello.raw" 2 "$b/uki.efi"
  for s in linux initrd cmdline; do objcopy -O binary --only-section=".$s" "$b/uki.efi" "$b/$s"; done
  mkdir "$b/bb"
  (cd "$b/bb" && cpio -idm --quiet <../initrd && rm -rf init kiln && mkdir -p bin && cp /bin/busybox bin/)
  # kiln-init's root modules, in its order; busybox has no dmsetup, so it
  # mounts the partition without dm-verity (kiln's table setup and hash
  # checks are extra work on its side).
  mods=$(cd "$b/bb" && for m in squashfs evdev dm-mod dm-bufio reed_solomon dm-verity button virtio_blk; do find lib/modules -name "$m.ko*"; done | tr '\n' ' ')
  {
    echo '#!/bin/busybox sh'
    echo '/bin/busybox mount -t proc proc /proc'
    echo '/bin/busybox mount -t sysfs sysfs /sys'
    echo '/bin/busybox mount -t devtmpfs dev /dev'
    echo 'read up _ < /proc/uptime; echo "bb start $up"'
    echo "for m in $mods; do /bin/busybox insmod /\$m; done"
    echo 'while [ ! -b /dev/vda2 ]; do /bin/busybox usleep 10000; done'
    echo '/bin/busybox mount -t squashfs -o ro /dev/vda2 /sysroot'
    echo '/bin/busybox chroot /sysroot/containers/greet/rootfs /bin/busybox echo hello'
    echo 'read up _ < /proc/uptime; echo "bb first $up"'
    echo '/bin/busybox poweroff -f'
  } >"$b/bb/init"
  chmod 755 "$b/bb/init"
  (cd "$b/bb" && find . | cpio -o -H newc --quiet) >"$b/bb-initrd"
  boot() { # INITRD [QEMU ARGS]: the console
    local initrd="$1"
    shift
    timeout 120 qemu-system-x86_64 -machine q35 -accel tcg "$@" -m 1024 -smp 1 -display none \
      -serial stdio -monitor none -no-reboot -nic none -kernel "$b/linux" -initrd "$initrd" \
      -append "$(cat "$b/cmdline")" -drive "if=virtio,format=raw,snapshot=on,file=$b/out/hello.raw" </dev/null | tr -d '\r'
  }
  # One boot that writes to the disk first: the data partition's ext4 is
  # grown once, at a host's first boot; the boots measured are later ones.
  timeout 120 qemu-system-x86_64 -machine q35 -accel tcg -m 1024 -smp 1 -display none \
    -serial null -monitor none -no-reboot -nic none -kernel "$b/linux" -initrd "$b/initrd" \
    -append "$(cat "$b/cmdline")" -drive "if=virtio,format=raw,file=$b/out/hello.raw" </dev/null >/dev/null
  # /init to the first container line, seconds: kiln's and busybox's.
  kiln_time() { boot "$b/initrd" "$@" | awk '/\] starting$/ {s=$3+0} /greet: first output line/ {f=$3+0} END {printf "%.3f\n", f - s}'; }
  bb_time() { boot "$b/bb-initrd" "$@" | awk '/^bb start/ {s=$3} /^bb first/ {f=$3} END {printf "%.3f\n", f - s}'; }
  # Real time, interleaved, best of five each: this machine's load comes
  # and goes, and alternating gives both the same share of it.
  for _ in 1 2 3 4 5; do
    kiln_time >>"$b/kiln.times"
    bb_time >>"$b/bb.times"
  done
  kiln_s=$(sort -n "$b/kiln.times" | head -1)
  bb_s=$(sort -n "$b/bb.times" | head -1)
  # -icount: guest time is instructions executed (1 ns each), whatever the
  # host's load and however long TCG takes to translate code it meets
  # the first time: the guest's work alone, the same run after run.
  kiln_i=$(kiln_time -icount shift=0)
  bb_i=$(bb_time -icount shift=0)
  echo
  echo "## Boot (seconds from /init to the first container line, TCG)"
  echo
  row "case" "kiln s" "busybox s" "ratio"
  row "hello.toml, one vCPU, real time" "$kiln_s" "$bb_s" "$(ratio "$kiln_s" "$bb_s")"
  row "hello.toml, one vCPU, -icount (instructions)" "$kiln_i" "$bb_i" "$(ratio "$kiln_i" "$bb_i")"
  echo "kiln: $(tr "\n" " " <"$b/kiln.times")busybox: $(tr "\n" " " <"$b/bb.times")" >&2
  rm -rf "$b"
fi
# Updates: hello.toml and the same recipe with one line of a container's
# command changed, published to a repository directory; a v1 disk updated
# from it. The standard: the new slot compressed whole (zstd -19, what an
# image-based update downloads) and written with dd.
if [ "$what" = all ] || [ "$what" = update ]; then
  cargo build --release -p kiln >/dev/null 2>&1 || cargo build --release -p kiln
  k="$PWD/target/release/kiln"
  u="$(mktemp -d /var/tmp/kiln-update.XXXXXX)"
  for v in 1 2; do
    mkdir "$u/v$v"
    sed "s/^version = .*/version = \"$v.0.0\"/" recipes/hello.toml >"$u/v$v/hello.toml"
    cp recipes/hello.lock "$u/v$v/hello.lock"
  done
  sed -i 's/hello from an onboot container/hello from an updated onboot container/' "$u/v2/hello.toml"
  "$k" build -q --locked "$u/v1/hello.toml" -o "$u/v1/out"
  "$k" build -q --locked "$u/v2/hello.toml" -o "$u/v2/out"
  openssl genpkey -algorithm ed25519 -out "$u/k.pem"
  openssl pkey -in "$u/k.pem" -pubout -out "$u/k.pub"
  "$k" publish-update -q --key "$u/k.pem" --to "$u/repo" "$u/v1/out/hello.raw"
  before=$(du -sb --apparent-size "$u/repo" | cut -f1)
  "$k" publish-update -q --key "$u/k.pem" --to "$u/repo" "$u/v2/out/hello.raw"
  after=$(du -sb --apparent-size "$u/repo" | cut -f1)
  # What a v1 host fetches: everything the v2 publish added (new chunks,
  # manifest, metadata); old metadata versions it never reads.
  kiln_bytes=$((after - before))
  cp "$u/v1/out/hello.raw" "$u/disk.raw"
  s=$(date +%s.%N)
  "$k" update -q --from "$u/repo" --root-key "$u/k.pub" "$u/disk.raw"
  kiln_s=$(awk "BEGIN { printf \"%.2f\", $(date +%s.%N) - $s }")
  # The standard: v2's slot (root, tree, UKI: up to the UKI's end) whole.
  read -r first _ < <(sgdisk -i2 "$u/v2/out/hello.raw" | awk '/First sector/ {print $3}')
  read -r last _ < <(sgdisk -i2 "$u/v2/out/hello.raw" | awk '/Last sector/ {print $3}')
  hdr=$(((last + 1) * 512 - 4096))
  off=$(od -An -t u8 -j $((hdr + 24)) -N 8 "$u/v2/out/hello.raw" | tr -d ' ')
  len=$(od -An -t u8 -j $((hdr + 32)) -N 8 "$u/v2/out/hello.raw" | tr -d ' ')
  dd if="$u/v2/out/hello.raw" of="$u/slot" bs=1M iflag=skip_bytes,count_bytes skip=$((first * 512)) count=$((off + len)) status=none
  zstd -q -19 -T0 "$u/slot" -o "$u/slot.zst"
  zstd_bytes=$(stat -c %s "$u/slot.zst")
  read -r b_first _ < <(sgdisk -i3 "$u/disk.raw" | awk '/First sector/ {print $3}')
  s=$(date +%s.%N)
  zstd -q -dc "$u/slot.zst" | dd of="$u/disk.raw" bs=1M seek=$((b_first * 512)) oflag=seek_bytes conv=notrunc,fsync status=none
  dd_s=$(awk "BEGIN { printf \"%.2f\", $(date +%s.%N) - $s }")
  echo
  echo "## Updates (hello.toml, one line of a container's command changed)"
  echo
  row "case" "kiln" "standard" "ratio"
  row "bytes a host fetches vs zstd -19 of the slot" "$kiln_bytes" "$zstd_bytes" "$(ratio "$kiln_bytes" "$zstd_bytes")"
  row "apply (s): update --from vs zstd -d | dd" "$kiln_s" "$dd_s" "$(ratio "$kiln_s" "$dd_s")"
  rm -rf "$u"
fi
# Networking: forwarded throughput. The same 32 MiB download from a
# container on the bridge through its published port (DNAT, bridge, veth)
# and from one on the host network, both through one QEMU user NIC in
# one guest; best of three each, alternating.
if [ "$what" = all ] || [ "$what" = net ]; then
  cargo build --release -p kiln >/dev/null 2>&1 || cargo build --release -p kiln
  n="$(mktemp -d /var/tmp/kiln-net.XXXXXX)"
  serve() { # PORT: a service's command, writing the file then serving it
    echo "command = [\"/bin/busybox\", \"sh\", \"-c\", \"busybox dd if=/dev/zero of=/w/big bs=1M count=32 2>/dev/null && exec busybox httpd -f -p $1 -h /w\"]"
  }
  bb='image = { debian = ["busybox-static"], scripts = false }'
  cat >"$n/netbench.toml" <<EOF
name = "netbench"
version = "1"
[kernel]
debian = "linux-image-cloud-amd64"
[[service]]
name = "onhost"
$bb
tmpfs = ["/w:size=40M"]
ready = { tcp = 8080 }
$(serve 8080)
[[service]]
name = "onbridge"
$bb
net = "bridge"
ports = ["8081:80"]
tmpfs = ["/w:size=40M"]
ready = { tcp = 80 }
$(serve 80)
EOF
  "$PWD/target/release/kiln" build -q "$n/netbench.toml" -o "$n/out"
  hp=$(shuf -i 20000-40000 -n 1)
  bp=$((hp + 1))
  "$PWD/target/release/kiln" run "$n/out/netbench.raw" --timeout 600 \
    --publish "$hp:8080" --publish "$bp:8081" >"$n/console" 2>&1 &
  run=$!
  for _ in $(seq 600); do
    grep -q 'onhost: ready' "$n/console" && grep -q 'onbridge: ready' "$n/console" && break
    sleep 0.5
  done
  get() { curl -sf -o /dev/null -w '%{time_total}\n' "http://127.0.0.1:$1/big" | awk '{ printf "%.3f\n", $1 }'; }
  for _ in 1 2 3; do
    get "$hp" >>"$n/host.times"
    get "$bp" >>"$n/bridge.times"
  done
  kill -TERM "$run"
  wait "$run" || true
  host_s=$(sort -n "$n/host.times" | head -1)
  bridge_s=$(sort -n "$n/bridge.times" | head -1)
  mbs() { awk "BEGIN { printf \"%.1f\", 32 / $1 }"; }
  echo
  echo "## Forwarded throughput (32 MiB over QEMU user networking, TCG)"
  echo
  row "case" "bridge s" "host s" "ratio"
  row "download, bridge (published port) vs host network" "$bridge_s" "$host_s" "$(ratio "$bridge_s" "$host_s")"
  echo "MB/s: bridge $(mbs "$bridge_s"), host $(mbs "$host_s")" >&2
  rm -rf "$n"
fi
[ "$what" = all ] || [ "$what" = pipeline ] || exit 0

cargo build --release -p kiln >/dev/null 2>&1 || cargo build --release -p kiln
kiln="$PWD/target/release/kiln"
work="$(mktemp -d /var/tmp/kiln-bench.XXXXXX)"
trap 'rm -rf "$work"' EXIT
cache="$work/cache"

# Wall seconds and peak RSS (MiB) of a command: "SECONDS RSS".
measure() {
  /usr/bin/time -f "%e %M" -o "$work/time" "$@" >/dev/null 2>"$work/stderr" || {
    cat "$work/stderr" >&2
    return 1
  }
  awk '{ printf "%s %d\n", $1, $2 / 1024 }' "$work/time"
}
# Best of three wall times of a command (quiet), for short runs.
best3() {
  local best=""
  for _ in 1 2 3; do
    local t
    t=$(measure "$@" | cut -d' ' -f1)
    if [ -z "$best" ] || awk "BEGIN { exit !($t < $best) }"; then best=$t; fi
  done
  echo "$best"
}

echo
echo "## Pipeline (wall seconds; ratio = kiln / tools)"
echo
row "case" "kiln s" "tools s" "ratio"
row "---" "---" "---" "---"

# ---- hello.toml, warm ----
mkdir -p "$work/hello"
cp recipes/hello.toml "$work/hello/"
"$kiln" build -q "$work/hello/hello.toml" -o "$work/hello/out" --cache "$cache"
kiln_hello=$(best3 "$kiln" build -q --locked "$work/hello/hello.toml" -o "$work/hello/out" --cache "$cache")

# The same unpacked inputs for the tools: kiln's root tree, kernel, initrd
# and UKI metadata, and the stub from the cached systemd-boot-efi .deb.
in="$work/hello/inputs"
mkdir -p "$in"
img="$work/hello/out/hello.raw"
read -r root_start root_end < <(sgdisk -i2 "$img" | awk '/First sector/ {f=$3} /Last sector/ {l=$3} END {print f, l}')
dd if="$img" of="$in/root.sqfs" bs=512 skip="$root_start" count=$((root_end - root_start + 1)) status=none
unsquashfs -q -d "$in/root" "$in/root.sqfs" >/dev/null
slot_uki "$img" 2 "$in/kiln.efi"
read -r esp_start esp_end < <(sgdisk -i1 "$img" | awk '/First sector/ {f=$3} /Last sector/ {l=$3} END {print f, l}')
dd if="$img" of="$in/esp.img" bs=512 skip="$esp_start" count=$((esp_end - esp_start + 1)) status=none
mcopy -i "$in/esp.img" ::/EFI/BOOT/BOOTX64.EFI "$in/chooser.efi"
for s in linux initrd osrel cmdline uname; do
  objcopy -O binary --only-section=".$s" "$in/kiln.efi" "$in/$s"
done
stub_sha=$(awk '/^\[stub\]/ {s=1} s && /^sha256 = / { gsub(/"|sha256:/, "", $3); print $3; exit }' "$work/hello/hello.lock")
dpkg-deb -x "$cache/sha256/$stub_sha" "$in/stubpkg"
stub="$in/stubpkg/usr/lib/systemd/boot/efi/linuxx64.efi.stub"

cat >"$work/tools.sh" <<'EOF'
#!/bin/bash
# What a user would script for the same disk: squashfs and its dm-verity
# tree, UKI (objcopy), ESP, the A/B GPT disk with the UKI in slot A.
set -euo pipefail
in="$1" out="$2" stub="$3"
rm -rf "$out"; mkdir -p "$out"
mksquashfs "$in/root" "$out/root.sqfs" -comp zstd -Xcompression-level 15 -b 128K -noappend -quiet -no-progress >/dev/null
pad=$(( ($(stat -c %s "$out/root.sqfs") + 4095) / 4096 * 4096 ))
truncate -s "$pad" "$out/root.sqfs"
veritysetup format "$out/root.sqfs" "$out/root.sqfs" --hash-offset="$pad" --data-blocks=$((pad / 4096)) >/dev/null
# UKI: sections after the stub's last one, 4 KiB aligned.
end=0
while read -r idx _ size vma _; do
  [[ "$idx" =~ ^[0-9]+$ ]] && end=$(( 0x$vma + 0x$size ))
done < <(objdump -h "$stub")
args=()
for s in osrel cmdline uname initrd linux; do
  vma=$(( (end + 4095) / 4096 * 4096 ))
  args+=(--add-section ".$s=$in/$s" --change-section-vma ".$s=$(printf 0x%x "$vma")")
  end=$(( vma + $(stat -c %s "$in/$s") ))
done
objcopy "${args[@]}" "$stub" "$out/uki.efi"
truncate -s 64M "$out/esp.img"
mkfs.vfat -F 32 -n KILN-ESP "$out/esp.img" >/dev/null
mmd -i "$out/esp.img" ::/EFI ::/EFI/BOOT
mcopy -i "$out/esp.img" "$in/chooser.efi" ::/EFI/BOOT/BOOTX64.EFI
truncate -s 256M "$out/disk.raw"
root=$(stat -c %s "$out/root.sqfs")
uki_at=$(( (root + 4095) / 4096 * 4096 ))
slot_mib=$(( (2 * (uki_at + $(stat -c %s "$out/uki.efi") + 4096) + 1048575) / 1048576 ))
sgdisk -n 1:2048:+64M -t 1:ef00 -n "2:0:+${slot_mib}M" -n "3:0:+${slot_mib}M" -n 4:0:0 "$out/disk.raw" >/dev/null
dd if="$out/esp.img" of="$out/disk.raw" bs=1M seek=1 conv=notrunc,sparse status=none
dd if="$out/root.sqfs" of="$out/disk.raw" bs=1M seek=65 conv=notrunc,sparse status=none
dd if="$out/uki.efi" of="$out/disk.raw" bs=1M oflag=seek_bytes seek=$(( (65 << 20) + uki_at )) conv=notrunc,sparse status=none
EOF
chmod +x "$work/tools.sh"
tools_hello=$(best3 "$work/tools.sh" "$in" "$work/hello/tools" "$stub")
row "hello.toml warm build vs tool pipeline" "$kiln_hello" "$tools_hello" "$(ratio "$kiln_hello" "$tools_hello")"

# ---- the 112-package image ----
big="$work/big"
mkdir -p "$big"
write_recipe() { # NAME PACKAGES COMPRESSION [SCRIPTS]
  cat >"$big/$1.toml" <<EOF
name = "$1"
version = "1"
[kernel]
debian = "linux-image-cloud-amd64"
[[service]]
name = "app"
image = { debian = [$2], scripts = ${4:-false} }
command = ["/usr/bin/python3", "-c", "print(1)"]
[disk]
size = "2G"
[output]
root_compression = "$3"
EOF
}
pkgs='"python3", "postgresql-17", "nginx"'
write_recipe big "$pkgs" zstd:15
# Fetch everything once (network), then drop what kiln derives from it.
"$kiln" build -q "$big/big.toml" -o "$big/out" --cache "$cache"
npkg=$(grep -c '^\[\[image.packages\]\]' "$big/big.lock")
reset_derived() { rm -rf "$cache/squashfs" "$cache/refs/tar"; }
reset_derived
read -r kiln_first rss_big < <(measure "$kiln" build -q --locked "$big/big.toml" -o "$big/out" --cache "$cache")
# Layers already unpacked (plain tars in the cache), blocks not compressed:
# the same input mksquashfs gets.
rm -rf "$cache/squashfs"
read -r kiln_packed _ < <(measure "$kiln" build -q --locked "$big/big.toml" -o "$big/out" --cache "$cache")
read -r kiln_again _ < <(measure "$kiln" build -q --locked "$big/big.toml" -o "$big/out" --cache "$cache")

# The tools: unpack every .deb of the image, then mksquashfs the tree.
mkdir -p "$big/debs"
awk '/^\[\[image\]\]/ {img=1} img && /^sha256 = / { gsub(/"|sha256:/, "", $3); print $3 }' "$big/big.lock" >"$big/debs.list"
unpack() {
  rm -rf "$big/tree"; mkdir -p "$big/tree"
  while read -r sha; do dpkg-deb -x "$cache/sha256/$sha" "$big/tree"; done <"$big/debs.list"
}
read -r unpack_s _ < <(measure bash -c "$(declare -f unpack); big='$big'; cache='$cache'; unpack")
unpack
tree_mib=$(du -sm "$big/tree" | cut -f1)
read -r mksq_s _ < <(measure mksquashfs "$big/tree" "$big/tools.sqfs" -comp zstd -Xcompression-level 15 -b 128K -noappend -quiet -no-progress)
kiln_unpack=$(awk "BEGIN { printf \"%.2f\", $kiln_first - $kiln_packed }")
tools_first=$(awk "BEGIN { printf \"%.2f\", $unpack_s + $mksq_s }")
row "$npkg pkgs ($tree_mib MiB): unpack .debs (first build minus the next row) vs dpkg-deb -x" "$kiln_unpack" "$unpack_s" "$(ratio "$kiln_unpack" "$unpack_s")"
row "$npkg pkgs: build from unpacked layers vs mksquashfs" "$kiln_packed" "$mksq_s" "$(ratio "$kiln_packed" "$mksq_s")"
row "$npkg pkgs: first build (.debs cached) vs unpack + mksquashfs" "$kiln_first" "$tools_first" "$(ratio "$kiln_first" "$tools_first")"
row "$npkg pkgs: rebuild, nothing changed (vs first)" "$kiln_again" "$kiln_first" "$(ratio "$kiln_again" "$kiln_first")"

write_recipe big "$pkgs, \"tree\"" zstd:15
read -r kiln_add _ < <(measure "$kiln" build -q "$big/big.toml" -o "$big/out" --cache "$cache")
row "$npkg pkgs: add one small package (vs first)" "$kiln_add" "$kiln_first" "$(ratio "$kiln_add" "$kiln_first")"

# Configured (maintainer scripts run, Essential set added): its own budget.
write_recipe conf "$pkgs" zstd:15 true
"$kiln" build -q "$big/conf.toml" -o "$big/outc" --cache "$cache"
rm -rf "$cache/refs/configured" "$cache/squashfs"
read -r kiln_conf _ < <(measure "$kiln" build -q --locked "$big/conf.toml" -o "$big/outc" --cache "$cache")
rm -rf "$cache/squashfs"
read -r kiln_conf_packed _ < <(measure "$kiln" build -q --locked "$big/conf.toml" -o "$big/outc" --cache "$cache")
read -r kiln_conf_again _ < <(measure "$kiln" build -q --locked "$big/conf.toml" -o "$big/outc" --cache "$cache")
write_recipe conf "$pkgs, \"tree\"" zstd:15 true
read -r kiln_conf_add _ < <(measure "$kiln" build -q "$big/conf.toml" -o "$big/outc" --cache "$cache")
nconf=$(grep -c '^\[\[image.packages\]\]' "$big/conf.lock")
conf_s=$(awk "BEGIN { printf \"%.2f\", $kiln_conf - $kiln_conf_packed }")
row "configured, $nconf pkgs: running the scripts (first build minus a build with them cached)" "$conf_s" "$kiln_conf" "$(ratio "$conf_s" "$kiln_conf")"
row "configured: rebuild, nothing changed (vs first)" "$kiln_conf_again" "$kiln_conf" "$(ratio "$kiln_conf_again" "$kiln_conf")"
row "configured: add one small package, scripts rerun (vs first)" "$kiln_conf_add" "$kiln_conf" "$(ratio "$kiln_conf_add" "$kiln_conf")"

write_recipe big3 "$pkgs" zstd:3
"$kiln" lock -q "$big/big3.toml" --cache "$cache"
rm -rf "$cache/squashfs"
read -r kiln_z3 _ < <(measure "$kiln" build -q --locked "$big/big3.toml" -o "$big/out3" --cache "$cache")
read -r mksq3_s _ < <(measure mksquashfs "$big/tree" "$big/tools3.sqfs" -comp zstd -Xcompression-level 3 -b 128K -noappend -quiet -no-progress)
row "$npkg pkgs, zstd:3: first build vs mksquashfs -Xcompression-level 3" "$kiln_z3" "$mksq3_s" "$(ratio "$kiln_z3" "$mksq3_s")"

root_size() { # IMAGE: bytes of the root squashfs at slot A's start (its superblock's bytes_used)
  local s
  s=$(sgdisk -i2 "$1" | awk '/First sector/ {print $3}')
  od -An -t u8 -j $((s * 512 + 40)) -N 8 "$1" | tr -d ' '
}
echo
echo "## Sizes and memory"
echo
printf "| %-46s | %10s |\n" "case" "value"
printf "| %-46s | %10s |\n" "---" "---"
printf "| %-46s | %10s |\n" "root squashfs, zstd:15 (MiB)" "$(( $(root_size "$big/out/big.raw") >> 20 ))"
printf "| %-46s | %10s |\n" "root squashfs, zstd:3 (MiB)" "$(( $(root_size "$big/out3/big3.raw") >> 20 ))"
printf "| %-46s | %10s |\n" "mksquashfs zstd 15 (MiB)" "$(( $(stat -c %s "$big/tools.sqfs") >> 20 ))"
write_recipe small '"python3"' zstd:15
"$kiln" build -q "$big/small.toml" -o "$big/outs" --cache "$cache"
rm -rf "$cache/squashfs"
read -r _ rss_small < <(measure "$kiln" build -q --locked "$big/small.toml" -o "$big/outs" --cache "$cache")
printf "| %-46s | %10s |\n" "peak RSS, python3 image, root $(( $(root_size "$big/outs/small.raw") >> 20 )) MiB" "$rss_small"
printf "| %-46s | %10s |\n" "peak RSS, $npkg-package image, root $(( $(root_size "$big/out/big.raw") >> 20 )) MiB" "$rss_big"
# Every output format from one build of the 112-package image: the disk
# encodings read the raw disk once each, the diskless forms stream the
# root; memory stays far below the disk size.
every="raw,qcow2,vhd,vhd-dynamic,vmdk,gce,kernel+initrd,uki,iso"
read -r t_all rss_all < <(measure "$kiln" build -q --locked --format "$every" "$big/big.toml" -o "$big/outall" --cache "$cache")
printf "| %-46s | %10s |\n" "every format, $npkg-package image: seconds" "$t_all"
printf "| %-46s | %10s |\n" "every format, $npkg-package image: peak RSS" "$rss_all"
