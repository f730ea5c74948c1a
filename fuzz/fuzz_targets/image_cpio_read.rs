//! The initramfs reader must turn any bytes into entries or an error, never panic; what it
//! reads must survive a write/read round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmcp_image::cpio;

fuzz_target!(|data: &[u8]| {
    if let Ok(entries) = cpio::read(data) {
        let mut again = Vec::new();
        if cpio::write(&entries, &mut again).is_ok() {
            assert_eq!(cpio::read(&again).unwrap(), entries);
        }
    }
});
