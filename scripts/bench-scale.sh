#!/usr/bin/env bash
# Scale benchmark (not a test): memory and store requests when the store or
# the tree is large, where restic-sized figures on small datasets say
# nothing.
#   1. A store of 2,000,000 chunks (a terabyte in 1 MiB chunks; synthetic
#      pack indexes, crates/chunk/examples/bench_scale.rs): what a backup and a restore
#      load, with their requests counted, then real `btm backup` (full and
#      incremental), `restore` and `gc --dry-run` against that store.
#   2. Trees of 1,000,000 small files, two shapes: backup, unchanged
#      backup, one file changed, and restore.
# Prints peak RSS and CPU (bench-cpu.sh) beside each; the targets are 256 MiB for (1) and 128 MiB
# for (2). Environment: BENCH_DIR, BENCH_CHUNKS (2000000), BENCH_FILES
# (1000000). Needs GNU time, and root (a loop-mounted ext4 for each
# million-file restore).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v /usr/bin/time >/dev/null || { apt-get update -qq; apt-get install -y -qq time >/dev/null; }
cargo build --release --locked --quiet --bin btm --example bench_scale
btm="$PWD/target/release/btm"
scale="$PWD/target/release/examples/bench_scale"
work=${BENCH_DIR:-$(mktemp -d /var/tmp/btm-bench-scale.XXXXXX)}
mnt="$work/mnt"
trap 'mountpoint -q "$mnt" && umount "$mnt"; rm -rf "$work"' EXIT
trap 'exit 130' INT TERM
mkdir -p "$work"
export BTM_CACHE_DIR="$work/cache"
chunks=${BENCH_CHUNKS:-2000000}
files=${BENCH_FILES:-1000000}

# shellcheck source=scripts/bench-cpu.sh
source scripts/bench-cpu.sh

row() { # LABEL CMD...: one line with seconds, peak RSS and CPU
    local label=$1; shift
    timed "$work/out" "$work/err" "$@"
    printf '%-52s %8s s %6s MiB %s\n' "$label" "$t_secs" "$((t_kb / 1024))" "$(cpu_columns)"
    grep -E '^  requests' "$work/out" || true
}

# fresh_fs: a new ext4 image at $mnt with an inode for every file, for a
# million-file restore. Not the root file system: right after the last
# shape's million files were deleted there, ext4's inode allocator steps
# over each recently deleted inode (reading its table block), and the
# same restore took from 24 to 154 s, most of it in the kernel.
fresh_fs() {
    mountpoint -q "$mnt" && umount "$mnt"
    rm -f "$work/fs.img"
    mkdir -p "$mnt"
    truncate -s 12G "$work/fs.img"
    mkfs.ext4 -q -F -N $((files + files / 5 + 10000)) -E lazy_itable_init=0,lazy_journal_init=0 "$work/fs.img"
    mount -o loop "$work/fs.img" "$mnt"
}

echo "== a store of $chunks chunks"
"$scale" fill "$work/store" "$chunks"
python3 scripts/bench-data.py meta "$work/small" 2000
row "load the known set (what a backup loads)" "$scale" known "$work/store"
row "load the chunk map (what a restore loads)" "$scale" map "$work/store"
row "btm backup, 2,000 files, into that store" "$btm" backup "$work/small" -s "$work/store"
echo x >> "$work/small/accounts/000/0000000"
row "btm backup, incremental" "$btm" backup "$work/small" -s "$work/store"
row "btm restore" "$btm" restore latest "$work/r" -s "$work/store"
row "btm gc --dry-run (grace 1s)" "$btm" gc -s "$work/store" --dry-run --grace 1s
rm -rf "$work/store" "$work/small" "$work/r" "$work/cache"

# Two shapes of small files: `tiny` (16 to 256 bytes) and `sixty` (issue
# 37's: 1,000 directories of 1,000 files of 40 to 80 bytes), each file a
# chunk of its own.
for shape in tiny sixty; do
    echo "== a tree of $files small files ($shape)"
    python3 scripts/bench-data.py "$shape" "$work/$shape" "$files"
    row "btm backup" "$btm" backup "$work/$shape" -s "$work/store2"
    row "btm backup, unchanged" "$btm" backup "$work/$shape" -s "$work/store2"
    echo x >> "$(find "$work/$shape" -name 0000000 -type f)"
    row "btm backup, one file changed" "$btm" backup "$work/$shape" -s "$work/store2"
    fresh_fs
    row "btm restore (into a new ext4)" "$btm" restore latest "$mnt/r" -s "$work/store2"
    diff -r "$work/$shape" "$mnt/r" >/dev/null || { echo "restore differs" >&2; exit 1; }
    umount "$mnt"
    rm -rf "${work:?}/$shape" "$work/fs.img" "$work/store2" "$work/cache"
done
