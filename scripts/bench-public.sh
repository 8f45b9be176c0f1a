#!/usr/bin/env bash
# Benchmark (not a test) of public snapshots (docs/publishing.md): a store
# published with `btm backup --publish` and served by Debian's nginx behind
# a proxy adding 20 ms per request and capping each connection at 50 MB/s
# (one long-distance TCP flow is capped by its window), against the status
# quo: `tar | zstd -1` of the same tree served by the same nginx, restored
# with `curl | zstd -d | tar x`.
#
#   scripts/bench-public.sh [SHAPE...]     default: node meta
#
# For each shape (scripts/bench-data.py: node, a node's LSM files, tables,
# sparse state file and block log; meta, 100,000 small account files),
# in one run:
# - full restore into an empty file system: `btm restore` over http://,
#   ranged GETs in parallel (and from two mirrors, each behind its own
#   proxy, `--mirror`), beside the tarball pipeline, the fetch floor
#   (every pack GET, 16 in flight, bytes discarded), the tarball's own
#   floor (one GET of it, bytes discarded) and the file-creation floor (the
#   tarball pipeline from a local file, no network);
# - a node a week behind (node-week, meta-week: 10% of the files changed,
#   appends to the block log): `btm restore --delete` over the old copy,
#   page cache dropped (and again warm, a node just stopped), beside
#   downloading the new tarball again and beside reading the old copy
#   (the floor of any restore that checks what is there); the bytes each
#   fetched;
# - publish cost: the requests and time `--publish` added to the week's
#   backup (one read and one write of the catalog).
#
# Environment: BENCH_DIR, BENCH_LATENCY_MS (20), BENCH_RATE_MB (50),
# BENCH_META_FILES (100000). Needs root, nginx, zstd, curl.
# shellcheck source=scripts/bench-lib.sh
source "$(dirname "$0")/bench-lib.sh"
shapes=("$@")
[ ${#shapes[@]} -gt 0 ] || shapes=(node meta)
for pkg in nginx-light:/usr/sbin/nginx zstd:zstd; do
    [ -x "${pkg#*:}" ] || command -v "${pkg#*:}" >/dev/null || { apt-get update -qq; apt-get install -y -qq "${pkg%%:*}" >/dev/null; }
done
latency=${BENCH_LATENCY_MS:-20}
rate=${BENCH_RATE_MB:-50}

machine_floors
www="$work/www"
mkdir -p "$www" "$work/nginx"
port=$((20000 + RANDOM % 20000))
cat >"$work/nginx/nginx.conf" <<CONF
daemon off;
user root;
worker_processes 2;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log;
events { worker_connections 1024; }
http {
  access_log off;
  sendfile on;
  client_body_temp_path $work/nginx/body;
  proxy_temp_path $work/nginx/proxy;
  fastcgi_temp_path $work/nginx/fcgi;
  uwsgi_temp_path $work/nginx/uwsgi;
  scgi_temp_path $work/nginx/scgi;
  server {
    listen 127.0.0.1:$port;
    root $www;
    location ~ /catalog\$ { add_header Cache-Control "no-cache"; }
  }
}
CONF
/usr/sbin/nginx -c "$work/nginx/nginx.conf" -p "$work/nginx" &
pids+=($!)
servers+=($!)
./target/release/examples/latency_proxy "127.0.0.1:$((port + 1))" "127.0.0.1:$port" "$latency" "$rate" >"$work/proxy.log" 2>&1 &
pids+=($!)
servers+=($!)
for _ in $(seq 1 100); do
    grep -q listening "$work/proxy.log" && (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.1
done
url="http://127.0.0.1:$((port + 1))"
# A second mirror: the same server behind a proxy of its own, as far away.
./target/release/examples/latency_proxy "127.0.0.1:$((port + 2))" "127.0.0.1:$port" "$latency" "$rate" >"$work/proxy2.log" 2>&1 &
pids+=($!)
servers+=($!)
for _ in $(seq 1 100); do grep -q listening "$work/proxy2.log" && break; sleep 0.1; done
url2="http://127.0.0.1:$((port + 2))"
"$btm" key generate "$work/publisher.key" >"$work/key.out"
trust=$(tail -1 "$work/key.out")
echo "== nginx behind a proxy: +$latency ms per request, $rate MB/s per connection"

drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
json_field() { python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); [d := d[k] for k in sys.argv[2:]]; print(d)' "$@"; }

for shape in "${shapes[@]}"; do
    echo "== $shape"
    src="$work/src-$shape"
    make_shape "$shape" "$src"
    "$btm" backup "$src" -s "$www/$shape" -t "$shape" "${append[@]}" --publish --signing-key "$work/publisher.key" >/dev/null 2>&1
    tar -C "$src" -cf - . | zstd -1 -T0 -q -f -o "$www/$shape.tar.zst"
    tar_bytes=$(stat -c %s "$www/$shape.tar.zst")
    note "store / tarball size" "$(mib "$(bytes "$www/$shape")") / $(mib "$tar_bytes") MiB"

    fresh_fs
    drop_caches
    measure "btm restore (full, http)" "$btm" restore latest "$mnt/btm" -s "$url/$shape" --trust "$trust" -t "$shape"
    btm_full=$last_secs
    diff -r --no-dereference "$src" "$mnt/btm" >/dev/null || { echo "btm's restore differs from the source" >&2; exit 1; }
    drop_caches
    # shellcheck disable=SC2016 # $1 and $2 are the inner shell's.
    measure "tarball: curl | zstd -d | tar x" sh -c 'mkdir -p "$2" && curl -sSf "$1" | zstd -dcq | tar -x -C "$2"' - "$url/$shape.tar.zst" "$mnt/tar"
    tar_full=$last_secs
    # shellcheck disable=SC2016 # $1 and $2 are the inner shell's.
    measure "floor: GET btm's packs, 16 in flight (curl)" sh -c '
        cd "$1" && find packs -type f | xargs -P 16 -I{} curl -sSf -o /dev/null "$2/{}"' - "$www/$shape" "$url/$shape"
    measure "floor: GET the tarball, one stream (curl)" curl -sSf -o /dev/null "$url/$shape.tar.zst"
    # Creating the files is a floor of its own (100,000 of them: meta).
    drop_caches
    # shellcheck disable=SC2016 # $1 and $2 are the inner shell's.
    measure "floor: the tarball pipeline from a local file" sh -c 'mkdir -p "$2" && zstd -dcq "$1" | tar -x -C "$2"' - "$www/$shape.tar.zst" "$mnt/local"
    rm -rf "$mnt/local"
    note "full restore: btm's lead over the tarball" "$(lead "$tar_full" "$btm_full")"
    drop_caches
    measure "btm restore (full, two mirrors)" "$btm" restore latest "$mnt/two" -s "$url/$shape" --mirror "$url2/$shape" --trust "$trust" -t "$shape"
    diff -r --no-dereference "$src" "$mnt/two" >/dev/null || { echo "btm's two-mirror restore differs from the source" >&2; exit 1; }
    rm -rf "$mnt/two"
    note "full restore: two mirrors over one" "$(lead "$btm_full" "$last_secs")"

    # A week later.
    python3 scripts/bench-data.py "$shape-week" "$src"
    "$btm" backup "$src" -s "$www/$shape" -t "$shape" "${append[@]}" --publish --signing-key "$work/publisher.key" --json >"$work/week.json" 2>/dev/null
    note "publish cost (requests, ms) after the week's backup" "$(json_field "$work/week.json" published requests), $(json_field "$work/week.json" published ms)"
    tar -C "$src" -cf - . | zstd -1 -T0 -q -f -o "$www/$shape.tar.zst"
    tar_bytes=$(stat -c %s "$www/$shape.tar.zst")
    # A restore over a copy must read it to know what is right: the floor
    # is reading the old copy from a cold page cache.
    cp -a "$mnt/btm" "$mnt/again"
    drop_caches
    # shellcheck disable=SC2016 # $1 is the inner shell's.
    measure "floor: read the old copy, cold cache (cat)" sh -c 'find "$1" -type f -print0 | xargs -0 cat >/dev/null' - "$mnt/btm"
    read_floor=$last_secs
    drop_caches
    # --delete: the files compaction removed go too, as on the publisher.
    # shellcheck disable=SC2016 # $1 to $6 are the inner shell's.
    measure "btm restore --delete over the week-old copy" sh -c '"$1" restore latest "$2" -s "$3" --trust "$4" -t "$5" --delete --json >"$6"' - \
        "$btm" "$mnt/btm" "$url/$shape" "$trust" "$shape" "$work/restore.json"
    btm_week=$last_secs
    diff -r --no-dereference "$src" "$mnt/btm" >/dev/null || { echo "btm's incremental restore differs from the source" >&2; exit 1; }
    fetched=$(json_field "$work/restore.json" summary bytes_downloaded)
    # The same over a node just stopped: its files still in the page cache.
    find "$mnt/again" -type f -print0 | xargs -0 cat >/dev/null
    # shellcheck disable=SC2016 # $1 to $5 are the inner shell's.
    measure "btm restore --delete, page cache warm" sh -c '"$1" restore latest "$2" -s "$3" --trust "$4" -t "$5" --delete >/dev/null' - \
        "$btm" "$mnt/again" "$url/$shape" "$trust" "$shape"
    btm_warm=$last_secs
    rm -rf "$mnt/tar" "$mnt/again"
    drop_caches
    # shellcheck disable=SC2016 # $1 and $2 are the inner shell's.
    measure "tarball: download it all again" sh -c 'mkdir -p "$2" && curl -sSf "$1" | zstd -dcq | tar -x -C "$2"' - "$url/$shape.tar.zst" "$mnt/tar"
    tar_week=$last_secs
    note "week behind: btm's lead over the tarball, cold / warm" "$(lead "$tar_week" "$btm_week") / $(lead "$tar_week" "$btm_warm")"
    note "week behind: btm (cold) over the local read floor" "$(lead "$btm_week" "$read_floor")"
    note "week behind: bytes fetched / tarball bytes" "$(mib "$fetched") / $(mib "$tar_bytes") MiB ($(awk -v a="$fetched" -v b="$tar_bytes" 'BEGIN { printf "%.1f", 100 * a / b }')%)"
done
