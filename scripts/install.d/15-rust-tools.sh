# Rust tools the test suite uses: cargo-llvm-cov (line-coverage gate of 50-test.sh) and
# cargo-fuzz (short fuzzing runs of 70-fuzz.sh). Built from crates.io once; skipped when present.
# (Sourced by scripts/install-deps.)
if [ "${VMCP_INSTALL_CROSS:-0}" = "1" ]; then
  rustup component add llvm-tools-preview
  if ! cargo llvm-cov --version >/dev/null 2>&1; then
    log "installing cargo-llvm-cov"
    cargo install --locked -q cargo-llvm-cov
  fi
  if ! cargo fuzz --version >/dev/null 2>&1; then
    log "installing cargo-fuzz"
    cargo install --locked -q cargo-fuzz
  fi
fi
