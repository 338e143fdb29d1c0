//! chitin's ACPI tables through ACPICA's own disassembler, `iasl -d`
//! (Debian's `acpica-tools`, installed by `cargo xtask test`): the DSDT's
//! AML must decompile into the devices chitin meant, and the FADT and MADT
//! must parse with the values chitin wrote. Skips, saying why, where
//! `iasl` is missing; under `CHITIN_REQUIRE_KVM=1` that is a failure.

use std::path::{Path, PathBuf};
use std::process::Command;

use chitin_acpi::{build_tables, AcpiConfig, VirtioMmioDevice};

fn iasl() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("iasl"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        let why = "iasl not found (apt-get install acpica-tools)";
        assert!(
            std::env::var("CHITIN_REQUIRE_KVM").as_deref() != Ok("1"),
            "{why}, but CHITIN_REQUIRE_KVM=1"
        );
        eprintln!("SKIPPED: {why}");
    }
    found
}

/// Disassemble `bytes` as `name.dat` in a fresh directory; returns the
/// `.dsl` text.
fn disassemble(iasl: &Path, name: &str, bytes: &[u8]) -> String {
    let dir = std::env::temp_dir().join(format!("chitin-iasl-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let dat = dir.join(format!("{name}.dat"));
    std::fs::write(&dat, bytes).unwrap();
    let out = Command::new(iasl)
        .arg("-d")
        .arg(&dat)
        .current_dir(&dir)
        .output()
        .unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "iasl -d {name} failed:\n{log}");
    for bad in ["Error", "Warning", "Invalid", "Unknown"] {
        assert!(!log.contains(bad), "iasl -d {name} reported {bad}:\n{log}");
    }
    let dsl = std::fs::read_to_string(dir.join(format!("{name}.dsl"))).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    dsl
}

fn machine() -> Vec<VirtioMmioDevice> {
    (0..3)
        .map(|i| VirtioMmioDevice {
            base: 0xd000_0000 + i * 0x1000,
            len: 0x1000,
            gsi: 5 + i as u32,
        })
        .collect()
}

/// The lines of `text` without their leading white space.
fn lines(text: &str) -> Vec<String> {
    text.lines().map(|l| l.trim().to_string()).collect()
}

#[test]
fn dsdt_decompiles_into_s5_com1_rtc_and_the_virtio_devices() {
    let Some(iasl) = iasl() else { return };
    let devices = machine();
    let tables = build_tables(&AcpiConfig {
        vcpus: 2,
        virtio: &devices,
    })
    .unwrap();
    let dsl = disassemble(&iasl, "dsdt", &tables.get(b"DSDT").unwrap().bytes);
    let text = lines(&dsl);
    let has = |want: &str| text.iter().any(|l| l.contains(want));
    assert!(has("Name (_S5, Package (0x02)"), "{dsl}");
    assert!(has("Device (COM1)"), "{dsl}");
    assert!(has("EisaId (\"PNP0501\")"), "{dsl}");
    assert!(has("Device (RTC)"), "{dsl}");
    assert!(has("EisaId (\"PNP0B00\")"), "{dsl}");
    assert!(has("0x03F8,             // Range Minimum"), "{dsl}");
    assert_eq!(
        text.iter()
            .filter(|l| l.contains("Name (_HID, \"LNRO0005\")"))
            .count(),
        devices.len(),
        "{dsl}"
    );
    for (i, dev) in devices.iter().enumerate() {
        assert!(has(&format!("Device (VR{i:02X})")), "{dsl}");
        assert!(
            has(&format!("0x{:08X},         // Address Base", dev.base)),
            "window of device {i}:\n{dsl}"
        );
    }
    // Every interrupt, COM1's and the devices', edge triggered and active
    // high, in the order declared.
    let irqs: Vec<String> = text
        .iter()
        .enumerate()
        .filter(|(_, l)| l.starts_with("Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive"))
        .map(|(i, _)| text[i + 2].clone())
        .collect();
    assert_eq!(
        irqs,
        ["0x00000004,", "0x00000005,", "0x00000006,", "0x00000007,"],
        "{dsl}"
    );
}

#[test]
fn fadt_and_madt_parse_with_the_values_chitin_wrote() {
    let Some(iasl) = iasl() else { return };
    let tables = build_tables(&AcpiConfig {
        vcpus: 3,
        virtio: &machine(),
    })
    .unwrap();
    let fadt = lines(&disassemble(
        &iasl,
        "facp",
        &tables.get(b"FACP").unwrap().bytes,
    ));
    let field = |text: &[String], name: &str| -> Vec<String> {
        text.iter()
            .filter(|l| l.contains(name))
            .map(|l| l.rsplit(':').next().unwrap_or_default().trim().to_string())
            .collect()
    };
    assert_eq!(field(&fadt, "Hardware Reduced (V5)"), ["1"], "{fadt:#?}");
    assert_eq!(field(&fadt, "Reset Register Supported (V2)"), ["1"]);
    // Sleep control and status registers, then the reset register.
    let addresses = field(&fadt, "Address : ");
    assert!(
        addresses.contains(&"0000000000000600".to_string()),
        "{fadt:#?}"
    );
    assert!(
        addresses.contains(&"0000000000000601".to_string()),
        "{fadt:#?}"
    );
    assert!(
        addresses.contains(&"0000000000000602".to_string()),
        "{fadt:#?}"
    );

    let madt = lines(&disassemble(
        &iasl,
        "apic",
        &tables.get(b"APIC").unwrap().bytes,
    ));
    assert_eq!(
        field(&madt, "Local Apic ID").len(),
        3,
        "one local APIC per vCPU: {madt:#?}"
    );
    assert_eq!(field(&madt, "Address : FEC00000").len(), 1, "{madt:#?}");
    assert_eq!(
        field(&madt, "Interrupt : 00000004"),
        ["00000004"],
        "{madt:#?}"
    );
}
