//! An async face for tokio runtimes (cargo feature `tokio`): the runtimes
//! that embed VMMs today (Kata's runtime-rs, containerd shims in Rust) are
//! async.
//!
//! A thin layer over the same blocking client, not a second
//! implementation: every call that can wait runs the blocking call on
//! tokio's blocking pool (`spawn_blocking`), so no runtime worker thread
//! ever waits on the guest. Everything keeps its deadlines and typed
//! errors. Dropping a future before it completes does not cancel the work:
//! a command started runs to its end (or its timeout) in the background.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use chitin::tokio::AsyncSandbox;
//! use chitin::{Command, GuestImage, Sandbox};
//!
//! let vm = Sandbox::builder().guest(GuestImage::default()).build()?.start()?;
//! let sandbox = AsyncSandbox::new(vm.handle());
//! let out = sandbox.output(Command::new("uname").arg("-r")).await?;
//! println!("{}", String::from_utf8_lossy(&out.stdout));
//! let mut sleeper = sandbox.spawn(Command::new("sleep").arg("1000")).await?;
//! sleeper.kill()?;
//! let status = sleeper.wait().await?;
//! assert_eq!(status.signal(), Some(chitin::Signal::KILL));
//! sandbox.stop().await;
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ::tokio::task;

use crate::exec::{relock, Signaller};
use crate::{
    Child, ChildStderr, ChildStdin, ChildStdout, Command, ExecError, ExitReason, ExitStatus,
    Output, SandboxHandle, Signal,
};

/// Run `work` on tokio's blocking pool and wait for it.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    match task::spawn_blocking(work).await {
        Ok(value) => value,
        Err(e) => match e.try_into_panic() {
            // chitin's own panic, in the caller's task.
            Ok(payload) => std::panic::resume_unwind(payload),
            Err(_) => panic!("the tokio runtime shut down under a chitin call"),
        },
    }
}

/// A running sandbox seen from async code: cheap to clone, `Send + Sync`,
/// built from a [`SandboxHandle`].
#[derive(Clone, Debug)]
pub struct AsyncSandbox {
    handle: SandboxHandle,
}

impl AsyncSandbox {
    /// The async face of `handle`'s sandbox.
    pub fn new(handle: SandboxHandle) -> Self {
        Self { handle }
    }

    /// [`RunningSandbox::output`](crate::RunningSandbox::output).
    pub async fn output(&self, cmd: &Command) -> Result<Output, ExecError> {
        let (handle, cmd) = (self.handle.clone(), cmd.clone());
        blocking(move || handle.output(&cmd)).await
    }

    /// [`RunningSandbox::status`](crate::RunningSandbox::status).
    pub async fn status(&self, cmd: &Command) -> Result<ExitStatus, ExecError> {
        let (handle, cmd) = (self.handle.clone(), cmd.clone());
        blocking(move || handle.status(&cmd)).await
    }

    /// [`RunningSandbox::spawn`](crate::RunningSandbox::spawn).
    pub async fn spawn(&self, cmd: &Command) -> Result<AsyncChild, ExecError> {
        let (handle, cmd) = (self.handle.clone(), cmd.clone());
        blocking(move || handle.spawn(&cmd))
            .await
            .map(AsyncChild::new)
    }

    /// [`SandboxHandle::wait`].
    pub async fn wait(&self) -> ExitReason {
        let handle = self.handle.clone();
        blocking(move || handle.wait()).await
    }

    /// [`SandboxHandle::stop`].
    pub async fn stop(&self) -> ExitReason {
        let handle = self.handle.clone();
        blocking(move || handle.stop()).await
    }

    /// Why the guest stopped, or `None` while it runs (never blocks).
    pub fn exit_reason(&self) -> Option<ExitReason> {
        self.handle.exit_reason()
    }

    /// The blocking handle underneath.
    pub fn handle(&self) -> &SandboxHandle {
        &self.handle
    }
}

/// A guest process seen from async code (from [`AsyncSandbox::spawn`]).
///
/// Its streams are the blocking [`ChildStdin`], [`ChildStdout`] and
/// [`ChildStderr`] (read or write them on the blocking pool); signals go
/// out at once, also while a `wait` is pending.
pub struct AsyncChild {
    /// Its stdin, when piped.
    pub stdin: Option<ChildStdin>,
    /// Its stdout, when piped.
    pub stdout: Option<ChildStdout>,
    /// Its stderr, when piped.
    pub stderr: Option<ChildStderr>,
    id: u32,
    signaller: Signaller,
    /// The child, lent to one blocking wait at a time (`None` once
    /// `wait_with_output` took it).
    child: Arc<Mutex<Option<Child>>>,
}

impl fmt::Debug for AsyncChild {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AsyncChild")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl AsyncChild {
    fn new(mut child: Child) -> Self {
        Self {
            stdin: child.stdin.take(),
            stdout: child.stdout.take(),
            stderr: child.stderr.take(),
            id: child.id(),
            signaller: child.signaller(),
            child: Arc::new(Mutex::new(Some(child))),
        }
    }

    /// Its pid in the guest.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Send it `signal`; returns at once.
    pub fn signal(&self, signal: Signal) -> Result<(), ExecError> {
        self.signaller.signal(signal)
    }

    /// Kill it (SIGKILL); returns at once.
    pub fn kill(&self) -> Result<(), ExecError> {
        self.signal(Signal::KILL)
    }

    /// Wait for it to exit, as [`Child::wait`] does (its deadline
    /// included). It takes `&self`, so [`AsyncChild::kill`] can go out
    /// while it is pending; drop (or `take()`) `stdin` first if the
    /// process waits for its EOF.
    ///
    /// Cancel-safe: dropping the future lets go of the child within
    /// [`WAIT_SLICE`], so a later `wait` or `wait_with_output` is not held
    /// up by a wait nobody awaits.
    pub async fn wait(&self) -> Result<ExitStatus, ExecError> {
        let child = Arc::clone(&self.child);
        let cancel = Cancel::default();
        let cancelled = Arc::clone(&cancel.0);
        blocking(move || loop {
            // The child is lent for one slice at a time.
            let status = match relock(&child).as_mut() {
                Some(child) => child.wait_timeout(WAIT_SLICE)?,
                None => return Err(gone()),
            };
            if let Some(status) = status {
                return Ok(status);
            }
            if cancelled.load(Ordering::SeqCst) {
                // Nobody awaits this any more; the value is dropped.
                return Err(ExecError::Timeout(Duration::ZERO));
            }
        })
        .await
    }

    /// [`Child::wait_with_output`]: the streams still in this child's
    /// fields are collected.
    pub async fn wait_with_output(mut self) -> Result<Output, ExecError> {
        let (stdin, stdout, stderr) = (self.stdin.take(), self.stdout.take(), self.stderr.take());
        let child = Arc::clone(&self.child);
        blocking(move || {
            drop(stdin);
            // A cancelled wait may still hold the child: this waits for it.
            let Some(mut child) = relock(&child).take() else {
                return Err(gone());
            };
            child.stdout = stdout;
            child.stderr = stderr;
            child.wait_with_output()
        })
        .await
    }
}

/// How long a blocking wait holds the child before it looks whether its
/// future was dropped.
pub const WAIT_SLICE: Duration = Duration::from_millis(50);

/// Set when the future that owns it is dropped (completed or not).
#[derive(Default)]
struct Cancel(Arc<AtomicBool>);

impl Drop for Cancel {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Only `wait_with_output`, which consumes the child, takes it out.
fn gone() -> ExecError {
    ExecError::AgentFailed("the child was already collected".into())
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::exec::fake::{host_sh, link};
    use crate::Stdio;

    /// An async sandbox over the agent's server library on the host.
    fn sandbox() -> (AsyncSandbox, crate::exec::fake::FakeDevice) {
        let (link, control, device) = link();
        (
            AsyncSandbox::new(SandboxHandle::detached(link, control)),
            device,
        )
    }

    #[tokio::test(flavor = "current_thread")]
    async fn output_and_status_run_without_blocking_the_runtime() {
        let (sandbox, _device) = sandbox();
        // One runtime thread: a ticker only advances if the commands do
        // not hold it.
        let ticks = tokio::spawn(async {
            let mut n = 0u32;
            let started = Instant::now();
            while started.elapsed() < Duration::from_millis(300) {
                tokio::time::sleep(Duration::from_millis(10)).await;
                n += 1;
            }
            n
        });
        let out = sandbox
            .output(host_sh("sleep 0.3; echo out").stdin(Stdio::bytes("x")))
            .await
            .unwrap();
        assert_eq!(out.stdout, b"out\n");
        let status = sandbox.status(&host_sh("exit 4")).await.unwrap();
        assert_eq!(status.code(), Some(4));
        let ticks = ticks.await.unwrap();
        eprintln!("the runtime's one thread ticked {ticks} times during a 300 ms exec");
        assert!(ticks >= 10, "only {ticks} ticks");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_child_is_killed_while_a_wait_is_pending() {
        let (sandbox, _device) = sandbox();
        let child = sandbox.spawn(&host_sh("sleep 1000")).await.unwrap();
        assert!(child.id() > 0);
        let (waited, killed) = tokio::join!(child.wait(), async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            child.kill()
        });
        killed.unwrap();
        assert_eq!(waited.unwrap().signal(), Some(Signal::KILL));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn wait_with_output_collects_the_streams_left_in_it() {
        let (sandbox, _device) = sandbox();
        let mut cmd = host_sh("cat; echo err >&2");
        cmd.stdin(Stdio::piped());
        let mut child = sandbox.spawn(&cmd).await.unwrap();
        let mut stdin = child.stdin.take().unwrap();
        tokio::task::spawn_blocking(move || {
            use std::io::Write;
            stdin.write_all(b"piped in").unwrap();
        })
        .await
        .unwrap();
        let out = child.wait_with_output().await.unwrap();
        assert_eq!(out.stdout, b"piped in");
        assert_eq!(out.stderr, b"err\n");
        assert!(out.status.success());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_cancelled_wait_holds_up_nothing_after_it() {
        let (sandbox, _device) = sandbox();
        // More than a window of stdout: the process waits on its pipe until
        // someone reads it, so a plain wait cannot end.
        let child = sandbox
            .spawn(&host_sh("head -c 1000000 /dev/zero; echo done >&2"))
            .await
            .unwrap();
        let waited = tokio::time::timeout(Duration::from_millis(300), child.wait()).await;
        assert!(waited.is_err(), "the wait should still be pending");
        // The wait above was dropped: collecting now drains the pipe.
        let started = Instant::now();
        let out = child.wait_with_output().await.unwrap();
        assert_eq!(out.stdout.len(), 1_000_000);
        assert_eq!(out.stderr, b"done\n");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn stop_ends_what_waits_on_the_sandbox() {
        let (sandbox, _device) = sandbox();
        let waiter = tokio::spawn({
            let sandbox = sandbox.clone();
            async move { sandbox.wait().await }
        });
        assert_eq!(sandbox.exit_reason(), None);
        assert_eq!(sandbox.stop().await, ExitReason::Stopped);
        assert_eq!(waiter.await.unwrap(), ExitReason::Stopped);
        let after = sandbox.output(&host_sh("true")).await;
        assert!(
            matches!(after, Err(ExecError::GuestStopped(_))),
            "{after:?}"
        );
    }
}
