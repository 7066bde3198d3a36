#!/bin/sh
# Render deploy/nginx.conf.template under PREFIX and run nginx in the foreground (exec: the
# caller's process becomes nginx's master, so honcho or a test stops it with SIGTERM).
#
#   deploy/nginx.sh PREFIX WS_PORT AGENT_PORT GATEWAYS AGENTS
#   deploy/nginx.sh .scale/nginx 8000 8001 8010,8011 8020,8021
#
# GATEWAYS and AGENTS: comma-separated ports on 127.0.0.1, or HOST:PORT entries. Writes
# PREFIX/conf/{nginx.conf,gateways.conf,agents.conf}; logs, pid and temporary files go to
# PREFIX/logs and PREFIX/tmp. NGINX_BIN names the binary (default: nginx, /usr/sbin searched too;
# not NGINX, which nginx itself reads as a list of inherited sockets).
set -eu

if [ $# -ne 5 ]; then
    echo "usage: $0 PREFIX WS_PORT AGENT_PORT GATEWAY_PORTS AGENT_PORTS  (e.g. .scale/nginx 8000 8001 8010,8011 8020,8021)" >&2
    exit 2
fi
template="$(cd "$(dirname "$0")" && pwd)/nginx.conf.template"
mkdir -p "$1/conf" "$1/logs" "$1/tmp"
prefix="$(cd "$1" && pwd)"  # absolute: nginx reads -p literally
ws_port=$2 agent_port=$3 gateways=$4 agents=$5

# One "server ...;" line per replica. max_fails/fail_timeout: after a failed connection a
# replica is skipped for 2 s, then tried again (nginx ignores both when the group has one).
servers() {
    for entry in $(echo "$1" | tr ',' ' '); do
        case $entry in *:*) ;; *) entry="127.0.0.1:$entry" ;; esac
        echo "server $entry max_fails=1 fail_timeout=2s;"
    done
}
servers "$gateways" >"$prefix/conf/gateways.conf"
servers "$agents" >"$prefix/conf/agents.conf"
sed -e "s/@WS_PORT@/$ws_port/g" -e "s/@AGENT_PORT@/$agent_port/g" "$template" >"$prefix/conf/nginx.conf"

# As root, nginx would run its workers as `nobody`, who cannot write PREFIX/tmp in a private
# directory (a test's tmp dir is mode 0700): keep them as the user who started it.
user=""
if [ "$(id -u)" = 0 ]; then user="user root;"; fi

unset NGINX  # nginx reads it as sockets inherited from an old master (binary upgrade)
PATH="$PATH:/usr/sbin:/sbin"  # Debian installs nginx in /usr/sbin, off a normal user's PATH
exec "${NGINX_BIN:-nginx}" -p "$prefix/" -c conf/nginx.conf -e stderr -g "daemon off; $user"
