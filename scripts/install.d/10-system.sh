# System packages and rustup targets. Sourced by scripts/install-deps.
add_backports
log "apt-get update"
$SUDO apt-get update -qq
. /etc/os-release
QEMU_SUITE=()
if [ "${VERSION_CODENAME:-}" = "bookworm" ] && [ -f /etc/apt/sources.list.d/vmcp-backports.sources ]; then
  QEMU_SUITE=(-t bookworm-backports)
fi
log "installing QEMU and guest inputs"
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${QEMU_SUITE[@]}" \
  qemu-system-x86 qemu-system-arm >/dev/null
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
  busybox-static cpio xz-utils zstd ca-certificates e2fsprogs mmdebstrap >/dev/null
# `vmcp image rootfs --pip` fetches wheels with the host's pip (the host's index settings).
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
  python3-pip >/dev/null
if [ "${VMCP_INSTALL_CROSS:-0}" = "1" ]; then
  log "installing mingw-w64 and wine (Windows cross checks)"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    gcc-mingw-w64-x86-64 wine64 >/dev/null
fi
log "adding rustup targets"
targets=(x86_64-unknown-linux-musl aarch64-unknown-linux-musl)
if [ "${VMCP_INSTALL_CROSS:-0}" = "1" ]; then
  targets+=(aarch64-apple-darwin x86_64-apple-darwin x86_64-pc-windows-msvc x86_64-pc-windows-gnu)
fi
rustup target add "${targets[@]}"
