#!/usr/bin/env bash
# Install (or uninstall) btm and its systemd service from an unpacked
# btm_package: /usr/local/bin/btm, /etc/systemd/system/btm-daemon.service
# and /etc/btm/btm.toml. Takes the original btm's flags. See usage().
set -euo pipefail

PROG=${0##*/}
HERE=$(cd "$(dirname "$0")" && pwd)

BIN_DEST=/usr/local/bin/btm
# The Cosmovisor pre-upgrade hook (docs/cosmovisor.md).
HOOK_DEST=/usr/local/lib/btm/btm-preupgrade.sh
UNIT_DIR=/etc/systemd/system
UNIT_DEST=$UNIT_DIR/btm-daemon.service
DROPIN_DIR=$UNIT_DIR/btm-daemon.service.d
CONFIG_DIR=/etc/btm
CONFIG_DEST=$CONFIG_DIR/btm.toml
SERVICE=btm-daemon

usage() {
    cat <<EOF
Usage

    $PROG [OPTIONS]

Installs btm to $BIN_DEST, the $SERVICE service to $UNIT_DEST,
writes $CONFIG_DEST from the options, and enables and starts the
service. Values are given with '=' (--snapshot-itv=4, -i=4).

Snapshot options (the original btm's, long or short style)
    --snapshot-itv=<ITV>        -i=<ITV>    snapshot every ITV blocks (default 10)
    --snapshot-cap=<CAP>        -c=<CAP>    keep at most CAP snapshots (default 100)
    --snapshot-mode=<MODE>      -m=<MODE>   zfs or btrfs (default: detected)
    --snapshot-algo=<ALGO>      -a=<ALGO>   fair or fade (default fair)
    --snapshot-volume=<VOLUME>  -p=<VOLUME> ZFS dataset or btrfs subvolume path (required)
    --snapshot-target=<VOLUME>              alias of --snapshot-volume

Height source
    --height-source=<SOURCE>    push (default), cometbft, ethereum, file or command
    --rpc-url=<URL>             node RPC for cometbft and ethereum (http://...); with
                                another source and --rpc-kind, asked only for the
                                chain identity exports record (btm verify)
    --rpc-kind=<KIND>           cometbft or ethereum: the kind of --rpc-url beside a
                                push, file or command source
    --height-file=<PATH>        for --height-source=file
    --height-command=<CMD>      for --height-source=command (split on spaces)

Exports (all optional; --export-store enables them)
    --export-store=<STORE>      a path, file://..., s3://..., gs://... or az://...
    --export-every=<BLOCKS>     export every BLOCKS blocks (a multiple of ITV)
    --export-tag=<TAG>          backup tag (default: the host name)
    --export-keep=<N>           backups kept (default 7)

Validator safety (docs/validators.md)
    --preserve=<PATHS>          comma-separated paths, relative to the volume, that
                                btm rollback carries across besides the signing
                                state it finds itself (priv_validator_state.json,
                                slashing-protection databases), which it always keeps

Other
    --force         replace an existing $CONFIG_DEST (the change is shown)
    --dry-run       print every action without doing it
    --uninstall     remove the binary and the unit; keep the configuration and
                    every snapshot
    -h, --help      this help

Example

    $PROG \\
        --snapshot-itv=4 \\
        --snapshot-cap=100 \\
        --snapshot-mode=zfs \\
        --snapshot-algo=fair \\
        --snapshot-volume=zfs/blockchain

Example, short style

    $PROG -i=4 -c=100 -m=zfs -a=fair -p=zfs/blockchain
    $PROG -i=4 -c=100 -m=btrfs -a=fair -p=/data/blockchain

Example, polling a CometBFT node and exporting to S3 every 1000 blocks

    $PROG -i=10 -c=100 -a=fade -p=tank/chain --height-source=cometbft \\
        --rpc-url=http://127.0.0.1:26657 --export-store=s3://backups/node1 \\
        --export-every=1000
EOF
}

die() {
    printf '%s: error: %s\n' "$PROG" "$*" >&2
    exit 2
}

dry_run=0
force=0
uninstall=0
itv=10
cap=100
mode=""
algo=fair
volume=""
source_kind=push
rpc_url=""
rpc_kind=""
preserve=""
height_file=""
height_command=""
export_store=""
export_every=""
export_tag=""
export_keep=""

# "--name=value" or "-n=value": the value; a missing "=" is an error.
value_of() {
    case $1 in
        *=*) printf '%s' "${1#*=}" ;;
        *) die "option '$1' needs a value, given as $1=VALUE (see $PROG -h)" ;;
    esac
}

for arg in "$@"; do
    case $arg in
        -h | --help) usage; exit 0 ;;
        --dry-run) dry_run=1 ;;
        --force) force=1 ;;
        --uninstall) uninstall=1 ;;
        --snapshot-itv=* | -i=* | --snapshot-itv | -i) itv=$(value_of "$arg") ;;
        --snapshot-cap=* | -c=* | --snapshot-cap | -c) cap=$(value_of "$arg") ;;
        --snapshot-mode=* | -m=* | --snapshot-mode | -m) mode=$(value_of "$arg") ;;
        --snapshot-algo=* | -a=* | --snapshot-algo | -a) algo=$(value_of "$arg") ;;
        --snapshot-volume=* | --snapshot-target=* | -p=* | --snapshot-volume | --snapshot-target | -p)
            volume=$(value_of "$arg") ;;
        --height-source=* | --height-source) source_kind=$(value_of "$arg") ;;
        --rpc-url=* | --rpc-url) rpc_url=$(value_of "$arg") ;;
        --rpc-kind=* | --rpc-kind) rpc_kind=$(value_of "$arg") ;;
        --preserve=* | --preserve) preserve=$(value_of "$arg") ;;
        --height-file=* | --height-file) height_file=$(value_of "$arg") ;;
        --height-command=* | --height-command) height_command=$(value_of "$arg") ;;
        --export-store=* | --export-store) export_store=$(value_of "$arg") ;;
        --export-every=* | --export-every) export_every=$(value_of "$arg") ;;
        --export-tag=* | --export-tag) export_tag=$(value_of "$arg") ;;
        --export-keep=* | --export-keep) export_keep=$(value_of "$arg") ;;
        *) die "unknown option '$arg' (see $PROG -h)" ;;
    esac
done

# Print a command, then run it unless this is a dry run.
run() {
    printf '+ %s\n' "$*"
    if [ "$dry_run" -eq 0 ]; then
        "$@"
    fi
}

have_systemd() {
    [ -d /run/systemd/system ]
}

if [ "$(id -u)" -ne 0 ] && [ "$dry_run" -eq 0 ]; then
    die "must run as root (it installs to $BIN_DEST and manages $SERVICE); try sudo, or --dry-run"
fi

if [ "$uninstall" -eq 1 ]; then
    if have_systemd; then
        run systemctl disable --now "$SERVICE" || true
    fi
    run rm -f "$BIN_DEST" "$UNIT_DEST" "$HOOK_DEST"
    run rm -rf "$DROPIN_DIR"
    if have_systemd; then
        run systemctl daemon-reload
    fi
    echo "btm uninstalled; $CONFIG_DEST and every snapshot are kept."
    exit 0
fi

# ---- validation: every value, before anything is changed ----

is_count() {
    case $1 in
        '' | *[!0-9]*) return 1 ;;
        0*) return 1 ;;
        *) [ "${#1}" -le 18 ] ;;
    esac
}

is_count "$itv" || die "--snapshot-itv (-i) must be a whole number of blocks >= 1, not '$itv'"
is_count "$cap" || die "--snapshot-cap (-c) must be a whole number >= 1, not '$cap'"
mode=$(printf '%s' "$mode" | tr '[:upper:]' '[:lower:]')
algo=$(printf '%s' "$algo" | tr '[:upper:]' '[:lower:]')
case $mode in '' | zfs | btrfs) ;; *) die "--snapshot-mode (-m) must be zfs or btrfs, not '$mode'" ;; esac
case $algo in fair | fade) ;; *) die "--snapshot-algo (-a) must be fair or fade, not '$algo'" ;; esac
[ -n "$volume" ] || die "--snapshot-volume (-p) is required (a ZFS dataset or a btrfs subvolume path)"
case $source_kind in
    push | file | command) ;;
    cometbft | ethereum)
        [ -n "$rpc_url" ] || die "--height-source=$source_kind needs --rpc-url=http://HOST:PORT" ;;
    *) die "--height-source must be push, cometbft, ethereum, file or command, not '$source_kind'" ;;
esac
case $rpc_kind in
    '') ;;
    cometbft | ethereum)
        case $source_kind in
            cometbft | ethereum) die "--rpc-kind is only for a push, file or command source; --height-source=$source_kind already names it" ;;
        esac
        [ -n "$rpc_url" ] || die "--rpc-kind needs --rpc-url=http://HOST:PORT" ;;
    *) die "--rpc-kind must be cometbft or ethereum, not '$rpc_kind'" ;;
esac
if [ -n "$rpc_url" ]; then
    case $source_kind in
        cometbft | ethereum) ;;
        *) [ -n "$rpc_kind" ] || die "--rpc-url with --height-source=$source_kind needs --rpc-kind=cometbft or ethereum" ;;
    esac
    case $rpc_url in http://?*) ;; *) die "--rpc-url must be an http:// URL, not '$rpc_url'" ;; esac
fi
# Paths only: btm's own parser checks each one when the config is checked.
preserve_paths=()
if [ -n "$preserve" ]; then
    IFS=, read -r -a preserve_paths <<<"$preserve"
    for p in "${preserve_paths[@]}"; do
        [ -n "$p" ] || die "--preserve has an empty path in '$preserve'"
    done
fi
if [ "$source_kind" = file ] && [ -z "$height_file" ]; then
    die "--height-source=file needs --height-file=PATH"
fi
if [ "$source_kind" = command ] && [ -z "$height_command" ]; then
    die "--height-source=command needs --height-command=CMD"
fi
if [ -z "$export_store" ] && { [ -n "$export_every" ] || [ -n "$export_tag" ] || [ -n "$export_keep" ]; }; then
    die "--export-every, --export-tag and --export-keep need --export-store"
fi
if [ -n "$export_every" ]; then
    is_count "$export_every" || die "--export-every must be a whole number of blocks >= 1, not '$export_every'"
    [ $((export_every % itv)) -eq 0 ] || die "--export-every ($export_every) must be a multiple of --snapshot-itv ($itv)"
fi
if [ -n "$export_keep" ]; then
    is_count "$export_keep" || die "--export-keep must be a whole number >= 1, not '$export_keep'"
fi

[ -x "$HERE/btm" ] || die "no btm binary next to $PROG (run it from the unpacked btm_package)"
[ -f "$HERE/btm-daemon.service" ] || die "no btm-daemon.service next to $PROG"

# The volume must exist and be ZFS or btrfs: btm itself checks (read-only).
check_args=(list -p "$volume")
if [ -n "$mode" ]; then
    check_args+=(-m "$mode")
fi
if ! err=$("$HERE/btm" "${check_args[@]}" 2>&1 >/dev/null); then
    die "volume '$volume' cannot be used: ${err#btm: error: }"
fi

# ---- the configuration file ----

toml_string() {
    # A TOML basic string: escape backslashes and quotes; refuse control
    # characters rather than write a file that means something else.
    case $1 in
        *[[:cntrl:]]*) die "a value contains a control character: $(printf '%q' "$1")" ;;
    esac
    local s=${1//\\/\\\\}
    s=${s//\"/\\\"}
    printf '"%s"' "$s"
}

new_config=$(mktemp)
trap 'rm -f "$new_config"' EXIT
{
    echo "# /etc/btm/btm.toml, written by install.sh; see btm.toml.example for every key."
    echo "volume = $(toml_string "$volume")"
    if [ -n "$mode" ]; then echo "mode = \"$mode\""; fi
    echo "itv = $itv"
    echo "cap = $cap"
    echo "algo = \"$algo\""
    echo "source = \"$source_kind\""
    if [ -n "$rpc_url" ]; then echo "rpc_url = $(toml_string "$rpc_url")"; fi
    if [ -n "$rpc_kind" ]; then echo "rpc_kind = \"$rpc_kind\""; fi
    if [ -n "$height_file" ]; then echo "height_file = $(toml_string "$height_file")"; fi
    if [ -n "$height_command" ]; then
        printf 'height_command = ['
        sep=""
        read -r -a words <<<"$height_command"
        for w in "${words[@]}"; do
            printf '%s%s' "$sep" "$(toml_string "$w")"
            sep=", "
        done
        printf ']\n'
    fi
    echo
    echo "# btm rollback and btm restore always keep the validator signing state they"
    echo "# find (data/priv_validator_state.json, slashing-protection databases), and"
    echo "# exports leave validator keys out: see docs/validators.md."
    if [ "${#preserve_paths[@]}" -gt 0 ]; then
        printf 'preserve = ['
        sep=""
        for p in "${preserve_paths[@]}"; do
            printf '%s%s' "$sep" "$(toml_string "$p")"
            sep=", "
        done
        printf ']\n'
    fi
    if [ -n "$export_store" ]; then
        echo
        echo "[export]"
        echo "store = $(toml_string "$export_store")"
        if [ -n "$export_every" ]; then echo "every = $export_every"; fi
        if [ -n "$export_tag" ]; then echo "tag = $(toml_string "$export_tag")"; fi
        if [ -n "$export_keep" ]; then echo "keep = $export_keep"; fi
    fi
} >"$new_config"

# The daemon's own parser validates the whole file (keys, values, source
# settings, export settings) exactly as it will at start.
if ! err=$("$HERE/btm" daemon --config "$new_config" --check-config 2>&1 >/dev/null); then
    die "${err#btm: error: }"
fi

write_config=1
if [ -f "$CONFIG_DEST" ]; then
    if cmp -s "$new_config" "$CONFIG_DEST"; then
        echo "$CONFIG_DEST is already up to date"
        write_config=0
    elif [ "$force" -eq 1 ]; then
        echo "$CONFIG_DEST will change (--force):"
        diff -u "$CONFIG_DEST" "$new_config" | sed 's/^/    /' || true
    else
        echo "$CONFIG_DEST exists and is kept; with --force it would change like this:"
        diff -u "$CONFIG_DEST" "$new_config" | sed 's/^/    /' || true
        write_config=0
    fi
fi

# ---- install ----

changed=0
install_file() { # mode source destination
    if [ -f "$3" ] && cmp -s "$2" "$3"; then
        echo "$3 is already up to date"
        return 0
    fi
    run install -D -m "$1" "$2" "$3"
    changed=1
}

install_file 0755 "$HERE/btm" "$BIN_DEST"
install_file 0644 "$HERE/btm-daemon.service" "$UNIT_DEST"
if [ -f "$HERE/btm-preupgrade.sh" ]; then
    install_file 0755 "$HERE/btm-preupgrade.sh" "$HOOK_DEST"
fi
if [ "$write_config" -eq 1 ] && [ "$dry_run" -eq 1 ]; then
    echo "$CONFIG_DEST would hold:"
    sed 's/^/    /' "$new_config"
fi
if [ "$write_config" -eq 1 ]; then
    run install -d -m 0755 "$CONFIG_DIR"
    run install -m 0644 "$new_config" "$CONFIG_DEST"
    changed=1
fi

if ! have_systemd; then
    echo "systemd is not running here: installed files only; start the daemon with"
    echo "    $BIN_DEST daemon --config $CONFIG_DEST"
    exit 0
fi

# Exponential restart backoff needs systemd >= 254 (RestartSteps=); older
# systemd keeps the unit's fixed RestartSec=.
systemd_version=$(systemctl --version | awk 'NR == 1 { print $2 }')
if [ "${systemd_version%%.*}" -ge 254 ] 2>/dev/null; then
    backoff=$(mktemp)
    printf '[Service]\nRestartSteps=6\nRestartMaxDelaySec=5min\n' >"$backoff"
    install_file 0644 "$backoff" "$DROPIN_DIR/backoff.conf"
    rm -f "$backoff"
fi

run systemctl daemon-reload
run systemctl enable "$SERVICE"
if [ "$changed" -eq 1 ] && systemctl is-active --quiet "$SERVICE"; then
    # An upgrade or a new configuration: restart into it.
    run systemctl restart "$SERVICE"
else
    run systemctl start "$SERVICE"
fi
if [ "$dry_run" -eq 0 ]; then
    systemctl --no-pager status "$SERVICE" || true
fi
