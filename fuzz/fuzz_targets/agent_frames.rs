//! Arbitrary bytes as the agent's side of an exec-protocol stream: what
//! the host client reads from a guest it must not trust.
//!
//! Two checks per input. The decoder: frames are read until the stream
//! ends or breaks; nothing may panic, allocate beyond the frame cap, or
//! decode into a frame the encoder would refuse or encode differently
//! (every accepted frame must round-trip exactly). The real client: a fake
//! agent answers the handshake and one EXEC with STARTED, then sends the
//! input bytes and hangs up; whatever they say, the client must end the
//! connection without panicking, every wait on the child must return, and
//! the output it buffered for the child must stay within one window per
//! output.

#![no_main]

use std::os::unix::net::UnixStream;
use std::time::Duration;

use chitin_agent_client::{Client, ClientConfig};
use chitin_agent_protocol::{read_frame, write_frame, ExecRequest, Frame, VERSION, WINDOW};
use chitin_seccomp::Seccomp;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut stream = data;
    while let Ok(Some(frame)) = read_frame(&mut stream) {
        let bytes = frame.encode().expect("a decoded frame must encode");
        let again = read_frame(&mut bytes.as_slice())
            .expect("an encoded frame must decode")
            .expect("an encoded frame is not an empty stream");
        assert_eq!(again, frame);
    }
    client_session(data);
});

/// The input as an agent's stream, after HELLO and STARTED for stream 1.
fn client_session(data: &[u8]) {
    let Ok((host, mut guest)) = UnixStream::pair() else {
        return;
    };
    let input = data.to_vec();
    let agent = std::thread::spawn(move || {
        let _ = read_frame(&mut guest);
        let _ = write_frame(&mut guest, &Frame::Hello { version: VERSION });
        // The client's EXEC comes before STARTED may.
        loop {
            match read_frame(&mut guest) {
                Ok(Some(Frame::Exec { id, .. })) => {
                    let _ = write_frame(&mut guest, &Frame::Started { id, pid: 1 });
                    break;
                }
                Ok(Some(_)) => {}
                _ => return,
            }
        }
        let _ = std::io::Write::write_all(&mut guest, &input);
        let _ = guest.shutdown(std::net::Shutdown::Write);
        // Take what the client sends until it goes.
        while let Ok(Some(_)) = read_frame(&mut guest) {}
    });
    let config = ClientConfig {
        handshake_timeout: Duration::from_secs(5),
        // The sanitizer's runtime reports from the client's threads too,
        // which their filters would not let it do.
        seccomp: Seccomp::Off,
        ..ClientConfig::default()
    };
    let client = Client::handshake_with(host, config).expect("the fake agent answers HELLO");
    if let Ok(child) = client.spawn_timeout(&ExecRequest::new(["x"]), Duration::from_secs(5)) {
        // The stream ends after the input: the wait must return, with the
        // child's end or the connection's.
        let _ = child.wait();
        let [stdout, stderr] = child.buffered();
        assert!(stdout <= WINDOW as usize && stderr <= WINDOW as usize);
    }
    drop(client);
    let _ = agent.join();
}
