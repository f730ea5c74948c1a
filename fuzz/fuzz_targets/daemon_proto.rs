//! The daemon's socket protocol from a hostile local client (and a broken daemon): frame
//! splitting with the length check, request and answer decoding with the field bounds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmcp_pool::proto::{decode_answer, decode_request, split_frame, MAX_ANSWER, MAX_REQUEST};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((payload, used))) = split_frame(data, MAX_REQUEST) {
        assert!(used <= data.len() && payload.len() <= MAX_REQUEST);
        if let Ok(r) = decode_request(payload) {
            assert!(r.check().is_ok());
        }
    }
    if let Ok(Some((payload, _))) = split_frame(data, MAX_ANSWER) {
        if let Ok(a) = decode_answer(payload) {
            assert!(a.check().is_ok());
        }
    }
    let _ = decode_request(data);
    let _ = decode_answer(data);
});
