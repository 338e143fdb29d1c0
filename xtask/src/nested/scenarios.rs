//! The scenarios of the nested tier: what runs in L1, on which L2 kernel,
//! and which judge reads its log.

use super::report::{
    judge_blk, judge_checks, judge_console, judge_discard, judge_host_checks, judge_integrity,
    judge_jailed_boot, judge_l1_checks, judge_panic, Run,
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
    /// Debian's cloud kernel as shipped (drivers as modules, found through
    /// ACPI) instead of the minimal kernel built from source.
    pub debian: bool,
}

/// The default guest: Linux 6.1 as ELF vmlinux.
pub const KERNEL_6_1: L2Kernel = L2Kernel {
    version: KernelVersion::V6_1,
    bzimage: false,
    debian: false,
};

/// The second guest kernel: Linux 6.12, booted as bzImage so that both
/// formats run in every nested run.
pub const KERNEL_6_12: L2Kernel = L2Kernel {
    version: KernelVersion::V6_12,
    bzimage: true,
    debian: false,
};

/// Debian 12's cloud kernel (6.1) as its package ships it: a bzImage, its
/// virtio drivers loaded from the initramfs by the agent.
pub const KERNEL_DEBIAN: L2Kernel = L2Kernel {
    version: KernelVersion::V6_1,
    bzimage: true,
    debian: true,
};

impl L2Kernel {
    /// The image's path inside L1.
    pub fn l1_path(self) -> String {
        format!("{}/{}", self.l1_dir(), self.file_name())
    }

    /// The directory inside L1 holding this kernel's image, with its
    /// `initramfs.cpio` next to it.
    pub fn l1_dir(self) -> String {
        if self.debian {
            "/l2/debian".to_string()
        } else {
            format!("/l2/{}", self.version.name())
        }
    }

    /// The initramfs this kernel boots with, inside L1.
    pub fn l1_initramfs(self) -> String {
        format!("{}/initramfs.cpio", self.l1_dir())
    }

    /// `vmlinux` or `bzImage`.
    pub fn file_name(self) -> &'static str {
        if self.bzimage {
            "bzImage"
        } else {
            "vmlinux"
        }
    }

    /// `6.1 ELF`, `6.12 bzImage`, `debian 6.1`: the table's kernel column.
    pub fn label(self) -> String {
        if self.debian {
            return format!("debian {}", self.version.name());
        }
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
    /// A machine without ACPI tables (chitin `--no-acpi`, QEMU
    /// `acpi=off`), and `acpi=off` on the L2 command line.
    pub no_acpi: bool,
    /// A boot-time row: run [`BOOT_REPEATS`] times, interleaved with the
    /// other timed rows, and reported by its median.
    pub timed: bool,
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
    no_acpi: false,
    timed: false,
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

/// A boot-time row.
const TIMED: Scenario = Scenario {
    timed: true,
    ..BOOT
};

pub const SCENARIOS: &[Scenario] = &[
    TIMED,
    // The peer, QEMU's microvm machine, with and without ACPI; and
    // chitin's machine without ACPI (MP table, devices on the command
    // line).
    Scenario {
        name: "boot-qemu",
        peer: true,
        no_acpi: true,
        ..TIMED
    },
    Scenario {
        name: "boot-qemu-acpi",
        peer: true,
        ..TIMED
    },
    Scenario {
        name: "boot-acpi-off",
        no_acpi: true,
        ..TIMED
    },
    Scenario {
        name: "blk-ro-acpi-off",
        agent: "blk-ro",
        disks: &["@ro,ro"],
        no_acpi: true,
        ..SMALL
    },
    // Debian's cloud kernel, unmodified, finding everything through ACPI.
    Scenario {
        name: "boot-debian",
        kernel: KERNEL_DEBIAN,
        ..TIMED
    },
    Scenario {
        name: "boot-qemu-debian",
        kernel: KERNEL_DEBIAN,
        peer: true,
        ..TIMED
    },
    Scenario {
        name: "smp4-debian",
        kernel: KERNEL_DEBIAN,
        ..SMP4
    },
    Scenario {
        name: "reset-debian",
        agent: "reset",
        kernel: KERNEL_DEBIAN,
        ..SMALL
    },
    Scenario {
        name: "panic-debian",
        agent: "panic",
        kernel: KERNEL_DEBIAN,
        judge: judge_panic,
        ..SMALL
    },
    Scenario {
        name: "blk-debian",
        agent: "blk",
        kernel: KERNEL_DEBIAN,
        disks: &["@blk-debian"],
        judge: judge_blk,
        ..SMALL
    },
    Scenario {
        name: "blk-ro-debian",
        agent: "blk-ro",
        kernel: KERNEL_DEBIAN,
        disks: &["@ro,ro"],
        ..SMALL
    },
    Scenario {
        name: "blk-integrity-debian",
        kernel: KERNEL_DEBIAN,
        disks: &["@ro,ro", "@integrity-debian"],
        ..BLK_INTEGRITY
    },
    Scenario {
        name: "blk-discard-debian",
        agent: "blk-discard",
        kernel: KERNEL_DEBIAN,
        disks: &["@discard-debian"],
        judge: judge_discard,
        ..SMALL
    },
    Scenario {
        name: "exec-debian",
        kernel: KERNEL_DEBIAN,
        ..EXEC
    },
    Scenario {
        name: "vsock-debian",
        kernel: KERNEL_DEBIAN,
        ..VSOCK
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
    // Pause, snapshot, and two clones restored at once (sandboxes of its
    // own, host checks through the library).
    Scenario {
        name: "snapshot",
        agent: "snapshot",
        timeout_s: 600,
        host_checks: Some("snapshot"),
        ..EXEC
    },
    // Debian's containerd in L1 running busybox containers with chitin's
    // shim (a VM each) and, side by side, its own runc shim; a detached
    // container takes exec, ps and kill.
    Scenario {
        name: "shim-ctr",
        agent: "shim-ctr",
        timeout_s: 900,
        host_checks: Some("shim-ctr"),
        judge: judge_l1_checks,
        ..EXEC
    },
    // containerd's CRI plugin running pods with chitin's shim (runtime
    // handler `chitin`), driven over the CRI socket as the kubelet does;
    // pod start side by side with runc.
    Scenario {
        name: "shim-cri",
        agent: "shim-cri",
        timeout_s: 900,
        host_checks: Some("shim-cri"),
        judge: judge_l1_checks,
        ..EXEC
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

/// Runs of each timed row (chitin's boots and their QEMU peers),
/// interleaved round by round, whose median is reported: one run each
/// would let noise or order decide the comparison.
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
    let acpi = if s.no_acpi { " acpi=off" } else { "" };
    // CHITIN_NESTED_EXTRA_CMDLINE adds entries for debugging a run, e.g.
    // `loglevel=8 printk.time=1` to see where boot time goes.
    let extra = std::env::var("CHITIN_NESTED_EXTRA_CMDLINE").unwrap_or_default();
    format!(
        "{reboot}{acpi} chitin.scenario={} chitin.expect_cpus={} chitin.expect_mem_mib={} {extra}",
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

    /// The scenarios that also run on Debian's cloud kernel, rows suffixed
    /// `-debian`.
    const DEBIAN_ROWS: &[&str] = &[
        "boot",
        "smp4",
        "reset",
        "panic",
        "blk",
        "blk-ro",
        "blk-integrity",
        "blk-discard",
        "exec",
        "vsock",
    ];

    #[test]
    fn debian_rows_run_the_same_scenario_on_the_debian_kernel() {
        let find = |name: &str| SCENARIOS.iter().find(|s| s.name == name).unwrap();
        for base in DEBIAN_ROWS {
            let new = find(&format!("{base}-debian"));
            let old = find(base);
            assert_eq!(new.agent, old.agent, "{base}");
            assert_eq!(new.kernel, KERNEL_DEBIAN, "{base}");
            assert_eq!(new.host_checks, old.host_checks, "{base}");
            assert_eq!((new.vcpus, new.mem_mib), (old.vcpus, old.mem_mib), "{base}");
            assert!(!new.no_acpi && !old.no_acpi, "{base}");
        }
        assert_eq!(KERNEL_DEBIAN.l1_initramfs(), "/l2/debian/initramfs.cpio");
    }

    #[test]
    fn only_boot_rows_are_timed_and_one_row_proves_the_mp_table_path() {
        for s in SCENARIOS {
            assert_eq!(
                s.timed,
                s.name.starts_with("boot") && s.name != "boot-jail" && !s.name.contains("6.12"),
                "{}",
                s.name
            );
        }
        assert!(SCENARIOS
            .iter()
            .any(|s| s.no_acpi && !s.peer && s.disks.is_empty()));
        assert!(SCENARIOS
            .iter()
            .any(|s| s.no_acpi && !s.peer && !s.disks.is_empty()));
        assert!(l2_cmdline(
            SCENARIOS
                .iter()
                .find(|s| s.name == "boot-acpi-off")
                .unwrap()
        )
        .contains(" acpi=off "));
        assert!(!l2_cmdline(&BOOT).contains("acpi=off"));
    }

    #[test]
    fn one_kernel_boots_as_bzimage() {
        assert!(SCENARIOS.iter().any(|s| s.kernel.bzimage));
        assert!(SCENARIOS.iter().any(|s| !s.kernel.bzimage));
        assert_eq!(KERNEL_6_12.l1_path(), "/l2/6.12/bzImage");
        assert_eq!(KERNEL_6_1.l1_path(), "/l2/6.1/vmlinux");
    }
}
