//! What `Stats` reports: the pod VM's cost on the host, as containerd's
//! cgroup v2 metrics.

use std::io;

use chitin::NetStats;
use containerd_shim::protos::cgroups_v2::metrics::{
    CPUStat, MemoryStat, Metrics, NetworkStat, PidsStat,
};

/// The shim process's (the VM's) usage on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostUsage {
    /// Resident memory now, and at most so far (bytes).
    pub rss: u64,
    pub rss_peak: u64,
    /// CPU time in user and kernel mode (µs).
    pub user_usec: u64,
    pub system_usec: u64,
}

/// `VmRSS` and `VmHWM` from `/proc/self/status`'s text, in bytes.
fn memory(status: &str) -> Option<(u64, u64)> {
    let kib = |key: &str| {
        status.lines().find_map(|l| {
            let rest = l.strip_prefix(key)?;
            rest.trim().strip_suffix("kB")?.trim().parse::<u64>().ok()
        })
    };
    Some((kib("VmRSS:")? << 10, kib("VmHWM:")? << 10))
}

/// `utime` and `stime` (clock ticks) from `/proc/self/stat`'s text.
fn cpu_ticks(stat: &str) -> Option<(u64, u64)> {
    // After `pid (comm) `, which may hold spaces: state is field 3, utime
    // field 14, stime field 15.
    let rest = stat.rsplit_once(") ")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some((f.get(11)?.parse().ok()?, f.get(12)?.parse().ok()?))
}

/// This process's usage now.
pub fn host_usage() -> io::Result<HostUsage> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("parsing {what}"));
    let (rss, rss_peak) =
        memory(&std::fs::read_to_string("/proc/self/status")?).ok_or_else(|| bad("status"))?;
    let (utime, stime) =
        cpu_ticks(&std::fs::read_to_string("/proc/self/stat")?).ok_or_else(|| bad("stat"))?;
    // SAFETY: sysconf takes a constant and touches no memory.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(HostUsage {
        rss,
        rss_peak,
        user_usec: utime * 1_000_000 / hz,
        system_usec: stime * 1_000_000 / hz,
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
    fn status_and_stat_parse() {
        let status = "Name:\tx\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\n";
        assert_eq!(memory(status), Some((1 << 20, 2 << 20)));
        assert_eq!(memory("VmRSS: 1 kB\n"), None);
        let stat = "42 (a b) S 1 42 42 0 -1 4194304 100 0 0 0 7 3 0 0 20 0 1 0";
        assert_eq!(cpu_ticks(stat), Some((7, 3)));
        assert_eq!(cpu_ticks("garbage"), None);
    }

    #[test]
    fn this_process_has_usage_and_it_lands_in_the_metrics() {
        let usage = host_usage().unwrap();
        assert!(usage.rss > 0 && usage.rss_peak >= usage.rss);
        let m = metrics(&usage, 256 << 20, 2, &[NetStats::default()]);
        assert_eq!(m.memory.usage, usage.rss);
        assert_eq!(m.memory.usage_limit, 256 << 20);
        assert_eq!(m.pids.current, 2);
        assert_eq!(m.cpu.usage_usec, usage.user_usec + usage.system_usec);
        assert_eq!(m.network[0].name, "eth0");
    }
}
