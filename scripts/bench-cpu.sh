# shellcheck shell=bash disable=SC2034 # its variables are its callers'.
# CPU accounting for every benchmark, sourced by each: a wall time is read
# against the CPU it took and how busy the machine was meanwhile (on two
# cores shared with servers and kernel threads, a run near 100 % busy had
# nothing left to take). Needs GNU time.

cores=$(nproc)
ticks=$(getconf CLK_TCK)

# machine_ticks: "busy total" CPU ticks of the whole machine so far
# (/proc/stat), kernel threads included: the loop device and writeback
# a restore's writes cost run there, counted by no process.
machine_ticks() { awk '/^cpu / { b = $2 + $3 + $4 + $7 + $8; print b, b + $5 + $6; exit }' /proc/stat; }

# pid_ticks PID: the CPU ticks (user + system) process PID has used so
# far, 0 if it is gone: fields 14 and 15 of /proc/PID/stat, counted after
# the command name (which may hold spaces) closes.
pid_ticks() { sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | awk '{ t = $12 + $13 } END { print t + 0 }'; }

# machine_busy M0 T0 M1 T1: the machine's busy share between two
# machine_ticks readings, tagged "CPU-bound" at 90 % or more.
machine_busy() {
    awk -v b=$(($3 - $1)) -v t=$(($4 - $2)) \
        'BEGIN { m = (t > 0) ? 100 * b / t : 0; printf "%.0f%%%s", m, (m >= 90) ? " CPU-bound" : "" }'
}

# timed OUT ERR CMD...: runs CMD with its output in OUT and ERR (its
# error shown and the script ended if it fails), and sets t_secs, t_kb
# (peak RSS), t_user, t_sys, t_machine (machine_busy meanwhile) and
# t_cpu (the machine's busy CPU seconds meanwhile).
timed() {
    local out=$1 err=$2; shift 2
    local m0 a0 m1 a1 tf; tf=$(mktemp)
    read -r m0 a0 < <(machine_ticks)
    /usr/bin/time -f "%e %M %U %S" -o "$tf" "$@" >"$out" 2>"$err" || { cat "$err"; rm -f "$tf"; exit 1; }
    read -r m1 a1 < <(machine_ticks)
    read -r t_secs t_kb t_user t_sys < "$tf"
    rm -f "$tf"
    t_machine=$(machine_busy "$m0" "$a0" "$m1" "$a1")
    t_cpu=$(awk -v b=$((m1 - m0)) -v t="$ticks" 'BEGIN { printf "%.2f", b / t }')
}

# cpu_columns: the last timed command's CPU, for a row of a table.
cpu_columns() { printf '%5s user %5s sys, machine %s' "$t_user" "$t_sys" "$t_machine"; }
