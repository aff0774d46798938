#!/usr/bin/env bash
# The test command (README, line 2): installs what the tests need, then runs every test.
#   1. format, lints, docs
#   2. unit and contract tests: mock backend, fake VMM (real agent in host mode), fake CH API
#   3. real-VM and network targets, one at a time, explicitly (DESIGN.md §7): a missing
#      prerequisite is reported as ignored with its reason, never as passed
#   4. the quickstart on a real capsule (scripts/quickstart.sh)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh

if ! command -v cargo >/dev/null 2>&1; then
  echo "test: cargo is not installed; install Rust with rustup (https://rustup.rs), then rerun" >&2
  exit 1
fi
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
if [ -z "${CAPSULES_CH_OPENAPI:-}" ] && [ -f ../shared/reference/cloud-hypervisor-openapi.yaml ]; then
  CAPSULES_CH_OPENAPI="$(cd .. && pwd)/shared/reference/cloud-hypervisor-openapi.yaml"
  export CAPSULES_CH_OPENAPI
fi

step() { printf '\n=== %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy"
cargo clippy --workspace --all-targets --all-features -- -D warnings
step "cargo doc"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --all-features --quiet

step "unit and contract tests"
cargo test --workspace --all-features

# Real VMs and network namespaces: serialized, each binary with its own hard timeouts.
vm_target() {
  local pkg=$1 target=$2
  step "real-VM target: $pkg --test $target"
  timeout --signal=KILL 1800 cargo test -p "$pkg" --all-features --test "$target" -- --test-threads=1
}
vm_target capsules-microvm net_policy
vm_target capsules-microvm smoke_boot
vm_target capsules-backend-qemu qemu_vmm
vm_target capsules-backend-qemu contract_qemu
vm_target capsules-backend-qemu vm_qemu
vm_target capsules-backend-qemu net_qemu
vm_target capsules-server preview_qemu
vm_target capsules-backend-chv real_ch
vm_target capsules-backend-chv contract_chv
vm_target capsules-server vm_console
vm_target capsules-server console_vm
vm_target capsules-server kill9_qemu
# The MCP server against a real capsule: it runs the capsules-server binary.
cargo build -q -p capsules-server --all-features
vm_target capsules-mcp mcp_real

step "quickstart on a real capsule"
timeout --signal=KILL 1800 scripts/quickstart.sh
