#!/usr/bin/env bash
# Installs what Capsules needs on a Debian 12 host (idempotent). Run as root.
#   - QEMU (TCG or KVM), mmdebstrap and friends to build the guest image from Debian packages,
#   - nftables and iproute2 for capsule networking,
#   - binutils to assemble the tiny Cloud Hypervisor test guest,
#   - the unprivileged user every VMM process runs as.
set -euo pipefail

need=()
have() { command -v "$1" >/dev/null 2>&1; }
have qemu-system-x86_64 || need+=(qemu-system-x86)
have qemu-img || need+=(qemu-utils)
have mmdebstrap || need+=(mmdebstrap)
have nft || need+=(nftables)
have mkfs.ext4 || need+=(e2fsprogs)
have ip || need+=(iproute2)
have zstd || need+=(zstd)
have xz || need+=(xz-utils)
have cpio || need+=(cpio)
have as || need+=(binutils)
have ps || need+=(procps)
have dpkg-deb || need+=(dpkg)
[ -f /usr/share/keyrings/debian-archive-keyring.gpg ] || need+=(debian-archive-keyring)
# The web console: Node.js and npm build its assets; headless Chromium and its WebDriver test it.
have node || need+=(nodejs)
have npm || need+=(npm)
[ -x /usr/bin/chromium ] || need+=(chromium)
[ -x /usr/bin/chromedriver ] || need+=(chromium-driver)

if [ "${#need[@]}" -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: missing packages: ${need[*]}; run as root or: sudo apt-get install -y ${need[*]}" >&2
    exit 1
  fi
  echo "setup: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${need[@]}"
fi

# The user VMM processes run as (DESIGN.md §5, Privileges).
if [ "$(id -u)" -eq 0 ] && ! id capsules-vmm >/dev/null 2>&1; then
  useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin capsules-vmm
fi

# The official MCP Python SDK, for examples/mcp's end-to-end test (reported ignored without it).
if command -v python3 >/dev/null 2>&1; then
  python3 -c "import mcp" 2>/dev/null || python3 -m pip install --quiet "mcp>=1,<2"
fi

# The web console's assets (examples/server/console/dist, served under /console/), rebuilt only
# when its sources or lockfile changed. npm fetches the locked packages from the npm registry.
console="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/examples/server/console"
if have npm && [ -f "$console/package-lock.json" ]; then
  stamp="$console/dist/.built-from"
  want="$(cd "$console" && cat package.json package-lock.json build.mjs index.html tsconfig.json $(find src -type f | sort) | sha256sum | cut -d' ' -f1)"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup: building the web console (npm ci && npm run build in examples/server/console)"
    (cd "$console" && npm ci --no-audit --no-fund --loglevel=error >/dev/null && npm run --silent build)
    echo "$want" >"$stamp"
  fi
fi
