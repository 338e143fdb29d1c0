//! From an OCI process (the bundle's `config.json`, or an exec's spec) to
//! the chitin [`Command`] that runs it in the pod VM.
//!
//! Honoured: `args`, `env`, `cwd`, `user.uid`/`user.gid`, the container's
//! `hostname` and root. Not yet (logged, then ignored; docs/kubernetes.md
//! lists them): `user.additionalGids`, `user.umask`, `rlimits`,
//! `capabilities`, `noNewPrivileges`, `oomScoreAdj`, and the LSM labels.
//! A terminal is refused: the agent has no pty yet.

use std::path::Path;

use chitin::Command;
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
    /// A terminal was asked for.
    #[error("a terminal (tty) is not supported by chitin yet")]
    Terminal,
}

/// The command that runs `process` with `root` (a directory in the guest)
/// as its root and `hostname` as its host name.
pub fn command(
    process: &Process,
    root: &str,
    hostname: Option<&str>,
    terminal: bool,
) -> Result<Command, SpecError> {
    if terminal || process.terminal() == Some(true) {
        return Err(SpecError::Terminal);
    }
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
    Ok(cmd)
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

/// The parts of `process` chitin does not apply yet, by their spec names.
pub fn ignored(process: &Process) -> Vec<&'static str> {
    let user = process.user();
    let mut out = Vec::new();
    if user
        .additional_gids()
        .as_ref()
        .is_some_and(|g| !g.is_empty())
    {
        out.push("user.additionalGids");
    }
    if user.umask().is_some() {
        out.push("user.umask");
    }
    if process.rlimits().as_ref().is_some_and(|r| !r.is_empty()) {
        out.push("rlimits");
    }
    if process.capabilities().is_some() {
        out.push("capabilities");
    }
    if process.no_new_privileges() == Some(true) {
        out.push("noNewPrivileges");
    }
    if process.oom_score_adj().is_some() {
        out.push("oomScoreAdj");
    }
    if process.apparmor_profile().is_some() || process.selinux_label().is_some() {
        out.push("LSM labels");
    }
    out
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
            (
                r#"{"args":["x"],"terminal":true,"cwd":"/","user":{"uid":0,"gid":0}}"#,
                SpecError::Terminal,
            ),
        ];
        for (json, want) in cases {
            assert_eq!(
                command(&process(json), "/r", None, false).unwrap_err(),
                want,
                "{json}"
            );
        }
        let ok = process(r#"{"args":["x"],"cwd":"/","user":{"uid":0,"gid":0}}"#);
        assert_eq!(
            command(&ok, "/r", None, true).unwrap_err(),
            SpecError::Terminal
        );
        assert!(parse_process(b"{not json").is_err());
    }

    #[test]
    fn what_is_not_applied_is_named() {
        let p = process(
            r#"{"args":["x"],"cwd":"/","user":{"uid":0,"gid":0,"additionalGids":[10]},
                "rlimits":[{"type":"RLIMIT_NOFILE","hard":1024,"soft":1024}],
                "noNewPrivileges":true}"#,
        );
        assert_eq!(
            ignored(&p),
            ["user.additionalGids", "rlimits", "noNewPrivileges"]
        );
        let plain = process(r#"{"args":["x"],"cwd":"/","user":{"uid":0,"gid":0}}"#);
        assert!(ignored(&plain).is_empty());
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
    fn a_relative_root_is_the_bundles() {
        assert_eq!(
            root_path(Path::new("/b"), Path::new("rootfs")),
            Path::new("/b/rootfs")
        );
        assert_eq!(root_path(Path::new("/b"), Path::new("/r")), Path::new("/r"));
    }
}
