#!/bin/sh
# Print the token the gateways of Procfile.scale share: $GATEWAY_TOKEN when set, else the one
# kept in .scale/gateway-token (mode 0600), made on first use. Every gateway calls this as it
# starts, at the same moment: the first `ln` wins and the others read the winner's token.
#
#   GATEWAY_TOKEN=$(sh deploy/gateway-token.sh) python ide.py --workspace examples/demo "..."
set -eu

if [ -n "${GATEWAY_TOKEN:-}" ]; then
    echo "$GATEWAY_TOKEN"
    exit 0
fi
dir="$(cd "$(dirname "$0")/.." && pwd)/.scale"
file="$dir/gateway-token"
if [ ! -s "$file" ]; then
    mkdir -p "$dir"
    umask 077
    tmp=$(mktemp "$dir/gateway-token.XXXXXX")
    head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$tmp"  # 256 random bits, in hex
    ln "$tmp" "$file" 2>/dev/null || true  # atomic: fails if another gateway made it first
    rm -f "$tmp"
fi
cat "$file"
