#!/usr/bin/env bash
# The main job on an embedded default: a throwaway btrfs volume in a
# loop-mounted image, snapshots at block heights under the fade policy,
# list, a preview with simulate, and a rollback that keeps a validator's
# signing state. Everything is removed at the end, also on failure.
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
cleanup() {
    umount "$work/mnt" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
export BTM_RUNTIME_DIR="$work/run" BTM_STATE_DIR="$work/state"

truncate -s 256M "$work/fs.img"
mkfs.btrfs -q "$work/fs.img"
mkdir "$work/mnt"
mount -o loop "$work/fs.img" "$work/mnt"
btrfs subvolume create "$work/mnt/chain" >/dev/null
export BTM_VOLUME="$work/mnt/chain"
mkdir -p "$BTM_VOLUME/data"

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

echo "A pretend node commits blocks 1..1000; btm snapshots every 10 (fade, cap 100)."
for h in $(seq 1 1000); do
    echo "state at block $h" > "$BTM_VOLUME/data/state.db"
    echo "{\"height\":\"$h\"}" > "$BTM_VOLUME/data/priv_validator_state.json"
    if [ $((h % 10)) -eq 0 ]; then
        "$btm" snapshot --height "$h" --prune -i 10 -c 100 -a fade >/dev/null
    fi
done
step "$btm" list
step "$btm" simulate -i 10 -c 100 -a fade --blocks 1000
step "$btm" rollback -s 555 --yes --preserve data/priv_validator_state.json
step cat "$BTM_VOLUME/data/state.db" "$BTM_VOLUME/data/priv_validator_state.json"
step "$btm" list
echo
echo "demo done: the volume is back at block 500, and the signing state still says 1000."
