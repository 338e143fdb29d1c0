//! What a guest sent that its devices refused or dropped, as the embedder
//! reads it: [`DeviceFaults`], one per device, from
//! [`RunningSandbox::device_faults`](crate::RunningSandbox::device_faults).
//!
//! The devices count these as they happen (a malformed descriptor chain, a
//! packet for a connection that does not exist, a request beyond the end
//! of a disk) and log each through the `log` crate, at most a few lines a
//! minute per device, with target `chitin::guest`. A stream that stalls
//! because the device refused what the guest sent shows up here.

use chitin_virtio::GuestFaults;

/// Faults of one device of a sandbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceFaults {
    /// The device: `vda`, `vdb`, ... for disks (in `.disk()` order, the
    /// root disk included), `eth0`, `eth1`, ... for network interfaces,
    /// `fs <tag>` for each share, `vsock` for the vsock device.
    pub device: String,
    /// Each reason seen with how many times, in reason order.
    pub reasons: Vec<(&'static str, u64)>,
    /// How many of all these broke the virtio specification (a guest bug
    /// or a hostile guest); the rest are what the protocol allows (a packet
    /// for a connection the host had just closed) or a device limit.
    pub malformed: u64,
}

impl DeviceFaults {
    /// Faults of all reasons.
    pub fn total(&self) -> u64 {
        self.reasons
            .iter()
            .fold(0u64, |sum, (_, n)| sum.saturating_add(*n))
    }

    /// Faults of `reason`.
    pub fn count(&self, reason: &str) -> u64 {
        self.reasons
            .iter()
            .find(|(r, _)| *r == reason)
            .map_or(0, |(_, n)| *n)
    }
}

/// The live fault tables of a sandbox's devices, by device name.
#[derive(Clone, Debug, Default)]
pub(crate) struct FaultTables(Vec<(String, GuestFaults)>);

impl FaultTables {
    pub(crate) fn add(&mut self, device: impl Into<String>, faults: &GuestFaults) {
        self.0.push((device.into(), faults.clone()));
    }

    pub(crate) fn snapshot(&self) -> Vec<DeviceFaults> {
        self.0
            .iter()
            .map(|(device, faults)| {
                let (reasons, malformed) = faults.snapshot();
                DeviceFaults {
                    device: device.clone(),
                    reasons,
                    malformed,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use chitin_virtio::Severity;

    use super::*;

    #[test]
    fn snapshot_lists_every_device_even_without_faults() {
        let vda = GuestFaults::new("blk a.img");
        let vsock = GuestFaults::new("vsock");
        let mut tables = FaultTables::default();
        tables.add("vda", &vda);
        tables.add("vsock", &vsock);
        vsock.record(Severity::Malformed, "wrong CID", &"x");
        vsock.record(Severity::Malformed, "wrong CID", &"x");
        vsock.record(Severity::Allowed, "no such connection", &"x");

        let snapshot = tables.snapshot();

        assert_eq!(snapshot.len(), 2);
        assert_eq!(snapshot[0].device, "vda");
        assert_eq!(snapshot[0].total(), 0);
        assert_eq!(snapshot[1].device, "vsock");
        assert_eq!(snapshot[1].count("wrong CID"), 2);
        assert_eq!(snapshot[1].total(), 3);
        assert_eq!(snapshot[1].malformed, 2);
    }
}
