#!/usr/bin/env bash
# The Capsules quickstart, end to end: installs what is missing, builds the server and the
# `capsule` CLI, starts the server on a free loopback port with a fresh state directory, and runs
# the quickstart's `capsule` commands exactly as the README shows them, printing each before it runs.
#
#   CAPSULES_BACKEND=mock|qemu|chv   passed to the server as --backend (default: the server chooses)
#   CAPSULES_SKIP_SETUP=1            do not run scripts/setup.sh
#   CAPSULES_QUICKSTART_HOST_NETWORK=1  run on the host's network; by default (as root) the server
#                                    and its capsule run in a network namespace of their own, so the
#                                    capsule's tap and nftables rules never touch the host's network
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

if [ "${CAPSULES_SKIP_SETUP:-0}" != 1 ]; then
  if [ "$(id -u)" -eq 0 ]; then
    bash scripts/setup.sh
  else
    bash scripts/setup.sh || echo "quickstart: setup.sh could not install everything (not root); going on" >&2
  fi
fi

# Built outside the private network namespace (cargo may need crates.io); the re-exec inside it
# skips the build.
if [ -z "${CAPSULES_QUICKSTART_IN_NETNS:-}" ]; then
  echo "quickstart: building capsules-server and capsule"
  cargo build -q -p capsules-server -p capsules-cli
fi
target="${CARGO_TARGET_DIR:-$repo/target}"
bin="$target/debug"
[ -x "$bin/capsules-server" ] && [ -x "$bin/capsule" ] || { echo "quickstart: binaries not found in $bin" >&2; exit 1; }

# A private network namespace for the server, its capsule's tap and nftables rules (root only).
if [ "$(id -u)" -eq 0 ] && [ -z "${CAPSULES_QUICKSTART_IN_NETNS:-}" ] \
  && [ "${CAPSULES_QUICKSTART_HOST_NETWORK:-0}" != 1 ] && command -v unshare >/dev/null 2>&1; then
  echo "quickstart: running in a private network namespace (CAPSULES_QUICKSTART_HOST_NETWORK=1 to use the host's)"
  export CAPSULES_QUICKSTART_IN_NETNS=1 CAPSULES_SKIP_SETUP=1
  exec unshare --net -- bash "${BASH_SOURCE[0]}" "$@"
fi
if [ -n "${CAPSULES_QUICKSTART_IN_NETNS:-}" ]; then
  ip link set lo up
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/capsules-quickstart.XXXXXX")"
# The VMM runs as an unprivileged user that must reach the state directory inside.
chmod 0711 "$work"
server_pid=""
cleanup() {
  local rc=$?
  if [ "$rc" -ne 0 ] && [ -f "$work/server.log" ]; then
    echo "quickstart: failed (exit $rc); the server's log:" >&2
    tail -n 40 "$work/server.log" >&2
  fi
  if [ -n "$server_pid" ]; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

# A free loopback port: bind port 0 and read what the kernel chose.
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
backend_args=()
if [ -n "${CAPSULES_BACKEND:-}" ]; then backend_args=(--backend "$CAPSULES_BACKEND"); fi
# The server reads CAPSULES_BACKEND itself too; pass it only as the flag.
env -u CAPSULES_BACKEND "$bin/capsules-server" "${backend_args[@]}" --state-dir "$work/state" \
  --listen "127.0.0.1:$port" >"$work/server.log" 2>&1 &
server_pid=$!

export CAPSULE_API="http://127.0.0.1:$port"
for _ in $(seq 1 600); do
  if [ -f "$work/state/bootstrap.json" ] && (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then break; fi
  if ! kill -0 "$server_pid" 2>/dev/null; then
    echo "quickstart: the server exited:" >&2; cat "$work/server.log" >&2; exit 1
  fi
  sleep 0.1
done
(exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || { echo "quickstart: the server did not answer" >&2; cat "$work/server.log" >&2; exit 1; }
grep -E 'listening|NOTICE' "$work/server.log" || true

owner="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["owner_token"])' "$work/state/bootstrap.json")"
export PATH="$bin:$PATH"

run() {
  echo "+ $*"
  "$@"
}

# The quickstart forwards no input: `capsule exec` sends its stdin when it is not a terminal.
exec </dev/null
export CAPSULE_TOKEN="$owner"
echo "+ capsule tokens create --scope agent:write --prefix agent-"
minted="$(capsule tokens create --scope agent:write --prefix agent-)"
echo "$minted"
agent="$(printf '%s\n' "$minted" | sed -n 's/^export CAPSULE_TOKEN=//p')"
[ -n "$agent" ] || { echo "quickstart: no token in the output of tokens create" >&2; exit 1; }
export CAPSULE_TOKEN="$agent"

run capsule create agent-pr-482 --size 2x2gb --credit-limit 2.00
run capsule cp ./examples/quickstart/project agent-pr-482:/workspace
run capsule exec agent-pr-482 -- npm test
run capsule terminate agent-pr-482
run capsule usage agent-pr-482
echo "quickstart: done"
