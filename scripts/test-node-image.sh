#!/usr/bin/env bash
# Build the node image the Kubernetes tests run: Debian's litecoind (a
# Bitcoin-Core-family full node) on a minimal Debian root made with
# debootstrap, as an OCI archive, with buildah in throwaway storage.
#
#   scripts/test-node-image.sh OUT.tar
set -euo pipefail
out=${1:?usage: scripts/test-node-image.sh OUT.tar}
work=$(mktemp -d /var/tmp/btm-node-image.XXXXXX)
storage=(--root "$work/storage" --runroot "$work/run" --storage-driver vfs)
cleanup() {
    buildah "${storage[@]}" rm --all >/dev/null 2>&1 || true
    buildah "${storage[@]}" rmi --all --force >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT
root=$work/rootfs
mkdir -m 0755 "$root"
debootstrap --variant=minbase --include=litecoind bookworm "$root" http://deb.debian.org/debian >/dev/null
rm -rf "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* "$root"/usr/share/doc "$root"/usr/share/man "$root"/usr/share/locale
ctr=$(buildah "${storage[@]}" from scratch)
buildah "${storage[@]}" add "$ctr" "$root" / >/dev/null
buildah "${storage[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --cmd '["litecoind"]' "$ctr"
buildah "${storage[@]}" commit --quiet --format oci "$ctr" localhost/btm-test-litecoind:1 >/dev/null
rm -f "$out.partial"
buildah "${storage[@]}" push --quiet localhost/btm-test-litecoind:1 "oci-archive:$out.partial:localhost/btm-test-litecoind:1"
mv "$out.partial" "$out"
