#!/usr/bin/env bash
# Benchmark (not a test): what a restore of many small files costs beside
# the file-creation floor, `tar x` of the same tree into an empty
# filesystem, and how many system calls each makes per file.
#
#   1. A tree of BENCH_FILES (150,000) small files (bench-data.py meta),
#      backed up by btm and archived by tar.
#   2. Into a fresh ext4 image each time, interleaved: tar x (the floor),
#      tar x then sync (the floor made durable, as btm's restore is when
#      it reports success), btm restore; with BENCH_BTM_OLD (another btm
#      binary) also that one, for old and new side by side. Two rounds.
#   3. The same restores once more under `strace -f -c`: system calls per
#      file, by call, for tar and btm (strace's own times are not shown:
#      they are strace's).
#
# Environment: BENCH_DIR, BENCH_FILES, BENCH_BTM_OLD. Needs root (loop
# mounts), GNU time, strace.
# shellcheck source=scripts/bench-lib.sh
source "$(dirname "$0")/bench-lib.sh"
command -v strace >/dev/null || { apt-get update -qq; apt-get install -y -qq strace >/dev/null; }
files=${BENCH_FILES:-150000}
old=${BENCH_BTM_OLD:-}

echo "== a tree of $files small files"
python3 scripts/bench-data.py meta "$work/src" "$files"
"$btm" backup "$work/src" -s "$work/store" >/dev/null
tar cf "$work/src.tar" -C "$work/src" .
results+=("## $files files ($(du -sh --apparent-size "$work/src" | cut -f1) apparent), local store||")

# restore_with WHO: restores the tree into $mnt/r with tar, tar + sync,
# btm, or the old btm.
restore_with() {
    case $1 in
        tar) mkdir "$mnt/r" && tar xpf "$work/src.tar" -C "$mnt/r" ;;
        tar+sync) mkdir "$mnt/r" && tar xpf "$work/src.tar" -C "$mnt/r" && sync ;;
        btm) "$btm" restore latest "$mnt/r" -s "$work/store" >/dev/null ;;
        old) "$old" restore latest "$mnt/r" -s "$work/store" >/dev/null ;;
    esac
}
export -f restore_with
export btm old work mnt

who=(tar tar+sync btm)
[ -z "$old" ] || who+=(old)
# The better of the two rounds of each.
declare -A fastest
for round in 1 2; do
    for w in "${who[@]}"; do
        fresh_fs
        sync
        echo 3 >/proc/sys/vm/drop_caches
        measure "round $round: $w" bash -c "restore_with $w"
        fastest[$w]=$(awk -v a="${fastest[$w]:-}" -v b="$last_secs" 'BEGIN { print (a != "" && a < b) ? a : b }')
    done
done
note "btm restore over tar x (the floor)" "$(lead "${fastest[btm]}" "${fastest[tar]}")"
note "btm restore over tar x + sync" "$(lead "${fastest[btm]}" "${fastest[tar+sync]}")"
[ -z "$old" ] || note "old btm restore over tar x" "$(lead "${fastest[old]}" "${fastest[tar]}")"

echo "== system calls per file (strace -f -c)"
for w in tar btm ${old:+old}; do
    fresh_fs
    strace -f -c -o "$work/strace.$w" bash -c "restore_with $w" >/dev/null
    # Calls per file, the most frequent first; futex and sched_yield are
    # threads waiting, not work on files, and are listed apart.
    awk '$NF ~ /^[a-z_0-9]+$/ && $4 ~ /^[0-9]+$/ && $NF != "total" { print $4, $NF }' "$work/strace.$w" |
        sort -rn | awk -v n="$files" -v w="$w" '
        {
            per = $1 / n
            if (per < 0.05) next
            if ($2 == "futex" || $2 == "sched_yield") { waits = waits sprintf(" %s %.2f", $2, per); next }
            t += per; line = line sprintf(" %s %.2f", $2, per)
        }
        END {
            printf "  %-8s %5.2f calls a file:%s\n", w, t, line
            if (waits != "") printf "  %-8s thread waits a file:%s\n", "", waits
        }'
done
umount "$mnt"
print_results
