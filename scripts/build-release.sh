#!/usr/bin/env bash
# Build the release binary and print its path on the last line of stdout:
# static musl when the target installs here and a musl C compiler exists
# (zstd is C), else glibc (README: minimum glibc). Used by pack.sh and
# packaging/build-deb.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
musl=x86_64-unknown-linux-musl
use_musl=0
if rustup target list --installed 2>/dev/null | grep -qx "$musl" \
    || rustup target add "$musl" >/dev/null 2>&1; then
    if command -v musl-gcc >/dev/null \
        || { command -v apt-get >/dev/null && apt-get install -y -qq musl-tools >/dev/null 2>&1; }; then
        use_musl=1
    fi
fi
if [ "$use_musl" -eq 1 ]; then
    echo "== building a static binary ($musl)" >&2
    cargo build --release --locked --target "$musl" >&2
    echo "$PWD/target/$musl/release/btm"
else
    echo "== building a glibc binary (the musl target is not available here)" >&2
    cargo build --release --locked >&2
    echo "$PWD/target/release/btm"
fi
