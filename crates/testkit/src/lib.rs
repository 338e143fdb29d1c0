//! chitin's test harness, shared by everything that proves a sandbox works
//! with real Linux: the test agent in the guest (this crate's
//! `chitin-test-agent` binary: the scenarios and echo tools), L1's init and
//! host checks in the nested tier, and the nested judges on the host.
//!
//! It owns, once for the whole tree:
//! - the result-line format: [`Report`] writes `chitin-check:` and
//!   `chitin-agent: done` lines, [`CheckLine::parse`] and [`Done::parse`]
//!   read them back (strictly: a judge passes only what a report wrote);
//! - the console markers ([`UP_MARKER`], [`CONSOLE_BEGIN`], [`CONSOLE_END`]);
//! - the checksum both sides print ([`fnv1a`]);
//! - the busybox container root of the container example and scenario
//!   ([`rootfs::busybox_rootfs`]).
//!
//! None of it is in a production guest image or the facade.

mod report;
pub mod rootfs;

use std::io::{Read, Write};

pub use report::{CheckLine, Done, Report, CHECK_PREFIX, DONE_PREFIX, UP_MARKER};

/// Marker line before the console pattern; the host checksums the bytes
/// between it and [`CONSOLE_END`].
pub const CONSOLE_BEGIN: &str = "chitin-console-begin";
/// See [`CONSOLE_BEGIN`].
pub const CONSOLE_END: &str = "chitin-console-end";

/// What in a guest kernel's log means the machine's ACPI tables are
/// wrong (ACPICA's `ACPI_ERROR`/`ACPI_WARNING`/`ACPI_BIOS_*` prefixes).
pub const ACPI_COMPLAINTS: &[&str] = &[
    "ACPI Error",
    "ACPI BIOS Error",
    "ACPI Warning",
    "ACPI BIOS Warning",
];

/// The lines of kernel log `log` that complain about ACPI.
pub fn acpi_complaints(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| ACPI_COMPLAINTS.iter().any(|c| l.contains(c)))
        .collect()
}

/// FNV-1a 64 offset basis: the `hash` to start [`fnv1a`] with.
pub const FNV_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
/// FNV-1a 64 prime.
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a, 64 bit, continued from `hash` over `bytes`: the checksum the
/// guest and the host each print for data that crossed a device, so a
/// judge compares 16 hex digits instead of megabytes.
pub fn fnv1a(hash: u64, bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(hash, |h, &b| (h ^ u64::from(b)).wrapping_mul(FNV_PRIME))
}

/// Echo `stream` back to itself until EOF or an error; returns the bytes
/// echoed. The echo servers of both sides of the vsock checks.
pub fn echo<S: Read + Write>(stream: &mut S) -> u64 {
    let mut echoed = 0u64;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return echoed,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return echoed;
                }
                echoed += n as u64;
            }
        }
    }
}

/// Deterministic pattern: xorshift64 seeded by `seed`, as bytes. Both
/// ends of a stream check fill with it; what they compare is the FNV-1a
/// of what was sent and of what arrived.
pub fn fill_pattern(seed: u64, buf: &mut [u8]) {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
}

/// Send `bytes` of pattern (a new seed every 64 KiB chunk) to `out`;
/// returns the bytes sent and their FNV-1a. Stops at the first error.
pub fn send_pattern<W: Write>(out: &mut W, bytes: u64) -> (u64, u64) {
    let mut chunk = vec![0u8; 64 << 10];
    let (mut sent, mut hash, mut seed) = (0u64, FNV_BASIS, 0u64);
    while sent < bytes {
        let n = chunk.len().min((bytes - sent) as usize);
        seed += 1;
        fill_pattern(seed, &mut chunk[..n]);
        if out.write_all(&chunk[..n]).is_err() {
            break;
        }
        hash = fnv1a(hash, &chunk[..n]);
        sent += n as u64;
    }
    (sent, hash)
}

/// Read `input` to its end (or first error); returns the bytes read and
/// their FNV-1a.
pub fn receive_all<R: Read>(input: &mut R) -> (u64, u64) {
    let mut buf = vec![0u8; 64 << 10];
    let (mut received, mut hash) = (0u64, FNV_BASIS);
    loop {
        match input.read(&mut buf) {
            Ok(0) => break,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
            Ok(n) => {
                hash = fnv1a(hash, &buf[..n]);
                received += n as u64;
            }
        }
    }
    (received, hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acpi_complaints_are_the_acpica_error_and_warning_lines() {
        let log = "<6>[    0.03] ACPI: RSDP 0x00000000000E0000 000024 (v02 CHITIN)\n\
                   <3>[    0.10] ACPI Error: AE_BAD_PARAMETER, During Region initialization\n\
                   <4>[    0.11] ACPI BIOS Warning (bug): Incorrect checksum\n\
                   <6>[    0.12] ACPI: Using IOAPIC for interrupt routing\n";
        assert_eq!(
            acpi_complaints(log),
            [
                "<3>[    0.10] ACPI Error: AE_BAD_PARAMETER, During Region initialization",
                "<4>[    0.11] ACPI BIOS Warning (bug): Incorrect checksum",
            ]
        );
        assert!(acpi_complaints("ACPI: Core revision 20220331").is_empty());
    }

    #[test]
    fn echo_returns_what_came_in_and_counts_it() {
        let (mut a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || echo(&mut b));
        a.write_all(b"hello echo").unwrap();
        a.shutdown(std::net::Shutdown::Write).unwrap();
        let mut back = Vec::new();
        // The echo ends with EOF from our side; then its end closes.
        let echoed = server.join().unwrap();
        a.read_to_end(&mut back).unwrap();
        assert_eq!((back.as_slice(), echoed), (&b"hello echo"[..], 10));
    }

    #[test]
    fn fnv1a_matches_reference_vectors() {
        // Reference vectors of FNV-1a 64.
        assert_eq!(fnv1a(FNV_BASIS, b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(FNV_BASIS, b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(FNV_BASIS, b"foobar"), 0x8594_4171_f739_67e8);
        // Continuing is the same as hashing at once.
        assert_eq!(
            fnv1a(fnv1a(FNV_BASIS, b"foo"), b"bar"),
            fnv1a(FNV_BASIS, b"foobar")
        );
    }
}
