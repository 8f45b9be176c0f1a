#!/usr/bin/env bash
# The main job on an embedded default: `btm daemon` in push mode on a
# throwaway btrfs volume in a loop-mounted image; a pretend node notifies
# each committed height, and the daemon exports every 250 blocks to a local
# chunk store; then `btm status`, `btm list`, `btm backups`, a restore of
# the latest export into a scratch directory (verified against the
# snapshot), a preview with `btm simulate`, and a rollback that keeps a
# validator's signing state.
# Everything is removed at the end, also on failure.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "scripts/demo.sh: needs root to mount a loop device" >&2
    exit 1
fi
command -v mkfs.btrfs >/dev/null || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq btrfs-progs >/dev/null
}
cargo build --release --locked --quiet
btm="$PWD/target/release/btm"

work=$(mktemp -d /tmp/btm-demo.XXXXXX)
daemon_pid=""
cleanup() {
    if [ -n "$daemon_pid" ]; then kill "$daemon_pid" 2>/dev/null; wait "$daemon_pid" 2>/dev/null || true; fi
    umount "$work/mnt" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
export BTM_RUNTIME_DIR="$work/run" BTM_STATE_DIR="$work/state"

truncate -s 256M "$work/fs.img"
mkfs.btrfs -q "$work/fs.img"
mkdir "$work/mnt"
mount -o loop "$work/fs.img" "$work/mnt"
btrfs subvolume create "$work/mnt/chain" >/dev/null
export BTM_VOLUME="$work/mnt/chain"
mkdir -p "$BTM_VOLUME/data"

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

# A sparse 1 GiB "database" with a little data: holes are never stored.
truncate -s 1G "$BTM_VOLUME/data/blockstore.db"
head -c 3000000 /dev/urandom | dd of="$BTM_VOLUME/data/blockstore.db" bs=1M seek=100 conv=notrunc status=none

echo "Starting btm daemon (push mode, fade, itv 10, cap 100) on a throwaway btrfs volume,"
echo "exporting every 250 blocks to the local chunk store $work/store."
"$btm" daemon -i 10 -c 100 -a fade --log-level warn \
    --export-store "$work/store" --export-every 250 --export-tag demo &
daemon_pid=$!
for _ in $(seq 100); do "$btm" status >/dev/null 2>&1 && break; sleep 0.05; done

echo "A pretend node commits blocks 1..1000 and notifies btm at each commit;"
echo "btm answers after the snapshot exists (or says why there is none)."
for h in $(seq 1 1000); do
    echo "state at block $h" > "$BTM_VOLUME/data/state.db"
    echo "{\"height\":\"$h\"}" > "$BTM_VOLUME/data/priv_validator_state.json"
    if [ "$h" -le 3 ] || [ "$h" -eq 10 ]; then
        step "$btm" notify --height "$h"
    else
        "$btm" notify --height "$h" >/dev/null
    fi
done
for _ in $(seq 200); do
    "$btm" status --json | grep -q '"last_export":{"height":1000' && break
    sleep 0.1
done
step "$btm" status
step "$btm" list
step "$btm" backups -s "$work/store" --long
echo
echo "Restoring the latest export into an empty directory and comparing it with snapshot 1000:"
step "$btm" restore latest "$work/restored" -s "$work/store" -t demo
diff -r "$BTM_VOLUME@1000" "$work/restored"
echo "identical; allocated: $(du -sh "$work/restored" | cut -f1) for $(du -sh --apparent-size "$work/restored" | cut -f1) of files (holes stay holes)"
step "$btm" check -s "$work/store" --read-data
step "$btm" simulate -i 10 -c 100 -a fade --blocks 1000
echo
echo "Stopping the node and the daemon, then rolling back to block 555 (closest: 500)."
kill -TERM "$daemon_pid"; wait "$daemon_pid"; daemon_pid=""
step "$btm" rollback -s 555 --yes --preserve data/priv_validator_state.json
step cat "$BTM_VOLUME/data/state.db" "$BTM_VOLUME/data/priv_validator_state.json"
echo
echo "demo done: the volume is back at block 500, and the signing state still says 1000."
