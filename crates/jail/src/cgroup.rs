//! The jail's cgroup (v2 only): created under `<cgroup2 root>/<parent>`,
//! with the controllers its limits need enabled on the way down, the
//! limits written, the jail's first process moved in, and removed once
//! every process in it is gone.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{CgroupLimits, JailError};

/// Where the cgroup v2 hierarchy is mounted, from `/proc/self/mountinfo`.
pub(crate) fn v2_root() -> Result<PathBuf, JailError> {
    let info =
        std::fs::read_to_string("/proc/self/mountinfo").map_err(|source| JailError::Step {
            step: "read /proc/self/mountinfo",
            path: None,
            source,
        })?;
    parse_v2_root(&info).ok_or(JailError::NoCgroupV2)
}

/// The mount point of the first `cgroup2` line of a mountinfo text.
fn parse_v2_root(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (fields, rest) = line.split_once(" - ")?;
        let fstype = rest.split_whitespace().next()?;
        let mount_point = fields.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(mount_point))
    })
}

/// The controllers `limits` needs.
fn controllers(limits: &CgroupLimits) -> Vec<&'static str> {
    let mut wanted = Vec::new();
    if limits.memory_max.is_some() {
        wanted.push("memory");
    }
    if limits.cpu_max.is_some() {
        wanted.push("cpu");
    }
    if limits.pids_max.is_some() {
        wanted.push("pids");
    }
    wanted
}

fn write(path: &Path, value: &str, step: &'static str) -> Result<(), JailError> {
    std::fs::write(path, value).map_err(|source| JailError::Step {
        step,
        path: Some(path.to_path_buf()),
        source,
    })
}

/// A jail's cgroup, made and limited; removed by [`Cgroup::remove`].
#[derive(Debug)]
pub(crate) struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// Make `<root>/<parent>/<id>` with `limits`. The parent levels are
    /// made if missing and each level from the root down delegates the
    /// controllers the limits need.
    pub(crate) fn create(
        root: &Path,
        parent: &str,
        id: &str,
        limits: &CgroupLimits,
    ) -> Result<Cgroup, JailError> {
        let wanted = controllers(limits);
        let available =
            std::fs::read_to_string(root.join("cgroup.controllers")).map_err(|source| {
                JailError::Step {
                    step: "read the cgroup v2 controllers",
                    path: Some(root.to_path_buf()),
                    source,
                }
            })?;
        for controller in &wanted {
            if !available.split_whitespace().any(|c| c == *controller) {
                return Err(JailError::ControllerMissing {
                    controller,
                    root: root.to_path_buf(),
                });
            }
        }
        let enable: String = wanted
            .iter()
            .map(|c| format!("+{c}"))
            .collect::<Vec<_>>()
            .join(" ");
        let mut level = root.to_path_buf();
        let parts: Vec<&str> = parent.split('/').filter(|p| !p.is_empty()).collect();
        for part in std::iter::once(None).chain(parts.iter().map(Some)) {
            if let Some(part) = part {
                level.push(part);
                match std::fs::create_dir(&level) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(source) => {
                        return Err(JailError::Step {
                            step: "make the parent cgroup",
                            path: Some(level),
                            source,
                        })
                    }
                }
            }
            if !enable.is_empty() {
                write(
                    &level.join("cgroup.subtree_control"),
                    &enable,
                    "enable cgroup controllers",
                )?;
            }
        }
        let path = level.join(id);
        match std::fs::create_dir(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(JailError::Busy(path));
            }
            Err(source) => {
                return Err(JailError::Step {
                    step: "make the jail's cgroup",
                    path: Some(path),
                    source,
                })
            }
        }
        let cgroup = Cgroup { path };
        if let Err(e) = cgroup.limit(limits) {
            cgroup.remove();
            return Err(e);
        }
        Ok(cgroup)
    }

    fn limit(&self, limits: &CgroupLimits) -> Result<(), JailError> {
        if let Some(bytes) = limits.memory_max {
            write(
                &self.path.join("memory.max"),
                &bytes.to_string(),
                "set memory.max",
            )?;
        }
        if let Some((quota, period)) = limits.cpu_max {
            write(
                &self.path.join("cpu.max"),
                &format!("{quota} {period}"),
                "set cpu.max",
            )?;
        }
        if let Some(pids) = limits.pids_max {
            write(
                &self.path.join("pids.max"),
                &pids.to_string(),
                "set pids.max",
            )?;
        }
        Ok(())
    }

    /// The cgroup's directory.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Move process `pid` (and so everything it starts) into the cgroup.
    pub(crate) fn add(&self, pid: libc::pid_t) -> Result<(), JailError> {
        write(
            &self.path.join("cgroup.procs"),
            &pid.to_string(),
            "move the jail into its cgroup",
        )
    }

    /// Kill what is left in the cgroup and remove it, waiting up to 2 s
    /// for the last processes to be reaped. Errors are only logged on
    /// stderr: there is no caller left to give them to.
    pub(crate) fn remove(&self) {
        let kill = self.path.join("cgroup.kill");
        if kill.exists() {
            let _ = std::fs::write(&kill, "1");
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match std::fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => {
                    eprintln!(
                        "chitin-jail: cannot remove cgroup {}: {e}",
                        self.path.display()
                    );
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v2_root_is_found_among_v1_mounts() {
        let info = "\
25 30 0:22 / /sys/fs/cgroup rw,nosuid - tmpfs tmpfs rw,mode=755
26 25 0:23 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
33 25 0:30 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw
";
        assert_eq!(
            parse_v2_root(info),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn v2_root_is_none_without_a_cgroup2_mount() {
        let info = "26 25 0:23 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(parse_v2_root(info), None);
    }

    #[test]
    fn controllers_follow_the_limits_asked_for() {
        let limits = CgroupLimits {
            memory_max: Some(1 << 30),
            cpu_max: None,
            pids_max: Some(64),
        };
        assert_eq!(controllers(&limits), ["memory", "pids"]);
        assert!(controllers(&CgroupLimits::default()).is_empty());
    }
}
