#!/usr/bin/env bash
# Benchmark (not a test) of the chunk engine against restic and rustic on a local
# store, side by side in one run, on several dataset shapes; see
# scripts/bench-lib.sh for what each run measures. The copy floors (`cp`
# into a fresh filesystem, bare and then synced) come beside each shape.
#
#   scripts/bench-chunk.sh [SHAPE...]      default: node meta chunk state
#
# Environment: BENCH_DIR, BENCH_META_FILES (100000).
# shellcheck source=scripts/bench-lib.sh
source "$(dirname "$0")/bench-lib.sh"
shapes=("$@")
[ ${#shapes[@]} -gt 0 ] || shapes=(node meta chunk state)

machine_floors
for shape in "${shapes[@]}"; do
    echo "== $shape, local store"
    rm -rf "$work/restic" "$work/btm" "$work/rustic"
    run_shape local "$shape" "$work/restic" "$work/btm" "$work/rustic" \
        "$work/restic" "$work/btm" "$work/rustic"
    rm -rf "$work/restic" "$work/btm" "$work/rustic"
done
print_results
