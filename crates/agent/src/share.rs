//! Shared folders the VMM asks the agent to mount.
//!
//! The VMM writes one `chitin.share=<tag>,<mount point>[,ro]` entry per
//! share it wants mounted; the agent creates the mount point and mounts
//! the share there as `virtiofs` with `nodev` and `nosuid` (and `ro` when
//! asked) before it serves the first command.

use crate::cmdline::KernelCmdline;
use crate::init::mount;

/// The command-line key.
pub const SHARE_KEY: &str = "chitin.share";

/// One share to mount.
#[derive(Debug, PartialEq, Eq)]
pub struct ShareMount {
    /// The virtio-fs tag.
    pub tag: String,
    /// Where it goes.
    pub at: String,
    /// Mount read-only.
    pub read_only: bool,
}

impl ShareMount {
    /// Parse one entry's value.
    pub fn parse(value: &str) -> Result<Self, String> {
        let mut parts = value.split(',');
        let (Some(tag), Some(at)) = (parts.next(), parts.next()) else {
            return Err(format!(
                "{SHARE_KEY}={value}: expected <tag>,<mount point>[,ro]"
            ));
        };
        let read_only = match parts.next() {
            None => false,
            Some("ro") => true,
            Some(other) => return Err(format!("{SHARE_KEY}={value}: unknown option {other:?}")),
        };
        if parts.next().is_some() || tag.is_empty() || !at.starts_with('/') {
            return Err(format!(
                "{SHARE_KEY}={value}: expected <tag>,<mount point>[,ro]"
            ));
        }
        Ok(Self {
            tag: tag.to_string(),
            at: at.to_string(),
            read_only,
        })
    }
}

/// Mount every share the command line names; one line per share saying
/// what was done or what failed.
pub fn mount_all(cmdline: &KernelCmdline) -> Vec<Result<String, String>> {
    cmdline
        .get_all(SHARE_KEY)
        .map(|value| {
            let share = ShareMount::parse(value)?;
            let mut flags = libc::MS_NODEV | libc::MS_NOSUID;
            if share.read_only {
                flags |= libc::MS_RDONLY;
            }
            mount(&share.tag, &share.at, "virtiofs", flags)
                .map_err(|e| format!("share {} at {}: {e}", share.tag, share.at))?;
            let mode = if share.read_only { " (read-only)" } else { "" };
            Ok(format!("share {} at {}{mode}", share.tag, share.at))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_reads_tag_mount_point_and_mode() {
        assert_eq!(
            ShareMount::parse("data,/mnt/data").unwrap(),
            ShareMount {
                tag: "data".into(),
                at: "/mnt/data".into(),
                read_only: false
            }
        );
        assert!(ShareMount::parse("data,/mnt/data,ro").unwrap().read_only);
        for bad in ["data", "data,relative", ",/x", "d,/x,rw", "d,/x,ro,extra"] {
            assert!(ShareMount::parse(bad).is_err(), "{bad}");
        }
    }
}
