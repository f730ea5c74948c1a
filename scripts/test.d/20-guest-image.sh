# Builds the static guest agent and the guest image, so the VM tests in later steps can boot
# it. The first run fetches the pinned kernel and busybox packages with `apt-get download`.
cargo build --locked -p vmcp-guest-agent --target x86_64-unknown-linux-musl --profile agent
cargo run --locked -q -p vmcp-cli -- image build
# The arm64 agent must keep building (the macOS backend boots it).
cargo build --locked -p vmcp-guest-agent --target aarch64-unknown-linux-musl --profile agent
