//! [`RemoteSandbox`]: a sandbox another process runs, reached through
//! its vsock device's Unix socket.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chitin_seccomp::Seccomp;
use chitin_vcpu::{ExitReason, VmControl};

use crate::error::ExecError;
use crate::exec::{AgentLink, Child, Command, ExitStatus, Output};

/// A sandbox that another process runs (a VMM confined in its own jail,
/// as chitin's containerd shim runs one per pod), driven from this one
/// through the vsock device's Unix socket: the path the other process
/// gave [`SandboxBuilder::vsock`](crate::SandboxBuilder::vsock).
///
/// Commands run as on a [`SandboxHandle`](crate::SandboxHandle): one
/// agent connection shared by all, opened on first use (waiting for the
/// agent while the guest boots) and again after the agent closed it.
/// This process cannot see the VM stop by itself: whoever watches the
/// other process calls [`RemoteSandbox::stopped`] when it ends, and
/// every command and wait still pending then ends at once with
/// [`ExecError::GuestStopped`].
///
/// ```no_run
/// use chitin::{Command, ExitReason, RemoteSandbox, Seccomp};
///
/// let vm = RemoteSandbox::new("/run/pod-1/vsock.sock", Seccomp::Enforce);
/// let out = vm.output(Command::new("uname").arg("-r"))?;
/// println!("{}", String::from_utf8_lossy(&out.stdout));
/// // The VMM process ended (seen by whoever waits for it).
/// vm.stopped(ExitReason::Stopped);
/// # Ok::<(), chitin::ExecError>(())
/// ```
pub struct RemoteSandbox {
    socket: PathBuf,
    link: AgentLink,
    control: Arc<VmControl>,
}

impl fmt::Debug for RemoteSandbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteSandbox")
            .field("socket", &self.socket)
            .field("exit_reason", &self.exit_reason())
            .finish_non_exhaustive()
    }
}

impl RemoteSandbox {
    /// The sandbox whose vsock device listens at `socket`. Nothing is
    /// opened yet. The threads its commands start here (stdin feeders,
    /// output copiers) run under `seccomp`.
    pub fn new(socket: impl Into<PathBuf>, seccomp: Seccomp) -> Self {
        let socket = socket.into();
        let control = Arc::new(VmControl::new());
        let link = AgentLink::new(socket.clone(), None, &control, seccomp);
        Self {
            socket,
            link,
            control,
        }
    }

    /// The vsock device's socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Run `cmd` to completion and collect its output, as
    /// [`RunningSandbox::output`](crate::RunningSandbox::output).
    pub fn output(&self, cmd: &Command) -> Result<Output, ExecError> {
        self.link.output(cmd)
    }

    /// Run `cmd` to completion, its output thrown away unless it goes
    /// elsewhere; the exit status.
    pub fn status(&self, cmd: &Command) -> Result<ExitStatus, ExecError> {
        self.link.status(cmd)
    }

    /// Start `cmd`, as [`RunningSandbox::spawn`](crate::RunningSandbox::spawn).
    pub fn spawn(&self, cmd: &Command) -> Result<Child, ExecError> {
        self.link.spawn(cmd)
    }

    /// The process running the VM ended, for `reason` (what it reported,
    /// or [`ExitReason::VmmGone`] when it said nothing): every command,
    /// wait and stdin write still pending ends with
    /// [`ExecError::GuestStopped`], and so does every later one. The
    /// first reason given stays.
    pub fn stopped(&self, reason: ExitReason) {
        self.control.request_exit(reason);
        self.link.close();
    }

    /// Why the VM stopped, once [`RemoteSandbox::stopped`] said so.
    pub fn exit_reason(&self) -> Option<ExitReason> {
        self.control.exit_reason()
    }

    /// Block until [`RemoteSandbox::stopped`] is called or `timeout`
    /// passes.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<ExitReason> {
        self.control.wait_timeout(timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::fake::{fake_vsock_device, host_sh};
    use std::time::Instant;

    #[test]
    fn remote_runs_commands_and_ends_them_when_told_the_vm_stopped() {
        let (path, _accepted, _device) = fake_vsock_device();
        let vm = RemoteSandbox::new(&path, Seccomp::Enforce);
        assert_eq!(vm.socket(), path);
        let out = vm.output(&host_sh("echo remote; exit 4")).unwrap();
        assert_eq!(out.stdout, b"remote\n");
        assert_eq!(out.status.code(), Some(4));
        assert_eq!(vm.status(&host_sh("exit 5")).unwrap().code(), Some(5));
        let mut child = vm.spawn(&host_sh("sleep 1000")).unwrap();
        assert!(vm.exit_reason().is_none());
        assert!(vm.wait_timeout(Duration::from_millis(10)).is_none());
        let started = Instant::now();
        vm.stopped(ExitReason::VmmGone);
        match child.wait() {
            Err(ExecError::GuestStopped(ExitReason::VmmGone)) => {}
            other => panic!("wait after the stop: {other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(5));
        // The first reason stays; later commands fail the same way.
        vm.stopped(ExitReason::Stopped);
        assert_eq!(vm.exit_reason(), Some(ExitReason::VmmGone));
        match vm.output(&host_sh("echo late")) {
            Err(ExecError::GuestStopped(ExitReason::VmmGone)) => {}
            other => panic!("a command after the stop: {other:?}"),
        }
    }
}
