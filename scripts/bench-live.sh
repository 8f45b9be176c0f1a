#!/usr/bin/env bash
# Benchmark (not a test) of live restore (`btm restore --live`) from a real
# S3 server (s3s-fs) behind a proxy adding 20 ms per request, for a node
# (ganache on LevelDB) beside cold data of each size given in GiB:
#
#   scripts/bench-live.sh [GIB...]     default: 1 8
#
# For each size, in one run:
# - time to first answer: from the command to the node's first RPC answer
#   on the live mount, beside the node's own start time on a local copy;
# - on-demand latency of a cold 4 KiB read (not yet hydrated), beside one
#   ranged GET of a pack through the same proxy (curl);
# - hydration: from the command to "hydrated", beside the fetch floor
#   (every pack GET at full parallelism, bytes discarded) and beside a
#   plain `btm restore` of the same backup into an empty directory;
# - reads after hydration through the mount (passthrough where the kernel
#   has it), sequential and 4 KiB random, beside the same reads of the
#   plain directory after `btm live finish`, page cache dropped before
#   each (after one untimed read: see `cold`);
# - the server's peak RSS.
#
# Then for trees of many small files beside the node (BENCH_LIVE_FILES,
# default 100000 1000000: the metadata-heavy "meta" shape for 100,000,
# the "tiny" shape for more, scripts/bench-data.py), served under
# `ulimit -Sn 1024` (hard 4096):
# - time to ready and to the node's first answer, beside the node's own
#   start on a local copy;
# - the server's peak RSS and the most descriptors it held, against the
#   tree's size;
# - hydration from the command, beside a plain `btm restore` of the same
#   backup and the fetch floor.
#
# Environment: BENCH_DIR, BENCH_LATENCY_MS (20), BENCH_LIVE_FILES (empty: none),
# GANACHE_BIN. Needs root, s3s-fs, ganache (npm), python3, curl, prlimit,
# /dev/fuse.
# shellcheck source=scripts/bench-lib.sh
source "$(dirname "$0")/bench-lib.sh"
sizes=("$@")
[ ${#sizes[@]} -gt 0 ] || sizes=(1 8)
read -r -a many <<<"${BENCH_LIVE_FILES-100000 1000000}"
ganache=${GANACHE_BIN:-/var/cache/btm-test/npm/node_modules/.bin/ganache}
if [ ! -x "$ganache" ]; then
    mkdir -p /var/cache/btm-test/npm
    npm install --no-audit --no-fund --silent --prefix /var/cache/btm-test/npm ganache@7.9.2 >/dev/null
fi

# Live mounts the run leaves when it stops early: their servers are dead.
bench_cleanup() {
    sleep 0.5
    for m in "$work"/live*; do
        umount -l "$m" 2>/dev/null || true
    done
}
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
# cold FILES...: read FILES once and drop the page cache, so that the read
# timed next finds a cold cache but memory the guest already holds. On this
# VM, memory the guest has given back to the host costs a host fault per
# page at its first touch: the first read after hydration spent 97% of
# its time copying pages to user space (perf), natively as through the
# mount, and a second read of the same files took a third of the time.
cold() { cat "$@" >/dev/null; drop_caches; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }
answers() {
    curl -s -m 1 -X POST -H 'content-type: application/json' \
        --data '{"jsonrpc":"2.0","id":1,"method":"eth_blockNumber","params":[]}' \
        "http://127.0.0.1:$1" | grep -q result
}
# start_node DB PORT: ganache on DB; sets node_pid.
start_node() {
    "$ganache" --database.dbPath "$1" --server.host 127.0.0.1 --server.port "$2" \
        --logging.quiet --wallet.seed bench --miner.blockTime 0.5 >/dev/null 2>&1 &
    node_pid=$!
    pids+=("$node_pid")
}
stop_node() { kill "$node_pid"; wait "$node_pid" 2>/dev/null || true; }
wait_answer() { until answers "$1"; do sleep 0.02; done; }

# make_node DIR GIB: a ganache database with a few hundred blocks, and
# GIB GiB of incompressible cold data in 256 MiB files.
make_node() {
    local dir=$1 gib=$2 port=$((40000 + RANDOM % 10000))
    mkdir -p "$dir/cold"
    "$ganache" --database.dbPath "$dir/ganache" --server.host 127.0.0.1 --server.port "$port" \
        --logging.quiet --wallet.seed bench --miner.blockTime 0.01 >/dev/null 2>&1 &
    local pid=$!
    wait_answer "$port"
    sleep 3
    kill "$pid"; wait "$pid" 2>/dev/null || true
    for i in $(seq 1 $((gib * 4))); do
        head -c 256M /dev/urandom >"$dir/cold/part$(printf %03d "$i")"
    done
}

# random_reads FILE COUNT: COUNT reads of 4 KiB at random offsets; prints
# the median and the slowest, in milliseconds.
random_reads() {
    python3 - "$1" "$2" <<'PYEOF'
import os, random, sys, time
path, n = sys.argv[1], int(sys.argv[2])
size = os.path.getsize(path)
fd = os.open(path, os.O_RDONLY)
rng = random.Random(1)
lat = []
for _ in range(n):
    off = rng.randrange(0, size // 4096) * 4096
    t = time.perf_counter()
    os.pread(fd, 4096, off)
    lat.append((time.perf_counter() - t) * 1000)
lat.sort()
print(f"{lat[len(lat) // 2]:.2f} {lat[-1]:.2f} {sum(lat):.0f}")
PYEOF
}

# peak_fds PID FILE: the most descriptors PID holds, written to FILE
# until PID ends (run it in the background).
peak_fds() {
    local peak=0 n
    while kill -0 "$1" 2>/dev/null; do
        n=$(find "/proc/$1/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)
        [ "$n" -le "$peak" ] || { peak=$n; echo "$peak" >"$2"; }
        sleep 0.05
    done
}

# live_many N: N small files beside a ganache node, exported and served
# live under ulimit -Sn 1024.
live_many() {
    local n=$1 shape=meta
    [ "$n" -le 100000 ] || shape=tiny
    echo "== $n files ($shape) beside ganache, s3s-fs with ${latency} ms per request, ulimit -Sn 1024"
    local src="$work/many$n" live="$work/livemany$n" plain="$work/plainmany$n"
    python3 scripts/bench-data.py "$shape" "$src/state" "$n"
    make_node "$src" 0
    results+=("## $n files ($shape, $(du -sh --apparent-size "$src" | cut -f1)) beside ganache, S3 with ${latency} ms per request, ulimit -Sn 1024||")
    mkdir -p "$work/s3/many$n"
    AWS_ENDPOINT_URL=$direct "$btm" backup "$src" -s "s3://many$n/x" -t node >/dev/null
    local port=$((40000 + RANDOM % 10000)) t0 ready first hydration
    t0=$(now); start_node "$src/ganache" "$port"; wait_answer "$port"; note "node's own start (local copy)" "$(since "$t0") s"; stop_node
    drop_caches
    t0=$(now)
    prlimit --nofile=1024:4096 -- "$btm" restore --live -s "s3://many$n/x" -t node "$live" 2>"$work/live.log" &
    server=$!
    pids+=("$server")
    peak_fds "$server" "$work/fds" &
    until grep -q '^ready' "$work/live.log"; do sleep 0.01; done
    ready=$(since "$t0")
    start_node "$live/ganache" "$port"; wait_answer "$port"; first=$(since "$t0")
    note "live: ready (mount shows the whole tree)" "$ready s"
    note "live: time to the node's first answer" "$first s"
    until grep -q '^hydrated' "$work/live.log"; do sleep 0.1; done
    hydration=$(since "$t0")
    note "live: hydration, from the command" "$hydration s"
    note "live: server peak RSS" "$(awk '/VmHWM/ { printf "%.0f", $2 / 1024 }' "/proc/$server/status") MiB"
    note "live: most descriptors held" "$(cat "$work/fds")"
    stop_node
    "$btm" live finish "$live" >/dev/null
    wait "$server"
    diff -r "$src/state" "$live/state" >/dev/null || { echo "live restore differs from the source" >&2; exit 1; }
    measure "btm restore, empty directory" "$btm" restore latest "$plain" -s "s3://many$n/x" -t node
    local restore=$last_secs
    fetch_floor "many$n/x"
    note "ready / plain restore" "$(lead "$restore" "$ready") sooner"
    note "hydration / restore over the fetch floor" "$(lead "$hydration" "$last_secs") / $(lead "$restore" "$last_secs")"
    rm -rf "$src" "$live" "$plain" "${work:?}/s3/many$n"
}

machine_floors
start_s3
direct=${AWS_ENDPOINT_URL%:*}:$((${AWS_ENDPOINT_URL##*:} - 1))
for gib in "${sizes[@]}"; do
    echo "== ganache and $gib GiB of cold data, s3s-fs with ${latency} ms per request"
    results+=("## ganache and $gib GiB of cold data, S3 with ${latency} ms per request||")
    src="$work/src$gib" live="$work/live$gib" plain="$work/plain$gib"
    make_node "$src" "$gib"
    mkdir -p "$work/s3/live$gib"
    AWS_ENDPOINT_URL=$direct "$btm" backup "$src" -s "s3://live$gib/x" -t node >/dev/null

    # The node's own start, on a local copy.
    port=$((40000 + RANDOM % 10000))
    t0=$(now); start_node "$src/ganache" "$port"; wait_answer "$port"; own=$(since "$t0"); stop_node
    note "node's own start (local copy)" "$own s"

    # Live: ready, the node's first answer, a cold read, hydration.
    t0=$(now)
    "$btm" restore --live -s "s3://live$gib/x" -t node "$live" 2>"$work/live.log" &
    server=$!
    pids+=("$server")
    until grep -q '^ready' "$work/live.log"; do sleep 0.01; done
    ready=$(since "$t0")
    start_node "$live/ganache" "$port"; wait_answer "$port"; first=$(since "$t0")
    note "live: ready (mount shows the whole tree)" "$ready s"
    note "live: time to the node's first answer" "$first s"
    read -r cold_med cold_max _ < <(random_reads "$live/cold/part001" 9)
    pack=$(find "$work/s3/live$gib/x/packs" -type f -print -quit)
    rtt=$(curl -s -o /dev/null -w '%{time_total}' -r 0-1048575 \
        -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" --aws-sigv4 aws:amz:us-east-1:s3 \
        --user "$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY" "$AWS_ENDPOINT_URL/${pack#"$work/s3/"}")
    note "live: cold 4 KiB read, median / slowest" "$cold_med / $cold_max ms"
    note "floor: one 1 MiB ranged GET (curl)" "$(awk -v t="$rtt" 'BEGIN { printf "%.1f", t * 1000 }') ms"
    until grep -q '^hydrated' "$work/live.log"; do sleep 0.1; done
    hydration=$(since "$t0")
    note "live: hydration, from the command" "$hydration s"
    rss=$(awk '/VmHWM/ { printf "%.0f", $2 / 1024 }' "/proc/$server/status")
    note "live: server peak RSS" "$rss MiB"
    stop_node

    # Reads after hydration: through the mount, then on the plain directory.
    cold "$live"/cold/part00[1-4]
    measure "read through the mount, sequential 1 GiB" sh -c "cat $live/cold/part00[1-4] >/dev/null"
    mount_seq=$last_secs
    note "live: opens passed through / served, files left" "$("$btm" live status --json "$live" |
        python3 -c 'import json, sys; s = json.load(sys.stdin); print(s["opens_passed_through"], "/", s["opens_served"], ",", s["files_left"])')"
    cold "$live"/cold/part002
    read -r _ _ mount_rand < <(random_reads "$live/cold/part002" 5000)
    "$btm" live finish "$live" >/dev/null
    wait "$server"
    cold "$live"/cold/part00[1-4]
    measure "read natively, sequential 1 GiB" sh -c "cat $live/cold/part00[1-4] >/dev/null"
    native_seq=$last_secs
    cold "$live"/cold/part002
    read -r _ _ native_rand < <(random_reads "$live/cold/part002" 5000)
    note "4 KiB random reads x5000: mount / native" "$mount_rand / $native_rand ms"
    note "reads after hydration, native over mount: seq / 4K" \
        "$(lead "$native_seq" "$mount_seq") / $(lead "$native_rand" "$mount_rand")"
    diff -r "$src/cold" "$live/cold" >/dev/null || { echo "live restore differs from the source" >&2; exit 1; }

    # The plain restore and the fetch floor.
    measure "btm restore, empty directory" "$btm" restore latest "$plain" -s "s3://live$gib/x" -t node
    restore=$last_secs
    fetch_floor "live$gib/x"
    floor=$last_secs
    note "hydration / restore over the fetch floor" "$(lead "$hydration" "$floor") / $(lead "$restore" "$floor")"
    rm -rf "$src" "$live" "$plain" "${work:?}/s3/live$gib"
done
for n in "${many[@]}"; do
    live_many "$n"
done
print_results
