#!/usr/bin/env bash
# Build btm_package.tar.gz: btm, install.sh, btm-daemon.service, a commented
# btm.toml.example and a short README, under btm_package/.
#
#   scripts/pack.sh                 release build (scripts/build-release.sh:
#                                   static musl where possible, else glibc)
#   scripts/pack.sh --bin PATH      package an existing binary (tests)
#   scripts/pack.sh --out FILE      where to write (default ./btm_package.tar.gz)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=""
out="$PWD/btm_package.tar.gz"
while [ $# -gt 0 ]; do
    case $1 in
        --bin) bin=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        *) echo "pack.sh: unknown argument '$1'" >&2; exit 2 ;;
    esac
done

if [ -z "$bin" ]; then
    bin=$(scripts/build-release.sh | tail -n 1)
fi

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
pkg=$stage/btm_package
mkdir "$pkg"
install -m 0755 "$bin" "$pkg/btm"
install -m 0755 install.sh "$pkg/install.sh"
install -m 0644 systemd/btm-daemon.service "$pkg/btm-daemon.service"
install -m 0644 'systemd/btm-live@.service' "$pkg/btm-live@.service"
install -m 0644 btm.toml.example "$pkg/btm.toml.example"
install -m 0755 packaging/cosmovisor/btm-preupgrade.sh "$pkg/btm-preupgrade.sh"
# Man pages and completions, generated from the binary's own flags.
"$bin" manpages "$pkg/man" >/dev/null
install -d "$pkg/completions"
"$bin" completions bash >"$pkg/completions/btm.bash"
"$bin" completions zsh >"$pkg/completions/_btm"
"$bin" completions fish >"$pkg/completions/btm.fish"
install -d "$pkg/monitoring"
install -m 0644 packaging/monitoring/btm-alerts.yml packaging/monitoring/btm-alerts.test.yml \
    packaging/monitoring/btm-dashboard.json "$pkg/monitoring/"
install -m 0644 packaging/README.package.md "$pkg/README.md"
tar -C "$stage" -czf "$out" --owner=0 --group=0 btm_package
echo "== $out"
tar -tzf "$out"
