//! From an OCI process (the bundle's `config.json`, or an exec's spec) to
//! the chitin [`Command`] that runs it in the pod VM.
//!
//! Honoured: `args`, `env`, `cwd`, `user.uid`/`user.gid`,
//! `user.additionalGids`, `user.umask`, `rlimits`, `capabilities`,
//! `noNewPrivileges`, `oomScoreAdj`, the container's `hostname` and
//! root, and its mounts the guest can provide (see [`plan_mounts`]). Not
//! applied (logged; docs/kubernetes.md lists them): the LSM labels.
//! A terminal (`terminal`, or the task's) is a guest terminal of
//! `consoleSize`, 24 × 80 without one, resized by `ResizePty`.

use std::path::{Path, PathBuf};

use chitin::{Command, Mount};
use oci_spec::runtime::Process;

/// Why an OCI process cannot run.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    /// `process` is missing from the container's spec.
    #[error("the spec has no process")]
    NoProcess,
    /// `process.args` is missing or empty.
    #[error("process.args is empty")]
    NoArgs,
    /// `process.cwd` is not absolute.
    #[error("process.cwd {0:?} is not an absolute path")]
    RelativeCwd(String),
    /// An `env` entry is not `KEY=VALUE`.
    #[error("process.env entry {0:?} is not KEY=VALUE")]
    BadEnv(String),
}

/// The command that runs `process` with `root` (a directory in the guest)
/// as its root and `hostname` as its host name.
pub fn command(
    process: &Process,
    root: &str,
    hostname: Option<&str>,
    terminal: bool,
) -> Result<Command, SpecError> {
    let args = process.args().as_deref().unwrap_or_default();
    let (program, rest) = args.split_first().ok_or(SpecError::NoArgs)?;
    let mut cmd = Command::new(program);
    cmd.args(rest);
    cmd.env_clear();
    for entry in process.env().as_deref().unwrap_or_default() {
        let (key, value) = entry
            .split_once('=')
            .filter(|(k, _)| !k.is_empty())
            .ok_or_else(|| SpecError::BadEnv(entry.clone()))?;
        cmd.env(key, value);
    }
    let cwd = process.cwd();
    if !cwd.is_absolute() {
        return Err(SpecError::RelativeCwd(cwd.display().to_string()));
    }
    cmd.current_dir(cwd.as_os_str());
    let user = process.user();
    cmd.uid(user.uid()).gid(user.gid());
    cmd.root(root);
    if let Some(name) = hostname.filter(|n| !n.is_empty()) {
        cmd.hostname(name);
    }
    if terminal || process.terminal() == Some(true) {
        // The spec's size, or a console's usual one until ResizePty.
        let (rows, cols) = process
            .console_size()
            .as_ref()
            .map(|b| (b.height(), b.width()))
            .unwrap_or((24, 80));
        cmd.tty(clamp_u16(rows), clamp_u16(cols));
    }
    if let Some(groups) = user.additional_gids() {
        cmd.groups(groups.iter().copied());
    }
    if let Some(mask) = user.umask() {
        cmd.umask(mask & 0o777);
    }
    for r in process.rlimits().as_deref().unwrap_or_default() {
        if let Some(resource) = rlimit_number(&r.typ()) {
            cmd.rlimit(resource, r.soft(), r.hard());
        }
    }
    if let Some(caps) = process.capabilities() {
        let mask = |set: &Option<oci_spec::runtime::Capabilities>| {
            set.iter()
                .flatten()
                .filter_map(capability_number)
                .fold(0u64, |m, n| m | 1 << n)
        };
        cmd.capabilities(chitin::Capabilities {
            bounding: mask(caps.bounding()),
            effective: mask(caps.effective()),
            permitted: mask(caps.permitted()),
            inheritable: mask(caps.inheritable()),
            ambient: mask(caps.ambient()),
        });
    }
    if process.no_new_privileges() == Some(true) {
        cmd.no_new_privileges();
    }
    if let Some(score) = process.oom_score_adj() {
        cmd.oom_score_adj(score.clamp(-1000, 1000));
    }
    Ok(cmd)
}

/// A terminal dimension as the guest takes it.
pub fn clamp_u16(v: impl TryInto<u16>) -> u16 {
    v.try_into().unwrap_or(u16::MAX)
}

/// Linux's capability numbers, by the names OCI gives them.
const CAPABILITIES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// Linux's `RLIMIT_*` numbers, by the names OCI gives them.
const RLIMITS: [&str; 16] = [
    "RLIMIT_CPU",
    "RLIMIT_FSIZE",
    "RLIMIT_DATA",
    "RLIMIT_STACK",
    "RLIMIT_CORE",
    "RLIMIT_RSS",
    "RLIMIT_NPROC",
    "RLIMIT_NOFILE",
    "RLIMIT_MEMLOCK",
    "RLIMIT_AS",
    "RLIMIT_LOCKS",
    "RLIMIT_SIGPENDING",
    "RLIMIT_MSGQUEUE",
    "RLIMIT_NICE",
    "RLIMIT_RTPRIO",
    "RLIMIT_RTTIME",
];

/// A value's name in the OCI JSON (`"CAP_CHOWN"`), through its serde
/// form, the spec's own spelling.
fn spec_name(value: &impl serde::Serialize) -> Option<String> {
    match serde_json::to_value(value).ok()? {
        serde_json::Value::String(name) => Some(name),
        _ => None,
    }
}

fn capability_number(cap: &oci_spec::runtime::Capability) -> Option<u32> {
    let name = spec_name(cap)?;
    CAPABILITIES
        .iter()
        .position(|c| *c == name)
        .map(|n| n as u32)
}

fn rlimit_number(typ: &oci_spec::runtime::PosixRlimitType) -> Option<u32> {
    let name = spec_name(typ)?;
    RLIMITS.iter().position(|r| *r == name).map(|n| n as u32)
}

/// The host name a container runs with: its spec's, or, for a container
/// that joins another's UTS namespace by path (CRI's containers join
/// their pod sandbox's), the pod's (`pod`: the first container's).
pub fn hostname(spec: &oci_spec::runtime::Spec, pod: Option<&str>) -> Option<String> {
    use oci_spec::runtime::LinuxNamespaceType;
    if let Some(own) = spec.hostname().as_ref().filter(|h| !h.is_empty()) {
        return Some(own.clone());
    }
    let joins_uts = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .is_some_and(|ns| {
            ns.iter()
                .any(|n| n.typ() == LinuxNamespaceType::Uts && n.path().is_some())
        });
    joins_uts.then(|| pod.map(str::to_string)).flatten()
}

/// The parts of `process` chitin does not apply, by their spec names:
/// the LSM labels (the guest kernel has no AppArmor or SELinux policy),
/// and capabilities or rlimits this build does not know.
pub fn ignored(process: &Process) -> Vec<String> {
    let mut out = Vec::new();
    if process.apparmor_profile().is_some() || process.selinux_label().is_some() {
        out.push("LSM labels".to_string());
    }
    for r in process.rlimits().as_deref().unwrap_or_default() {
        if rlimit_number(&r.typ()).is_none() {
            out.push(format!("rlimit {:?}", r.typ()));
        }
    }
    if let Some(caps) = process.capabilities() {
        let sets = [
            caps.bounding(),
            caps.effective(),
            caps.permitted(),
            caps.inheritable(),
            caps.ambient(),
        ];
        let mut unknown: Vec<String> = sets
            .iter()
            .flat_map(|s| s.iter().flatten())
            .filter(|c| capability_number(c).is_none())
            .map(|c| spec_name(c).unwrap_or_else(|| format!("{c:?}")))
            .collect();
        unknown.sort();
        unknown.dedup();
        out.extend(unknown.into_iter().map(|c| format!("capability {c}")));
    }
    out
}

/// Mounts the agent makes itself in every container root: a spec's
/// mount there is not needed (CRI's `/dev/shm` bind of a host tmpfs
/// included: shared memory cannot cross the VM boundary anyway).
const PROVIDED: &[&str] = &["/proc", "/sys", "/dev", "/dev/pts", "/dev/shm"];

/// A tmpfs's data options passed on to the guest; other options that
/// are not flags are dropped.
const TMPFS_DATA: &[&str] = &["size", "mode", "nr_inodes", "nr_blocks", "uid", "gid"];

/// One OCI mount as the shim carries it out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Planned {
    /// Made in the guest alone (a tmpfs).
    Guest(Mount),
    /// A host path bound into the pod's shared directory as `name` (in
    /// the container's directory there), read-only if asked; `mount`
    /// binds it from there inside the container.
    Host {
        /// The host path.
        source: PathBuf,
        /// Its name beside the container's `rootfs`.
        name: String,
        /// Bound read-only on the host.
        read_only: bool,
        /// With the mounts below it (`rbind`).
        recursive: bool,
        /// The guest's bind.
        mount: Mount,
    },
}

impl Planned {
    /// The mount inside the container.
    pub fn mount(&self) -> &Mount {
        match self {
            Planned::Guest(m) | Planned::Host { mount: m, .. } => m,
        }
    }

    /// Whether its mount point is a directory (a bind of anything else
    /// goes on a file).
    pub fn is_dir(&self) -> bool {
        match self {
            Planned::Guest(_) => true,
            Planned::Host { source, .. } => source.is_dir(),
        }
    }
}

/// The spec's mounts as the shim carries them out, in order, for a
/// container whose directory in the guest is `guest_dir`; and those it
/// cannot (their destination and type), for the log.
///
/// - `/proc`, `/sys`, `/dev`, `/dev/pts`, `/dev/shm`: the agent makes
///   its own; the spec's are not needed.
/// - binds (`type` `bind`, or a `bind`/`rbind` option): the host path is
///   bound into the shared directory, then inside the container, with
///   `ro`, `nosuid`, `nodev` and `noexec`. This is how Kubernetes
///   volumes, `/etc/hosts`, `/etc/resolv.conf` and `/etc/hostname` come.
/// - `tmpfs`: made in the guest, with its flags and size, mode,
///   inode and owner options. An exec gets a tmpfs of its own.
/// - anything else (`mqueue`, `cgroup`, a second `proc`...): not applied.
pub fn plan_mounts(spec: &oci_spec::runtime::Spec, guest_dir: &str) -> (Vec<Planned>, Vec<String>) {
    let (mut planned, mut ignored) = (Vec::new(), Vec::new());
    for m in spec.mounts().as_deref().unwrap_or_default() {
        let dest = m.destination();
        let Some(dest_str) = dest.to_str() else {
            ignored.push(format!("mount {} (not UTF-8)", dest.display()));
            continue;
        };
        let normal = Path::new(dest_str.trim_end_matches('/'));
        if PROVIDED.iter().any(|p| Path::new(p) == normal) {
            continue;
        }
        let typ = m.typ().as_deref().unwrap_or("");
        let options = m.options().as_deref().unwrap_or_default();
        let has = |o: &str| options.iter().any(|x| x == o);
        let read_only = has("ro") || has("rro");
        let flagged = |mut mount: Mount| {
            if read_only {
                mount = mount.read_only();
            }
            if has("nosuid") {
                mount = mount.nosuid();
            }
            if has("nodev") {
                mount = mount.nodev();
            }
            if has("noexec") {
                mount = mount.noexec();
            }
            mount
        };
        if typ == "bind" || has("bind") || has("rbind") {
            let special =
                |s: &PathBuf| std::fs::metadata(s).is_ok_and(|m| !m.is_dir() && !m.is_file());
            match m.source().as_ref().filter(|s| s.is_absolute()) {
                // A socket or a device cannot cross into the VM through
                // virtio-fs.
                Some(source) if special(source) => ignored.push(format!(
                    "bind mount {dest_str} of {} (neither a file nor a directory)",
                    source.display()
                )),
                Some(source) => {
                    let name = format!("m{}", planned.len());
                    let guest_source = format!("{guest_dir}/{name}");
                    planned.push(Planned::Host {
                        source: source.clone(),
                        name,
                        read_only,
                        recursive: has("rbind"),
                        mount: flagged(Mount::bind(guest_source, dest_str)),
                    });
                }
                None => ignored.push(format!("bind mount {dest_str} (no absolute source)")),
            }
        } else if typ == "tmpfs" {
            let data: Vec<&str> = options
                .iter()
                .map(String::as_str)
                .filter(|o| {
                    o.split_once('=')
                        .is_some_and(|(k, _)| TMPFS_DATA.contains(&k))
                })
                .collect();
            let tmpfs = Mount::tmpfs(dest_str).options(data.join(","));
            planned.push(Planned::Guest(flagged(tmpfs)));
        } else {
            ignored.push(format!("mount {dest_str} ({typ})"));
        }
    }
    (planned, ignored)
}

/// An exec's process, as containerd sends it (the OCI process as JSON).
pub fn parse_process(json: &[u8]) -> Result<Process, String> {
    serde_json::from_slice(json).map_err(|e| format!("the exec's process spec: {e}"))
}

/// The container root in the spec, made absolute against the bundle.
pub fn root_path(bundle: &Path, root: &Path) -> std::path::PathBuf {
    if root.is_absolute() {
        root.to_path_buf()
    } else {
        bundle.join(root)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn process(json: &str) -> Process {
        parse_process(json.as_bytes()).unwrap()
    }

    #[test]
    fn args_env_cwd_user_root_and_hostname_reach_the_command() {
        let p = process(
            r#"{"args":["/bin/sh","-c","echo hi"],"env":["PATH=/bin","A=b=c"],
                "cwd":"/work","user":{"uid":1000,"gid":100}}"#,
        );
        let cmd = command(&p, "/run/chitin/pod/c1/rootfs", Some("web"), false).unwrap();
        let text = format!("{cmd:?}");
        assert_eq!(cmd.get_program(), "/bin/sh");
        assert_eq!(cmd.get_args(), ["-c", "echo hi"]);
        for part in [
            "PATH",
            "/bin",
            "\"A\"",
            "b=c",
            "/work",
            "1000",
            "100",
            "c1/rootfs",
            "web",
        ] {
            assert!(text.contains(part), "{part} missing from {text}");
        }
    }

    #[test]
    fn bad_processes_are_refused_by_name() {
        let cases = [
            (r#"{"cwd":"/","user":{"uid":0,"gid":0}}"#, SpecError::NoArgs),
            (
                r#"{"args":[],"cwd":"/","user":{"uid":0,"gid":0}}"#,
                SpecError::NoArgs,
            ),
            (
                r#"{"args":["x"],"cwd":"rel","user":{"uid":0,"gid":0}}"#,
                SpecError::RelativeCwd("rel".into()),
            ),
            (
                r#"{"args":["x"],"env":["NOEQUALS"],"cwd":"/","user":{"uid":0,"gid":0}}"#,
                SpecError::BadEnv("NOEQUALS".into()),
            ),
            (
                r#"{"args":["x"],"env":["=v"],"cwd":"/","user":{"uid":0,"gid":0}}"#,
                SpecError::BadEnv("=v".into()),
            ),
        ];
        for (json, want) in cases {
            assert_eq!(
                command(&process(json), "/r", None, false).unwrap_err(),
                want,
                "{json}"
            );
        }
        assert!(parse_process(b"{not json").is_err());
    }

    #[test]
    fn a_terminal_is_a_guest_terminal_of_the_specs_size() {
        let ok = process(r#"{"args":["x"],"cwd":"/","user":{"uid":0,"gid":0}}"#);
        let shown = format!("{:?}", command(&ok, "/r", None, true).unwrap());
        assert!(
            shown.contains("tty: Some(WindowSize { rows: 24, cols: 80 })"),
            "{shown}"
        );
        let sized = process(
            r#"{"args":["x"],"terminal":true,"consoleSize":{"height":33,"width":101},"cwd":"/","user":{"uid":0,"gid":0}}"#,
        );
        let shown = format!("{:?}", command(&sized, "/r", None, false).unwrap());
        assert!(
            shown.contains("tty: Some(WindowSize { rows: 33, cols: 101 })"),
            "{shown}"
        );
        let none = format!("{:?}", command(&ok, "/r", None, false).unwrap());
        assert!(none.contains("tty: None"), "{none}");
    }

    #[test]
    fn what_is_not_applied_is_named() {
        let p = process(
            r#"{"args":["x"],"cwd":"/","user":{"uid":0,"gid":0},"apparmorProfile":"x",
                "capabilities":{"bounding":["CAP_CHOWN"]}}"#,
        );
        assert_eq!(ignored(&p), ["LSM labels"]);
        let plain = process(r#"{"args":["x"],"cwd":"/","user":{"uid":0,"gid":0}}"#);
        assert!(ignored(&plain).is_empty());
    }

    #[test]
    fn groups_umask_rlimits_capabilities_and_the_rest_reach_the_command() {
        let p = process(
            r#"{"args":["x"],"cwd":"/","user":{"uid":1000,"gid":1000,"additionalGids":[10,20],"umask":18},
                "rlimits":[{"type":"RLIMIT_NOFILE","hard":2048,"soft":1024}],
                "capabilities":{"bounding":["CAP_CHOWN","CAP_NET_RAW"],"effective":["CAP_CHOWN"],
                    "permitted":["CAP_CHOWN"],"ambient":["CAP_CHECKPOINT_RESTORE"]},
                "noNewPrivileges":true,"oomScoreAdj":1500}"#,
        );
        let cmd = command(&p, "/r", None, false).unwrap();
        let shown = format!("{cmd:?}");
        for want in [
            "groups: [10, 20]",
            "umask: Some(18)",
            "Rlimit { resource: 7, soft: 1024, hard: 2048 }",
            "bounding: 8193,",
            "effective: 1,",
            "permitted: 1,",
            "inheritable: 0,",
            &format!("ambient: {}", 1u64 << 40),
            "no_new_privileges: true",
            // Clamped to the kernel's range.
            "oom_score_adj: Some(1000)",
        ] {
            assert!(shown.contains(want), "{want:?} not in {shown}");
        }
    }

    #[test]
    fn a_container_joining_the_pods_uts_namespace_takes_the_pods_hostname() {
        let spec = |json: &str| -> oci_spec::runtime::Spec { serde_json::from_str(json).unwrap() };
        let own = spec(r#"{"ociVersion":"1.0.2","hostname":"web"}"#);
        assert_eq!(hostname(&own, Some("pod")).as_deref(), Some("web"));
        let joins = spec(
            r#"{"ociVersion":"1.0.2","linux":{"namespaces":[{"type":"uts","path":"/proc/7/ns/uts"}]}}"#,
        );
        assert_eq!(hostname(&joins, Some("pod")).as_deref(), Some("pod"));
        assert_eq!(hostname(&joins, None), None);
        let fresh = spec(r#"{"ociVersion":"1.0.2","linux":{"namespaces":[{"type":"uts"}]}}"#);
        assert_eq!(hostname(&fresh, Some("pod")), None);
    }

    #[test]
    fn mounts_are_planned_as_cri_and_kubernetes_give_them() {
        let spec: oci_spec::runtime::Spec = serde_json::from_str(
            r#"{"ociVersion":"1.0.2","mounts":[
                {"destination":"/proc","type":"proc","source":"proc"},
                {"destination":"/dev","type":"tmpfs","source":"tmpfs","options":["nosuid","strictatime","mode=755","size=65536k"]},
                {"destination":"/dev/shm","type":"bind","source":"/run/containerd/sandboxes/p/shm","options":["rbind","ro"]},
                {"destination":"/dev/mqueue","type":"mqueue","source":"mqueue"},
                {"destination":"/sys/fs/cgroup","type":"cgroup","source":"cgroup","options":["ro"]},
                {"destination":"/etc/hosts","type":"bind","source":"/var/lib/sandboxes/p/hosts","options":["rbind","rprivate","rw"]},
                {"destination":"/data","source":"/var/lib/kubelet/pods/u/volumes/v","options":["rbind","ro","nosuid"]},
                {"destination":"/cache","type":"tmpfs","source":"tmpfs","options":["nodev","size=1m","mode=1777","huge=always","rw"]},
                {"destination":"/plain","type":"bind","source":"/var/lib/kubelet/pods/u/volumes/w","options":["bind","rro"]},
                {"destination":"/dev/fuse","type":"bind","source":"/dev/null","options":["bind"]},
                {"destination":"/bad","type":"bind","source":"relative","options":["rbind"]}
            ]}"#,
        )
        .unwrap();
        let (planned, ignored) = plan_mounts(&spec, "/run/chitin/pod/c1");
        assert_eq!(
            planned,
            [
                Planned::Host {
                    source: "/var/lib/sandboxes/p/hosts".into(),
                    name: "m0".into(),
                    read_only: false,
                    recursive: true,
                    mount: Mount::bind("/run/chitin/pod/c1/m0", "/etc/hosts"),
                },
                Planned::Host {
                    source: "/var/lib/kubelet/pods/u/volumes/v".into(),
                    name: "m1".into(),
                    read_only: true,
                    recursive: true,
                    mount: Mount::bind("/run/chitin/pod/c1/m1", "/data")
                        .read_only()
                        .nosuid(),
                },
                Planned::Guest(Mount::tmpfs("/cache").options("size=1m,mode=1777").nodev()),
                Planned::Host {
                    source: "/var/lib/kubelet/pods/u/volumes/w".into(),
                    name: "m3".into(),
                    read_only: true,
                    recursive: false,
                    mount: Mount::bind("/run/chitin/pod/c1/m3", "/plain").read_only(),
                },
            ]
        );
        assert_eq!(
            ignored,
            [
                "mount /dev/mqueue (mqueue)",
                "mount /sys/fs/cgroup (cgroup)",
                "bind mount /dev/fuse of /dev/null (neither a file nor a directory)",
                "bind mount /bad (no absolute source)"
            ]
        );
    }

    #[test]
    fn a_relative_root_is_the_bundles() {
        assert_eq!(
            root_path(Path::new("/b"), Path::new("rootfs")),
            Path::new("/b/rootfs")
        );
        assert_eq!(root_path(Path::new("/b"), Path::new("/r")), Path::new("/r"));
    }
}
