//! Arbitrary bytes as a snapshot's state file: what `Snapshot::open`
//! reads from a directory it must not trust (a damaged disk, another
//! program's file, a hostile tenant's upload).
//!
//! Two checks per input. As a whole file, the header, length and checksum
//! checks run first; nothing may panic or allocate beyond the file. As a
//! payload behind a valid header and checksum (which anyone can compute),
//! the decoder runs on it: it must fail cleanly or decode into state that
//! encodes back to exactly the same bytes (no field it accepts is lost or
//! read two ways).

#![no_main]

use chitin::fuzzing::{parse_state_file, reencode_payload};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = parse_state_file(data);
    if let Ok(again) = reencode_payload(data) {
        assert_eq!(again, data, "a decoded payload must encode to itself");
    }
});
