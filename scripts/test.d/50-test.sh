# Unit and integration tests of the whole workspace, under line-coverage measurement: fails if
# any test fails or workspace line coverage drops below 80 %. The VM tests boot the image built by
# 20-guest-image.sh; VMCP_REQUIRE_VM=1 makes them fail instead of skip if QEMU or the image is missing.
export VMCP_REQUIRE_VM=1
# The MCP interop tests need the reference servers of scripts/install.d/40-mcp-interop.sh.
export VMCP_REQUIRE_INTEROP=1
# The approval page's browser test needs chromium + chromedriver (scripts/install.d/60-chromium.sh).
export VMCP_REQUIRE_BROWSER=1
cargo llvm-cov --version >/dev/null 2>&1 || {
  echo "cargo-llvm-cov is missing: run VMCP_INSTALL_CROSS=1 scripts/install-deps" >&2
  exit 1
}
# `cargo llvm-cov` builds test targets only: the QEMU stand-in of the vm crate's tests is an example.
cargo build --locked -q -p vmcp-vm --example fake_qemu
export VMCP_FAKE_QEMU="$PWD/target/debug/examples/fake_qemu"
cargo llvm-cov --workspace --locked --summary-only --fail-under-lines 80 2>&1 |
  grep -vE '^\S+\.rs +[0-9]+ ' # keep test output and the TOTAL line, drop the per-file table
