#!/usr/bin/env bash
# Benchmark (not a test) of incremental exports from snapshots, on a loop
# btrfs volume with 1.4 GiB of node-like data: an LSM database of 256 files
# of 4 MiB, a 4 GiB sparse file with 256 MiB of data, and a 128 MiB block
# log configured as append-only. Snapshot 100 is exported; then the node
# "commits": 2 new 4 MiB database files, one deleted, 2 MiB appended to the
# block log, a small file rewritten; snapshot 200 is exported. Prints what
# each export read and uploaded and how long it took: the second export
# should read little more than the change. A last case rewrites 1 MiB in
# place inside the big sparse file: on btrfs only the chunk holding it is
# read, because the file's extents are compared with the previous
# snapshot's (FIEMAP).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then echo "needs root (loop device)" >&2; exit 1; fi
command -v mkfs.btrfs >/dev/null || { apt-get update -qq; apt-get install -y -qq btrfs-progs >/dev/null; }
cargo build --release --locked --quiet
btm="$PWD/target/release/btm"
work=$(mktemp -d /var/tmp/btm-bench-export.XXXXXX)
cleanup() { umount "$work/mnt" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
trap 'exit 130' INT TERM
export BTM_RUNTIME_DIR="$work/run" BTM_STATE_DIR="$work/state"

truncate -s 3G "$work/fs.img"
mkfs.btrfs -q "$work/fs.img"
mkdir "$work/mnt"
mount -o loop "$work/fs.img" "$work/mnt"
vol="$work/mnt/chain"
btrfs subvolume create "$vol" >/dev/null
mkdir -p "$vol/db" "$vol/blocks"
echo "== generating the dataset"
for i in $(seq 0 255); do head -c 4M /dev/urandom > "$vol/db/$i.sst"; done
truncate -s 4G "$vol/state.db"
for i in $(seq 0 63); do
    head -c 4M /dev/urandom | dd of="$vol/state.db" bs=4M seek=$(( (i * 13) % 1024 )) conv=notrunc status=none
done
head -c 128M /dev/urandom > "$vol/blocks/log"
echo '{"height":100}' > "$vol/height.json"
sync

cat > "$work/btm.toml" <<TOML
volume = "$vol"
[export]
store = "$work/store"
tag = "bench"
append_only = ["blocks/log"]
TOML

# shellcheck source=scripts/bench-cpu.sh
source scripts/bench-cpu.sh

export_once() {
    timed "$work/export.json" "$work/err" "$btm" export --config "$work/btm.toml" --json
    echo "$(python3 -c '
import json, sys
r = json.load(sys.stdin)
b = r["backup"]
mib = 2 ** 20
print("height %d: %.2f s, read %.1f MiB, uploaded %.1f MiB, %d of %d files unchanged (not read)" % (
    r["height"], r["duration_ms"] / 1000, b["bytes_read"] / mib, b["bytes_uploaded"] / mib,
    b["files_unchanged"], b["files"]))' <"$work/export.json"); $(cpu_columns)"
}

"$btm" snapshot -p "$vol" --height 100 >/dev/null
echo "== first export (full)"
export_once
head -c 4M /dev/urandom > "$vol/db/new1.sst"
head -c 4M /dev/urandom > "$vol/db/new2.sst"
rm "$vol/db/7.sst"
head -c 2M /dev/urandom >> "$vol/blocks/log"
echo '{"height":200}' > "$vol/height.json"
sync
"$btm" snapshot -p "$vol" --height 200 >/dev/null
echo "== second export (2 new 4 MiB db files, 1 deleted, 2 MiB appended to the block log, height.json)"
export_once
head -c 1M /dev/urandom | dd of="$vol/state.db" bs=1M seek=$((13 * 4)) conv=notrunc status=none
sync
"$btm" snapshot -p "$vol" --height 300 >/dev/null
echo "== third export (1 MiB rewritten in place inside the 4 GiB sparse file)"
export_once
