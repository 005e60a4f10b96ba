#!/bin/sh
# ejabberd for the side-by-side load benchmark.
#
#   bench/ejabberd/setup.sh install   apt-get install ejabberd (Debian 12: 23.01) and stop the packaged service
#   bench/ejabberd/setup.sh start     install our config, wipe the Mnesia database, start, wait until ready
#   bench/ejabberd/setup.sh stop      stop the node
#   bench/ejabberd/setup.sh status    ejabberdctl status
#   bench/ejabberd/setup.sh pid       the beam.smp process id
#
# Users are registered in-band (XEP-0077) by `subrosa-bench xmpp`, which is far
# faster than one `ejabberdctl register` per user. Needs root (apt, /etc, /var/lib).
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
CONFIG=/etc/ejabberd/subrosa-bench.yml
# Debian's ejabberdctl.cfg sets EJABBERD_CONFIG_PATH, which would override
# --config: our own ctl config replaces it.
CTL_CONFIG=/etc/ejabberd/subrosa-bench-ctl.cfg
SPOOL=/var/lib/ejabberd
NOFILE=${EJABBERD_NOFILE:-65536}

die() { echo "setup.sh: $*" >&2; exit 1; }

ctl() { ejabberdctl --config "$CONFIG" --ctl-config "$CTL_CONFIG" "$@"; }

install_pkg() {
    if ! command -v ejabberdctl >/dev/null 2>&1; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y ejabberd >/dev/null || die "apt-get install ejabberd failed"
    fi
    # The package may have started its own node with the stock config.
    ejabberdctl stop >/dev/null 2>&1 || true
    ejabberdctl stopped >/dev/null 2>&1 || true
    dpkg-query -W -f='ejabberd ${Version}\n' ejabberd
}

beam_pid() {
    for p in /proc/[0-9]*; do
        if [ "$(cat "$p/comm" 2>/dev/null)" = beam.smp ] && grep -q ejabberd "$p/cmdline" 2>/dev/null; then
            basename "$p"
            return 0
        fi
    done
    return 1
}

start() {
    command -v ejabberdctl >/dev/null 2>&1 || install_pkg
    stop_node
    install -m 640 -o root -g ejabberd "$HERE/ejabberd.yml" "$CONFIG"
    grep -v '^EJABBERD_CONFIG_PATH=' /etc/ejabberd/ejabberdctl.cfg >"$CTL_CONFIG"
    # A fresh database each run: no users or offline messages left from the last one.
    find "$SPOOL" -maxdepth 1 -type f ! -name .erlang.cookie -delete
    hard=$(ulimit -Hn)
    if [ "$hard" != unlimited ] && [ "$hard" -lt "$NOFILE" ]; then NOFILE=$hard; fi
    ulimit -n "$NOFILE"
    # ejabberdctl starts the VM through su as the ejabberd user; where PAM
    # applies limits.conf on su, this keeps the raised limit.
    echo "ejabberd - nofile $NOFILE" >/etc/security/limits.d/subrosa-bench-ejabberd.conf
    ERL_MAX_PORTS=$((NOFILE + 1000)) ctl start
    ctl started || die "ejabberd did not start (see /var/log/ejabberd/error.log)"
    pid=$(beam_pid)
    if [ "$(awk '/open files/ {print $4}' /proc/"$pid"/limits)" -lt "$NOFILE" ]; then
        die "ejabberd runs with $(grep 'open files' /proc/"$pid"/limits | tr -s ' '): su did not keep the limit"
    fi
    echo "ejabberd started: config $CONFIG, beam.smp pid $pid, $(grep 'open files' /proc/"$pid"/limits)"
}

stop_node() {
    [ -f "$CTL_CONFIG" ] || cp /etc/ejabberd/ejabberdctl.cfg "$CTL_CONFIG"
    if ctl status >/dev/null 2>&1; then
        ctl stop >/dev/null
        ctl stopped >/dev/null 2>&1 || true
    fi
    # Wait for the VM to go, so that its port and memory are free.
    i=0
    while beam_pid >/dev/null && [ $i -lt 50 ]; do sleep 0.2; i=$((i + 1)); done
}

case "${1:-}" in
    install) install_pkg ;;
    start) start ;;
    stop) stop_node; echo "ejabberd stopped" ;;
    status) ctl status ;;
    pid) beam_pid || die "no ejabberd beam.smp process" ;;
    *) die "usage: setup.sh install|start|stop|status|pid" ;;
esac
