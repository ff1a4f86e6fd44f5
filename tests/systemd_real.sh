#!/usr/bin/env bash
# chatd under a real systemd: boots systemd 252 as PID 1 in systemd-nspawn and checks the units
# and the Debian package there. Driven by tests/systemd_real.rs; runs alone too (as root):
#
#   cargo deb && tests/systemd_real.sh target/debian/chatd_*.deb
#
# Needs root, systemd-nspawn (apt-get install systemd-container), unshare and nsenter. Each
# container is this machine's / under an overlay whose upper layer is a tmpfs, in a mount
# namespace of its own, with --private-network (loopback only): nothing it does reaches the
# host's files or any network, and it all goes away when this script exits, pass or fail.
#
# Two containers, one per mode:
#   deb     dpkg -i the package; the relay by socket activation, STATUS=, reload, the watchdog;
#           two lingering users' `systemctl --user enable --now chatd` members chatting through
#           the relay; a broken config (user unit and relay) and the documented recovery;
#           systemd-analyze security; an upgrade (dpkg -i again) and a purge.
#   manual  docs/SERVICE.md's commands as written (its "Install the binaries", "A relay: system
#           units" and "Your own daemon" blocks, with the binaries taken from the package).
#
# Every wait polls with a deadline; the whole run is bounded by the caller (and each container
# by CHATD_CT_TIMEOUT seconds, default 300).
set -euo pipefail

say() { printf '[%s] %s\n' "$(date +%T)" "$*"; }
die() { say "FAIL: $*"; exit 1; }

# wait_for SECS WHAT CMD...: run CMD until it succeeds; fail naming WHAT after SECS seconds.
# The 0.2 s pause is the polling interval, not a synchronisation.
wait_for() {
    local secs=$1 what=$2 end
    shift 2
    end=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        if [ "$SECONDS" -ge "$end" ]; then
            say "timed out after ${secs}s waiting for: $what"
            say "last try: $*"
            "$@" 2>&1 | tail -20 || true
            return 1
        fi
        sleep 0.2
    done
}

# ----------------------------------------------------------------------------------------------
# Inside the container (as root, systemd is PID 1).

I_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
T=/mnt/chatd-test

diagnose() {
    say "---- diagnostics"
    systemctl --no-pager --failed || true
    systemctl --no-pager status chatd-relay.socket chatd-relay.service || true
    journalctl --no-pager -n 80 || true
}

# as USER CMD...: run CMD as USER with what a login session would give systemctl --user.
as() {
    local user=$1 uid
    shift
    uid=$(id -u "$user")
    runuser -u "$user" -- env -i PATH="$I_PATH" HOME="/home/$user" USER="$user" LANG=C.UTF-8 \
        XDG_RUNTIME_DIR="/run/user/$uid" DBUS_SESSION_BUS_ADDRESS="unix:path=/run/user/$uid/bus" \
        "$@"
}

add_lingering_user() { # add_lingering_user NAME: a user whose manager runs while logged out
    local user=$1
    useradd --create-home --shell /bin/bash "$user"
    loginctl enable-linger "$user"
    wait_for 60 "$user's user manager" systemctl is-active "user@$(id -u "$user").service"
    wait_for 60 "$user's user bus" test -S "/run/user/$(id -u "$user")/bus"
}

# A member run by hand as a transient system unit: the "other member" for socket activation.
start_probe() {
    mkdir -p -m 0700 /run/chatd-probe
    systemd-run --quiet --unit=chatd-probe --property=RuntimeMaxSec=600 \
        /usr/bin/chatd --user probe --connect 127.0.0.1:9999 --key-bits 2048 \
        --state-dir /var/lib/chatd-probe --socket /run/chatd-probe/ctl.sock
}
probe_connected() {
    chatctl --socket /run/chatd-probe/ctl.sock --json status | grep -q '"connected":true'
}
relay_ctl() { chatctl --socket /run/chatd-relay/control.sock "$@"; }
relay_pid() { systemctl show -p MainPID --value chatd-relay.service; }
relay_status_has() { systemctl --no-pager status chatd-relay.service | grep -qF "$1"; }
user_unit_inactive() { [ "$(as "$1" systemctl --user is-active "$2")" != active ]; }
relay_active() { [ "$(systemctl is-active chatd-relay.service)" = active ]; }
journal_has() { # journal_has UNIT-MATCH TEXT: TEXT in the journal since this container booted
    journalctl --no-pager -b "$1" | grep -qF "$2"
}

# check_member_chat SENDER RECIPIENT TEXT: SENDER's user unit sends, RECIPIENT's history has it.
check_member_chat() {
    local from=$1 to=$2 text=$3
    wait_for 60 "$from sees $to" as "$from" sh -c "chatctl who | grep -q '^$to '"
    as "$from" chatctl send "$to" --wait delivered --timeout 60 "$text" >/dev/null ||
        die "$from: chatctl send $to failed"
    wait_for 30 "$to has the message from $from" \
        as "$to" sh -c "chatctl tail -n 20 | grep -qF -- '$text'"
}

inside_deb() {
    # This machine's image comes from a container build whose policy-rc.d (exit 101) forbids
    # maintainer scripts to start or stop services; a Debian system has none.
    if [ -e /usr/sbin/policy-rc.d ]; then
        say "removing /usr/sbin/policy-rc.d (in the container only)"
        rm -f /usr/sbin/policy-rc.d
    fi
    say "install the package: dpkg -i"
    dpkg -i "$T/chatd.deb" >/dev/null
    [ "$(stat -c '%a %U' /etc/chatd-relay)" = "700 chatd" ] ||
        die "/etc/chatd-relay is $(stat -c '%a %U' /etc/chatd-relay), not 700 chatd"
    dpkg-query -W -f='${Conffiles}\n' chatd | grep -q ' /etc/chatd-relay/chatd.toml ' ||
        die "/etc/chatd-relay/chatd.toml is not a conffile"
    for page in chatctl.1 chatd.toml.5 chatd.8; do
        [ -f "/usr/share/man/man${page##*.}/$page.gz" ] || die "no man page $page.gz"
    done
    for f in /usr/share/bash-completion/completions/chatctl /usr/share/zsh/vendor-completions/_chatd \
        /usr/share/fish/vendor_completions.d/chatctl.fish /usr/lib/systemd/user/chatd.socket; do
        [ -f "$f" ] || die "no $f"
    done
    # Without --man=no: verify also looks up Documentation=man:chatd(8) and the others.
    out=$(systemd-analyze verify chatd-relay.service chatd-relay.socket 2>&1) || true
    [ -z "$out" ] || die "systemd-analyze verify: $out"
    [ "$(systemctl is-enabled chatd-relay.socket)" = disabled ] || die "the package enabled the relay"
    relay_active && die "the package started the relay"

    say "socket activation: systemctl start chatd-relay.socket, then a member connects"
    systemctl start chatd-relay.socket
    [ "$(systemctl is-active chatd-relay.service)" = inactive ] || die "the service started with the socket"
    start_probe
    wait_for 60 "the relay started by the member's connection" relay_active
    wait_for 60 "the member connected" probe_connected

    say "systemctl status shows chatd's STATUS="
    wait_for 30 "Status: line with one member" relay_status_has 'Status: "relay listening on [::]:9999, 1 member online"'

    say "systemctl reload applies a changed config"
    local pid
    pid=$(relay_pid)
    printf 'max_connections = 500\n' >>/etc/chatd-relay/chatd.toml
    systemctl reload chatd-relay
    wait_for 30 "the reload logged" journal_has -uchatd-relay.service "reloaded config: max_connections 1024 -> 500"
    [ "$(relay_pid)" = "$pid" ] || die "reload restarted chatd"
    relay_active || die "relay not active after reload"

    say "the watchdog restarts a SIGSTOPped chatd (WatchdogSec=30)"
    local restarts
    restarts=$(systemctl show -p NRestarts --value chatd-relay.service)
    kill -STOP "$pid"
    wait_for 90 "a new chatd after the watchdog" sh -c \
        "[ \"\$(systemctl show -p MainPID --value chatd-relay.service)\" != $pid ] && [ \"\$(systemctl is-active chatd-relay.service)\" = active ]"
    journal_has -uchatd-relay.service "Watchdog timeout" || die "no watchdog timeout in the journal"
    [ "$(systemctl show -p NRestarts --value chatd-relay.service)" -gt "$restarts" ] || die "NRestarts did not grow"
    wait_for 90 "the member reconnected after the restart" probe_connected

    say "lingering users' systemctl --user enable --now chatd members chat through the relay"
    local u
    for u in alice bob; do
        add_lingering_user "$u"
        as "$u" sh -c "mkdir -p -m 0700 ~/.config/chatd && printf 'user = \"$u\"\nconnect = \"127.0.0.1:9999\"\n' > ~/.config/chatd/chatd.toml"
        as "$u" systemctl --user enable --now chatd.socket chatd
    done
    for u in alice bob; do
        # chatctl's default socket: $XDG_RUNTIME_DIR/chatd/control.sock, as chatd.socket has it.
        wait_for 90 "$u connected" as "$u" sh -c 'chatctl --json status | grep -q "\"connected\":true"'
    done
    check_member_chat alice bob "hello bob, from a user unit"
    check_member_chat bob alice "hello alice"
    wait_for 30 "three members online" relay_status_has "3 members online"

    say "a broken config (user unit): a clear status, no start loop, recovery as SERVICE.md says"
    as alice systemctl --user stop chatd.service
    [ "$(as alice systemctl --user is-active chatd.socket)" = active ] || die "alice's chatd.socket is not listening"
    as alice sh -c 'cp ~/.config/chatd/chatd.toml ~/chatd.toml.good && echo "max_queue = 0" >> ~/.config/chatd/chatd.toml'
    local rc=0
    # The issue's trap: this used to start chatd again and again until the start limit.
    timeout 60 runuser -u alice -- env -i PATH="$I_PATH" HOME=/home/alice \
        XDG_RUNTIME_DIR="/run/user/$(id -u alice)" chatctl status >/dev/null 2>&1 || rc=$?
    [ "$rc" -eq 3 ] || die "chatctl status with a broken config: exit $rc, not 3 (not reachable)"
    wait_for 30 "alice's chatd.socket stopped" user_unit_inactive alice chatd.socket
    for _ in 1 2 3; do
        as alice chatctl status >/dev/null 2>&1 && die "chatctl status worked with a broken config"
    done
    local st
    st=$(as alice systemctl --user --no-pager status chatd.service 2>&1 || true)
    printf '%s\n' "$st" | grep -q 'Active: failed (Result: exit-code)' || die "status of the failed chatd: $st"
    printf '%s\n' "$st" | grep -q 'status=2' || die "status does not show exit status 2: $st"
    [ "$(as alice systemctl --user show -p Result --value chatd.service)" = exit-code ] ||
        die "chatd.service Result is not exit-code (start limit hit?)"
    [ "$(as alice systemctl --user show -p Result --value chatd.socket)" = success ] ||
        die "chatd.socket failed instead of being stopped"
    local starts
    starts=$(journalctl --no-pager -b _UID="$(id -u alice)" | grep -cF 'max_queue must be greater than 0' || true)
    [ "$starts" -eq 1 ] || die "chatd started $starts times with the broken config, not once"
    as alice sh -c 'cp ~/chatd.toml.good ~/.config/chatd/chatd.toml'
    as alice systemctl --user restart chatd
    [ "$(as alice systemctl --user is-active chatd.socket)" = active ] || die "restart chatd did not start chatd.socket"
    wait_for 60 "alice connected again" as alice sh -c 'chatctl --json status | grep -q "\"connected\":true"'
    check_member_chat bob alice "still there, alice?"

    say "a broken config (relay): a clear status, members refused, recovery as SERVICE.md says"
    cp /etc/chatd-relay/chatd.toml /root/chatd-relay.toml.good
    printf 'this is not toml\n' >>/etc/chatd-relay/chatd.toml
    systemctl restart chatd-relay.service && die "the relay started with a broken config"
    wait_for 30 "chatd-relay.socket stopped" sh -c '[ "$(systemctl is-active chatd-relay.socket)" != active ]'
    st=$(systemctl --no-pager status chatd-relay.service 2>&1 || true)
    printf '%s\n' "$st" | grep -q 'Active: failed (Result: exit-code)' || die "relay status: $st"
    printf '%s\n' "$st" | grep -qF '/etc/chatd-relay/chatd.toml' || die "relay status does not name the file: $st"
    [ "$(systemctl show -p Result --value chatd-relay.socket)" = success ] || die "chatd-relay.socket failed"
    cp /root/chatd-relay.toml.good /etc/chatd-relay/chatd.toml
    systemctl restart chatd-relay
    relay_active || die "relay not active after the documented restart"
    [ "$(systemctl is-active chatd-relay.socket)" = active ] || die "restart did not start chatd-relay.socket"
    wait_for 120 "the member reconnected to the recovered relay" probe_connected
    for u in alice bob; do
        wait_for 120 "$u reconnected to the recovered relay" as "$u" sh -c 'chatctl --json status | grep -q "\"connected\":true"'
    done
    check_member_chat alice bob "after the relay came back"

    say "systemd-analyze security chatd-relay.service scores 2.0 or better"
    local score
    score=$(systemd-analyze security --no-pager chatd-relay.service 2>&1 |
        sed -n 's/.*Overall exposure level for chatd-relay.service: \([0-9.]*\).*/\1/p')
    [ -n "$score" ] || die "no score from systemd-analyze security"
    say "exposure level $score"
    awk -v s="$score" 'BEGIN { exit !(s <= 2.0) }' || die "exposure level $score is above 2.0"

    say "upgrade: dpkg -i again restarts the enabled relay, which keeps its members"
    systemctl enable --quiet chatd-relay.socket chatd-relay.service
    pid=$(relay_pid)
    dpkg -i "$T/chatd.deb" >/dev/null
    wait_for 60 "relay active after the upgrade" relay_active
    [ "$(relay_pid)" != "$pid" ] || die "the upgrade did not restart the relay"
    [ "$(systemctl is-active chatd-relay.socket)" = active ] || die "socket not active after the upgrade"
    grep -q 'max_connections = 500' /etc/chatd-relay/chatd.toml || die "the upgrade replaced the changed conffile"
    wait_for 120 "the member connected after the upgrade" probe_connected
    check_member_chat bob alice "after the upgrade"

    say "purge: units stopped, relay state removed"
    dpkg --purge chatd >/dev/null
    relay_active && die "relay still running after the purge"
    [ ! -e /var/lib/chatd-relay ] || die "/var/lib/chatd-relay left after the purge"
    [ ! -e /etc/chatd-relay ] || die "/etc/chatd-relay left after the purge"
    [ ! -e /etc/systemd/system/sockets.target.wants/chatd-relay.socket ] || die "enablement left after the purge"
    say "deb: all checks passed"
}

# print_block FILE HEADING: the first ```sh block after the line "## HEADING".
print_block() {
    awk -v h="## $2" '
        $0 == h { insec = 1; next }
        insec && /^## / { exit }
        insec && /^```sh$/ { inblock = 1; next }
        inblock && /^```$/ { exit }
        inblock { print }' "$1"
}

inside_manual() {
    local src=/opt/chatd-src
    # A clone as SERVICE.md expects it, with the package's binaries as target/release/.
    mkdir -p "$src/target/release" /root/deb
    cp -r "$T/src/." "$src/"
    dpkg-deb -x "$T/chatd.deb" /root/deb
    cp /root/deb/usr/bin/chatd /root/deb/usr/bin/chatctl "$src/target/release/"
    chmod -R a+rX "$src"
    command -v sudo >/dev/null || { printf '#!/bin/sh\nexec "$@"\n' >/usr/local/bin/sudo && chmod 755 /usr/local/bin/sudo; }

    local block
    for heading in "Install the binaries" "A relay: system units"; do
        block=$(print_block "$src/docs/SERVICE.md" "$heading")
        [ -n "$block" ] || die "no sh block under '## $heading' in SERVICE.md"
        say "SERVICE.md, $heading:"
        printf '%s\n' "$block" | sed 's/^/    /'
        # cargo build --release: the binaries are already there (from the package).
        (cd "$src" && set -e && eval "$(printf '%s\n' "$block" | grep -v '^cargo ')") ||
            die "SERVICE.md's '$heading' commands failed"
    done
    relay_active || die "relay not running after SERVICE.md's commands"
    wait_for 30 "Status: line" relay_status_has 'Status: "relay listening on [::]:9999'
    [ -f /etc/chatd-relay/chatd.toml ] || die "SERVICE.md's steps made no /etc/chatd-relay/chatd.toml"

    say "reload uses /etc/chatd-relay/chatd.toml"
    printf 'max_queue = 500\n' >>/etc/chatd-relay/chatd.toml
    systemctl reload chatd-relay
    wait_for 30 "the reload logged" journal_has -uchatd-relay.service "reloaded config: max_queue 10000 -> 500"

    say "socket activation across a restart"
    systemctl stop chatd-relay.service
    [ "$(systemctl is-active chatd-relay.socket)" = active ] || die "socket stopped with the service"
    start_probe
    wait_for 60 "relay started by the member" relay_active
    wait_for 60 "the member connected" probe_connected

    say "SERVICE.md, Your own daemon (a lingering user; the relay is 127.0.0.1:9999)"
    add_lingering_user carol
    block=$(print_block "$src/docs/SERVICE.md" "Your own daemon (a member): user units" |
        sed 's/chat\.example\.org/127.0.0.1/g; s/user = "alice"/user = "carol"/')
    [ -n "$block" ] || die "no sh block under '## Your own daemon (a member): user units'"
    printf '%s\n' "$block" | sed 's/^/    /'
    # The block's last command is chatctl status; chatd answers it once ready.
    as carol bash -c "cd $src && set -e && $block" >/dev/null || die "SERVICE.md's user-unit commands failed"
    wait_for 90 "carol connected" as carol sh -c 'chatctl --json status | grep -q "\"connected\":true"'
    say "manual: all checks passed"
}

if [ "${1:-}" = --inside ]; then
    export PATH="$I_PATH" LANG=C.UTF-8
    trap 'rc=$?; [ $rc -eq 0 ] || diagnose; exit $rc' EXIT
    case "${2:-}" in
    deb) inside_deb ;;
    manual) inside_manual ;;
    *) die "unknown mode ${2:-}" ;;
    esac
    exit 0
fi

# ----------------------------------------------------------------------------------------------
# On the host.

[ "$#" -ge 1 ] || { echo "usage: $0 CHATD.deb [deb|manual]..." >&2; exit 2; }
[ "$(id -u)" -eq 0 ] || die "needs root (systemd-nspawn)"
for tool in systemd-nspawn unshare nsenter; do
    command -v "$tool" >/dev/null || die "$tool is missing (apt-get install systemd-container util-linux)"
done

# A private mount namespace: the tmpfs and overlay below vanish with this process.
if [ -z "${CHATD_SYSTEMD_REAL_UNSHARED:-}" ]; then
    export CHATD_SYSTEMD_REAL_UNSHARED=1
    exec unshare --mount --propagation private bash "$0" "$@"
fi

deb=$(readlink -f "$1")
shift
[ -f "$deb" ] || die "no package $deb"
modes=("$@")
[ "${#modes[@]}" -gt 0 ] || modes=(deb manual)
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
script=$(readlink -f "${BASH_SOURCE[0]}")
ct_timeout=${CHATD_CT_TIMEOUT:-300}

base=$(mktemp -d /tmp/chatd-systemd-real.XXXXXX)
nspawn_pid=
leader=

stop_container() {
    [ -n "$nspawn_pid" ] || return 0
    if kill -0 "$nspawn_pid" 2>/dev/null; then
        kill -TERM "$nspawn_pid" 2>/dev/null || true # nspawn powers the container off
        local end=$((SECONDS + 30))
        while kill -0 "$nspawn_pid" 2>/dev/null && [ "$SECONDS" -lt "$end" ]; do sleep 0.2; done
    fi
    # Killing a PID namespace's init kills everything in it.
    [ -z "$leader" ] || kill -KILL "$leader" 2>/dev/null || true
    kill -KILL "$nspawn_pid" 2>/dev/null || true
    wait "$nspawn_pid" 2>/dev/null || true
    nspawn_pid= leader=
    umount -R "$base/ct" 2>/dev/null || umount -R -l "$base/ct" 2>/dev/null || true
}
cleanup() {
    stop_container
    umount -R "$base" 2>/dev/null || umount -R -l "$base" 2>/dev/null || true
    rmdir "$base" 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mount -t tmpfs -o mode=0755,size=4G tmpfs "$base"
mkdir -p "$base/test/src/docs" "$base/ct"
cp "$deb" "$base/test/chatd.deb"
cp "$script" "$base/test/systemd_real.sh"
cp -r "$repo/contrib" "$base/test/src/"
cp "$repo/docs/SERVICE.md" "$base/test/src/docs/"

in_ct() {
    nsenter --target "$leader" --all -- env -i PATH="$I_PATH" HOME=/root LANG=C.UTF-8 TERM=dumb "$@"
}

boot() { # boot NAME: start a container on a fresh overlay; sets nspawn_pid and leader
    local ct="$base/ct"
    mkdir -p "$ct"
    mount -t tmpfs -o mode=0755,size=2G tmpfs "$ct"
    mkdir -p "$ct/upper" "$ct/work" "$ct/root"
    mount -t overlay overlay -o "lowerdir=/,upperdir=$ct/upper,workdir=$ct/work" "$ct/root"
    systemd-nspawn --quiet -D "$ct/root" --boot --private-network --register=no --keep-unit \
        --link-journal=no --machine="$1" --console=pipe --bind-ro="$base/test:$T" \
        </dev/null >"$base/console-$1.log" 2>&1 &
    nspawn_pid=$!
    leader_is_up() {
        kill -0 "$nspawn_pid" 2>/dev/null || { cat "$base/console-$1.log"; die "systemd-nspawn exited"; }
        leader=$(pgrep -P "$nspawn_pid" | head -1) && [ "$(cat "/proc/$leader/comm" 2>/dev/null)" = systemd ]
    }
    wait_for 60 "systemd as PID 1 of container $1" leader_is_up
    wait_for 60 "the manager's socket in container $1" in_ct test -S /run/systemd/private
    local state
    state=$(in_ct timeout 120 systemctl is-system-running --wait 2>&1 || true)
    case "$state" in
    running) ;;
    degraded) say "container $1 is degraded:"; in_ct systemctl --no-pager --failed || true ;;
    *) die "container $1 did not boot: $state" ;;
    esac
}

for mode in "${modes[@]}"; do
    start=$SECONDS
    say "==> container chatd-test-$mode: booting systemd"
    boot "chatd-test-$mode"
    in_ct systemctl --version | head -1
    rc=0
    in_ct timeout "$ct_timeout" bash "$T/systemd_real.sh" --inside "$mode" || rc=$?
    stop_container
    [ "$rc" -eq 0 ] || die "mode $mode failed (exit $rc)"
    say "==> $mode passed in $((SECONDS - start)) s"
done
say "all passed"
