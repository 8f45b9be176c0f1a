#!/bin/sh
# Cosmovisor pre-upgrade hook: snapshot the node's volume at the upgrade
# height through the running btm daemon, protected with the upgrade's name,
# so that a failed upgrade can be rolled back (btm rollback --to-protected
# NAME) and no retention policy prunes that snapshot.
#
# Cosmovisor runs it as
#     $DAEMON_HOME/cosmovisor/$COSMOVISOR_CUSTOM_PREUPGRADE <upgrade-name> <upgrade-height>
# from $DAEMON_HOME, before switching binaries; a non-zero exit fails the
# upgrade. Install it there (docs/cosmovisor.md) and set
#     COSMOVISOR_CUSTOM_PREUPGRADE=btm-preupgrade.sh
#
# Environment (all optional): BTM (the btm binary, default: btm on PATH),
# BTM_SOCKET (the daemon's control socket), BTM_PREUPGRADE_TIMEOUT (how long
# to wait for the snapshot, default 10m).
set -eu

prog="btm-preupgrade"
die() {
    echo "$prog: $*" >&2
    exit 1
}

[ "$#" -eq 2 ] || die "expected <upgrade-name> <upgrade-height>, as Cosmovisor passes them; got $# argument(s)"
name=$1
height=$2
case $height in
    '' | *[!0-9]*) die "upgrade height '$height' is not a block height" ;;
esac
# The label: the upgrade's name in btm's label alphabet (letters, digits,
# '.', '_', '-'), at most 64 characters.
label=$(printf '%s' "$name" | tr -c 'A-Za-z0-9._-' '_' | cut -c 1-64)
[ -n "$label" ] || die "the upgrade has an empty name"

btm=${BTM:-btm}
set -- notify --height "$height" --protect "$label" --timeout "${BTM_PREUPGRADE_TIMEOUT:-10m}"
if [ -n "${BTM_SOCKET:-}" ]; then
    set -- "$@" --socket "$BTM_SOCKET"
fi
if ! out=$("$btm" "$@" 2>&1); then
    die "no protected snapshot for upgrade '$name' at height $height, so the upgrade must not go on: $out"
fi
echo "$prog: $out (protected as $label); roll back with: btm rollback --to-protected $label"
