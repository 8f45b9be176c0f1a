# shellcheck shell=bash
# What the two engine benchmarks share, sourced by scripts/bench-chunk.sh
# (local store) and scripts/bench-remote.sh (S3 behind a latency proxy):
# btm, restic and rustic (restic's Rust reimplementation, built from
# crates.io) side by side in one run, on several dataset shapes
# (scripts/bench-data.py).
#
# For each shape: full backup, the shape's incremental change, incremental
# backup, store growth, restore into an empty filesystem (a fresh ext4
# image per restore, so no run inherits another's deleted inodes), restore
# over the previous version, objects stored, peak RSS and the command's
# own CPU time. The machine's floors come first: disk write, BLAKE3, zstd.
#
# Environment: BENCH_DIR (work directory), BENCH_META_FILES (100000),
# RUSTIC (the rustic binary; built into /var/cache/btm-test/rustic with
# `cargo install rustic-rs` when missing, which takes a while once).
# Needs root (loop mounts), restic, GNU time, curl.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
meta_files=${BENCH_META_FILES:-100000}

for pkg in restic:restic time:/usr/bin/time e2fsprogs:mkfs.ext4 curl:curl; do
    cmd=${pkg#*:}
    command -v "$cmd" >/dev/null || { apt-get update -qq; apt-get install -y -qq "${pkg%%:*}" >/dev/null; }
done
rustic=${RUSTIC:-/var/cache/btm-test/rustic/bin/rustic}
[ -x "$rustic" ] || {
    cargo install --locked --quiet rustic-rs --version 0.11.4 --root /var/cache/btm-test/rustic
    rustic=/var/cache/btm-test/rustic/bin/rustic
}
cargo build --release --locked --quiet --bin btm --example latency_proxy --example floors
btm="$PWD/target/release/btm"
work=${BENCH_DIR:-$(mktemp -d /var/tmp/btm-bench.XXXXXX)}
mnt="$work/mnt"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    # A script's own mounts under $work (bench-live.sh's), then ours.
    ! declare -F bench_cleanup >/dev/null || bench_cleanup
    mountpoint -q "$mnt" && umount "$mnt"
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
mkdir -p "$mnt"
export RESTIC_PASSWORD=bench RESTIC_CACHE_DIR="$work/restic-cache" BTM_CACHE_DIR="$work/btm-cache"
export RUSTIC_PASSWORD=bench XDG_CONFIG_HOME="$work/xdg"
# rustic_on USTORE: sets ucmd, the rustic command line for USTORE, a
# directory, or profile:NAME for a profile under $XDG_CONFIG_HOME/rustic
# (its S3 options).
rustic_on() {
    local repo=(-r "$1")
    [[ $1 != profile:* ]] || repo=(-P "${1#profile:}")
    ucmd=("$rustic" "${repo[@]}" --no-progress --cache-dir "$work/rustic-cache")
}

# A fresh ext4 filesystem at $mnt, big enough for any shape.
fresh_fs() {
    mountpoint -q "$mnt" && umount "$mnt"
    rm -f "$work/fs.img"
    truncate -s 8G "$work/fs.img"
    mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$work/fs.img"
    mount -o loop "$work/fs.img" "$mnt"
}

# shellcheck source=scripts/bench-cpu.sh
source scripts/bench-cpu.sh

# The servers a benchmark runs beside the client (s3s-fs, the latency
# proxy, nginx): their CPU during each measure is reported with it.
servers=()

# server_ticks: CPU ticks (user + system) the servers and their children
# have used so far.
server_ticks() {
    local p all=() t=0
    for p in "${servers[@]}"; do
        all+=("$p")
        mapfile -t -O "${#all[@]}" all < <(pgrep -P "$p" || true)
    done
    for p in "${all[@]}"; do
        t=$((t + $(pid_ticks "$p")))
    done
    echo "$t"
}

# measure LABEL CMD...: runs CMD, records "LABEL|seconds|peak MiB|user
# s|system s|servers' CPU s|busy|machine", where busy is the CPU of the
# command and the servers over what the cores had in that time, and
# machine the whole machine's (kernel threads too): near 100 % the run was
# CPU-bound here, and a ratio to a floor is to be read against that. Sets
# last_secs, last_cpu (the machine's busy CPU seconds meanwhile) and
# last_srv (the servers' CPU seconds).
results=()
measure() {
    local label=$1; shift
    sync
    local s0 s1; s0=$(server_ticks)
    timed "$work/out" "$work/err" "$@"
    s1=$(server_ticks)
    local secs=$t_secs kb=$t_kb user=$t_user sys=$t_sys machine=$t_machine srv busy
    srv=$(awk -v a="$s0" -v b="$s1" -v t="$ticks" 'BEGIN { printf "%.2f", (b - a) / t }')
    busy=$(awk -v u="$user" -v s="$sys" -v v="$srv" -v c="$cores" -v w="$secs" \
        'BEGIN { printf "%.0f%%", (w > 0) ? 100 * (u + s + v) / (c * w) : 0 }')
    last_cpu=$t_cpu last_srv=$srv
    results+=("$label|$secs|$((kb / 1024))|$user|$sys|$srv|$busy|$machine")
    last_secs=$secs
    printf '  %-46s %8s s %6s MiB %6s user %6s sys %6s servers %5s busy, machine %s\n' \
        "$label" "$secs" "$((kb / 1024))" "$user" "$sys" "$srv" "$busy" "$machine"
}
note() { results+=("$1|$2|||||"); printf '  %-46s %8s\n' "$1" "$2"; }
# lead A B: how many times faster B's seconds are than A's.
lead() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1fx", a / b }'; }
bytes() { du -sb "$1" | cut -f1; }
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }

# start_s3: s3s-fs on a random port, serving $work/s3 (a directory per
# bucket), and the latency proxy (BENCH_LATENCY_MS, 20) one port above it;
# exports the AWS_* variables that reach it through the proxy.
start_s3() {
    command -v s3s-fs >/dev/null || cargo install --locked s3s-fs --version 0.14.1 --features binary
    latency=${BENCH_LATENCY_MS:-20}
    mkdir -p "$work/s3"
    local port=$((20000 + RANDOM % 20000))
    s3s-fs --host 127.0.0.1 --port "$port" --access-key bench --secret-key benchsecret "$work/s3" >"$work/s3.log" 2>&1 &
    pids+=($!)
    servers+=($!)
    ./target/release/examples/latency_proxy "127.0.0.1:$((port + 1))" "127.0.0.1:$port" "$latency" >"$work/proxy.log" 2>&1 &
    pids+=($!)
    servers+=($!)
    for _ in $(seq 1 100); do
        grep -q listening "$work/proxy.log" && (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
        sleep 0.1
    done
    export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=benchsecret AWS_REGION=us-east-1 AWS_ALLOW_HTTP=true
    export AWS_ENDPOINT_URL="http://127.0.0.1:$((port + 1))"
}

# fetch_floor PREFIX [DIR]: GET every pack under $work/s3/PREFIX/packs
# through the proxy, 16 in flight (btm's restore default for a remote
# store), bytes discarded: the floor of any restore of those packs here.
# With DIR, each pack is written to a file in DIR instead and the whole
# synced: fetching the bytes and storing them durably, as a restore must
# (its own bytes are more, once decompressed). Sets floor_bytes, the bytes
# fetched.
fetch_floor() {
    local out=/dev/null label="floor: GET btm's packs, 16 in flight (curl)"
    if [ -n "${2:-}" ]; then
        mkdir -p "$2"
        out="$2/{}"
        label="floor: the same GETs into files, then sync"
    fi
    # shellcheck disable=SC2016 # $1, $2 and $3 are the inner shell's.
    measure "$label" sh -c '
        cd "$1" && find "$2/packs" -type f | xargs -P 16 -I{} curl -sSf --create-dirs -o "$3" \
            -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" --aws-sigv4 aws:amz:us-east-1:s3 \
            --user "$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY" "$AWS_ENDPOINT_URL/{}" &&
        if [ "$3" != /dev/null ]; then sync; fi' - "$work/s3" "$1" "$out"
    floor_bytes=$(bytes "$work/s3/$1/packs")
}

machine_floors() {
    echo "== machine floors"
    dd if=/dev/zero of="$work/dd" bs=1M count=1024 conv=fdatasync 2>&1 | tail -1 | sed 's/^/floor: disk write (dd, 1 GiB, fdatasync): /'
    rm -f "$work/dd"
    ./target/release/examples/floors
}

# make_shape SHAPE DIR: the shape's dataset; sets append (btm's
# --appendonly flags for it).
make_shape() {
    local shape=$1 src=$2
    if [ "$shape" = meta ]; then
        python3 scripts/bench-data.py meta "$src" "$meta_files"
    else
        python3 scripts/bench-data.py "$shape" "$src"
    fi
    case $shape in
        node) append=(--appendonly blocks/blocks.log) ;;
        chunk) append=(--appendonly blocks.log) ;;
        state) append=(--appendonly log/wal) ;;
        churn) append=(--appendonly log/wal.log) ;;
        *) append=() ;;
    esac
}

# run_shape WHERE SHAPE RSTORE BSTORE USTORE RDIR BDIR UDIR [AFTER_FULL
# BEFORE_RESTORE]: one side-by-side run of restic on RSTORE, btm on BSTORE
# and rustic on USTORE, whose objects are under RDIR, BDIR and UDIR; WHERE
# (local or remote) labels it, and a local run also measures the copy
# floors. The remote benchmark's hooks: AFTER_FULL measures the upload
# floor right after btm's full backup (it sets put_floor), BEFORE_RESTORE
# [DIR] the fetch floor right before btm's restore (fetch_floor: its
# seconds and floor_bytes; with DIR, fetched and stored), so that each is
# compared with a floor of the same minute on this noisy machine. The last
# lines give btm's lead over each peer, the restores as multiples of the
# floor (the durable copy locally; remotely the fetch floor for the bytes
# btm's restore downloaded, then the slowest of it, the durable copy and
# fetching and storing the same bytes), btm's
# restore over its CPU floor (the machine's CPU it kept busy, spread over
# every core: where that is near the wall time, only less work is faster),
# and remotely btm's full backup over the upload floor.
run_shape() {
    local where=$1 shape=$2 rstore=$3 bstore=$4 ustore=$5 rdir=$6 bdir=$7 udir=$8
    local after_full=${9:-} before_restore=${10:-}
    local src="$work/src" prev="$work/prev"
    rm -rf "$src" "$prev" "$work/restic-cache" "$work/btm-cache" "$work/rustic-cache"
    make_shape "$shape" "$src"
    results+=("## $shape, $where ($(du -sh --apparent-size "$src" | cut -f1) apparent, $(du -sh "$src" | cut -f1) real, $(find "$src" -type f | wc -l) files)||")
    restic init -q -r "$rstore" >/dev/null
    rustic_on "$ustore"
    "${ucmd[@]}" init >/dev/null 2>&1
    local floor=
    if [ "$where" = local ]; then
        fresh_fs
        measure "floor: cp -a --sparse=always into a fresh fs" cp -a --sparse=always "$src" "$mnt/copy"
        # btm's restore is durable when it reports success; this is the
        # same copy made durable, the floor to compare it with.
        fresh_fs
        # shellcheck disable=SC2016 # $1 and $2 are the inner shell's.
        measure "floor: the same cp, then sync" sh -c 'cp -a --sparse=always "$1" "$2" && sync' - "$src" "$mnt/copy"
        floor=$last_secs
    fi
    measure "restic full" restic -q -r "$rstore" backup "$src"; local rfull=$last_secs
    measure "rustic full" "${ucmd[@]}" backup "$src"; local ufull=$last_secs
    measure "btm full" "$btm" backup "$src" -s "$bstore" "${append[@]}"; local bfull=$last_secs
    put_floor=
    [ -z "$after_full" ] || "$after_full"
    local r1 b1 u1; r1=$(bytes "$rdir"); b1=$(bytes "$bdir"); u1=$(bytes "$udir")
    cp -a --sparse=always "$src" "$prev"
    python3 scripts/bench-data.py "$shape-change" "$src"
    measure "restic incremental" restic -q -r "$rstore" backup "$src"; local rincr=$last_secs
    measure "rustic incremental" "${ucmd[@]}" backup "$src"; local uincr=$last_secs
    measure "btm incremental" "$btm" backup "$src" -s "$bstore" "${append[@]}"; local bincr=$last_secs
    note "store growth, restic" "$(mib $(( $(bytes "$rdir") - r1 ))) MiB"
    note "store growth, rustic" "$(mib $(( $(bytes "$udir") - u1 ))) MiB"
    note "store growth, btm" "$(mib $(( $(bytes "$bdir") - b1 ))) MiB"
    fresh_fs
    measure "restic restore, empty fs" restic -q -r "$rstore" restore latest --target "$mnt/r"; local rrest=$last_secs
    fresh_fs
    measure "rustic restore, empty fs" "${ucmd[@]}" restore latest "$mnt/u"; local urest=$last_secs
    fresh_fs
    local raw_floor='' copy_floor='' stored_floor=''
    if [ -n "$before_restore" ]; then
        # A restore can be no faster than fetching its bytes, nor than
        # making the same tree durable from memory (files created,
        # written and synced: on a tree of many small files this one is
        # the larger). Both in the restore's minute.
        # shellcheck disable=SC2016 # $1 and $2 are the inner shell's.
        measure "floor: cp -a --sparse=always, then sync" sh -c 'cp -a --sparse=always "$1" "$2" && sync' - "$src" "$mnt/copy"
        copy_floor=$last_secs
        # And no faster than fetching its bytes and storing them.
        fresh_fs
        "$before_restore" "$mnt/fetched"
        stored_floor=$last_secs
        fresh_fs
        "$before_restore"
        raw_floor=$last_secs
    fi
    measure "btm restore, empty fs" "$btm" restore latest "$mnt/b" -s "$bstore" --json
    local brest=$last_secs brest_cpu=$last_cpu brest_srv=$last_srv
    if [ -n "$raw_floor" ]; then
        # GET every pack is more than this restore needs (the change
        # replaced some of the full backup's bytes): the floor for the
        # bytes it downloaded, at the rate the GETs had.
        local got; got=$(python3 -c 'import json, sys; print(json.load(sys.stdin)["summary"]["bytes_downloaded"])' <"$work/out")
        floor=$(scaled_floor "$raw_floor" "$got")
        note "fetch floor for btm's $(mib "$got") of $(mib "$floor_bytes") MiB" "$floor s"
        stored_floor=$(scaled_floor "$stored_floor" "$got")
        note "fetch-and-store floor for the same" "$stored_floor s"
    fi
    diff -r "$src" "$mnt/b" >/dev/null || { echo "btm's restore differs from the source" >&2; exit 1; }
    # Each pair of fetch floor (scaled) and btm's restore, "floor:restore",
    # and the same floors plus the servers' CPU during each restore spread
    # over the cores (issue 37's bound where the servers' CPU keeps a
    # restore from the fetch floor on this machine's two cores).
    local pairs='' served=''
    if [ -n "$raw_floor" ]; then
        # One pair swings by a fifth on this VM: two more, and medians.
        pairs="$floor:$brest"
        served="$(with_servers "$floor" "$brest_srv"):$brest"
        for _ in 2 3; do
            fresh_fs
            "$before_restore"
            local f2; f2=$(scaled_floor "$last_secs" "$got")
            measure "btm restore, empty fs (again)" "$btm" restore latest "$mnt/b" -s "$bstore"
            pairs="$pairs $f2:$last_secs"
            served="$served $(with_servers "$f2" "$last_srv"):$last_secs"
        done
    fi
    fresh_fs
    # restic restores the source's absolute path under its target.
    mkdir -p "$mnt/r$(dirname "$src")"
    cp -a --sparse=always "$prev" "$mnt/r$src"
    measure "restic restore, over previous" restic -q -r "$rstore" restore latest --target "$mnt/r"
    mkdir -p "$mnt/u$(dirname "$src")"
    cp -a --sparse=always "$prev" "$mnt/u$src"
    measure "rustic restore, over previous" "${ucmd[@]}" restore latest "$mnt/u"
    cp -a --sparse=always "$prev" "$mnt/b"
    # --delete: what the change removed goes too (the churn shape removes
    # files), so the result is checked exact; restic 0.14 has no such flag.
    measure "btm restore, over previous" "$btm" restore latest "$mnt/b" -s "$bstore" --delete
    diff -r "$src" "$mnt/b" >/dev/null || { echo "btm's restore over the previous version differs" >&2; exit 1; }
    umount "$mnt"
    note "objects, restic" "$(find "$rdir" -type f | wc -l)"
    note "objects, rustic" "$(find "$udir" -type f | wc -l)"
    note "objects, btm" "$(find "$bdir" -type f | wc -l)"
    note "btm's lead over restic: full / incr / restore" \
        "$(lead "$rfull" "$bfull") / $(lead "$rincr" "$bincr") / $(lead "$rrest" "$brest")"
    note "btm's lead over rustic: full / incr / restore" \
        "$(lead "$ufull" "$bfull") / $(lead "$uincr" "$bincr") / $(lead "$urest" "$brest")"
    [ -z "$put_floor" ] || note "btm's full backup over the upload floor" "$(lead "$bfull" "$put_floor")"
    # Restores as multiples of the floor (the durable copy locally, the
    # fetch floor remotely): the best lead over restic any restore could
    # show here, and how far btm's restore is from it.
    [ -z "$floor" ] || note "restic's restore over the floor; btm's" "$(lead "$rrest" "$floor") / $(lead "$brest" "$floor")"
    if [ -n "$pairs" ]; then
        note "btm's restore over the fetch floor, 3 pairs" "$(over_floors "$pairs" 0)"
        note "over the fetch floor + the servers' CPU / $cores" "$(over_floors "$served" 0)"
        note "btm's restore over the slower floor (fetch, durable copy)" "$(over_floors "$pairs" "$copy_floor")"
        note "btm's restore over the slowest (and fetch and store)" \
            "$(over_floors "$pairs" "$(awk -v a="$copy_floor" -v b="$stored_floor" 'BEGIN { print (a > b) ? a : b }')")"
    fi
    note "btm's restore over its CPU floor ($brest_cpu CPU s / $cores)" \
        "$(awk -v w="$brest" -v c="$brest_cpu" -v n="$cores" 'BEGIN { printf "%.2fx", (c > 0) ? w * n / c : 0 }')"
    rm -rf "$prev"
}

# scaled_floor SECS BYTES: a fetch floor of SECS for $floor_bytes, scaled
# to the BYTES a restore downloaded, at the rate the GETs had.
scaled_floor() {
    awk -v f="$1" -v g="$2" -v b="$floor_bytes" 'BEGIN { printf "%.2f", f * g / b }'
}

# with_servers FLOOR SRV: a fetch floor plus SRV seconds of the servers'
# CPU spread over the cores.
with_servers() {
    awk -v f="$1" -v s="$2" -v c="$cores" 'BEGIN { printf "%.2f", f + s / c }'
}

# over_floors "F:R F:R F:R" COPY: each restore R over the slower of its
# fetch floor F and the durable copy COPY (0: none), and their median.
over_floors() {
    local ratios
    ratios=$(echo "$1" | tr ' ' '\n' | awk -F: -v c="$2" '{ f = ($1 > c) ? $1 : c; printf "%.2f\n", $2 / f }')
    local mid=$(( ($(echo "$ratios" | wc -l) + 1) / 2 ))
    echo "$(echo "$ratios" | sed 's/$/x/' | tr '\n' ' ')(median $(echo "$ratios" | sort -n | sed -n "${mid}p")x)"
}

print_results() {
    echo
    echo "CPU: the command's user and system seconds; servers: what the servers"
    echo "(s3s-fs, the proxy, nginx) used meanwhile; busy: the command's and the"
    echo "servers' CPU over $cores cores x wall; machine: all the machine's CPU"
    echo "(kernel threads too: a loop device's writes, writeback) over the same."
    printf '%-46s %9s %8s %7s %7s %8s %5s %s\n' "operation" "seconds" "RSS MiB" "user s" "sys s" "servers" "busy" "machine"
    local r label secs mb user sys srv busy machine
    for r in "${results[@]}"; do
        IFS='|' read -r label secs mb user sys srv busy machine <<<"$r"
        if [[ $label == "##"* ]]; then echo; echo "${label#\#\# }"; continue; fi
        printf '%-46s %9s %8s %7s %7s %8s %5s %s\n' "$label" "$secs" "$mb" "$user" "$sys" "$srv" "$busy" "$machine"
    done
    echo
    echo "restic's restore over the previous version writes every file again; btm's"
    echo "reads the local files and fetches only the chunks that differ."
}
