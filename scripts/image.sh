#!/usr/bin/env bash
# Build the OCI image btm-image.tar (`make image`): the static musl binary
# on no base image at all, with CA certificates, a non-root user (btm,
# 65532:65532), `btm` as the entrypoint and the OCI labels. Built with
# Debian's buildah in private, throwaway storage (the host's image store is
# not touched), with layer times from the last commit so a rebuild of the
# same commit gives the same layer.
#
# The archive is an OCI layout (index.json: podman load, docker load of
# Docker 25 and later, ctr import, kind load image-archive) that also
# carries a Docker manifest.json (docker load of older Docker).
#
#   scripts/image.sh                  release build (scripts/build-release.sh)
#   scripts/image.sh --bin PATH       an existing static binary (tests)
#   scripts/image.sh --out FILE       where to write (default ./btm-image.tar)
#   scripts/image.sh --name NAME      image name (default localhost/btm:VERSION)
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
bin=""
out="$PWD/btm-image.tar"
name="localhost/btm:$version"
while [ $# -gt 0 ]; do
    case $1 in
        --bin) bin=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --name) name=$2; shift 2 ;;
        *) echo "image.sh: unknown argument '$1'" >&2; exit 2 ;;
    esac
done

missing=()
command -v buildah >/dev/null || missing+=(buildah)
[ -f /etc/ssl/certs/ca-certificates.crt ] || missing+=(ca-certificates)
command -v python3 >/dev/null || missing+=(python3)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "== installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ -z "$bin" ]; then
    bin=$(scripts/build-release.sh | tail -n 1)
fi
# A binary that needs a loader or libraries would not run on no base.
if ! file -L "$bin" | grep -q 'static'; then
    echo "image.sh: $bin is not statically linked (needs the musl target and musl-gcc)" >&2
    exit 1
fi

work=$(mktemp -d /var/tmp/btm-image.XXXXXX)
storage=(--root "$work/storage" --runroot "$work/run" --storage-driver vfs)
ctr=""
cleanup() {
    [ -n "$ctr" ] && buildah "${storage[@]}" rm "$ctr" >/dev/null 2>&1
    buildah "${storage[@]}" rmi --all --force >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

# The whole file system of the image.
root=$work/rootfs
install -d -m 0755 "$root/usr/local/bin" "$root/etc/ssl/certs"
install -d -m 1777 "$root/tmp"
install -d -m 0755 -o 65532 -g 65532 "$root/home/btm"
install -m 0755 "$bin" "$root/usr/local/bin/btm"
strip "$root/usr/local/bin/btm" 2>/dev/null || true
install -m 0644 /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
printf 'root:x:0:0:root:/root:/sbin/nologin\nbtm:x:65532:65532:btm:/home/btm:/sbin/nologin\n' >"$root/etc/passwd"
printf 'root:x:0:\nbtm:x:65532:\n' >"$root/etc/group"

epoch=$(git log -1 --format=%ct 2>/dev/null || date +%s)
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
ctr=$(buildah "${storage[@]}" from scratch)
buildah "${storage[@]}" add "$ctr" "$root" / >/dev/null
buildah "${storage[@]}" config \
    --entrypoint '["/usr/local/bin/btm"]' --cmd '["--help"]' \
    --user 65532:65532 --workingdir / \
    --env PATH=/usr/local/bin --env HOME=/home/btm --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    --label org.opencontainers.image.title=btm \
    --label "org.opencontainers.image.description=Blockchain Time Machine: snapshots, exports and in-place restores of a node's volume" \
    --label "org.opencontainers.image.version=$version" \
    --label "org.opencontainers.image.revision=$revision" \
    --label org.opencontainers.image.source=https://github.com/btm-project/btm \
    --label org.opencontainers.image.licenses=MIT \
    "$ctr"
buildah "${storage[@]}" commit --quiet --format oci --timestamp "$epoch" "$ctr" "$name" >/dev/null
rm -f "$out"
buildah "${storage[@]}" push --quiet "$name" "oci-archive:$out:$name"

# Older Docker reads manifest.json, not index.json: name the same blobs.
python3 - "$out" "$name" <<'EOF'
import io, json, sys, tarfile
path, name = sys.argv[1], sys.argv[2]
with tarfile.open(path) as t:
    index = json.load(t.extractfile("index.json"))
    digest = index["manifests"][0]["digest"].split(":")[1]
    manifest = json.load(t.extractfile(f"blobs/sha256/{digest}"))
blob = lambda d: "blobs/sha256/" + d["digest"].split(":")[1]
docker = [{"Config": blob(manifest["config"]), "RepoTags": [name],
           "Layers": [blob(l) for l in manifest["layers"]]}]
data = json.dumps(docker).encode()
with tarfile.open(path, "a") as t:
    info = tarfile.TarInfo("manifest.json")
    info.size, info.mode = len(data), 0o644
    t.addfile(info, io.BytesIO(data))
EOF
echo "== $out ($name, $(du -k "$out" | cut -f1) KiB)"
