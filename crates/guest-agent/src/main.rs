//! `vmcp-agent`: the guest's `/init`.
fn main() {}
