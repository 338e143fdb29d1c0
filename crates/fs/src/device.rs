//! [`Fs`]: a virtio-fs device (virtio 1.2 §5.11) serving one host
//! directory, and the worker thread that serves its queues.
//!
//! Queues: 0 is the high-priority queue (FORGET and INTERRUPT), 1 the one
//! request queue. Both are served on the share's own thread,
//! `chitin-fs`, so a slow host file system stalls this share only, never
//! the event loop the other devices run on, and the per-thread credential
//! switches of the passthrough layer happen on a thread chitin owns.
//!
//! The thread is started with the device (by the embedder's thread, at
//! `build()`), confines itself to the `fs` seccomp filter and then waits
//! for activations: each one opens a fresh passthrough file system on that
//! thread and serves it until the driver resets the device, which drops
//! every inode and handle the guest held and closes their fds. Activation
//! and reset, which the guest triggers from a vCPU thread, only hand work
//! to the worker and wait for its answer: no vCPU thread opens a host path
//! or starts a thread.

use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use chitin_seccomp::{Seccomp, ThreadClass};

use chitin_memory::GuestMemoryMmap;
use chitin_virtio::active::Active;
use chitin_virtio::{
    read_config_bytes, ActivateContext, ActivateError, GuestFaults, VirtioDevice, VirtioInterrupt,
};
use event_manager::{EventOps, Events, MutEventSubscriber};
use fuse_backend_rs::passthrough::{CachePolicy, Config, PassthroughFs};
use virtio_queue::Queue;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::confine::{Confined, Policy};
use crate::handler::FsHandler;
use crate::idmap::{IdMap, IdMapError};
use crate::{QUEUE_SIZE, TAG_LEN, VIRTIO_ID_FS};

/// Host fds a share may hold unless configured otherwise. The guest's
/// kernel holds a lookup on every inode in its cache (a `find` over a
/// container image holds one per file) until memory pressure makes it
/// forget them, so the cap must fit real trees.
pub const DEFAULT_MAX_OPEN_FILES: usize = 65536;

/// How long the guest may cache names and attributes before asking again;
/// host-side changes to the share show in the guest after at most this.
pub const CACHE_TIMEOUT: Duration = Duration::from_secs(1);

/// `wanted` host fds for a share, at most half the process's soft fd
/// limit, so a guest within its cap cannot exhaust the VMM's fds. The
/// soft limit is first raised to the hard one (as virtiofsd does; the
/// usual soft limit of 1024 would not hold one container image).
fn fd_budget(wanted: usize, tag: &str) -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit to the valid pointer.
    let mut ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0;
    if ok && limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads one rlimit from the valid pointer.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
        // SAFETY: as above.
        ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0;
    }
    let half = if ok {
        usize::try_from(limit.rlim_cur / 2).unwrap_or(usize::MAX)
    } else {
        wanted
    };
    if wanted > half {
        log::warn!(
            "share {tag}: at most {half} open files (half the soft RLIMIT_NOFILE), not {wanted}"
        );
    }
    wanted.min(half).max(1)
}

/// Queues: high priority, then one request queue.
const NUM_QUEUES: usize = 2;

/// Request queues the device offers (config `num_request_queues`).
const NUM_REQUEST_QUEUES: u32 = 1;

/// What an embedder configures for one share.
#[derive(Clone, Debug)]
pub struct FsConfig {
    /// The host directory served.
    pub root: PathBuf,
    /// The tag the guest mounts it by (`mount -t virtiofs <tag> <dir>`),
    /// 1 to 36 bytes, no NUL.
    pub tag: String,
    /// Refuse every change with `EROFS`.
    pub read_only: bool,
    /// Guest ↔ host user and group ids.
    pub ids: IdMap,
    /// Most host fds the share may hold (inodes the guest looked up plus
    /// open files and directories).
    pub max_open_files: usize,
    /// Serve extended attributes (off by default: `ENOSYS`).
    pub xattr: bool,
    /// The seccomp mode of the share's thread.
    pub seccomp: Seccomp,
}

impl FsConfig {
    /// A writable share of `root` under `tag` with default limits.
    pub fn new(root: impl Into<PathBuf>, tag: impl Into<String>) -> Self {
        Self {
            root: root.into(),
            tag: tag.into(),
            read_only: false,
            ids: IdMap::default(),
            max_open_files: DEFAULT_MAX_OPEN_FILES,
            xattr: false,
            seccomp: Seccomp::default(),
        }
    }
}

/// Why a share cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The tag is empty, longer than 36 bytes or holds a NUL.
    #[error("share tag {tag:?} must be 1 to {TAG_LEN} bytes without NUL")]
    Tag {
        /// The tag given.
        tag: String,
    },
    /// The shared directory cannot be resolved.
    #[error("cannot resolve shared directory {path}")]
    Root {
        /// The path given.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The shared path is not a directory.
    #[error("shared path {0} is not a directory")]
    NotADirectory(PathBuf),
    /// The shared path is not valid UTF-8 (the passthrough layer takes
    /// its root as a string).
    #[error("shared path {0} is not valid UTF-8")]
    NotUtf8(PathBuf),
    /// An id range is unusable.
    #[error("id mapping of the share")]
    IdMap(#[from] IdMapError),
    /// `max_open_files` is 0.
    #[error("a share needs room for at least one open file")]
    NoOpenFiles,
    /// An eventfd could not be created.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// The share's thread could not be started or confined.
    #[error("cannot start the share's thread")]
    Thread(#[source] std::io::Error),
}

/// A virtio-fs device serving one host directory.
pub struct Fs {
    config_space: [u8; TAG_LEN + 4],
    served: Served,
    queue_events: Vec<EventFd>,
    worker: Worker,
}

/// A share, checked: what it serves and under which policy, enough to
/// open its file system on any thread.
#[derive(Clone)]
pub(crate) struct Served {
    root: PathBuf,
    pub(crate) policy: Policy,
    faults: GuestFaults,
}

impl Served {
    /// Check `config` and resolve the shared directory.
    pub(crate) fn new(config: &FsConfig) -> Result<Self, FsError> {
        let tag = config.tag.as_bytes();
        if tag.is_empty() || tag.len() > TAG_LEN || tag.contains(&0) {
            return Err(FsError::Tag {
                tag: config.tag.clone(),
            });
        }
        config.ids.validate()?;
        if config.max_open_files == 0 {
            return Err(FsError::NoOpenFiles);
        }
        let root = std::fs::canonicalize(&config.root).map_err(|source| FsError::Root {
            path: config.root.clone(),
            source,
        })?;
        let meta = std::fs::metadata(&root).map_err(|source| FsError::Root {
            path: config.root.clone(),
            source,
        })?;
        use std::os::unix::fs::MetadataExt;
        let root_id = (meta.dev(), meta.ino());
        if !meta.is_dir() {
            return Err(FsError::NotADirectory(config.root.clone()));
        }
        if root.to_str().is_none() {
            return Err(FsError::NotUtf8(config.root.clone()));
        }
        Ok(Self {
            root,
            policy: Policy {
                read_only: config.read_only,
                ids: config.ids,
                max_open_files: fd_budget(config.max_open_files, &config.tag),
                root_id: Some(root_id),
                xattr: config.xattr,
            },
            faults: GuestFaults::new(format!("fs {}", config.tag)),
        })
    }

    /// The faults the share counts.
    #[cfg(any(test, feature = "test-utils"))]
    pub(crate) fn faults(&self) -> &GuestFaults {
        &self.faults
    }

    /// A fresh passthrough file system over the root, behind the policy.
    pub(crate) fn file_system(&self) -> std::io::Result<Confined> {
        let config = Config {
            root_dir: self.root.to_string_lossy().into_owned(),
            xattr: self.policy.xattr,
            do_import: true,
            cache_policy: CachePolicy::Auto,
            entry_timeout: CACHE_TIMEOUT,
            attr_timeout: CACHE_TIMEOUT,
            writeback: false,
            inode_file_handles: false,
            // Inode numbers from the host's, so a forgotten inode leaves
            // nothing behind in the layer's tables (with its own numbers
            // it remembers every inode ever looked up).
            use_host_ino: true,
            ..Config::default()
        };
        let inner = PassthroughFs::<()>::new(config)?;
        Ok(Confined::new(
            inner,
            self.policy.clone(),
            self.faults.clone(),
        ))
    }
}

impl Fs {
    /// Check `config`, resolve the shared directory and start the share's
    /// thread; nothing is served until the driver activates the device.
    pub fn new(config: FsConfig) -> Result<Fs, FsError> {
        let served = Served::new(&config)?;
        let tag = config.tag.as_bytes();
        let mut config_space = [0u8; TAG_LEN + 4];
        config_space[..tag.len()].copy_from_slice(tag);
        config_space[TAG_LEN..].copy_from_slice(&NUM_REQUEST_QUEUES.to_le_bytes());
        let queue_events = (0..NUM_QUEUES)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(FsError::EventFd)?;
        let worker = Worker::spawn(served.clone(), &queue_events, config.seccomp)
            .map_err(FsError::Thread)?;
        Ok(Fs {
            config_space,
            served,
            queue_events,
            worker,
        })
    }

    /// The shared directory, resolved.
    pub fn root(&self) -> &Path {
        &self.served.root
    }

    /// What the driver got wrong or the share refused, counted.
    pub fn faults(&self) -> &GuestFaults {
        &self.served.faults
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; NUM_QUEUES]
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn device_features(&self) -> u64 {
        // No VIRTIO_FS_F_NOTIFICATION: the device sends no notifications.
        0
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // The configuration space is read-only (virtio 1.2 §5.11.4).
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.worker.stop_serving();
        let active = Active::<NUM_QUEUES>::from_context(ctx)?;
        self.worker.serve(active).map_err(|e| {
            ActivateError::Device(format!("cannot serve {}: {e}", self.served.root.display()))
        })
    }

    fn reset(&mut self) {
        self.worker.stop_serving();
    }
}

/// The worker watches the queue eventfds itself; the shared event loop
/// has nothing to do for this device.
impl MutEventSubscriber for Fs {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {}

    fn init(&mut self, _ops: &mut EventOps) {}
}

/// What the device asks of its thread.
enum Job {
    /// Open a fresh file system and serve these queues until `stop` fires.
    Serve { active: Active<NUM_QUEUES> },
}

/// The share's thread, from the device's creation to its drop.
struct Worker {
    jobs: Option<mpsc::Sender<Job>>,
    /// The thread's answers: whether a job started, then that it ended.
    answers: mpsc::Receiver<Result<(), String>>,
    /// Ends a serving job (written by reset, activation and drop).
    stop: EventFd,
    serving: bool,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Start the thread; it gives itself its own file-system attributes
    /// and drops what a share must not have, then confines itself.
    fn spawn(
        served: Served,
        queue_events: &[EventFd],
        seccomp: Seccomp,
    ) -> std::io::Result<Worker> {
        let events = queue_events
            .iter()
            .map(EventFd::try_clone)
            .collect::<Result<Vec<_>, _>>()?;
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let stop_seen = stop.try_clone()?;
        let (jobs, job_rx) = mpsc::channel();
        let (answer_tx, answers) = mpsc::channel();
        let thread = chitin_seccomp::spawn_prepared(
            "chitin-fs",
            ThreadClass::Fs,
            seccomp,
            prepare_thread,
            move || work(&served, &events, &job_rx, &answer_tx, &stop_seen),
        )?;
        Ok(Worker {
            jobs: Some(jobs),
            answers,
            stop,
            serving: false,
            thread: Some(thread),
        })
    }

    /// Serve `active` from now on; returns once the file system is open
    /// (or why it could not be).
    fn serve(&mut self, active: Active<NUM_QUEUES>) -> Result<(), String> {
        let sent = self
            .jobs
            .as_ref()
            .is_some_and(|jobs| jobs.send(Job::Serve { active }).is_ok());
        if !sent {
            return Err("the share's thread is gone".into());
        }
        match self.answers.recv() {
            Ok(Ok(())) => {
                self.serving = true;
                Ok(())
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err("the share's thread is gone".into()),
        }
    }

    /// Stop serving after the request in progress; every fd the share
    /// held is closed when this returns.
    fn stop_serving(&mut self) {
        if !std::mem::take(&mut self.serving) {
            return;
        }
        // One write cannot overflow the counter.
        let _ = self.stop.write(1);
        // Ok: the job ended; Err: the thread is gone (it panicked).
        let _ = self.answers.recv();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop_serving();
        // A closed job channel ends the thread.
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("the chitin-fs thread panicked");
            }
        }
    }
}

/// The thread's life: take a job, open a file system for it, serve, and
/// say when it ended; until the device goes.
fn work(
    served: &Served,
    events: &[EventFd],
    jobs: &mpsc::Receiver<Job>,
    answers: &mpsc::Sender<Result<(), String>>,
    stop: &EventFd,
) {
    while let Ok(Job::Serve { active }) = jobs.recv() {
        // A stop meant for an earlier job is not this one's.
        let _ = stop.read();
        let fs = match served.file_system() {
            Ok(fs) => fs,
            Err(e) => {
                let _ = answers.send(Err(e.to_string()));
                continue;
            }
        };
        let handler = FsHandler::new(Arc::new(fs), served.faults.clone());
        if answers.send(Ok(())).is_err() {
            return;
        }
        serve(active, &handler, events, stop);
        // Every inode and handle the guest held closes here.
        drop(handler);
        if answers.send(Ok(())).is_err() {
            return;
        }
    }
}

/// Make this thread fit to serve a share: its own umask (the passthrough
/// layer sets the umask to 0 at FUSE_INIT, which would otherwise be the
/// whole process's), and, under root, no supplementary groups and only
/// the capabilities serving files as the guest's mapped ids needs
/// ([`SHARE_CAPABILITIES`]; without `CAP_FSETID` a write clears set-id
/// bits, as for a host user; without `CAP_SYS_ADMIN` or `CAP_MKNOD` the
/// thread cannot mount or make devices whatever it is made to do).
/// Capabilities are per thread: the embedder's threads keep theirs. Run
/// before the thread confines itself; what fails is logged and the share
/// served anyway, as the host user allows.
fn prepare_thread() -> std::io::Result<()> {
    // SAFETY: unshare takes flags only; CLONE_FS gives this thread its
    // own root, cwd and umask.
    if unsafe { libc::unshare(libc::CLONE_FS) } != 0 {
        log::warn!(
            "chitin-fs: cannot unshare the fs attributes: {}",
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(());
    }
    // SAFETY: setgroups reads 0 entries from a null list; the raw syscall
    // changes this thread only.
    if unsafe { libc::syscall(libc::SYS_setgroups, 0i64, std::ptr::null::<libc::gid_t>()) } != 0 {
        log::warn!(
            "chitin-fs: cannot drop supplementary groups: {}",
            std::io::Error::last_os_error()
        );
    }
    let keep: caps::CapsHashSet = SHARE_CAPABILITIES.iter().copied().collect();
    for set in [
        caps::CapSet::Effective,
        caps::CapSet::Permitted,
        caps::CapSet::Inheritable,
    ] {
        let kept = match caps::read(None, set) {
            Ok(now) => now.intersection(&keep).copied().collect(),
            Err(_) => caps::CapsHashSet::new(),
        };
        if let Err(e) = caps::set(None, set, &kept) {
            log::warn!("chitin-fs: cannot reduce the thread's capabilities: {e}");
        }
    }
    Ok(())
}

/// What a share's thread keeps of a root VMM's capabilities: changing a
/// file's owner to the guest's, reaching files as root does, acting as a
/// file's owner, and switching to the guest's mapped ids and back.
const SHARE_CAPABILITIES: &[caps::Capability] = &[
    caps::Capability::CAP_CHOWN,
    caps::Capability::CAP_DAC_OVERRIDE,
    caps::Capability::CAP_DAC_READ_SEARCH,
    caps::Capability::CAP_FOWNER,
    caps::Capability::CAP_SETUID,
    caps::Capability::CAP_SETGID,
];

/// Wait for notifications and serve both queues until `stop` fires.
fn serve(mut active: Active<NUM_QUEUES>, handler: &FsHandler, events: &[EventFd], stop: &EventFd) {
    let mut fds: Vec<libc::pollfd> = events
        .iter()
        .map(|e| e.as_raw_fd())
        .chain(std::iter::once(stop.as_raw_fd()))
        .map(pollfd)
        .collect();
    // Requests the driver queued before it set DRIVER_OK are served at once.
    let mut pending = true;
    loop {
        // Look at the stop event before every run, without blocking while
        // chains are left over: a driver that keeps its queue full cannot
        // hold off a reset.
        if !wait(&mut fds, if pending { 0 } else { -1 }) {
            return;
        }
        if fds.last().is_some_and(|f| f.revents != 0) {
            return;
        }
        for event in events {
            // Drain before serving: a notification arriving meanwhile makes
            // the fd readable again. EAGAIN (nothing to drain) is harmless.
            let _ = event.read();
        }
        pending = false;
        active.run(|queues, mem, interrupt| {
            for queue in queues.iter_mut() {
                pending |= run_queue(handler, queue, mem, interrupt)?;
            }
            Ok::<(), crate::handler::HandlerError>(())
        });
        if active.failed() {
            // Nothing more until the driver resets the device.
            pending = false;
        }
    }
}

fn run_queue(
    handler: &FsHandler,
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    interrupt: &dyn VirtioInterrupt,
) -> Result<bool, crate::handler::HandlerError> {
    Ok(handler.process_queue(queue, mem, interrupt)?.pending)
}

fn pollfd(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

/// Wait up to `timeout_ms` (-1: for ever) for one of `fds` to be
/// readable; false if polling itself failed (the thread then ends:
/// without poll it can serve nothing).
fn wait(fds: &mut [libc::pollfd], timeout_ms: i32) -> bool {
    for f in fds.iter_mut() {
        f.revents = 0;
    }
    loop {
        // SAFETY: `fds` is a valid, exclusively borrowed array of pollfd
        // for its whole length; poll writes only their `revents`.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if n >= 0 {
            return true;
        }
        if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            log::error!(
                "chitin-fs cannot poll its queues: {}",
                std::io::Error::last_os_error()
            );
            return false;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use chitin_virtio::test_utils::{guest_memory, SplitQueueBuilder, TestDescriptor};
    use fuse_backend_rs::abi::fuse_abi::{InHeader, InitIn, Opcode, OutHeader};
    use vm_memory::{ByteValued, Bytes, GuestAddress};

    use super::*;
    use crate::test_utils::{RecordingInterrupt, TempTree, NEXT, WRITE};

    /// This process's fds open on something under `dir` (other tests
    /// running meanwhile open fds of their own elsewhere).
    fn fds_under(dir: &Path) -> usize {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|target| target.starts_with(dir))
            .count()
    }

    /// Held by the tests that start a device (and so a `chitin-fs`
    /// thread), so the thread counts of one are not moved by another.
    static DEVICES: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn threads_named(name: &str) -> usize {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter(|t| {
                let comm = t.as_ref().unwrap().path().join("comm");
                std::fs::read_to_string(comm).is_ok_and(|c| c.trim() == name)
            })
            .count()
    }

    #[test]
    fn config_space_has_tag_and_one_request_queue() {
        let _devices = DEVICES.lock().unwrap_or_else(|e| e.into_inner());
        let tree = TempTree::new("config");
        let fs = Fs::new(FsConfig::new(tree.path(), "data")).unwrap();
        let mut config = [0xffu8; 40];
        fs.read_config(0, &mut config);
        assert_eq!(&config[..4], b"data");
        assert!(config[4..36].iter().all(|&b| b == 0));
        assert_eq!(u32::from_le_bytes(config[36..].try_into().unwrap()), 1);
        assert_eq!(fs.device_type(), 26);
        assert_eq!(fs.queue_max_sizes().len(), 2);
    }

    #[test]
    fn bad_configs_are_refused_with_their_reason() {
        let _devices = DEVICES.lock().unwrap_or_else(|e| e.into_inner());
        let tree = TempTree::new("bad");
        let file = tree.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let err = |c: FsConfig| Fs::new(c).err().unwrap();
        assert!(matches!(
            err(FsConfig::new(tree.path(), "")),
            FsError::Tag { .. }
        ));
        assert!(matches!(
            err(FsConfig::new(tree.path(), "t".repeat(37))),
            FsError::Tag { .. }
        ));
        assert!(matches!(
            err(FsConfig::new(tree.path().join("missing"), "t")),
            FsError::Root { .. }
        ));
        assert!(matches!(
            err(FsConfig::new(&file, "t")),
            FsError::NotADirectory(_)
        ));
        let mut none = FsConfig::new(tree.path(), "t");
        none.max_open_files = 0;
        assert!(matches!(err(none), FsError::NoOpenFiles));
    }

    #[test]
    fn device_serves_on_its_own_thread_reset_closes_every_fd_and_drop_ends_it() {
        let _devices = DEVICES.lock().unwrap_or_else(|e| e.into_inner());
        let tree = TempTree::new("device");
        std::fs::write(tree.path().join("file"), b"x").unwrap();
        let root = std::fs::canonicalize(tree.path()).unwrap();
        let threads_before = threads_named("chitin-fs");
        let mut fs = Fs::new(FsConfig::new(tree.path(), "data")).unwrap();
        assert_eq!(threads_named("chitin-fs"), threads_before + 1);
        assert_eq!(fds_under(&root), 0, "nothing is opened before activation");

        let mem = guest_memory(1 << 20);
        let hiprio = SplitQueueBuilder::new(&mem, GuestAddress(0), 16).unwrap();
        let mut request = SplitQueueBuilder::new(&mem, GuestAddress(0x4000), 16).unwrap();
        let header = InHeader {
            len: 40 + 16,
            opcode: Opcode::Init as u32,
            unique: 1,
            ..Default::default()
        };
        let init = InitIn {
            major: 7,
            minor: 31,
            max_readahead: 0,
            flags: 0,
        };
        let mut bytes = header.as_slice().to_vec();
        bytes.extend_from_slice(init.as_slice());
        mem.write_slice(&bytes, GuestAddress(0x1_0000)).unwrap();
        request
            .add_chain(&[
                TestDescriptor::new(0x1_0000, bytes.len() as u32, NEXT),
                TestDescriptor::new(0x2_0000, 4096, WRITE),
            ])
            .unwrap();
        let interrupt = Arc::new(RecordingInterrupt::new());
        fs.activate(ActivateContext {
            mem: mem.clone(),
            queues: vec![hiprio.build().unwrap(), request.build().unwrap()],
            interrupt: interrupt.clone(),
            acked_features: 0,
        })
        .unwrap();
        fs.queue_events()[1].write(1).unwrap();

        // The worker answers INIT without the event loop.
        let deadline = Instant::now() + Duration::from_secs(10);
        while request.used_idx().unwrap() == 0 {
            assert!(Instant::now() < deadline, "no reply to INIT");
            std::thread::sleep(Duration::from_millis(5));
        }
        let out: OutHeader = mem.read_obj(GuestAddress(0x2_0000)).unwrap();
        assert_eq!(out.error, 0);
        assert_eq!(out.unique, 1);
        assert_eq!(threads_named("chitin-fs"), threads_before + 1);
        assert!(fds_under(&root) >= 1, "the share's root is held");

        fs.reset();
        assert_eq!(fds_under(&root), 0, "every fd of the share is closed");
        drop(fs);
        assert_eq!(threads_named("chitin-fs"), threads_before);
    }
}
