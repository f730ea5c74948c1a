//! The first bytes of a guest's CONNECT tunnel and the targets it names come from the guest:
//! the ClientHello reader and the authority/rule parsers must never panic, and the reader
//! must never ask for more than its bound.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmcp_egress::sni::{peek, Peek, MAX_PEEK};
use vmcp_egress::{Policy, Target};

fuzz_target!(|data: &[u8]| {
    if let Ok(Peek::Incomplete(n)) = peek(data) {
        assert!(n > data.len() && n <= MAX_PEEK);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Target::parse_authority(text, Some(80));
        if let Ok(p) = text.parse::<Policy>() {
            // What a policy prints parses back to the same rules.
            let again: Policy = p.to_string().parse().expect("printed policy parses");
            assert_eq!(again.rules(), p.rules());
        }
    }
});
