//! Any bytes from the guest (or the host) must decode to messages or errors, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmcp_guest_proto::{decode, encode, read_msg, GuestMsg, HostMsg};

fuzz_target!(|data: &[u8]| {
    // Frame stream as the host reads it: decode repeatedly until incomplete or error.
    let mut at = 0;
    while let Ok(Some((msg, used))) = decode::<GuestMsg>(&data[at..]) {
        // What decodes must survive a re-encode/decode round trip unchanged.
        let again = encode(&msg).unwrap();
        let (back, n) = decode::<GuestMsg>(&again).unwrap().unwrap();
        assert_eq!(back, msg);
        assert_eq!(n, again.len());
        // The flow-control accounting of any message is defined and bounded.
        let _ = msg.request_id();
        assert!(msg.window_cost() as usize <= vmcp_guest_proto::MAX_PAYLOAD + 64);
        at += used;
    }
    // Frame stream as the guest reads it, through the blocking reader.
    let mut r = data;
    let mut scratch = Vec::new();
    while let Ok(Some(_)) = read_msg::<HostMsg, _>(&mut r, &mut scratch) {}
});
