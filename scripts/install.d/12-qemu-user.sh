# The system user QEMU runs as when vmcp runs as root (crates/vm/src/qemu/spawn.rs): its own
# uid, so no other service's processes can trace or signal QEMU (the shared `nobody` could).
# Sourced by scripts/install-deps. No home directory, no login shell, no password.
if ! getent passwd vmcp-qemu >/dev/null; then
  log "creating the system user vmcp-qemu (QEMU runs as it when vmcp is root)"
  nologin=/usr/sbin/nologin
  [ -x "$nologin" ] || nologin=/bin/false
  $SUDO useradd --system --no-create-home --home-dir /nonexistent --shell "$nologin" \
    --user-group vmcp-qemu
fi
