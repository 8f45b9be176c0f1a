#!/usr/bin/env bash
# Benchmark (not a test) of the sparse chunk engine against restic, on a
# state-like dataset, to a local store, warm page cache, same run:
#   - a 2 GiB sparse file with 512 MiB of data in scattered 4 MiB extents
#   - 200 files of 4 MiB of compressible data
#   - a 512 MiB append-only file of random data
# Reports full backup, incremental backup (1% of the sparse file's extents
# rewritten in place, 16 MiB appended, 5 new files), restore into an empty
# directory and restore over the previous version: wall time and peak RSS.
# Also sweeps the chunk size. Needs restic (apt) and GNU time (apt).
set -euo pipefail
cd "$(dirname "$0")/.."
for pkg in restic:restic time:/usr/bin/time; do
    cmd=${pkg#*:}
    command -v "$cmd" >/dev/null || { apt-get update -qq; apt-get install -y -qq "${pkg%%:*}" >/dev/null; }
done
cargo build --release --locked --quiet
btm="$PWD/target/release/btm"
work=${BENCH_DIR:-$(mktemp -d /var/tmp/btm-bench-chunk.XXXXXX)}
trap 'rm -rf "$work"' EXIT
trap 'exit 130' INT TERM
src="$work/src"
mkdir -p "$src/files"

echo "== generating the dataset in $work"
truncate -s 2G "$src/state.db"
# 128 extents of 4 MiB at scattered 16 MiB-aligned slots.
for i in $(seq 0 127); do
    slot=$(( (i * 37) % 128 ))
    head -c 4M /dev/urandom | dd of="$src/state.db" bs=4M seek=$((slot * 4)) conv=notrunc status=none
done
base=$(head -c 64K /dev/urandom | base64 -w0)
for i in $(seq 1 200); do
    for _ in $(seq 1 48); do printf '%s %d\n' "$base" "$i"; done | head -c 4M > "$src/files/f$i"
done
head -c 512M /dev/urandom > "$src/blocks.log"
du -sh --apparent-size "$src" | sed 's/^/apparent size: /'
du -sh "$src" | sed 's/^/allocated:     /'

measure() { # label, command...: prints "label seconds peakMB"
    local label=$1; shift
    sync; /usr/bin/time -f "%e %M" -o "$work/time" "$@" >/dev/null 2>"$work/err" || { cat "$work/err"; exit 1; }
    read -r secs kb < "$work/time"
    printf '%s %s %s\n' "$label" "$secs" "$((kb / 1024))"
}

change() {
    # 1% of the extents (2 of 128) rewritten in place, 16 MiB appended, 5 new files.
    for slot in 5 77; do head -c 4M /dev/urandom | dd of="$src/state.db" bs=4M seek=$((slot * 4)) conv=notrunc status=none; done
    head -c 16M /dev/urandom >> "$src/blocks.log"
    for i in $(seq 201 205); do head -c 4M /dev/urandom > "$src/files/f$i"; done
}

export RESTIC_PASSWORD=bench RESTIC_CACHE_DIR="$work/restic-cache"
restic init -q -r "$work/restic" >/dev/null
cp -a --sparse=always "$src" "$work/src-v1"   # for resetting between runs
results=()
results+=("$(measure "restic full" restic -q -r "$work/restic" backup "$src")")
results+=("$(measure "btm full" "$btm" backup "$src" -s "$work/btm" --appendonly blocks.log)")
change
results+=("$(measure "restic incremental" restic -q -r "$work/restic" backup "$src")")
results+=("$(measure "btm incremental" "$btm" backup "$src" -s "$work/btm" --appendonly blocks.log)")
results+=("$(measure "restic restore (empty dir)" restic -q -r "$work/restic" restore latest --target "$work/r-restic")")
results+=("$(measure "btm restore (empty dir)" "$btm" restore latest "$work/r-btm" -s "$work/btm")")
# The write floor: copying the same tree, sparse, with cp.
results+=("$(measure "cp --sparse=always (write floor)" cp -a --sparse=always "$src" "$work/r-cp")")
rm -rf "$work/r-cp"
# Over the previous version: put v1 in place, restore the latest over it.
rm -rf "$work/r-restic" "$work/r-btm"
cp -a --sparse=always "$work/src-v1" "$work/r-restic-over"
cp -a --sparse=always "$work/src-v1" "$work/r-btm-over"
results+=("$(measure "restic restore (over previous)" restic -q -r "$work/restic" restore latest --target "$work/r-restic-over")")
results+=("$(measure "btm restore (over previous)" "$btm" restore latest "$work/r-btm-over" -s "$work/btm")")
cmp "$src/state.db" "$work/r-btm-over/state.db" && cmp "$src/blocks.log" "$work/r-btm-over/blocks.log"
echo "restored state.db allocated: btm $(du -h "$work/r-btm-over/state.db" | cut -f1), original $(du -h "$src/state.db" | cut -f1)"
restic_over=$(find "$work/r-restic-over" -name state.db | head -1)
echo "restic's restored state.db allocated: $(du -h "$restic_over" | cut -f1)"

echo
printf '%-32s %10s %12s\n' "operation" "seconds" "peak RSS MB"
for r in "${results[@]}"; do
    label=$(sed -E 's/ [0-9.]+ [0-9]+$//' <<<"$r"); secs=$(awk '{print $(NF-1)}' <<<"$r"); mb=$(awk '{print $NF}' <<<"$r")
    printf '%-32s %10s %12s\n' "$label" "$secs" "$mb"
done
rm -rf "$work/r-restic-over" "$work/r-btm-over" "$work/restic" "$work/src-v1"

echo
echo "== chunk size sweep (full backup to a fresh store, then the same incremental change)"
printf '%-10s %12s %14s %16s\n' "chunk" "full s" "incr s" "incr uploaded"
for cs in 1M 2M 4M 8M 16M; do
    rm -rf "$work/sweep"
    full=$(measure x "$btm" backup "$src" -s "$work/sweep" --chunk-size "$cs" --appendonly blocks.log | awk '{print $2}')
    change
    /usr/bin/time -f "%e" -o "$work/time" "$btm" backup "$src" -s "$work/sweep" --chunk-size "$cs" --appendonly blocks.log --json > "$work/incr.json" 2>/dev/null
    up=$(python3 -c "import json;print(json.load(open('$work/incr.json'))['bytes_uploaded']//1048576)")
    printf '%-10s %12s %14s %14s MB\n' "$cs" "$full" "$(cat "$work/time")" "$up"
done
