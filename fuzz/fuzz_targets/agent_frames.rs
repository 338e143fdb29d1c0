//! Arbitrary bytes as the agent's side of an exec-protocol stream: what
//! the host client reads from a guest it must not trust. Frames are read
//! until the stream ends or breaks; nothing may panic, allocate beyond the
//! frame cap, or decode into a frame the encoder would refuse or encode
//! differently (every accepted frame must round-trip exactly).

#![no_main]

use chitin_agent::protocol::{read_frame, Frame};
use chitin_agent::window::Window;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut stream = data;
    // Credit frames also drive a window, as the client's demultiplexer does.
    let window = Window::new();
    while let Ok(Some(frame)) = read_frame(&mut stream) {
        let bytes = frame.encode().expect("a decoded frame must encode");
        let again = read_frame(&mut bytes.as_slice())
            .expect("an encoded frame must decode")
            .expect("an encoded frame is not an empty stream");
        assert_eq!(again, frame);
        if let Frame::StdinCredit { bytes, .. } | Frame::OutputCredit { bytes, .. } = frame {
            // Give then take back the same amount: the window never runs
            // dry, so `take` never waits.
            if bytes > 0 && window.give(bytes).is_ok() {
                assert_eq!(window.take(bytes), Some(bytes));
            }
        }
    }
});
