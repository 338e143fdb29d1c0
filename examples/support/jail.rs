//! `--jail` for the examples: confine the process with chitin's jail
//! before the sandbox is built (one sandbox per process, as a containerd
//! shim or a CLI runs it).

use chitin::jail::CgroupLimits;
use chitin::SandboxBuilder;

/// The examples' jail options.
#[derive(clap::Args, Debug)]
pub struct JailArgs {
    /// Confine this process before the sandbox is built: new namespaces, a
    /// root holding only the sandbox's files, no capabilities,
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
    /// Enter the jail `builder` needs (if `--jail`). Returns in the jailed
    /// process only; the calling process waits for it and exits as it
    /// does.
    pub fn enter(&self, builder: &SandboxBuilder) -> Result<(), String> {
        if !self.jail {
            return Ok(());
        }
        let mut jail = builder
            .jail(format!("example-{}", std::process::id()))
            .ids(self.jail_uid, self.jail_gid)
            .keep_env("RUST_LOG")
            .keep_env("CHITIN_SECCOMP");
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
