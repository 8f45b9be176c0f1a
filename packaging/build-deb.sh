#!/usr/bin/env bash
# Build btm_<version>_amd64.deb from packaging/deb: /usr/bin/btm, the unit
# in /lib/systemd/system (ExecStart pointing at /usr/bin/btm), the example
# configuration as the conffile /etc/btm/btm.toml, and maintainer scripts
# that reload systemd without starting anything.
#   packaging/build-deb.sh [--bin PATH] [--out DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
bin=""
out=$PWD
while [ $# -gt 0 ]; do
    case $1 in
        --bin) bin=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        *) echo "build-deb.sh: unknown argument '$1'" >&2; exit 2 ;;
    esac
done
if [ -z "$bin" ]; then
    bin=$(scripts/build-release.sh | tail -n 1)
fi
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
root=$stage/btm
install -D -m 0755 "$bin" "$root/usr/bin/btm"
install -d "$root/lib/systemd/system"
sed 's#/usr/local/bin/btm#/usr/bin/btm#g' systemd/btm-daemon.service >"$root/lib/systemd/system/btm-daemon.service"
chmod 0644 "$root/lib/systemd/system/btm-daemon.service"
sed 's#/usr/local/bin/btm#/usr/bin/btm#g' 'systemd/btm-live@.service' >"$root/lib/systemd/system/btm-live@.service"
chmod 0644 "$root/lib/systemd/system/btm-live@.service"
install -D -m 0644 btm.toml.example "$root/etc/btm/btm.toml"
install -D -m 0755 packaging/cosmovisor/btm-preupgrade.sh "$root/usr/lib/btm/btm-preupgrade.sh"
# Man pages and completions, generated from the binary's own flags.
"$bin" manpages "$stage/man" >/dev/null
install -d "$root/usr/share/man/man1"
for page in "$stage"/man/*.1; do
    name=$(basename "$page")
    gzip -9n -c "$page" >"$root/usr/share/man/man1/$name.gz"
done
install -d "$root/usr/share/bash-completion/completions" "$root/usr/share/zsh/vendor-completions" \
    "$root/usr/share/fish/vendor_completions.d"
"$bin" completions bash >"$root/usr/share/bash-completion/completions/btm"
"$bin" completions zsh >"$root/usr/share/zsh/vendor-completions/_btm"
"$bin" completions fish >"$root/usr/share/fish/vendor_completions.d/btm.fish"
for f in btm-alerts.yml btm-alerts.test.yml btm-dashboard.json; do
    install -D -m 0644 "packaging/monitoring/$f" "$root/usr/share/btm/monitoring/$f"
done
install -D -m 0644 README.md "$root/usr/share/doc/btm/README.md"
# The README links docs/*.md; keep the same relative layout.
for doc in docs/*.md; do
    install -D -m 0644 "$doc" "$root/usr/share/doc/btm/$doc"
done
install -d "$root/DEBIAN"
sed "s/@VERSION@/$version/" packaging/deb/control.in >"$root/DEBIAN/control"
echo "Installed-Size: $(du -sk "$root" | cut -f1)" >>"$root/DEBIAN/control"
install -m 0644 packaging/deb/conffiles "$root/DEBIAN/conffiles"
for s in postinst prerm postrm; do
    install -m 0755 "packaging/deb/$s" "$root/DEBIAN/$s"
done
deb="$out/btm_${version}_amd64.deb"
dpkg-deb --root-owner-group --build "$root" "$deb" >/dev/null
echo "== $deb"
dpkg-deb --info "$deb" | sed -n '/Package:/,$p'
