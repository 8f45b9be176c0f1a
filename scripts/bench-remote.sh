#!/usr/bin/env bash
# Benchmark (not a test) of the chunk engine against restic and rustic on a real S3
# server (s3s-fs) behind a proxy that adds a cloud round trip to every
# request (crates/chunk/examples/latency_proxy.rs), side by side in one
# run; see scripts/bench-lib.sh for what each run measures.
#
#   scripts/bench-remote.sh [SHAPE...]     default: node meta churn
#
# The server and the proxy share this machine's two cores with the client,
# so the script measures that setting's own floors beside each shape: every
# pack of btm's full backup uploaded right after that backup, and every
# pack in the store fetched right before btm's restore, through the proxy
# by curl, with as many requests in flight as btm's backup and restore
# use, and the same GETs written into files of a fresh file system and
# synced. No backup or restore of those bytes, by any tool, can beat them
# here.
#
# Environment: BENCH_DIR, BENCH_LATENCY_MS (20), BENCH_META_FILES (100000).
# Needs s3s-fs (cargo install s3s-fs) besides what bench-lib.sh needs.
# shellcheck source=scripts/bench-lib.sh
source "$(dirname "$0")/bench-lib.sh"
shapes=("$@")
[ ${#shapes[@]} -gt 0 ] || shapes=(node meta churn)

# The transfer floors, from btm's packs in $bucket, through the proxy.
# put_floors, right after btm's full backup: PUT them all to a scratch
# bucket, 4 in flight (btm's backup default for a remote store).
# get_floor [DIR], right before btm's restore: GET every pack in the store
# then, 16 in flight (its restore default), bytes discarded (or stored in
# DIR and synced).
put_floors() {
    mkdir -p "$work/s3/put$bucket"
    # shellcheck disable=SC2016 # $1, $2 and $3 are the inner shell's.
    measure "floor: PUT btm's packs, 4 in flight (curl)" sh -c '
        cd "$1" && find "$2/x/packs" -type f | xargs -P 4 -I{} curl -sSf -o /dev/null -T {} \
            -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" --aws-sigv4 aws:amz:us-east-1:s3 \
            --user "$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY" "$AWS_ENDPOINT_URL/$3/{}"' - "$work/s3" "$bucket" "put$bucket"
    put_floor=$last_secs
    rm -rf "${work:?}/s3/put$bucket"
}
get_floor() { fetch_floor "$bucket/x" "$@"; }

machine_floors
start_s3
for shape in "${shapes[@]}"; do
    echo "== $shape, s3s-fs with ${latency} ms per request"
    bucket="b$((10000 + RANDOM))"
    mkdir -p "$work/s3/r$bucket" "$work/s3/$bucket" "$work/s3/u$bucket" "$work/xdg/rustic"
    # rustic reaches S3 through opendal, configured by a profile.
    cat >"$work/xdg/rustic/bench.toml" <<EOF
[repository]
repository = "opendal:s3"

[repository.options]
bucket = "u$bucket"
root = "/x"
endpoint = "$AWS_ENDPOINT_URL"
region = "$AWS_REGION"
access_key_id = "$AWS_ACCESS_KEY_ID"
secret_access_key = "$AWS_SECRET_ACCESS_KEY"
EOF
    run_shape remote "$shape" "s3:$AWS_ENDPOINT_URL/r$bucket" "s3://$bucket/x" profile:bench \
        "$work/s3/r$bucket" "$work/s3/$bucket" "$work/s3/u$bucket" put_floors get_floor
    rm -rf "${work:?}/s3/r$bucket" "${work:?}/s3/$bucket" "${work:?}/s3/u$bucket"
done
print_results
