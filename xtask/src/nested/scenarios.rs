//! The scenarios of the nested tier: what runs in L1, on which L2 kernel,
//! and which judge reads its log.

use super::report::{
    judge_blk, judge_checks, judge_console, judge_discard, judge_host_checks, judge_integrity,
    judge_jailed_boot, judge_panic, Run,
};
use crate::disks::Disks;
use crate::guest::KernelVersion;

/// L2 command line shared by every chitin scenario: console on COM1, reset
/// through the i8042 on reboot, reboot at once on panic, quiet boot.
const L2_BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 quiet";
/// The agent's "up" line: VMM start → this line is the boot figure.
pub use chitin_testkit::UP_MARKER;

/// Which L2 kernel a scenario boots, and in which format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct L2Kernel {
    /// The kernel version.
    pub version: KernelVersion,
    /// Boot the bzImage instead of the ELF vmlinux.
    pub bzimage: bool,
}

/// The default guest: Linux 6.1 as ELF vmlinux.
pub const KERNEL_6_1: L2Kernel = L2Kernel {
    version: KernelVersion::V6_1,
    bzimage: false,
};

/// The second guest kernel: Linux 6.12, booted as bzImage so that both
/// formats run in every nested run.
pub const KERNEL_6_12: L2Kernel = L2Kernel {
    version: KernelVersion::V6_12,
    bzimage: true,
};

impl L2Kernel {
    /// The image's path inside L1.
    pub fn l1_path(self) -> String {
        format!("{}/{}", self.l1_dir(), self.file_name())
    }

    /// The directory inside L1 holding this version's image, with an
    /// `initramfs.cpio` next to it.
    pub fn l1_dir(self) -> String {
        format!("/l2/{}", self.version.name())
    }

    /// `vmlinux` or `bzImage`.
    pub fn file_name(self) -> &'static str {
        if self.bzimage {
            "bzImage"
        } else {
            "vmlinux"
        }
    }

    /// `6.1 ELF`, `6.12 bzImage`: the table's kernel column.
    pub fn label(self) -> String {
        let format = if self.bzimage { "bzImage" } else { "ELF" };
        format!("{} {format}", self.version.name())
    }
}

/// A scenario: how to run it and how to judge it.
pub struct Scenario {
    /// The row name (6.12 rows end in `-6.12`).
    pub name: &'static str,
    /// What the guest agent runs (`chitin.scenario=`).
    pub agent: &'static str,
    /// The L2 kernel.
    pub kernel: L2Kernel,
    pub vcpus: u32,
    pub mem_mib: u32,
    pub timeout_s: u32,
    /// Run the peer (QEMU microvm) instead of chitin.
    pub peer: bool,
    /// Run `chitin-exec-checks <this>` in L1 (host-side checks through the
    /// library, against the agent guest) instead of the `boot` example.
    pub host_checks: Option<&'static str>,
    /// chitin `--disk` values, in L2 order; `@serial` stands for the L1
    /// block device of that image (see [`crate::disks`]).
    pub disks: &'static [&'static str],
    /// Run the `boot` example jailed (`--jail` as uid/gid 1000).
    pub jail: bool,
    pub judge: fn(&Run, &Disks) -> Result<String, String>,
}

const BOOT: Scenario = Scenario {
    name: "boot",
    agent: "boot",
    kernel: KERNEL_6_1,
    vcpus: 2,
    mem_mib: 256,
    timeout_s: 60,
    peer: false,
    host_checks: None,
    disks: &[],
    jail: false,
    judge: judge_checks,
};

const SMP4: Scenario = Scenario {
    name: "smp4",
    agent: "smp4",
    vcpus: 4,
    timeout_s: 90,
    ..BOOT
};

const BLK_INTEGRITY: Scenario = Scenario {
    name: "blk-integrity",
    agent: "blk-integrity",
    vcpus: 1,
    mem_mib: 192,
    timeout_s: 240,
    disks: &["@ro,ro", "@integrity"],
    judge: judge_integrity,
    ..BOOT
};

const EXEC: Scenario = Scenario {
    name: "exec",
    agent: "exec",
    timeout_s: 180,
    host_checks: Some("exec"),
    judge: judge_host_checks,
    ..BOOT
};

const VSOCK: Scenario = Scenario {
    name: "vsock",
    agent: "vsock",
    host_checks: Some("vsock"),
    ..EXEC
};

/// virtio-net over a tap in a network namespace inside L1: ping, TCP
/// streams each way, concurrent connections, a UDP flood.
const NET: Scenario = Scenario {
    name: "net",
    agent: "net",
    timeout_s: 900,
    host_checks: Some("net"),
    ..EXEC
};

/// virtio-fs: shares of directories made in L1, each scenario with
/// sandboxes of its own (host checks through the library).
const FS: Scenario = Scenario {
    name: "fs",
    agent: "fs",
    timeout_s: 600,
    host_checks: Some("fs"),
    ..EXEC
};

/// A small 1-vCPU scenario judged by the agent's own checks.
const SMALL: Scenario = Scenario {
    vcpus: 1,
    mem_mib: 128,
    ..BOOT
};

pub const SCENARIOS: &[Scenario] = &[
    BOOT,
    Scenario {
        name: "boot-qemu",
        peer: true,
        ..BOOT
    },
    // The boot figure with the VMM jailed as well as filtered.
    Scenario {
        name: "boot-jail",
        jail: true,
        judge: judge_jailed_boot,
        ..BOOT
    },
    Scenario {
        name: "reset",
        agent: "reset",
        ..SMALL
    },
    Scenario {
        name: "panic",
        agent: "panic",
        judge: judge_panic,
        ..SMALL
    },
    Scenario {
        name: "console",
        agent: "console",
        timeout_s: 240,
        judge: judge_console,
        ..SMALL
    },
    SMP4,
    Scenario {
        name: "blk",
        agent: "blk",
        disks: &["@blk"],
        judge: judge_blk,
        ..SMALL
    },
    Scenario {
        name: "blk-ro",
        agent: "blk-ro",
        disks: &["@ro,ro"],
        ..SMALL
    },
    BLK_INTEGRITY,
    Scenario {
        name: "blk-discard",
        agent: "blk-discard",
        disks: &["@discard"],
        judge: judge_discard,
        ..SMALL
    },
    EXEC,
    VSOCK,
    NET,
    Scenario {
        name: "net-offload",
        agent: "net-offload",
        timeout_s: 600,
        host_checks: Some("net-offload"),
        ..NET
    },
    Scenario {
        name: "net-limit",
        agent: "net-limit",
        timeout_s: 300,
        host_checks: Some("net-limit"),
        ..NET
    },
    Scenario {
        name: "net-reset",
        agent: "net-reset",
        timeout_s: 420,
        host_checks: Some("net-reset"),
        ..NET
    },
    FS,
    Scenario {
        name: "fs-escape",
        agent: "fs-escape",
        timeout_s: 300,
        host_checks: Some("fs-escape"),
        ..FS
    },
    Scenario {
        name: "fs-ro",
        agent: "fs-ro",
        timeout_s: 300,
        host_checks: Some("fs-ro"),
        ..FS
    },
    Scenario {
        name: "fs-bench",
        agent: "fs-bench",
        timeout_s: 600,
        host_checks: Some("fs-bench"),
        ..FS
    },
    Scenario {
        name: "container",
        agent: "container",
        timeout_s: 300,
        host_checks: Some("container"),
        ..FS
    },
    // The exec, vsock, blk, fs and net checks in a VMM confined by
    // chitin-jail as uid 1000 with cgroup limits.
    Scenario {
        name: "jail",
        agent: "jail",
        timeout_s: 600,
        host_checks: Some("jail"),
        ..FS
    },
    // The same checks on the second kernel, in the same L1 run.
    Scenario {
        name: "boot-6.12",
        kernel: KERNEL_6_12,
        ..BOOT
    },
    Scenario {
        name: "smp4-6.12",
        kernel: KERNEL_6_12,
        ..SMP4
    },
    Scenario {
        name: "blk-integrity-6.12",
        kernel: KERNEL_6_12,
        // Its own image, so the host's check cannot pass on what the 6.1
        // run wrote.
        disks: &["@ro,ro", "@integrity-6.12"],
        ..BLK_INTEGRITY
    },
    Scenario {
        name: "exec-6.12",
        kernel: KERNEL_6_12,
        ..EXEC
    },
    Scenario {
        name: "vsock-6.12",
        kernel: KERNEL_6_12,
        ..VSOCK
    },
];

/// Runs of `boot` and `boot-qemu`, interleaved, whose median is reported:
/// one run each would let noise or order decide the comparison.
pub const BOOT_REPEATS: usize = 3;

/// The warm-up run: the first VMM started in a fresh L1 pays a one-time
/// cost (the first nested VM entry under TCG is slow: its page tables and
/// translated code are cold), which must not land on a measured scenario.
pub const WARMUP: Scenario = Scenario {
    name: "warm-up",
    agent: "reset",
    ..SMALL
};

/// The L2 command line of a scenario.
pub fn l2_cmdline(s: &Scenario) -> String {
    let reboot = if s.peer {
        // QEMU's microvm has no i8042: stop through a triple fault.
        "console=ttyS0 reboot=t panic=-1 quiet"
    } else {
        L2_BASE_CMDLINE
    };
    // CHITIN_NESTED_EXTRA_CMDLINE adds entries for debugging a run, e.g.
    // `loglevel=8 printk.time=1` to see where boot time goes.
    let extra = std::env::var("CHITIN_NESTED_EXTRA_CMDLINE").unwrap_or_default();
    format!(
        "{reboot} chitin.scenario={} chitin.expect_cpus={} chitin.expect_mem_mib={} {extra}",
        s.agent, s.vcpus, s.mem_mib
    )
    .trim_end()
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenario_names_are_unique() {
        let mut names: Vec<&str> = SCENARIOS.iter().map(|s| s.name).collect();
        names.sort_unstable();
        let before = names.len();
        names.dedup();
        assert_eq!(names.len(), before);
    }

    #[test]
    fn second_kernel_rows_run_the_same_agent_scenario() {
        let find = |name: &str| SCENARIOS.iter().find(|s| s.name == name).unwrap();
        for base in ["boot", "smp4", "blk-integrity", "exec", "vsock"] {
            let new = find(&format!("{base}-6.12"));
            let old = find(base);
            assert_eq!(new.agent, old.agent);
            assert_eq!(new.kernel, KERNEL_6_12);
            assert_eq!(old.kernel, KERNEL_6_1);
            assert_eq!(new.host_checks, old.host_checks);
        }
    }

    #[test]
    fn one_kernel_boots_as_bzimage() {
        assert!(SCENARIOS.iter().any(|s| s.kernel.bzimage));
        assert!(SCENARIOS.iter().any(|s| !s.kernel.bzimage));
        assert_eq!(KERNEL_6_12.l1_path(), "/l2/6.12/bzImage");
        assert_eq!(KERNEL_6_1.l1_path(), "/l2/6.1/vmlinux");
    }
}
