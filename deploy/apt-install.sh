#!/bin/sh
# apt-get install PACKAGE...: as root, or through sudo when not root; a clear error otherwise.
# The Makefile calls it for what is missing (redis-server, nginx-light, python3-venv), .ci/run
# for make itself.
set -eu

if [ $# -eq 0 ]; then
    echo "usage: $0 PACKAGE..." >&2
    exit 2
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "$0: this needs $*, and there is no apt-get here: install them with this system's package manager" >&2
    exit 1
fi
if [ "$(id -u)" = 0 ]; then
    sudo=""
elif command -v sudo >/dev/null 2>&1; then
    sudo="sudo"
else
    echo "$0: this needs $*: run as root, or install sudo, or have root run: apt-get install $*" >&2
    exit 1
fi
echo "apt-get install $*" >&2
$sudo apt-get update -qq
$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
