# Unit and integration tests of the whole workspace. The VM tests boot the image built by
# 20-guest-image.sh; VMCP_REQUIRE_VM=1 makes them fail instead of skip if QEMU or the image is missing.
export VMCP_REQUIRE_VM=1
# The MCP interop tests need the reference servers of scripts/install.d/40-mcp-interop.sh.
export VMCP_REQUIRE_INTEROP=1
cargo test --workspace --locked
