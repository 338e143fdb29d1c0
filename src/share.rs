//! Shared folders: what a runtime author configures ([`Share`]), and how
//! each becomes a virtio-fs device serving a host directory in-process.
//!
//! A share with a mount point travels to the guest on the kernel command
//! line as `chitin.share=<tag>,<mount point>[,ro]`; chitin's guest agent
//! mounts each one (`virtiofs`, `nodev`, and `ro` for a read-only share)
//! before it serves the first command, so `exec("cat /mnt/data/x")`
//! works at once. A share without a mount point is left for the guest to
//! mount itself by its tag.

use std::path::{Path, PathBuf};

use chitin_fs::{FsConfig, IdMap, IdRange, DEFAULT_MAX_OPEN_FILES};
use chitin_seccomp::Seccomp;

use crate::error::SandboxError;

/// The command-line key of a share the agent mounts.
pub(crate) const SHARE_KEY: &str = "chitin.share";

/// A host directory shared with the guest over virtio-fs.
///
/// The guest can never reach a host file outside the directory: names
/// are single path components, host symlinks are never followed, `..` at
/// the share's root is the root, device nodes cannot be made and no
/// special file is opened on the host.
///
/// ```
/// use chitin::Share;
///
/// let data = Share::new("/srv/data", "data").mount_at("/mnt/data");
/// let image = Share::new("/var/lib/images/app", "app").read_only(true).mount_at("/app");
/// # let _ = (data, image);
/// ```
#[derive(Debug, Clone)]
pub struct Share {
    host_dir: PathBuf,
    tag: String,
    read_only: bool,
    mount_at: Option<String>,
    ids: IdMap,
    max_open_files: usize,
    xattr: bool,
}

impl Share {
    /// Share `host_dir` under `tag` (1 to 36 of `A-Z a-z 0-9 . _ -`),
    /// writable, not mounted by the agent.
    pub fn new(host_dir: impl Into<PathBuf>, tag: impl Into<String>) -> Self {
        Self {
            host_dir: host_dir.into(),
            tag: tag.into(),
            read_only: false,
            mount_at: None,
            ids: IdMap::default(),
            max_open_files: DEFAULT_MAX_OPEN_FILES,
            xattr: false,
        }
    }

    /// Refuse every change from the guest (`EROFS`); the agent mounts it
    /// read-only as well.
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// Have the agent mount the share at `path` in the guest (an absolute
    /// path without whitespace, commas or `..`; created if missing)
    /// before the first command runs.
    pub fn mount_at(mut self, path: impl Into<String>) -> Self {
        self.mount_at = Some(path.into());
        self
    }

    /// Map `uids.count` guest user ids from `uids.guest` to host ids from
    /// `uids.host`, and the same for groups; ids outside a range are the
    /// overflow id 65534. When the VMM runs as root, every request runs
    /// with the mapped host ids (so host permissions apply); otherwise
    /// with the VMM's own.
    pub fn map_ids(mut self, uids: IdRange, gids: IdRange) -> Self {
        self.ids = IdMap {
            uids: Some(uids),
            gids: Some(gids),
        };
        self
    }

    /// Most host fds the share may hold for the guest (files and
    /// directories it looked up or opened); past it the guest gets
    /// `ENFILE`/`EMFILE`. Default [`DEFAULT_MAX_OPEN_FILES`], and never
    /// more than half the process's `RLIMIT_NOFILE` (a share raises the
    /// soft limit to the hard one when it is set up).
    pub fn max_open_files(mut self, max: usize) -> Self {
        self.max_open_files = max;
        self
    }

    /// Serve extended attributes (off by default).
    pub fn xattr(mut self, xattr: bool) -> Self {
        self.xattr = xattr;
        self
    }

    /// The host directory.
    pub fn host_dir(&self) -> &Path {
        &self.host_dir
    }

    /// The tag.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// Where the agent mounts it, if anywhere.
    pub fn mount_point(&self) -> Option<&str> {
        self.mount_at.as_deref()
    }

    /// Whether the share is read-only.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Check what `build()` can check without touching the host.
    pub(crate) fn validate(&self) -> Result<(), SandboxError> {
        let invalid = |why: String| SandboxError::InvalidShare(format!("{}: {why}", self.tag));
        let tag_ok = !self.tag.is_empty()
            && self.tag.len() <= chitin_fs::TAG_LEN
            && self
                .tag
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !tag_ok {
            return Err(SandboxError::InvalidShare(format!(
                "tag {:?} must be 1 to {} of A-Z a-z 0-9 . _ -",
                self.tag,
                chitin_fs::TAG_LEN
            )));
        }
        if let Some(at) = &self.mount_at {
            let clean = at.starts_with('/')
                && !at.bytes().any(|b| {
                    b.is_ascii_whitespace() || b.is_ascii_control() || b"\",'".contains(&b)
                })
                && !at.split('/').any(|part| part == "..");
            if !clean {
                return Err(invalid(format!(
                    "mount point {at:?} must be an absolute path without whitespace, commas, quotes or .."
                )));
            }
        }
        self.ids
            .validate()
            .map_err(|e| invalid(format!("id mapping: {e}")))?;
        if self.max_open_files == 0 {
            return Err(invalid("max_open_files must be at least 1".into()));
        }
        Ok(())
    }

    pub(crate) fn config(&self, seccomp: Seccomp) -> FsConfig {
        FsConfig {
            root: self.host_dir.clone(),
            tag: self.tag.clone(),
            read_only: self.read_only,
            ids: self.ids,
            max_open_files: self.max_open_files,
            xattr: self.xattr,
            seccomp,
        }
    }

    /// The agent's command-line entry, for a share it mounts.
    pub(crate) fn cmdline_entry(&self) -> Option<String> {
        let at = self.mount_at.as_deref()?;
        let ro = if self.read_only { ",ro" } else { "" };
        Some(format!("{SHARE_KEY}={},{at}{ro}", self.tag))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_entry_names_tag_mount_point_and_mode() {
        let share = Share::new("/srv", "data").mount_at("/mnt/data");
        assert_eq!(
            share.cmdline_entry().as_deref(),
            Some("chitin.share=data,/mnt/data")
        );
        let ro = share.clone().read_only(true);
        assert_eq!(
            ro.cmdline_entry().as_deref(),
            Some("chitin.share=data,/mnt/data,ro")
        );
        assert_eq!(Share::new("/srv", "x").cmdline_entry(), None);
    }

    #[test]
    fn validate_refuses_bad_tags_and_mount_points() {
        for tag in ["", "a b", "a,b", "x=y", &"t".repeat(37)] {
            assert!(Share::new("/srv", tag).validate().is_err(), "{tag:?}");
        }
        for at in ["relative", "/a b", "/a,b", "/a/../b", "/\"q\""] {
            let share = Share::new("/srv", "t").mount_at(at);
            assert!(share.validate().is_err(), "{at:?}");
        }
        let zero = Share::new("/srv", "t").max_open_files(0);
        assert!(zero.validate().is_err());
        assert!(Share::new("/srv", "ok-1.x")
            .mount_at("/mnt/ok")
            .validate()
            .is_ok());
    }
}
