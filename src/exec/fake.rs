//! Test support: the agent's server library on the host behind a
//! stand-in for the vsock device's Unix socket, so the host side of exec
//! runs for real without a guest.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use chitin_agent::server::{self, NoHooks};
use chitin_seccomp::Seccomp;
use chitin_vcpu::VmControl;

use super::{AgentLink, Command, AGENT_PORT};

pub(crate) fn host_sh(script: &str) -> Command {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(script)
        .env("PATH", "/usr/local/bin:/usr/bin:/bin");
    cmd
}

/// An agent link to the agent's server library on the host, through a
/// stand-in vsock device; with the guard that ends it.
pub(crate) fn link() -> (AgentLink, Arc<VmControl>, FakeDevice) {
    let (path, _accepted, device) = fake_vsock_device();
    let control = Arc::new(VmControl::new());
    (
        AgentLink::new(path, None, &control, Seccomp::Enforce),
        control,
        device,
    )
}

/// Stops a fake device's accept thread and removes its directory.
pub(crate) struct FakeDevice {
    path: PathBuf,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for FakeDevice {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // Wakes the accept thread, which then sees `stop`.
        let _ = UnixStream::connect(&self.path);
        if let Some(dir) = self.path.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A stand-in for the vsock device's Unix socket: each connection gets
/// `OK` to its `CONNECT` and the real agent server behind it. Returns
/// the socket path, the guest ends of the connections made, and the
/// guard that ends it.
pub(crate) fn fake_vsock_device() -> (PathBuf, Arc<Mutex<Vec<UnixStream>>>, FakeDevice) {
    let dir = std::env::temp_dir().join(format!(
        "chitin-link-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("vsock.sock");
    let _ = std::fs::remove_file(&path);
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let accepted: Arc<Mutex<Vec<UnixStream>>> = Arc::default();
    let list = Arc::clone(&accepted);
    let stop: Arc<std::sync::atomic::AtomicBool> = Arc::default();
    let stopped = Arc::clone(&stop);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            if stopped.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            let Ok(mut stream) = stream else { return };
            let mut line = [0u8; 13];
            let parsed = stream
                .read_exact(&mut line)
                .ok()
                .and_then(|()| chitin_vsock::host::parse_connect_line(&line));
            if parsed != Some(AGENT_PORT) {
                continue;
            }
            let ok = chitin_vsock::host::ok_line(1);
            stream.write_all(ok.as_bytes()).unwrap();
            list.lock().unwrap().push(stream.try_clone().unwrap());
            std::thread::spawn(move || {
                let reader = stream.try_clone().unwrap();
                server::serve(reader, stream, &NoHooks)
            });
        }
    });
    let guard = FakeDevice {
        path: path.clone(),
        stop,
    };
    (path, accepted, guard)
}
