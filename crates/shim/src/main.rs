//! `containerd-shim-chitin-v2`: containerd's runtime v2 shim for chitin.
//! containerd runs it as `io.containerd.chitin.v2` (a Kubernetes
//! RuntimeClass with `handler: chitin`); every pod gets its own chitin
//! VM, and the pod's containers run in it, each in its own root shared
//! from the host over virtio-fs. docs/kubernetes.md says how to install
//! it and what works.
//!
//! One shim process serves a whole pod: containerd starts it once per
//! container, and a container of a pod whose shim already runs is handed
//! that shim's socket (the grouping is the CRI sandbox id).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Config, DeleteResponse, ExitSignal, Flags, StartOpts};

mod config;
mod mounts;
mod netns;
mod process;
mod service;
mod spec;
mod stats;
mod vmm;

/// containerd's name for this runtime.
const RUNTIME_ID: &str = "io.containerd.chitin.v2";
/// Where each shim keeps its directory: `<namespace>/<grouping>`.
const STATE_ROOT: &str = "/run/chitin/shim";
/// The CRI's annotation naming a container's pod sandbox.
const SANDBOX_ID_ANNOTATION: &str = "io.kubernetes.cri.sandbox-id";

/// The shim: how containerd starts, waits for and cleans up after it.
struct ChitinShim {
    namespace: String,
    bundle: PathBuf,
    state_dir: PathBuf,
    /// The pod's shim socket.
    socket: String,
    exit: Arc<ExitSignal>,
}

/// The shim a container belongs to: its pod's (the CRI sandbox id in its
/// spec), or its own for a container outside a pod (`ctr run`).
fn grouping(bundle: &Path, id: &str) -> String {
    let from_spec = oci_spec::runtime::Spec::load(bundle.join("config.json"))
        .ok()
        .and_then(|s| s.annotations().clone())
        .and_then(|a| a.get(SANDBOX_ID_ANNOTATION).cloned())
        .filter(|g| !g.is_empty() && !g.contains('/') && g != "." && g != "..");
    from_spec.unwrap_or_else(|| id.to_string())
}

/// Whether a shim listens on `address` (`unix://PATH`).
fn socket_live(address: &str) -> bool {
    let path = address.strip_prefix("unix://").unwrap_or(address);
    !path.is_empty() && std::os::unix::net::UnixStream::connect(path).is_ok()
}

impl containerd_shim::Shim for ChitinShim {
    type T = service::Service;

    fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        let bundle = if args.bundle.is_empty() {
            std::env::current_dir().unwrap_or_default()
        } else {
            PathBuf::from(&args.bundle)
        };
        let group = grouping(&bundle, &args.id);
        Self {
            namespace: args.namespace.clone(),
            state_dir: Path::new(STATE_ROOT).join(&args.namespace).join(&group),
            socket: containerd_shim::socket_address(&args.address, &args.namespace, &group),
            bundle,
            exit: Arc::new(ExitSignal::default()),
        }
    }

    fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        let group = grouping(&self.bundle, &opts.id);
        let (_pid, address) = containerd_shim::spawn(opts, &group, Vec::new())?;
        containerd_shim::synchronous::util::write_address(&address)?;
        Ok(address)
    }

    /// containerd's clean-up after a shim that died (or a create that
    /// failed): the container's rootfs mount, and the shim's directory
    /// when no shim serves the pod any more.
    fn delete_shim(&mut self) -> containerd_shim::Result<DeleteResponse> {
        let rootfs = self.bundle.join("rootfs");
        if mounts::is_mount_point(&rootfs) {
            if let Err(e) = mounts::unmount(&rootfs) {
                log::warn!("unmounting {}: {e}", rootfs.display());
            }
        }
        // A shim still serving the pod (this container's create failed)
        // keeps its directory; otherwise its VMM is killed with its cgroup,
        // as the shim recorded it (if the shim died, a VMM that ignores
        // the end of its stdin could outlive it), and the shared directory
        // goes, binds and all (the guest may have left anything there;
        // nothing in it is looked at).
        if !socket_live(&self.socket) {
            if let Some((cgroup, parent)) = vmm::recorded_cgroup(&self.state_dir) {
                vmm::remove_cgroups(&cgroup, &parent);
            }
            service::remove_state_dir(&self.state_dir);
        }
        Ok(DeleteResponse {
            // As runc's shim reports a task it found dead: SIGKILL.
            exit_status: 128 + libc::SIGKILL as u32,
            exited_at: Some(containerd_shim::util::timestamp()?).into(),
            ..Default::default()
        })
    }

    fn wait(&mut self) {
        self.exit.wait();
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        service::Service::new(
            &self.namespace,
            self.state_dir.clone(),
            Some(service::Events::new(
                std::env::var("TTRPC_ADDRESS").unwrap_or_default(),
                publisher,
            )),
            Arc::clone(&self.exit),
        )
    }
}

/// Let the shim hold as many files as its hard limit allows: every file
/// the guest opens in a container's root is an open file of the shim's.
fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given, which outlives the
    // call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0
        && limit.rlim_cur < limit.rlim_max
    {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: setrlimit reads the struct, which outlives the call.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
    }
}

fn main() {
    raise_open_file_limit();
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if args.first().is_some_and(|a| a == vmm::SUBCOMMAND) {
        // The pod VM's own process, which the shim starts.
        vmm::main(&args);
    }
    containerd_shim::run::<ChitinShim>(
        RUNTIME_ID,
        Some(Config {
            // The shim's only child is its VMM process, which it waits
            // for itself: a reaper would race that wait.
            no_reaper: true,
            ..Default::default()
        }),
    );
}
