#!/bin/sh
# Times kiln's encoders against mksquashfs, mkfs.fat+mcopy, cpio and
# sgdisk+dd on the same input and prints ours/tool ratios.
# KILN_BENCH_MB (input MiB, default 48) and KILN_BENCH_RUNS (default 3)
# tune the run.
set -eu
cd "$(dirname "$0")/.."
exec cargo bench -p kiln-formats --bench formats "$@"
