//! containerd's task service (API v2) over one chitin VM per pod: the
//! pod's first container boots the VM; every container is a process tree
//! in it, its root the container's rootfs shared in over virtio-fs.
//!
//! The pid containerd is told for a task is the shim's own (the process
//! that holds the VM, as Kata reports its VMM's): a host pid, so host
//! tools that signal it reach the VM, never an unrelated host process.
//! `Pids` lists the guest pids.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use chitin::Signal;
use containerd_shim::api;
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc::{self, Code};
use containerd_shim::protos::types::task::ProcessInfo;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{ExitSignal, TtrpcContext, TtrpcResult};
use oci_spec::runtime::Spec;

use crate::config::Config;
use crate::mounts;
use crate::netns;
use crate::process::{relock, Exit, Io, Process, ProcessError, Status};
use crate::spec;
use crate::stats;
use crate::vmm::{self, Vmm, GUEST_SHARED, SHARED};

/// The shared directory is a tmpfs of this size and at most this many
/// files: the guest can write there, and holds only the containers'
/// mount points of its own.
const SHARED_SIZE: u64 = 1 << 20;
const SHARED_INODES: u64 = 4096;

fn rpc(code: Code, message: impl Display) -> ttrpc::Error {
    ttrpc::error::get_rpc_status(code, message.to_string())
}

fn not_found(what: impl Display) -> ttrpc::Error {
    rpc(Code::NOT_FOUND, format!("{what} not found"))
}

fn timestamp(at: SystemTime) -> Timestamp {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: since.as_secs() as i64,
        nanos: since.subsec_nanos() as i32,
        ..Default::default()
    }
}

/// A container id safe as one path component.
fn check_id(id: &str) -> TtrpcResult<()> {
    let ok = !id.is_empty()
        && id.len() <= 256
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(rpc(Code::INVALID_ARGUMENT, format!("invalid id {id:?}")))
    }
}

/// The pod's VM.
struct Vm {
    /// Its process, in its jail.
    vmm: Arc<Vmm>,
    /// The pod's network it joined.
    network: Option<netns::PodNetwork>,
    /// Its guest memory.
    memory_bytes: u64,
    /// The host name of the container that booted it (CRI's pod
    /// sandbox): the pod's.
    hostname: Option<String>,
}

/// One container of the pod.
struct Container {
    bundle: PathBuf,
    /// The snapshotter's mounts, mounted by us at `bundle/rootfs`.
    mounted_rootfs: Option<PathBuf>,
    /// Its root bound into the shared directory.
    bound: mounts::Bound,
    /// The host paths of its mounts bound there too.
    volumes: Vec<mounts::Bound>,
    /// Its root in the guest.
    guest_root: String,
    hostname: Option<String>,
    /// Its mounts inside the root, for its execs too.
    mounts: Vec<chitin::Mount>,
    init: Arc<Process>,
    execs: BTreeMap<String, Arc<Process>>,
}

impl Container {
    /// Its execs with their ids, for use without the pod's lock.
    fn execs(&self) -> impl Iterator<Item = (String, Arc<Process>)> + '_ {
        self.execs.iter().map(|(k, p)| (k.clone(), Arc::clone(p)))
    }

    /// Its processes that run now.
    fn running(&self) -> impl Iterator<Item = &Arc<Process>> {
        std::iter::once(&self.init)
            .chain(self.execs.values())
            .filter(|p| p.status() == Status::Running)
    }

    fn process(&self, exec_id: &str) -> TtrpcResult<&Arc<Process>> {
        if exec_id.is_empty() {
            Ok(&self.init)
        } else {
            self.execs
                .get(exec_id)
                .ok_or_else(|| not_found(format_args!("exec {exec_id}")))
        }
    }
}

impl Pod {
    fn container(&self, id: &str) -> TtrpcResult<&Container> {
        self.containers
            .get(id)
            .ok_or_else(|| not_found(format_args!("container {id}")))
    }

    fn vm(&self) -> TtrpcResult<&Vm> {
        self.vm
            .as_ref()
            .ok_or_else(|| rpc(Code::FAILED_PRECONDITION, "the pod VM is not running"))
    }

    fn container_mut(&mut self, id: &str) -> TtrpcResult<&mut Container> {
        self.containers
            .get_mut(id)
            .ok_or_else(|| not_found(format_args!("container {id}")))
    }
}

#[derive(Default)]
struct Pod {
    /// Shutdown has begun: nothing new is created.
    shutting_down: bool,
    vm: Option<Vm>,
    containers: BTreeMap<String, Container>,
}

/// Shared by the task service's threads and the processes' exit threads.
struct Shared {
    namespace: String,
    /// This shim's directory: the shared directory and the VM's console.
    state_dir: PathBuf,
    events: Option<Events>,
    pod: Mutex<Pod>,
}

/// Where events go: containerd's ttrpc address, and a connection to it
/// made again when one fails (containerd restarted).
pub struct Events {
    address: String,
    publisher: Mutex<Option<RemotePublisher>>,
}

impl Events {
    /// Events to `address`, starting with the connection `publisher`.
    pub fn new(address: String, publisher: RemotePublisher) -> Self {
        Self {
            address,
            publisher: Mutex::new(Some(publisher)),
        }
    }
}

/// How long containerd may take to take one event.
const PUBLISH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

impl Shared {
    /// Publish `event`; if the connection fails, connect again once and
    /// retry. An event that still cannot go is logged and dropped.
    fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        let Some(events) = &self.events else {
            return;
        };
        let mut publisher = relock(&events.publisher);
        let mut last = String::new();
        for _ in 0..2 {
            if publisher.is_none() {
                match RemotePublisher::new(&events.address) {
                    Ok(p) => *publisher = Some(p),
                    Err(e) => {
                        last = format!("connecting to {}: {e}", events.address);
                        continue;
                    }
                }
            }
            let Some(p) = publisher.as_ref() else {
                continue;
            };
            let ctx = ttrpc::context::with_duration(PUBLISH_TIMEOUT);
            match p.publish(ctx, topic, &self.namespace, event.clone_box()) {
                Ok(()) => return,
                Err(e) => {
                    last = e.to_string();
                    *publisher = None;
                }
            }
        }
        log::warn!("publishing {topic}: {last}");
    }

    fn shared_dir(&self) -> PathBuf {
        self.state_dir.join(SHARED)
    }

    /// A process of container `id` ended: tell containerd; an init's end
    /// also ends the container's other processes (as its PID namespace
    /// would).
    fn exited(&self, id: &str, exec_id: &str, exit: Exit) {
        if exec_id.is_empty() {
            let execs: Vec<_> = relock(&self.pod)
                .containers
                .get(id)
                .map(|c| c.execs().collect())
                .unwrap_or_default();
            self.kill_all(id, execs);
        }
        self.publish_exit(id, exec_id, exit);
    }

    /// SIGKILL `processes` of container `id` (`(exec id, process)`);
    /// those that never started stop here, and their exits are reported.
    fn kill_all(&self, id: &str, processes: Vec<(String, Arc<Process>)>) {
        for (exec_id, p) in processes {
            if let Ok(Some(exit)) = p.signal(Signal::KILL) {
                self.publish_exit(id, &exec_id, exit);
            }
        }
    }

    fn publish_exit(&self, id: &str, exec_id: &str, exit: Exit) {
        self.publish(
            topics::TASK_EXIT_EVENT_TOPIC,
            Box::new(TaskExit {
                container_id: id.to_string(),
                id: if exec_id.is_empty() { id } else { exec_id }.to_string(),
                pid: std::process::id(),
                exit_status: exit.status,
                exited_at: Some(timestamp(exit.at)).into(),
                ..Default::default()
            }),
        );
    }

    /// Undo a container's host mounts and directories.
    fn release(&self, c: Container) {
        for v in c.volumes {
            v.release();
        }
        c.bound.release();
        if let Some(rootfs) = &c.mounted_rootfs {
            if let Err(e) = mounts::unmount(rootfs) {
                log::warn!("unmounting {}: {e}", rootfs.display());
            }
        }
    }

    /// Stop the VM when no container is left.
    fn stop_vm_if_idle(&self, pod: &mut Pod) {
        if !pod.containers.is_empty() {
            return;
        }
        if let Some(vm) = pod.vm.take() {
            let reason = vm.vmm.stop();
            log::info!("pod VM stopped: {reason:?}");
            // The tap went with the VM; the veth's redirect goes now.
            if let Some(network) = vm.network {
                network.leave();
            }
            // The shared directory's tmpfs, and whatever the guest left.
            let shared = self.shared_dir();
            if let Err(e) = mounts::unmount(&shared) {
                log::warn!("unmounting {}: {e}", shared.display());
            }
        }
    }
}

/// Boot the pod's VM in its own jailed process ([`Vmm`]), its shared
/// directory in `state_dir`, from the node's settings; joined to the
/// pod's network namespace `netns` if the pod has one; its cgroup made
/// in `cgroup_parent`.
fn boot(state_dir: &Path, netns: Option<&Path>, cgroup_parent: String) -> Result<Vm, String> {
    let config = Config::load().map_err(|e| e.to_string())?;
    let shared = state_dir.join(SHARED);
    fs::create_dir_all(&shared).map_err(|e| format!("{}: {e}", shared.display()))?;
    // A fresh tmpfs: one left by a shim that died may hold what its
    // guest wrote, and binds of old roots.
    mounts::unmount(&shared).map_err(|e| format!("{}: {e}", shared.display()))?;
    mounts::mount_tmpfs(&shared, SHARED_SIZE, SHARED_INODES)
        .map_err(|e| format!("a tmpfs on {}: {e}", shared.display()))?;
    let mut network = None;
    let mut tap = None;
    if let Some(path) = netns {
        let (n, t) = netns::join(path).map_err(|e| {
            let _ = mounts::unmount(&shared);
            format!("joining the pod's network {}: {e}", path.display())
        })?;
        log::info!("pod network: {}", netns::describe(&n.interface));
        tap = Some(t);
        network = Some(n);
    }
    let args = vmm::Args {
        state_dir: state_dir.to_path_buf(),
        cgroup_parent,
        net: network.as_ref().map(|n| vmm::Interface {
            mac: n.interface.mac,
            address: n.interface.address,
            prefix: n.interface.prefix,
            gateway: n.interface.gateway,
        }),
    };
    let vmm = Vmm::start(&args, tap).inspect_err(|_| {
        let _ = mounts::unmount(&shared);
        if let Some(n) = network.take() {
            n.leave();
        }
    })?;
    log::info!(
        "pod VM up: {} MiB, {} vCPUs, {}, cgroup {}",
        config.memory_mib,
        config.vcpus,
        config.guest.kernel().display(),
        vmm.cgroup().display()
    );
    Ok(Vm {
        vmm,
        network,
        memory_bytes: config.memory_mib << 20,
        hostname: None,
    })
}

/// The task service containerd talks to.
#[derive(Clone)]
pub struct Service {
    shared: Arc<Shared>,
    exit: Arc<ExitSignal>,
}

impl Service {
    /// A service for one pod: events go to `events` under `namespace`;
    /// `state_dir` is the shim's own directory; `exit` ends the shim.
    pub fn new(
        namespace: &str,
        state_dir: PathBuf,
        events: Option<Events>,
        exit: Arc<ExitSignal>,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                namespace: namespace.to_string(),
                state_dir,
                events,
                pod: Mutex::new(Pod::default()),
            }),
            exit,
        }
    }

    fn process(&self, id: &str, exec_id: &str) -> TtrpcResult<Arc<Process>> {
        relock(&self.shared.pod)
            .container(id)?
            .process(exec_id)
            .cloned()
    }

    /// Put the container's root in place: the snapshotter's mounts (if
    /// any) at `bundle/rootfs`, then bound into the shared directory.
    /// Returns what was mounted at `bundle/rootfs`, and the bind.
    fn mount_root(
        &self,
        req: &api::CreateTaskRequest,
        spec: &Spec,
        planned: &[spec::Planned],
    ) -> Result<(Option<PathBuf>, mounts::Bound), String> {
        let bundle = Path::new(&req.bundle);
        let root = spec.root().as_ref().ok_or("the spec has no root")?;
        let mut mounted = None;
        let source = if req.rootfs.is_empty() {
            spec::root_path(bundle, root.path())
        } else {
            let target = bundle.join("rootfs");
            fs::create_dir_all(&target).map_err(|e| format!("{}: {e}", target.display()))?;
            for m in &req.rootfs {
                if let Err(e) = mounts::mount_snapshot(&m.type_, &m.source, &m.options, &target) {
                    let _ = mounts::unmount(&target);
                    return Err(format!("mounting the rootfs ({}): {e}", m.type_));
                }
            }
            mounted = Some(target.clone());
            target
        };
        let read_only = root.readonly().unwrap_or(false);
        // Made in a read-only root too, before it is made read-only, as
        // runc does (CRI's sandbox root is read-only; pause images have
        // no mount points), with those of the spec's mounts.
        for p in planned {
            let dest = Path::new(p.mount().destination());
            if let Err(e) = mounts::make_mount_point(&source, dest, p.is_dir()) {
                log::warn!("{}: mount point {}: {e}", req.id, dest.display());
            }
        }
        let bound = mounts::ensure_mount_points(&source).and_then(|()| {
            mounts::bind_beneath(
                &self.shared.shared_dir(),
                &req.id,
                "rootfs",
                &source,
                read_only,
                true,
            )
        });
        match bound {
            Ok(bound) => Ok((mounted, bound)),
            Err(e) => {
                if let Some(t) = &mounted {
                    let _ = mounts::unmount(t);
                }
                Err(format!(
                    "sharing the root {} with the pod VM: {e}",
                    source.display()
                ))
            }
        }
    }
}

impl Service {
    /// Bind the host paths of a container's mounts into the shared
    /// directory beside its root; on failure, none stays bound.
    fn bind_volumes(
        &self,
        id: &str,
        planned: &[spec::Planned],
    ) -> Result<Vec<mounts::Bound>, String> {
        let mut bound = Vec::new();
        for p in planned {
            let spec::Planned::Host {
                source,
                name,
                read_only,
                recursive,
                ..
            } = p
            else {
                continue;
            };
            let shared = self.shared.shared_dir();
            match mounts::bind_beneath(&shared, id, name, source, *read_only, *recursive) {
                Ok(b) => bound.push(b),
                Err(e) => {
                    for b in bound {
                        b.release();
                    }
                    return Err(format!(
                        "sharing the mount source {} with the pod VM: {e}",
                        source.display()
                    ));
                }
            }
        }
        Ok(bound)
    }
}

impl containerd_shim::Task for Service {
    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        check_id(&req.id)?;
        if !req.checkpoint.is_empty() {
            return Err(rpc(
                Code::UNIMPLEMENTED,
                "creating a task from a checkpoint is not supported",
            ));
        }
        let bundle = PathBuf::from(&req.bundle);
        let spec = Spec::load(bundle.join("config.json")).map_err(|e| {
            rpc(
                Code::INVALID_ARGUMENT,
                format!("the bundle's config.json: {e}"),
            )
        })?;
        let process = spec
            .process()
            .as_ref()
            .ok_or_else(|| rpc(Code::INVALID_ARGUMENT, spec::SpecError::NoProcess))?;
        let guest_dir = format!("{GUEST_SHARED}/{}", req.id);
        let guest_root = format!("{guest_dir}/rootfs");
        let (planned, not_mounted) = spec::plan_mounts(&spec, &guest_dir);
        let mounts: Vec<chitin::Mount> = planned.iter().map(|p| p.mount().clone()).collect();

        let mut pod = relock(&self.shared.pod);
        let pod_hostname = pod.vm.as_ref().and_then(|vm| vm.hostname.as_deref());
        let hostname = spec::hostname(&spec, pod_hostname);
        // Refuse what cannot run before anything is mounted or booted.
        let mut command = spec::command(process, &guest_root, hostname.as_deref(), req.terminal)
            .map_err(|e| rpc(Code::INVALID_ARGUMENT, e))?;
        for m in &mounts {
            command.mount(m.clone());
        }
        let mut ignored = spec::ignored(process);
        ignored.extend(not_mounted);
        if !ignored.is_empty() {
            log::warn!("{}: not applied in the VM: {}", req.id, ignored.join(", "));
        }
        if pod.shutting_down {
            return Err(rpc(Code::FAILED_PRECONDITION, "the shim is shutting down"));
        }
        if pod.containers.contains_key(&req.id) {
            return Err(rpc(
                Code::ALREADY_EXISTS,
                format!("container {} exists", req.id),
            ));
        }
        if pod.vm.is_none() {
            let netns = netns::netns_path(&spec);
            let cgroups_path = spec.linux().as_ref().and_then(|l| l.cgroups_path().clone());
            let pod_id = self
                .shared
                .state_dir
                .file_name()
                .map_or(req.id.clone(), |n| n.to_string_lossy().into_owned());
            let parent = vmm::cgroup_parent(
                cgroups_path.as_deref().and_then(Path::to_str),
                &self.shared.namespace,
                &pod_id,
            )
            .map_err(|e| rpc(Code::INVALID_ARGUMENT, e))?;
            let mut vm = boot(&self.shared.state_dir, netns.as_deref(), parent)
                .map_err(|e| rpc(Code::UNAVAILABLE, e))?;
            // The pod's: its later containers join its UTS namespace.
            vm.hostname = hostname.clone();
            pod.vm = Some(vm);
        }
        let (mounted, bound) = match self.mount_root(&req, &spec, &planned) {
            Ok(m) => m,
            Err(e) => {
                self.shared.stop_vm_if_idle(&mut pod);
                return Err(rpc(Code::FAILED_PRECONDITION, e));
            }
        };
        let volumes = match self.bind_volumes(&req.id, &planned) {
            Ok(v) => v,
            Err(e) => {
                bound.release();
                if let Some(t) = &mounted {
                    let _ = mounts::unmount(t);
                }
                self.shared.stop_vm_if_idle(&mut pod);
                return Err(rpc(Code::FAILED_PRECONDITION, e));
            }
        };
        let io = Io {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            // As the command has it: the task's or the spec's.
            terminal: req.terminal || process.terminal() == Some(true),
        };
        pod.containers.insert(
            req.id.clone(),
            Container {
                bundle: bundle.clone(),
                mounted_rootfs: mounted,
                bound,
                volumes,
                guest_root,
                hostname,
                mounts,
                init: Process::new(command, io),
                execs: BTreeMap::new(),
            },
        );
        drop(pod);
        let pid = std::process::id();
        self.shared.publish(
            topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(TaskCreate {
                container_id: req.id.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: Some(TaskIO {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                    ..Default::default()
                })
                .into(),
                pid,
                ..Default::default()
            }),
        );
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let (process, vmm) = {
            let pod = relock(&self.shared.pod);
            let c = pod.container(&req.id)?;
            let vm = pod.vm()?;
            (c.process(&req.exec_id)?.clone(), Arc::clone(&vm.vmm))
        };
        let shared = Arc::clone(&self.shared);
        let (id, exec_id) = (req.id.clone(), req.exec_id.clone());
        let pid = std::process::id();
        // The start event goes out before anything can report the end.
        let started = |guest_pid: u32| {
            log::info!("{} {}: guest pid {guest_pid}", req.id, req.exec_id);
            if req.exec_id.is_empty() {
                self.shared.publish(
                    topics::TASK_START_EVENT_TOPIC,
                    Box::new(TaskStart {
                        container_id: req.id.clone(),
                        pid,
                        ..Default::default()
                    }),
                );
            } else {
                self.shared.publish(
                    topics::TASK_EXEC_STARTED_EVENT_TOPIC,
                    Box::new(TaskExecStarted {
                        container_id: req.id.clone(),
                        exec_id: req.exec_id.clone(),
                        pid,
                        ..Default::default()
                    }),
                );
            }
        };
        process
            .start(vmm.remote(), started, move |exit| {
                shared.exited(&id, &exec_id, exit)
            })
            .map_err(|e| match e {
                ProcessError::AlreadyStarted | ProcessError::Exited => {
                    rpc(Code::FAILED_PRECONDITION, e)
                }
                other => rpc(Code::UNKNOWN, chitin::error_chain(&other)),
            })?;
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let pod = relock(&self.shared.pod);
        let c = pod.container(&req.id)?;
        let process = c.process(&req.exec_id)?.clone();
        if process.status() == Status::Running {
            return Err(rpc(
                Code::FAILED_PRECONDITION,
                format!("{} {} is still running", req.id, req.exec_id),
            ));
        }
        // What never started stops now (its waiters wake and its exit is
        // reported); an init's execs go with it.
        let mut doomed = vec![(req.exec_id.clone(), Arc::clone(&process))];
        if req.exec_id.is_empty() {
            doomed.extend(c.execs());
        }
        drop(pod);
        self.shared.kill_all(&req.id, doomed);
        let mut pod = relock(&self.shared.pod);
        if !req.exec_id.is_empty() {
            if let Some(c) = pod.containers.get_mut(&req.id) {
                c.execs.remove(&req.exec_id);
            }
        } else {
            if let Some(c) = pod.containers.remove(&req.id) {
                self.shared.release(c);
            }
            self.shared.stop_vm_if_idle(&mut pod);
        }
        drop(pod);
        let exit = process.exit().unwrap_or(Exit {
            status: 128 + libc::SIGKILL as u32,
            at: SystemTime::now(),
        });
        let pid = std::process::id();
        if req.exec_id.is_empty() {
            self.shared.publish(
                topics::TASK_DELETE_EVENT_TOPIC,
                Box::new(TaskDelete {
                    container_id: req.id.clone(),
                    pid,
                    exit_status: exit.status,
                    exited_at: Some(timestamp(exit.at)).into(),
                    ..Default::default()
                }),
            );
        }
        Ok(api::DeleteResponse {
            pid,
            exit_status: exit.status,
            exited_at: Some(timestamp(exit.at)).into(),
            ..Default::default()
        })
    }

    fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let pod = relock(&self.shared.pod);
        let c = pod.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        let status = match p.status() {
            Status::Created => api::Status::CREATED,
            Status::Running => api::Status::RUNNING,
            Status::Stopped => api::Status::STOPPED,
        };
        let exit = p.exit();
        Ok(api::StateResponse {
            id: req.id.clone(),
            bundle: c.bundle.display().to_string(),
            pid: std::process::id(),
            status: status.into(),
            stdin: p.io.stdin.clone(),
            stdout: p.io.stdout.clone(),
            stderr: p.io.stderr.clone(),
            terminal: p.io.terminal,
            exit_status: exit.map_or(0, |e| e.status),
            exited_at: exit.map(|e| timestamp(e.at)).into(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
    }

    fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let signal = i32::try_from(req.signal)
            .ok()
            .and_then(Signal::new)
            .ok_or_else(|| rpc(Code::INVALID_ARGUMENT, format!("signal {}", req.signal)))?;
        let targets: Vec<(String, Arc<Process>)> = {
            let pod = relock(&self.shared.pod);
            let c = pod.container(&req.id)?;
            let mut t = vec![(req.exec_id.clone(), c.process(&req.exec_id)?.clone())];
            if req.all && req.exec_id.is_empty() {
                t.extend(c.execs());
            }
            t
        };
        for (i, (exec_id, p)) in targets.iter().enumerate() {
            match p.signal(signal) {
                Ok(Some(exit)) => self.shared.exited(&req.id, exec_id, exit),
                Ok(None) => {}
                // The one named has ended: containerd expects NotFound.
                Err(ProcessError::Exited) if i == 0 => {
                    return Err(not_found(format_args!(
                        "running process {} {}",
                        req.id, req.exec_id
                    )))
                }
                Err(ProcessError::Exited) => {}
                Err(e) => return Err(rpc(Code::UNKNOWN, chitin::error_chain(&e))),
            }
        }
        Ok(api::Empty::new())
    }

    fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        let process = {
            let pod = relock(&self.shared.pod);
            pod.container(&req.id)?.process(&req.exec_id)?.clone()
        };
        let (rows, cols) = (spec::clamp_u16(req.height), spec::clamp_u16(req.width));
        process
            .resize(rows, cols)
            .map_err(|e| rpc(Code::UNKNOWN, chitin::error_chain(&e)))?;
        Ok(api::Empty::new())
    }

    fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<api::Empty> {
        if req.exec_id.is_empty() {
            return Err(rpc(Code::INVALID_ARGUMENT, "an exec needs an exec id"));
        }
        let json = req
            .spec
            .as_ref()
            .map(|a| a.value.as_slice())
            .unwrap_or_default();
        let process = spec::parse_process(json).map_err(|e| rpc(Code::INVALID_ARGUMENT, e))?;
        let mut pod = relock(&self.shared.pod);
        let c = pod.container_mut(&req.id)?;
        if c.execs.contains_key(&req.exec_id) {
            return Err(rpc(
                Code::ALREADY_EXISTS,
                format!("exec {} exists", req.exec_id),
            ));
        }
        if c.init.status() != Status::Running {
            return Err(rpc(
                Code::FAILED_PRECONDITION,
                format!("container {} is not running", req.id),
            ));
        }
        let mut command =
            spec::command(&process, &c.guest_root, c.hostname.as_deref(), req.terminal)
                .map_err(|e| rpc(Code::INVALID_ARGUMENT, e))?;
        for m in &c.mounts {
            command.mount(m.clone());
        }
        let io = Io {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal || process.terminal() == Some(true),
        };
        c.execs
            .insert(req.exec_id.clone(), Process::new(command, io));
        drop(pod);
        self.shared.publish(
            topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            Box::new(TaskExecAdded {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            }),
        );
        Ok(api::Empty::new())
    }

    fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        let pod = relock(&self.shared.pod);
        let c = pod.container(&req.id)?;
        let processes = c
            .running()
            .map(|p| ProcessInfo {
                pid: p.pid(),
                ..Default::default()
            })
            .collect();
        Ok(api::PidsResponse {
            processes,
            ..Default::default()
        })
    }

    /// The pod VM's usage as cgroup v2 metrics (`ctr task metrics`): the
    /// memory and CPU time of its VMM's cgroup, the guest's network
    /// traffic, and the container's running processes. Every container
    /// of the pod reports the same VM.
    fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let (vmm, memory_bytes, running) = {
            let pod = relock(&self.shared.pod);
            let c = pod.container(&req.id)?;
            let vm = pod.vm()?;
            (
                Arc::clone(&vm.vmm),
                vm.memory_bytes,
                c.running().count() as u64,
            )
        };
        let usage = stats::cgroup_usage(vmm.cgroup()).map_err(|e| rpc(Code::UNKNOWN, e))?;
        let metrics = stats::metrics(&usage, memory_bytes, running, &vmm.net_stats());
        let any = containerd_shim::util::convert_to_any(Box::new(metrics))
            .map_err(|e| rpc(Code::UNKNOWN, e))?;
        Ok(api::StatsResponse {
            stats: Some(any).into(),
            ..Default::default()
        })
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        let p = self.process(&req.id, &req.exec_id)?;
        if req.stdin {
            p.release_stdin();
        }
        Ok(api::Empty::new())
    }

    fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        let p = self.process(&req.id, &req.exec_id)?;
        let exit = p.wait();
        Ok(api::WaitResponse {
            exit_status: exit.status,
            exited_at: Some(timestamp(exit.at)).into(),
            ..Default::default()
        })
    }

    fn connect(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: std::process::id(),
            version: format!("chitin {}", env!("CARGO_PKG_VERSION")),
            ..Default::default()
        })
    }

    fn shutdown(&self, _ctx: &TtrpcContext, req: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        let mut pod = relock(&self.shared.pod);
        if !pod.containers.is_empty() && !req.now {
            // Other containers of the pod still use this shim.
            return Ok(api::Empty::new());
        }
        pod.shutting_down = true;
        let containers = std::mem::take(&mut pod.containers);
        for c in containers.into_values() {
            self.shared.release(c);
        }
        self.shared.stop_vm_if_idle(&mut pod);
        drop(pod);
        remove_state_dir(&self.shared.state_dir);
        self.exit.signal();
        Ok(api::Empty::new())
    }
}

/// Remove the shim's state directory: the shared directory's tmpfs is
/// unmounted (with every bind left in it) without looking inside, since
/// the guest could write there.
pub fn remove_state_dir(dir: &Path) {
    let shared = dir.join(SHARED);
    if let Err(e) = mounts::unmount(&shared) {
        log::warn!("unmounting {}: {e}", shared.display());
    }
    let _ = fs::remove_dir(&shared);
    // The VMM's run directory: its console log and sockets.
    vmm::remove_run_dir(dir);
    let _ = fs::remove_dir(dir);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_single_safe_path_components() {
        for ok in ["c1", "a.b-c_d", &"x".repeat(256)] {
            check_id(ok).unwrap();
        }
        for bad in ["", ".", "..", "a/b", "a b", "é", &"x".repeat(257)] {
            assert!(check_id(bad).is_err(), "{bad:?}");
        }
    }

    /// containerd's events service, counting the topics it is sent.
    #[derive(Default)]
    struct Containerd(Mutex<Vec<String>>);

    impl containerd_shim::protos::shim_sync::Events for Containerd {
        fn forward(
            &self,
            _ctx: &TtrpcContext,
            req: containerd_shim::protos::api::ForwardRequest,
        ) -> TtrpcResult<api::Empty> {
            relock(&self.0).push(req.envelope.topic.clone());
            Ok(api::Empty::new())
        }
    }

    fn serve(path: &Path) -> (ttrpc::Server, Arc<Containerd>) {
        let _ = fs::remove_file(path);
        let containerd = Arc::new(Containerd::default());
        let service = containerd_shim::protos::shim_sync::create_events(containerd.clone());
        let mut server = ttrpc::Server::new()
            .bind(&format!("unix://{}", path.display()))
            .unwrap()
            .register_service(service);
        server.start().unwrap();
        (server, containerd)
    }

    #[test]
    fn events_reach_a_containerd_that_restarted() {
        let dir = std::env::temp_dir().join(format!("chitin-shim-events-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("containerd.sock.ttrpc");
        let address = socket.display().to_string();
        let (first, seen) = serve(&socket);
        let events = Events::new(address.clone(), RemotePublisher::new(&address).unwrap());
        let service = Service::new("ns", dir.join("state"), Some(events), Arc::default());
        let start = || Box::new(TaskStart::default()) as Box<dyn MessageDyn>;
        service
            .shared
            .publish(topics::TASK_START_EVENT_TOPIC, start());
        assert_eq!(*relock(&seen.0), [topics::TASK_START_EVENT_TOPIC]);

        // containerd restarts: the old connection is dead, a new server
        // listens at the same address.
        first.shutdown();
        let (second, seen_again) = serve(&socket);
        service
            .shared
            .publish(topics::TASK_EXIT_EVENT_TOPIC, start());
        assert_eq!(*relock(&seen_again.0), [topics::TASK_EXIT_EVENT_TOPIC]);
        second.shutdown();

        // Nobody listens: the event is dropped, nothing hangs or panics.
        let _ = fs::remove_file(&socket);
        service
            .shared
            .publish(topics::TASK_DELETE_EVENT_TOPIC, start());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn timestamps_split_seconds_and_nanos() {
        let t = timestamp(UNIX_EPOCH + std::time::Duration::from_nanos(5_000_000_123));
        assert_eq!((t.seconds, t.nanos), (5, 123));
    }
}
