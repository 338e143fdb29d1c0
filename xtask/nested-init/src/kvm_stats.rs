//! L1 KVM's exit counters of the VMs a process holds (debugfs
//! `kvm/<tid>-<fd>/`, summed over their vCPUs): counts that, unlike wall
//! time, do not depend on how busy the emulating host is. Shared by L1's
//! init (`nested: exits` at each run's marker) and the exec checks (exits
//! per exec and per 4 MiB over vsock).

/// The counters, as (label, debugfs file).
pub const EXIT_STATS: &[(&str, &str)] = &[
    ("total", "exits"),
    ("io", "io_exits"),
    ("mmio", "mmio_exits"),
    ("hlt", "halt_exits"),
    ("irq_window", "irq_window_exits"),
    ("irq", "irq_exits"),
    ("emulated", "insn_emulation"),
    ("hypercalls", "hypercalls"),
];

/// Where L1's KVM keeps a directory of statistics per VM.
const KVM_DEBUGFS: &str = "/sys/kernel/debug/kvm";

/// Whether this process sees L1 KVM's statistics at all (a jailed
/// process, in a mount namespace of its own, does not).
pub fn visible() -> bool {
    std::path::Path::new(KVM_DEBUGFS).is_dir()
}

/// Each counter summed over the VMs process `pid` holds (directories
/// named after the thread that created the VM: any of the process's
/// threads), or `None` when it holds none (or debugfs is missing).
pub fn exit_counts(pid: u32) -> Option<Vec<(&'static str, u64)>> {
    let mut prefixes = vec![format!("{pid}-")];
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        prefixes.extend(
            tasks
                .filter_map(Result::ok)
                .map(|t| format!("{}-", t.file_name().to_string_lossy())),
        );
    }
    let mut vms: Vec<std::path::PathBuf> = std::fs::read_dir(KVM_DEBUGFS)
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            prefixes.iter().any(|p| name.starts_with(p.as_str()))
        })
        .map(|e| e.path())
        .collect();
    vms.sort();
    vms.dedup();
    if vms.is_empty() {
        return None;
    }
    Some(
        EXIT_STATS
            .iter()
            .map(|(label, file)| {
                let sum = vms
                    .iter()
                    .filter_map(|vm| std::fs::read_to_string(vm.join(file)).ok())
                    .filter_map(|text| text.trim().parse::<u64>().ok())
                    .sum();
                (*label, sum)
            })
            .collect(),
    )
}

/// `total=<n> io=<n> ...`.
pub fn format(counts: &[(&str, u64)]) -> String {
    counts
        .iter()
        .map(|(label, n)| format!("{label}={n}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// What each counter grew by from `before` to `after`, divided by `per`
/// (at least 1), as `total=<n> ...`.
pub fn growth(before: &[(&str, u64)], after: &[(&str, u64)], per: u64) -> String {
    let grown: Vec<(&str, u64)> = after
        .iter()
        .map(|(label, a)| {
            let b = before
                .iter()
                .find(|(l, _)| l == label)
                .map_or(0, |(_, b)| *b);
            (*label, a.saturating_sub(b) / per.max(1))
        })
        .collect();
    format(&grown)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn growth_is_per_unit_and_never_negative() {
        let before = [("total", 100), ("io", 10)];
        let after = [("total", 300), ("io", 8), ("mmio", 40)];
        assert_eq!(growth(&before, &after, 20), "total=10 io=0 mmio=2");
        assert_eq!(growth(&before, &after, 0), "total=200 io=0 mmio=40");
        assert_eq!(format(&[("total", 1), ("hlt", 0)]), "total=1 hlt=0");
    }

    #[test]
    fn a_process_without_a_vm_has_no_counts() {
        // This test process holds no VM (and CI has no debugfs mounted
        // for it either way).
        assert_eq!(exit_counts(std::process::id()), None);
    }
}
