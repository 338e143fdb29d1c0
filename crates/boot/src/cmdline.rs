//! Building the kernel command line.
//!
//! The user's command line comes first, then the entries the VMM needs (for
//! example `virtio_mmio.device=...`). If the user line carries init arguments
//! after ` -- `, the VMM entries go before the separator so that the kernel,
//! not init, sees them. Validation (printable ASCII, quoting) is
//! linux-loader's; this module only orders the parts and enforces the
//! length limit.

use linux_loader::cmdline::{Cmdline, Error as CmdlineError};

use crate::BootError;

/// Separator between kernel and init arguments (Linux `kernel/params.c`).
const INIT_ARGS_SEPARATOR: &str = " -- ";

/// Build the command line: `user` first (may be empty), then each of
/// `vmm_entries`, separated by single spaces, limited to `max_len` bytes
/// including the terminating NUL (pass
/// [`chitin_memory::layout::CMDLINE_MAX_SIZE`]).
///
/// Blank parts are skipped. Init arguments in `user` (after ` -- `) stay at
/// the end.
///
/// # Errors
///
/// [`BootError::CmdlineTooLong`] when the line (without NUL) is longer than
/// `max_len - 1` bytes; [`BootError::CmdlineInvalid`] when linux-loader
/// rejects a part (non-printable or non-ASCII character, interior NUL).
pub fn build_cmdline(
    user: &str,
    vmm_entries: &[&str],
    max_len: usize,
) -> Result<Cmdline, BootError> {
    let (boot_args, init_args) = split_init_args(user);
    // Assemble once without a limit to validate and measure, so that the
    // error can say how long the line is.
    let unlimited = assemble(boot_args, vmm_entries, init_args, usize::MAX)
        .map_err(BootError::CmdlineInvalid)?;
    let len = unlimited
        .as_cstring()
        .map_err(BootError::CmdlineInvalid)?
        .as_bytes()
        .len();
    let max = max_len.saturating_sub(1);
    if max_len == 0 || len > max {
        return Err(BootError::CmdlineTooLong { len, max });
    }
    assemble(boot_args, vmm_entries, init_args, max_len).map_err(|e| match e {
        CmdlineError::TooLarge | CmdlineError::InvalidCapacity => {
            BootError::CmdlineTooLong { len, max }
        }
        other => BootError::CmdlineInvalid(other),
    })
}

/// Split `user` at the first ` -- ` outside double quotes into kernel and
/// init arguments. A leading or trailing `--` counts as a separator too.
fn split_init_args(user: &str) -> (&str, &str) {
    let trimmed = user.trim();
    // Search " {trimmed} " so that a leading "-- x" or trailing "x --" is
    // found like an inner separator. `padded[i + 1] == trimmed[i]`, and the
    // separator is ASCII, so every index below is a char boundary.
    let padded = format!(" {trimmed} ");
    let found = padded
        .match_indices(INIT_ARGS_SEPARATOR)
        .map(|(idx, _)| idx)
        .find(|&idx| padded[..idx].matches('"').count() % 2 == 0);
    let Some(idx) = found else {
        return (trimmed, "");
    };
    let boot_end = idx.saturating_sub(1).min(trimmed.len());
    let init_start = (idx + INIT_ARGS_SEPARATOR.len() - 1).min(trimmed.len());
    (trimmed[..boot_end].trim(), trimmed[init_start..].trim())
}

fn assemble(
    boot_args: &str,
    vmm_entries: &[&str],
    init_args: &str,
    capacity: usize,
) -> Result<Cmdline, CmdlineError> {
    let mut cmdline = Cmdline::new(capacity)?;
    for part in std::iter::once(&boot_args).chain(vmm_entries) {
        if !part.trim().is_empty() {
            cmdline.insert_str(part)?;
        }
    }
    if !init_args.is_empty() {
        cmdline.insert_init_args(init_args)?;
    }
    Ok(cmdline)
}

#[cfg(test)]
mod tests {
    use chitin_memory::layout::CMDLINE_MAX_SIZE;

    use super::*;

    fn text(cmdline: &Cmdline) -> String {
        cmdline.as_cstring().unwrap().into_string().unwrap()
    }

    #[test]
    fn build_cmdline_user_and_entries_joined_with_spaces() {
        let cmdline = build_cmdline(
            "console=ttyS0 quiet",
            &["reboot=k", "virtio_mmio.device=4K@0xd0000000:5"],
            CMDLINE_MAX_SIZE,
        )
        .unwrap();
        assert_eq!(
            text(&cmdline),
            "console=ttyS0 quiet reboot=k virtio_mmio.device=4K@0xd0000000:5"
        );
    }

    #[test]
    fn build_cmdline_empty_user_gives_entries_only() {
        let cmdline = build_cmdline("", &["reboot=k", "panic=1"], CMDLINE_MAX_SIZE).unwrap();
        assert_eq!(text(&cmdline), "reboot=k panic=1");
    }

    #[test]
    fn build_cmdline_blank_parts_are_skipped() {
        let cmdline = build_cmdline("  ", &["", "panic=1", " "], CMDLINE_MAX_SIZE).unwrap();
        assert_eq!(text(&cmdline), "panic=1");
    }

    #[test]
    fn build_cmdline_nothing_gives_empty_line() {
        let cmdline = build_cmdline("", &[], CMDLINE_MAX_SIZE).unwrap();
        assert_eq!(text(&cmdline), "");
    }

    #[test]
    fn build_cmdline_init_args_stay_after_vmm_entries() {
        let cmdline =
            build_cmdline("console=ttyS0 -- --single", &["panic=1"], CMDLINE_MAX_SIZE).unwrap();
        assert_eq!(text(&cmdline), "console=ttyS0 panic=1 -- --single");
    }

    #[test]
    fn build_cmdline_leading_separator_moves_all_to_init() {
        let cmdline = build_cmdline("-- single", &["panic=1"], CMDLINE_MAX_SIZE).unwrap();
        assert_eq!(text(&cmdline), "panic=1 -- single");
    }

    #[test]
    fn build_cmdline_quoted_separator_is_not_split() {
        let cmdline = build_cmdline("a=\"x -- y\"", &["panic=1"], CMDLINE_MAX_SIZE).unwrap();
        assert_eq!(text(&cmdline), "a=\"x -- y\" panic=1");
    }

    #[test]
    fn build_cmdline_max_minus_one_bytes_is_accepted() {
        // A line of exactly max_len - 1 bytes leaves room for the NUL.
        let user = "a".repeat(CMDLINE_MAX_SIZE - 1);
        let cmdline = build_cmdline(&user, &[], CMDLINE_MAX_SIZE).unwrap();
        assert_eq!(text(&cmdline).len(), CMDLINE_MAX_SIZE - 1);
    }

    #[test]
    fn build_cmdline_max_bytes_is_too_long() {
        let user = "a".repeat(CMDLINE_MAX_SIZE);
        let err = build_cmdline(&user, &[], CMDLINE_MAX_SIZE).unwrap_err();
        assert!(matches!(
            err,
            BootError::CmdlineTooLong { len, max }
                if len == CMDLINE_MAX_SIZE && max == CMDLINE_MAX_SIZE - 1
        ));
    }

    #[test]
    fn build_cmdline_entries_push_over_limit_is_too_long() {
        // 10 bytes of user line + space + 10 bytes of entry = 21 > 20 - 1.
        let err = build_cmdline("aaaaaaaaaa", &["bbbbbbbbbb"], 20).unwrap_err();
        assert!(matches!(
            err,
            BootError::CmdlineTooLong { len: 21, max: 19 }
        ));
    }

    #[test]
    fn build_cmdline_zero_max_is_too_long() {
        let err = build_cmdline("", &[], 0).unwrap_err();
        assert!(matches!(err, BootError::CmdlineTooLong { len: 0, max: 0 }));
    }

    #[test]
    fn build_cmdline_interior_nul_is_invalid() {
        let err = build_cmdline("console=ttyS0\0evil", &[], CMDLINE_MAX_SIZE).unwrap_err();
        assert!(matches!(err, BootError::CmdlineInvalid(_)));
    }

    #[test]
    fn build_cmdline_non_printable_entry_is_invalid() {
        let err = build_cmdline("quiet", &["a=\x07"], CMDLINE_MAX_SIZE).unwrap_err();
        assert!(matches!(err, BootError::CmdlineInvalid(_)));
    }

    #[test]
    fn build_cmdline_limit_is_kept_for_later_inserts() {
        // The returned line carries the limit: a later insert cannot grow it
        // past max_len - 1 bytes (here 9).
        let mut cmdline = build_cmdline("12345", &[], 10).unwrap();
        assert!(cmdline.insert_str("6789").is_err());
    }
}
