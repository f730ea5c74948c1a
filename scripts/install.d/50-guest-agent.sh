# The guest agent (/init of every VM): a static musl binary for this host's architecture, which
# `vmcp image build` (or the first `vmcp run`) packs into the guest image. Needs cargo, and the
# musl target added by 10-system.sh. (Sourced by scripts/install-deps.)
if command -v cargo >/dev/null; then
  log "building the guest agent for $(uname -m)-unknown-linux-musl"
  (cd "$(dirname "${BASH_SOURCE[0]}")/../.." &&
    cargo build --locked -q -p vmcp-guest-agent --target "$(uname -m)-unknown-linux-musl" --profile agent)
else
  log "cargo not found: install Rust (rustup), then run scripts/install-deps again"
  exit 1
fi
