//! What `Stats` reports: the pod VM's cost on the host, as containerd's
//! cgroup v2 metrics.

use std::io;

use chitin::NetStats;
use containerd_shim::protos::cgroups_v2::metrics::{
    CPUStat, MemoryStat, Metrics, NetworkStat, PidsStat,
};

/// The VMM's usage on the host (its cgroup's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostUsage {
    /// Memory charged now, and at most so far (bytes).
    pub rss: u64,
    pub rss_peak: u64,
    /// CPU time in user and kernel mode (µs).
    pub user_usec: u64,
    pub system_usec: u64,
}

/// The usage of the cgroup at `dir` (the VMM's): `memory.current`,
/// `memory.peak` (where the kernel has it, else the current figure) and
/// `cpu.stat`'s times.
pub fn cgroup_usage(dir: &std::path::Path) -> io::Result<HostUsage> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("parsing {what}"));
    let number = |name: &str| -> io::Result<u64> {
        std::fs::read_to_string(dir.join(name))?
            .trim()
            .parse()
            .map_err(|_| bad(name))
    };
    let rss = number("memory.current")?;
    let rss_peak = number("memory.peak").unwrap_or(rss);
    let cpu = std::fs::read_to_string(dir.join("cpu.stat"))?;
    let field = |key: &str| {
        cpu.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
            .ok_or_else(|| bad("cpu.stat"))
    };
    Ok(HostUsage {
        rss,
        rss_peak,
        user_usec: field("user_usec")?,
        system_usec: field("system_usec")?,
    })
}

/// The metrics message: `usage` of a VM with `memory_bytes` of guest
/// memory, `processes` running in the container, the VM's interfaces.
pub fn metrics(usage: &HostUsage, memory_bytes: u64, processes: u64, nets: &[NetStats]) -> Metrics {
    Metrics {
        pids: Some(PidsStat {
            current: processes,
            ..Default::default()
        })
        .into(),
        cpu: Some(CPUStat {
            usage_usec: usage.user_usec + usage.system_usec,
            user_usec: usage.user_usec,
            system_usec: usage.system_usec,
            ..Default::default()
        })
        .into(),
        memory: Some(MemoryStat {
            usage: usage.rss,
            max_usage: usage.rss_peak,
            usage_limit: memory_bytes,
            ..Default::default()
        })
        .into(),
        network: nets
            .iter()
            .enumerate()
            .map(|(i, n)| NetworkStat {
                name: format!("eth{i}"),
                rx_bytes: n.rx_bytes,
                rx_packets: n.rx_frames,
                rx_dropped: n.rx_dropped,
                tx_bytes: n.tx_bytes,
                tx_packets: n.tx_frames,
                tx_dropped: n.tx_backend_drops,
                tx_errors: n.tx_malformed,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cgroups_usage_lands_in_the_metrics() {
        let dir = std::env::temp_dir().join(format!("chitin-stats-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("memory.current"), "1048576\n").unwrap();
        std::fs::write(
            dir.join("cpu.stat"),
            "usage_usec 30\nuser_usec 10\nsystem_usec 20\nnr_periods 0\n",
        )
        .unwrap();
        // No memory.peak (before Linux 5.19): the current figure.
        let usage = cgroup_usage(&dir).unwrap();
        assert_eq!(
            usage,
            HostUsage {
                rss: 1 << 20,
                rss_peak: 1 << 20,
                user_usec: 10,
                system_usec: 20
            }
        );
        std::fs::write(dir.join("memory.peak"), "2097152\n").unwrap();
        assert_eq!(cgroup_usage(&dir).unwrap().rss_peak, 2 << 20);
        let m = metrics(&usage, 256 << 20, 2, &[NetStats::default()]);
        assert_eq!(m.memory.usage, usage.rss);
        assert_eq!(m.memory.usage_limit, 256 << 20);
        assert_eq!(m.pids.current, 2);
        assert_eq!(m.cpu.usage_usec, 30);
        assert_eq!(m.network[0].name, "eth0");
        std::fs::write(dir.join("cpu.stat"), "usage_usec 30\n").unwrap();
        assert!(cgroup_usage(&dir).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
