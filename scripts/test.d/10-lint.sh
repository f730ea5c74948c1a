# Formatting and lints on the host target.
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
