#!/usr/bin/env bash
# Benchmark (not a test): the latency of `btm notify` (push → snapshot →
# answer) against a bare `btrfs subvolume snapshot -r` of the same volume,
# interleaved in the same run, and the daemon's idle RSS. Prints figures;
# README.md records them. Needs root (loop-mounted btrfs).
set -euo pipefail
cd "$(dirname "$0")/.."
n=${BENCH_ROUNDS:-60}

cargo build --release --locked --quiet
btm="$PWD/target/release/btm"
work=$(mktemp -d /tmp/btm-bench.XXXXXX)
daemon_pid=""
cleanup() {
    [ -n "$daemon_pid" ] && kill "$daemon_pid" 2>/dev/null && wait "$daemon_pid" 2>/dev/null
    umount "$work/mnt" 2>/dev/null || true
    rm -rf "$work" "$BTM_RUNTIME_DIR"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
# Runtime files on tmpfs, as /run is in production.
export BTM_RUNTIME_DIR=/dev/shm/btm-bench.$$ BTM_STATE_DIR="$work/state"

truncate -s 1G "$work/fs.img"
mkfs.btrfs -q "$work/fs.img" >/dev/null 2>&1
mkdir "$work/mnt"
mount -o loop "$work/fs.img" "$work/mnt"
btrfs subvolume create "$work/mnt/chain" >/dev/null
mkdir "$work/mnt/bare"
head -c 64M /dev/urandom > "$work/mnt/chain/state.db"

"$btm" daemon -p "$work/mnt/chain" -i 1 -c 100000 --log-level warn &
daemon_pid=$!
for _ in $(seq 100); do "$btm" status >/dev/null 2>&1 && break; sleep 0.05; done
sleep 1
rss() { awk '/VmRSS/{print $2}' "/proc/$daemon_pid/status"; }
# shellcheck source=scripts/bench-cpu.sh
source scripts/bench-cpu.sh
daemon_ticks() { pid_ticks "$daemon_pid"; }
rss_start=$(rss)

now() { date +%s%N; }
bare=() push=()
for i in $(seq 1 "$n"); do
    # The node writes a little between blocks, as a real one would.
    head -c 256K /dev/urandom | dd of="$work/mnt/chain/state.db" bs=256K seek=$((i % 200)) conv=notrunc status=none
    t0=$(now); btrfs subvolume snapshot -r "$work/mnt/chain" "$work/mnt/bare/s$i" >/dev/null; t1=$(now)
    bare+=($(( (t1 - t0) / 1000 )))
    head -c 256K /dev/urandom | dd of="$work/mnt/chain/state.db" bs=256K seek=$((i % 200)) conv=notrunc status=none
    t0=$(now); "$btm" notify --height "$i" >/dev/null; t1=$(now)
    push+=($(( (t1 - t0) / 1000 )))
done
# The same comparison from one process, with the library call a Rust node
# makes instead of spawning `btm notify`.
cargo build --release --locked --quiet --example notify_latency
lib=$("$PWD/target/release/examples/notify_latency" "$work/mnt/chain" "$work/mnt/bare" \
    "$BTM_RUNTIME_DIR/btm.sock" "$n" $((n + 1)))
mapfile -t lbare < <(awk '{print $1}' <<<"$lib"); mapfile -t lpush < <(awk '{print $2}' <<<"$lib")
sleep 2
rss_idle=$(rss)
fds() { find "/proc/$daemon_pid/fd" -mindepth 1 -maxdepth 1 | wc -l; }
fds_before=$(fds)

# Soak: many more heights (and status calls); memory and open files must
# stay flat.
soak=${BENCH_SOAK:-1000}
soak_d0=$(daemon_ticks); read -r soak_m0 soak_t0 < <(machine_ticks); soak_s0=$(date +%s%N)
for i in $(seq $((2 * n + 1)) $((2 * n + soak))); do
    "$btm" notify --height "$i" >/dev/null
    [ $((i % 100)) -eq 0 ] && "$btm" status >/dev/null
done
soak_d1=$(daemon_ticks); read -r soak_m1 soak_t1 < <(machine_ticks); soak_s1=$(date +%s%N)
sleep 2
rss_soak=$(rss); fds_after=$(fds)

stats() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {printf "median %.1f ms, p90 %.1f ms", a[int((NR+1)/2)]/1000, a[int(NR*0.9)]/1000}'; }
med() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
mb=$(med "${bare[@]}"); mp=$(med "${push[@]}")
lb=$(med "${lbare[@]}"); lp=$(med "${lpush[@]}")
echo "rounds:                            $n of each, interleaved"
echo "library call (btm::client::notify, as a Rust node does):"
echo "  bare btrfs subvolume snapshot:   $(stats "${lbare[@]}")"
echo "  notify → snapshot → answer:      $(stats "${lpush[@]}")"
awk -v b="$lb" -v p="$lp" 'BEGIN {printf "  overhead (median):               %+.1f%% (target: within +20%%)\n", (p-b)*100/b}'
echo "shell, 256 KiB written before each (the btm notify command adds its own process start):"
echo "  bare btrfs subvolume snapshot:   $(stats "${bare[@]}")"
echo "  btm notify:                      $(stats "${push[@]}")"
awk -v b="$mb" -v p="$mp" 'BEGIN {printf "  overhead (median):               %+.1f%%\n", (p-b)*100/b}'
echo "daemon RSS after start:            $((rss_start / 1024)).$(( (rss_start % 1024) * 10 / 1024 )) MiB"
echo "daemon RSS idle after $((2 * n)) snapshots: $((rss_idle / 1024)).$(( (rss_idle % 1024) * 10 / 1024 )) MiB (target: under 20 MB)"
awk -v d=$((soak_d1 - soak_d0)) -v t="$ticks" -v n="$soak" -v w=$((soak_s1 - soak_s0)) \
    'BEGIN { printf "daemon CPU over the soak:          %.2f s in %.1f s, %.2f ms a snapshot", d / t, w / 1e9, 1000 * d / t / n }'
echo ", machine $(machine_busy "$soak_m0" "$soak_t0" "$soak_m1" "$soak_t1")"
echo "after $soak more snapshots:        RSS $((rss_soak / 1024)).$(( (rss_soak % 1024) * 10 / 1024 )) MiB, open fds $fds_before -> $fds_after"
