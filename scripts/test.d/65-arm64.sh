# The arm64 guest image (what Virtualization.framework boots on Apple Silicon), built on this
# host and runtime-tested under qemu-system-aarch64 (TCG, `virt` machine) with the same VM
# integration tests as the x86_64 image. The agent is cross-built with rust-lld
# (.cargo/config.toml), so no aarch64 C toolchain is needed.
start=$(date +%s)
cargo build --locked -q -p vmcp-guest-agent --target aarch64-unknown-linux-musl --profile agent
cargo build --locked -q -p vmcp-cli
./target/debug/vmcp image build --arch aarch64 >/dev/null
kernel=$(./target/debug/vmcp image path --arch aarch64 | awk '/^kernel /{print $2}')
# The framework needs the uncompressed arm64 Image: check the header magic at byte 56.
magic=$(dd if="$kernel" bs=1 skip=56 count=4 2>/dev/null | od -An -c | tr -d ' ')
[ "$magic" = 'ARMd' ] || { echo "65-arm64: $kernel is not an uncompressed arm64 Image" >&2; exit 1; }
echo "65-arm64: image ready after $(( $(date +%s) - start ))s" >&2
# The rootfs test needs an arm64 static busybox for its ext4 image: take the pinned one.
cache="${VMCP_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/vmcp}"
bb_dir=$(mktemp -d)
trap 'rm -rf "$bb_dir"' EXIT
dpkg-deb --fsys-tarfile "$cache"/downloads/busybox-static_*_arm64.deb | tar -xO ./bin/busybox >"$bb_dir/busybox"
chmod +x "$bb_dir/busybox"
export VMCP_TEST_BUSYBOX="$bb_dir/busybox"
export VMCP_TEST_ARCH=aarch64 VMCP_REQUIRE_VM=1
cargo test --locked -p vmcp-vm --test qemu_vm
echo "65-arm64: done after $(( $(date +%s) - start ))s" >&2
