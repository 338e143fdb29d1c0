//! `--jail` for the examples: confine the process with chitin-jail before
//! the sandbox is built (one sandbox per process, as a containerd shim or
//! a CLI runs it).

use std::path::PathBuf;

use chitin_jail::{CgroupLimits, Jail};

/// The examples' jail options.
#[derive(clap::Args, Debug)]
pub struct JailArgs {
    /// Confine this process before the sandbox is built: new namespaces, a
    /// root holding only what the sandbox needs, no capabilities,
    /// `--jail-uid`/`--jail-gid` (run as root; see docs/security.md).
    #[arg(long)]
    pub jail: bool,
    /// The jailed uid.
    #[arg(long, default_value_t = 65534)]
    pub jail_uid: u32,
    /// The jailed gid.
    #[arg(long, default_value_t = 65534)]
    pub jail_gid: u32,
    /// cgroup v2 memory.max of the jail, MiB.
    #[arg(long)]
    pub jail_mem_mib: Option<u64>,
    /// cgroup v2 cpu.max of the jail, percent of one CPU.
    #[arg(long)]
    pub jail_cpu_percent: Option<u64>,
    /// cgroup v2 pids.max of the jail.
    #[arg(long)]
    pub jail_pids: Option<u64>,
}

impl JailArgs {
    /// Enter the jail (if `--jail`), exposing `read_only` files, the
    /// `writable` ones and `/dev/kvm`. Returns in the jailed process only;
    /// the calling process waits for it and exits as it does.
    pub fn enter(&self, read_only: &[PathBuf], writable: &[PathBuf]) -> Result<(), String> {
        if !self.jail {
            return Ok(());
        }
        let mut jail = Jail::new(format!("example-{}", std::process::id()))
            .ids(self.jail_uid, self.jail_gid)
            .device("/dev/kvm")
            .keep_env("RUST_LOG")
            .keep_env("CHITIN_SECCOMP");
        for path in read_only {
            jail = jail.read_only(path);
        }
        for path in writable {
            jail = jail.writable(path);
        }
        let limits = CgroupLimits {
            memory_max: self.jail_mem_mib.map(|m| m << 20),
            cpu_max: self.jail_cpu_percent.map(|p| (p * 1000, 100_000)),
            pids_max: self.jail_pids,
        };
        if limits != CgroupLimits::default() {
            jail = jail.cgroup(limits);
        }
        let jailed = jail.enter().map_err(|e| chitin::error_chain(&e))?;
        eprintln!(
            "chitin: jailed as uid {} gid {} ({:?})",
            jailed.ids().0,
            jailed.ids().1,
            jailed.root_switch()
        );
        Ok(())
    }
}
