#!/usr/bin/env bash
# Benchmark (not a test) behind the default chunk and pack sizes
# (docs/format.md, "Choosing the sizes"). On the node-like shape
# (scripts/bench-data.py node), for each chunk size: full backup, then the
# shape's incremental change (in-place page rewrites, an append, new
# tables) and what the incremental uploads. restic's incremental upload on
# the same change is the yardstick. Then, for each pack size, a full backup
# and a restore through s3s-fs with BENCH_LATENCY_MS (20) per request.
# Environment: BENCH_DIR. Needs restic, GNU time, s3s-fs.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v s3s-fs >/dev/null || cargo install --locked s3s-fs --version 0.14.1 --features binary
cargo build --release --locked --quiet --bin btm --example latency_proxy
btm="$PWD/target/release/btm"
work=${BENCH_DIR:-$(mktemp -d /var/tmp/btm-bench-sizes.XXXXXX)}
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
mkdir -p "$work"
export RESTIC_PASSWORD=bench RESTIC_CACHE_DIR="$work/restic-cache" BTM_CACHE_DIR="$work/btm-cache"
python3 scripts/bench-data.py node "$work/v1"
cp -a --sparse=always "$work/v1" "$work/v2"
python3 scripts/bench-data.py node-change "$work/v2"
# shellcheck source=scripts/bench-cpu.sh
source scripts/bench-cpu.sh
# secs CMD...: "seconds/CPU seconds (user + system)".
secs() {
    timed "$work/out" "$work/err" "$@"
    awk -v w="$t_secs" -v u="$t_user" -v s="$t_sys" 'BEGIN { printf "%s/%.2f", w, u + s }'
}
growth() { echo $(( ($(du -sb "$1" | cut -f1) - $2) / 1024 )); }

# Both tools back up the same path, first v1 then v2 in its place.
src="$work/src"
restic init -q -r "$work/restic" >/dev/null
rm -rf "$src"; cp -a --sparse=always "$work/v1" "$src"
restic -q -r "$work/restic" backup "$src" >/dev/null
before=$(du -sb "$work/restic" | cut -f1)
rm -rf "$src"; cp -a --sparse=always "$work/v2" "$src"
restic -q -r "$work/restic" backup "$src" >/dev/null
echo "restic: incremental store growth $(growth "$work/restic" "$before") KiB"

echo
echo "(seconds/CPU seconds of btm, user + system)"
printf '%-8s %12s %12s %16s\n' chunk "full s" "incr s" "incr growth KiB"
for cs in 256KiB 512KiB 1MiB 2MiB 4MiB; do
    rm -rf "$work/btm" "$work/btm-cache" "$src"
    cp -a --sparse=always "$work/v1" "$src"
    full=$(secs "$btm" backup "$src" -s "$work/btm" --chunk-size "$cs" --appendonly blocks/blocks.log)
    before=$(du -sb "$work/btm" | cut -f1)
    rm -rf "$src"; cp -a --sparse=always "$work/v2" "$src"
    incr=$(secs "$btm" backup "$src" -s "$work/btm" --chunk-size "$cs" --appendonly blocks/blocks.log)
    printf '%-8s %12s %12s %16s\n' "$cs" "$full" "$incr" "$(growth "$work/btm" "$before")"
done

port=$((20000 + RANDOM % 20000))
mkdir -p "$work/s3"
s3s-fs --host 127.0.0.1 --port "$port" --access-key bench --secret-key benchsecret "$work/s3" >"$work/s3.log" 2>&1 &
pids+=($!)
./target/release/examples/latency_proxy "127.0.0.1:$((port + 1))" "127.0.0.1:$port" "${BENCH_LATENCY_MS:-20}" >"$work/proxy.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do grep -q listening "$work/proxy.log" && (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=benchsecret AWS_REGION=us-east-1 AWS_ALLOW_HTTP=true
export AWS_ENDPOINT_URL="http://127.0.0.1:$((port + 1))"
echo
printf '%-8s %12s %12s %10s %8s %s\n' pack "full s" "restore s" "peak MiB" objects "restore CPU"
for ps in 16MiB 32MiB 64MiB; do
    bucket="p${ps%MiB}"; mkdir -p "$work/s3/$bucket"
    rm -rf "$work/btm-cache" "$work/r"
    full=$(secs "$btm" backup "$work/v1" -s "s3://$bucket/x" --pack-size "$ps")
    timed /dev/null "$work/err" "$btm" restore latest "$work/r" -s "s3://$bucket/x"
    printf '%-8s %12s %12s %10s %8s %s\n' "$ps" "$full" "$t_secs" "$((t_kb / 1024))" "$(find "$work/s3/$bucket" -type f | wc -l)" "$(cpu_columns)"
done
