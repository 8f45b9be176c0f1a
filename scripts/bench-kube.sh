#!/usr/bin/env bash
# Benchmark (not a test) of the Kubernetes init container's restore against
# the same restore on the host, in one run: the same static binary, the
# same user (1000, as the example pods run), the same descriptor limit
# (1024:1024, as the tests' podman gives), into a fresh ext4 filesystem
# each, from s3s-fs behind the latency proxy (scripts/bench-lib.sh). The
# container is the image `make image` builds, run by podman (runc) with a
# read-only root, as the component runs it; its time includes the
# container's start, measured alone beside it. Host and container
# alternate, three rounds each, and the medians are compared. The fetch
# floor (every pack GET, 16 in flight) is measured beside them, and the
# image's size is printed.
#
#   scripts/bench-kube.sh [SHAPE...]     default: node meta
#
# Environment: BENCH_DIR, BENCH_LATENCY_MS (20), BENCH_META_FILES (here
# 30000). Needs podman, runc and buildah besides what bench-lib.sh needs.
export BENCH_META_FILES=${BENCH_META_FILES:-30000}
# shellcheck source=scripts/bench-lib.sh
source "$(dirname "$0")/bench-lib.sh"
shapes=("$@")
[ ${#shapes[@]} -gt 0 ] || shapes=(node meta)
for pkg in podman runc buildah; do
    command -v "$pkg" >/dev/null || { apt-get update -qq; apt-get install -y -qq "$pkg" >/dev/null; }
done

static=$(scripts/build-release.sh 2>/dev/null | tail -n 1)
scripts/image.sh --bin "$static" --out "$work/btm-image.tar" >/dev/null
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
mkdir -p "$work/podman"
cat >"$work/podman/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]
[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
events_logger = "file"
EOF
export CONTAINERS_CONF="$work/podman/containers.conf"
podman=(podman --root "$work/podman/storage" --runroot "$work/podman/run")
bench_cleanup() {
    "${podman[@]}" rm -a -f >/dev/null 2>&1 || true
    "${podman[@]}" rmi -a -f >/dev/null 2>&1 || true
}
"${podman[@]}" load -q -i "$work/btm-image.tar" >/dev/null

echo "== the image"
note "image archive (compressed layer)" "$(mib "$(bytes "$work/btm-image.tar")") MiB"
note "image unpacked" "$(mib "$("${podman[@]}" image inspect --format '{{.Size}}' "localhost/btm:$version")") MiB"

# median A B C: the middle one.
median() { printf '%s\n' "$@" | sort -g | sed -n "$((($# + 1) / 2))p"; }

# restore_on_host ROUND: the restore as user 1000, descriptors 1024:1024,
# into a fresh filesystem.
restore_on_host() {
    fresh_fs
    # User 1000 must reach the filesystem: $work is private to root.
    chmod 0755 "$work" "$mnt"
    install -d -o 1000 -g 1000 "$mnt/r" "$mnt/cache"
    measure "btm restore on the host ($1)" prlimit --nofile=1024:1024 -- \
        setpriv --reuid=1000 --regid=1000 --clear-groups env BTM_CACHE_DIR="$mnt/cache" \
        "$static" restore latest "$mnt/r" -s "s3://$bucket/x" -t bench
}

# restore_in_container ROUND: the same in the image, as the component runs
# it (its cache on the volume, a read-only root); podman's time, the
# container's start included.
restore_in_container() {
    fresh_fs
    chmod 0755 "$mnt"
    install -d -o 1000 -g 1000 "$mnt/r"
    measure "btm restore in the container ($1)" "${podman[@]}" run --rm --network host \
        --user 1000:1000 --read-only --tmpfs /tmp -v "$mnt/r:/data" \
        -e AWS_ACCESS_KEY_ID -e AWS_SECRET_ACCESS_KEY -e AWS_REGION -e AWS_ALLOW_HTTP -e AWS_ENDPOINT_URL \
        -e BTM_CACHE_DIR=/data/.btm/cache -e XDG_STATE_HOME=/data/.btm/state \
        "localhost/btm:$version" restore latest /data -s "s3://$bucket/x" -t bench
}

machine_floors
measure "floor: a container's start and end (btm --version)" "${podman[@]}" run --rm \
    --read-only "localhost/btm:$version" --version
start_s3
for shape in "${shapes[@]}"; do
    echo "== $shape, s3s-fs with ${latency} ms per request"
    bucket="b$((10000 + RANDOM))"
    mkdir -p "$work/s3/$bucket" "$work/src"
    make_shape "$shape" "$work/src"
    "$btm" backup "$work/src" -s "s3://$bucket/x" -t bench >/dev/null
    fetch_floor "$bucket/x"
    floor=$last_secs

    # Alternated, three rounds each: this VM is noisy, and whichever ran
    # first would warm the server's page cache for the other.
    hosts=() containers=()
    for round in 1 2 3; do
        restore_on_host "$round"
        hosts+=("$last_secs")
        restore_in_container "$round"
        containers+=("$last_secs")
    done
    host=$(median "${hosts[@]}") container=$(median "${containers[@]}")
    note "$shape: host, median of 3" "$host s"
    note "$shape: container, median of 3" "$container s"
    note "$shape: container / host" "$(lead "$container" "$host")"
    note "$shape: container - host" "$(awk -v a="$container" -v b="$host" 'BEGIN { printf "%+.2f s", a - b }')"
    note "$shape: host / fetch floor" "$(lead "$host" "$floor")"
    umount "$mnt"
    rm -rf "${work:?}/src" "${work:?}/s3/$bucket" "$BTM_CACHE_DIR"
done
print_results
