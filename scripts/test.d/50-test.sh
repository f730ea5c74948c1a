# Unit and integration tests of the whole workspace.
cargo test --workspace --locked
