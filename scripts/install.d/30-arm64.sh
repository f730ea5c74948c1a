# arm64 guest image inputs: `vmcp image build --arch aarch64` fetches the arm64 kernel and
# busybox-static packages with `apt-get download name:arm64=version`, which needs dpkg to know
# the architecture. (Sourced by scripts/install-deps.)
if command -v dpkg >/dev/null && ! dpkg --print-foreign-architectures | grep -qx arm64; then
  log "enabling the arm64 package architecture (for the arm64 guest image)"
  $SUDO dpkg --add-architecture arm64
  $SUDO apt-get update -qq
fi
