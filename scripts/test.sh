#!/usr/bin/env bash
# Run the whole test suite, real filesystems included, on a fresh machine.
#
# Installs what the tests need (btrfs-progs, zfs-fuse) if it is missing,
# starts zfs-fuse if it is not running (and stops it again afterwards, by
# the PID it started), then runs every test. Needs root: the tests create
# loop-mounted btrfs images and zfs-fuse pools, and they fail rather than
# skip when they cannot.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "scripts/test.sh: the real-filesystem tests need root (loop devices, zfs-fuse)" >&2
    exit 1
fi

missing=()
command -v mkfs.btrfs >/dev/null || missing+=(btrfs-progs)
command -v zfs-fuse >/dev/null || missing+=(zfs-fuse)
command -v curl >/dev/null || missing+=(curl)
command -v npm >/dev/null || missing+=(nodejs npm)
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v shellcheck >/dev/null || missing+=(shellcheck)
command -v musl-gcc >/dev/null || missing+=(musl-tools)
command -v dpkg-deb >/dev/null || missing+=(dpkg)
# litecoind (with litecoin-cli): a real Bitcoin-Core-family full node.
command -v litecoind >/dev/null || missing+=(litecoind)
# nginx (Debian's), the static web server the published-store tests and
# bench-public.sh read from (not started as a service: tests run their own).
[ -x /usr/sbin/nginx ] || missing+=(nginx-light)
# Python's lmdb (Debian's), for the live-restore test's LMDB workload.
/usr/bin/python3 -c 'import lmdb' 2>/dev/null || missing+=(python3-lmdb)
# Kubernetes without a cluster: podman with runc (crun fails on hybrid
# cgroups) and catatonit (its pause image), buildah for the images, skopeo
# to read their archives, kubectl for kustomize, PyYAML for the pod shim.
command -v podman >/dev/null || missing+=(podman)
command -v runc >/dev/null || missing+=(runc)
command -v catatonit >/dev/null || missing+=(catatonit)
command -v buildah >/dev/null || missing+=(buildah)
command -v skopeo >/dev/null || missing+=(skopeo)
command -v kubectl >/dev/null || missing+=(kubectl)
/usr/bin/python3 -c 'import yaml' 2>/dev/null || missing+=(python3-yaml)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "== installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# promtool, for the alert rules' unit tests: Debian ships it in the
# prometheus package (nothing is started here).
if ! command -v promtool >/dev/null; then
    echo "== installing prometheus (for promtool)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
modprobe loop 2>/dev/null || true

# ganache: a real Ethereum node for the polled-chain tests, from npm, kept
# in a cache directory between runs.
npm_prefix=${BTM_TEST_NPM_PREFIX:-/var/cache/btm-test/npm}
export GANACHE_BIN="$npm_prefix/node_modules/.bin/ganache"
if [ ! -x "$GANACHE_BIN" ]; then
    echo "== installing ganache (npm) into $npm_prefix"
    mkdir -p "$npm_prefix"
    npm install --no-audit --no-fund --silent --prefix "$npm_prefix" ganache@7.9.2 >/dev/null
fi
# Azurite: Microsoft's Azure Blob Storage emulator, for the Azure store tests.
export AZURITE_BIN="$npm_prefix/node_modules/.bin/azurite-blob"
if [ ! -x "$AZURITE_BIN" ]; then
    echo "== installing azurite (npm) into $npm_prefix"
    npm install --no-audit --no-fund --silent --prefix "$npm_prefix" azurite@3.37.0 >/dev/null
fi

# A minimal Debian root with systemd, for the real-systemd test; built once
# with debootstrap (under a minute) and cached as a tarball.
# (man-db and bash-completion: the install test reads a man page and
# completes a command, as an operator would.)
export BTM_TEST_ROOTFS=${BTM_TEST_ROOTFS:-/var/cache/btm-test/bookworm-systemd-man.tar}
if [ ! -f "$BTM_TEST_ROOTFS" ]; then
    echo "== bootstrapping a Debian root with systemd into $BTM_TEST_ROOTFS"
    rootfs_dir=$(mktemp -d /var/tmp/btm-rootfs.XXXXXX)
    # mktemp makes it 0700; as the container's / that would lock out every
    # non-root service (dbus).
    chmod 0755 "$rootfs_dir"
    debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,btrfs-progs,man-db,bash-completion \
        bookworm "$rootfs_dir" http://deb.debian.org/debian >/dev/null
    mkdir -p "$(dirname "$BTM_TEST_ROOTFS")"
    tar -C "$rootfs_dir" -cf "$BTM_TEST_ROOTFS.partial" .
    mv "$BTM_TEST_ROOTFS.partial" "$BTM_TEST_ROOTFS"
    rm -rf "$rootfs_dir"
fi

# The artifacts operators get, so the systemd test installs exactly them.
echo "== make pack, make deb"
make --no-print-directory pack >/dev/null
make --no-print-directory deb >/dev/null
export BTM_PACKAGE="$PWD/btm_package.tar.gz"
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
export BTM_DEB="$PWD/btm_${version}_amd64.deb"
echo "== make image"
make --no-print-directory image >/dev/null
export BTM_IMAGE="$PWD/btm-image.tar"
# The node image the Kubernetes tests run (litecoind from Debian's packages),
# built once and cached.
export BTM_TEST_NODE_IMAGE=${BTM_TEST_NODE_IMAGE:-/var/cache/btm-test/litecoind-image-1.tar}
if [ ! -f "$BTM_TEST_NODE_IMAGE" ]; then
    echo "== building the litecoind test image into $BTM_TEST_NODE_IMAGE"
    mkdir -p "$(dirname "$BTM_TEST_NODE_IMAGE")"
    scripts/test-node-image.sh "$BTM_TEST_NODE_IMAGE"
fi

started_pid=""
stop_zfs_fuse() {
    if [ -n "$started_pid" ] && kill -0 "$started_pid" 2>/dev/null; then
        kill "$started_pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$started_pid" 2>/dev/null || break; sleep 0.1; done
    fi
}
trap stop_zfs_fuse EXIT
trap 'exit 130' INT TERM

if ! zpool list >/dev/null 2>&1; then
    echo "== starting zfs-fuse"
    pidfile=$(mktemp -u /run/btm-test-zfs-fuse.XXXXXX.pid)
    zfs-fuse --pidfile "$pidfile"
    for _ in $(seq 100); do
        zpool list >/dev/null 2>&1 && break
        sleep 0.1
    done
    started_pid=$(cat "$pidfile")
    rm -f "$pidfile"
    zpool list >/dev/null 2>&1 || { echo "zfs-fuse did not come up" >&2; exit 1; }
fi

# s3s-fs: a real S3-compatible server for the S3 store tests.
if ! command -v s3s-fs >/dev/null; then
    echo "== installing s3s-fs (cargo install; a few minutes the first time)"
    cargo install --locked --quiet s3s-fs --version 0.14.1 --features binary
fi

echo "== cargo test (unit, property, CLI, daemon, exports, ganache and litecoind chains, chunk engine, S3, Azure, real btrfs + zfs-fuse, live restore over FUSE (also at a million files and under descriptor limits of 1024 and 256), published stores over nginx, install.sh, real systemd, Kubernetes manifests under podman)"
# A wedged filesystem must fail the run, not hang it until CI's limit.
timeout --signal=KILL 1800 cargo test --locked --all-targets --no-fail-fast -- --test-threads=2
cargo test --locked --doc
echo "== rustdoc: every intra-doc link resolves"
RUSTDOCFLAGS="-D warnings" cargo doc --locked --quiet --no-deps --workspace --document-private-items
