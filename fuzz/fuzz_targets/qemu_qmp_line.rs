//! Any line QEMU's QMP socket sends must parse to a message or an error, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmcp_vm::qemu::qmp::parse_line;

fuzz_target!(|data: &[u8]| {
    let _ = parse_line(data);
});
