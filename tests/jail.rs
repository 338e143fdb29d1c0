//! Host tier: chitin-jail around a process that runs a test guest on the
//! host's KVM. Its own harness (`harness = false`): `Jail::enter` needs a
//! process with one thread, which libtest's runner is not, and the jailed
//! process is a copy of this binary started with `CHITIN_JAIL_TEST_ROLE`.
//!
//! Run by `cargo xtask test` with the host-KVM tests (`-- --ignored`);
//! without that flag it lists its tests as ignored. Needs root (namespaces,
//! mounts, device nodes) and `/dev/kvm`.

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use chitin::{Console, ConsoleCapture, Sandbox};
use chitin_jail::{CgroupLimits, Jail, JailError, RootSwitch};
use chitin_test_guests::Guest;
use common::Scratch;

/// Set in the copy of this binary that enters the jail.
const ROLE: &str = "CHITIN_JAIL_TEST_ROLE";
/// The jailed ids: `nobody`.
const JAILED_ID: u32 = 65534;
/// The namespaces a jail makes.
const NAMESPACES: [&str; 5] = ["mnt", "pid", "ipc", "uts", "net"];

/// This process's namespace of each kind (`mnt:[4026531841]`, ...).
fn namespaces() -> Vec<String> {
    NAMESPACES
        .iter()
        .map(|ns| {
            let link = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
            link.display().to_string()
        })
        .collect()
}

/// A `/proc/self/status` field, whitespace collapsed.
fn status_field(field: &str) -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Every path under `/` but inside `/proc` and `/tmp` (which are mounts of
/// the jail's own).
fn root_listing(dir: &Path, out: &mut BTreeSet<String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        out.insert(path.display().to_string());
        let skip = path == Path::new("/proc") || path == Path::new("/tmp");
        if !skip && path.symlink_metadata().unwrap().is_dir() {
            root_listing(&path, out);
        }
    }
}

/// `path` and every directory above it, as the jail's root shows them
/// (what is below `/tmp` is in the jail's own `/tmp`, which the listing
/// does not enter).
fn with_ancestors(path: &Path, out: &mut BTreeSet<String>) {
    for a in path.ancestors() {
        if a != Path::new("/") && (a == Path::new("/tmp") || !a.starts_with("/tmp")) {
            out.insert(a.display().to_string());
        }
    }
}

/// The jailed copy: enter the jail the parent describes in the
/// environment, write what it sees to `<out>/facts`, boot the report
/// guest, exit 0.
fn jailed_main() {
    let out = PathBuf::from(std::env::var("CHITIN_JAIL_OUT").unwrap());
    let guest = PathBuf::from(std::env::var("CHITIN_JAIL_GUEST").unwrap());
    let state = PathBuf::from(std::env::var("CHITIN_JAIL_STATE").unwrap());
    let jailed = Jail::new(format!("host-test-{}", std::process::id()))
        .ids(JAILED_ID, JAILED_ID)
        .state_dir(&state)
        .read_only(&guest)
        .writable(&out)
        .device("/dev/kvm")
        .max_open_files(512)
        .max_file_size(1 << 30)
        .enter();
    let jailed = entered_or_exit(jailed);
    let mut facts = status_facts(&[
        "Uid",
        "Gid",
        "Groups",
        "CapInh",
        "CapPrm",
        "CapEff",
        "CapBnd",
        "CapAmb",
        "NoNewPrivs",
    ]);
    facts.push(format!("ns: {}", namespaces().join(" ")));
    facts.push(format!("switch: {:?}", jailed.root_switch()));
    facts.push(format!("pid: {}", std::process::id()));
    // SAFETY: getsid(0) has no preconditions.
    let session = unsafe { libc::getsid(0) };
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Field 7, tty_nr, counted after the command's closing parenthesis.
    let tty = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(4).map(str::to_string))
        .unwrap_or_default();
    facts.push(format!("session: {session} tty {tty}"));
    facts.push(format!("env: {}", std::env::vars().count()));
    let open_fds = std::fs::read_dir("/proc/self/fd").unwrap().count();
    facts.push(format!("fds: {open_fds}"));
    let mut listing = BTreeSet::new();
    root_listing(Path::new("/"), &mut listing);
    facts.push(format!(
        "root: {}",
        listing.into_iter().collect::<Vec<_>>().join(" ")
    ));
    let console = ConsoleCapture::default();
    let reason = Sandbox::builder()
        .kernel(&guest)
        .memory_mib(64)
        .cmdline("chitin.test=report quiet")
        .console(Console::capture(&console))
        .build()
        .and_then(|s| s.start())
        .map(|r| {
            r.wait_timeout(common::GUEST_TIMEOUT)
                .unwrap_or_else(|| r.stop())
        });
    let printed = String::from_utf8_lossy(&console.contents()).into_owned();
    facts.push(format!(
        "guest: {} {}",
        match reason {
            Ok(r) => r.to_string(),
            Err(e) => chitin::error_chain(&e),
        },
        printed.ends_with("done\n")
    ));
    std::fs::write(out.join("facts"), facts.join("\n") + "\n").unwrap();
    std::process::exit(0);
}

/// The jailed copy in a user namespace: enter, write what it sees, exit.
fn jailed_userns_main() {
    let out = PathBuf::from(std::env::var("CHITIN_JAIL_OUT").unwrap());
    let state = PathBuf::from(std::env::var("CHITIN_JAIL_STATE").unwrap());
    let jailed = Jail::new(format!("host-userns-{}", std::process::id()))
        .ids(JAILED_ID, JAILED_ID)
        .user_namespace(true)
        .state_dir(&state)
        .writable(&out)
        .enter();
    let jailed = entered_or_exit(jailed);
    let mut facts = status_facts(&[
        "Uid",
        "Gid",
        "CapPrm",
        "CapEff",
        "CapBnd",
        "CapAmb",
        "NoNewPrivs",
    ]);
    let map = std::fs::read_to_string("/proc/self/uid_map").unwrap_or_default();
    facts.push(format!(
        "uid_map: {}",
        map.split_whitespace().collect::<Vec<_>>().join(" ")
    ));
    facts.push(format!("switch: {:?}", jailed.root_switch()));
    facts.push(format!("pid: {}", std::process::id()));
    std::fs::write(out.join("facts"), facts.join("\n") + "\n").unwrap();
    std::process::exit(0);
}

/// The jailed process, or exit 2 saying why the jail failed.
fn entered_or_exit(entered: Result<chitin_jail::Jailed, JailError>) -> chitin_jail::Jailed {
    entered.unwrap_or_else(|e| {
        eprintln!("jail: {}", chitin::error_chain(&e));
        std::process::exit(2);
    })
}

/// `<field>: <value>` lines of `/proc/self/status` for `fields`.
fn status_facts(fields: &[&str]) -> Vec<String> {
    fields
        .iter()
        .map(|field| format!("{field}: {}", status_field(field)))
        .collect()
}

/// A fact line's value.
fn fact<'a>(facts: &'a str, key: &str) -> &'a str {
    facts
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(": "))
        .unwrap_or_else(|| panic!("no {key} in {facts}"))
}

fn jailed_process_has_the_ids_namespaces_root_and_runs_a_guest_and_leaves_nothing() {
    let scratch = Scratch::new("jail-run");
    let out = scratch.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::os::unix::fs::chown(&out, Some(JAILED_ID), Some(JAILED_ID)).unwrap();
    let state = scratch.path().join("state");
    let guest = Guest::Report.path().to_path_buf();
    // Arrange: the parent's own view, for comparison.
    let ours = namespaces();
    let mounts_before = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    // Act
    let status = Command::new(std::env::current_exe().unwrap())
        .env(ROLE, "jailed")
        .env("CHITIN_JAIL_OUT", &out)
        .env("CHITIN_JAIL_GUEST", &guest)
        .env("CHITIN_JAIL_STATE", &state)
        .env("CHITIN_JAIL_SECRET", "not for the jail")
        .status()
        .unwrap();
    // Assert: it ran and said what it saw.
    assert_eq!(status.code(), Some(0), "jailed process: {status}");
    let facts = std::fs::read_to_string(out.join("facts")).unwrap();
    eprintln!("{facts}");
    let id = JAILED_ID.to_string();
    assert_eq!(fact(&facts, "Uid"), [id.as_str(); 4].join(" "));
    assert_eq!(fact(&facts, "Gid"), [id.as_str(); 4].join(" "));
    assert_eq!(fact(&facts, "Groups"), "");
    for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(fact(&facts, caps), "0000000000000000", "{caps}");
    }
    assert_eq!(fact(&facts, "NoNewPrivs"), "1");
    let theirs: Vec<&str> = fact(&facts, "ns").split(' ').collect();
    for (kind, (a, b)) in NAMESPACES.iter().zip(ours.iter().zip(theirs)) {
        assert_ne!(a, b, "the jail shares the {kind} namespace");
    }
    assert_eq!(
        fact(&facts, "switch"),
        format!("{:?}", RootSwitch::PivotRoot)
    );
    assert_eq!(fact(&facts, "pid"), "1", "PID 1 of its own namespace");
    assert_eq!(
        fact(&facts, "session"),
        "1 tty 0",
        "a session of its own without a controlling terminal"
    );
    assert_eq!(fact(&facts, "env"), "0", "the environment is cleared");
    // stdin, stdout, stderr and the directory listing's own fd.
    assert_eq!(fact(&facts, "fds"), "4", "inherited fds are closed");
    let mut expected = BTreeSet::from([
        "/dev".to_string(),
        "/dev/kvm".to_string(),
        "/dev/urandom".to_string(),
        "/proc".to_string(),
        "/tmp".to_string(),
    ]);
    with_ancestors(&guest, &mut expected);
    with_ancestors(&out, &mut expected);
    // The writable directory's own contents are the host's (the facts
    // file is written after the listing).
    let root: BTreeSet<String> = fact(&facts, "root").split(' ').map(String::from).collect();
    assert_eq!(root, expected);
    assert_eq!(fact(&facts, "guest"), "guest reset true");
    // Nothing of the jail is left: its directory, its mounts.
    let dirs: Vec<_> = std::fs::read_dir(&state).unwrap().collect();
    assert!(dirs.is_empty(), "left in the state dir: {dirs:?}");
    let mounts_after = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert_eq!(mounts_before, mounts_after);
    assert!(!mounts_after.contains(&state.display().to_string()));
}

fn user_namespace_jail_is_root_inside_and_nobody_outside_without_capabilities() {
    let scratch = Scratch::new("jail-userns");
    let out = scratch.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::os::unix::fs::chown(&out, Some(JAILED_ID), Some(JAILED_ID)).unwrap();
    let state = scratch.path().join("state");
    let status = Command::new(std::env::current_exe().unwrap())
        .env(ROLE, "jailed-userns")
        .env("CHITIN_JAIL_OUT", &out)
        .env("CHITIN_JAIL_STATE", &state)
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(0), "jailed process: {status}");
    let facts = std::fs::read_to_string(out.join("facts")).unwrap();
    eprintln!("{facts}");
    // Root inside, the host's nobody outside, one id mapped.
    assert_eq!(fact(&facts, "Uid"), "0 0 0 0");
    assert_eq!(fact(&facts, "Gid"), "0 0 0 0");
    assert_eq!(fact(&facts, "uid_map"), format!("0 {JAILED_ID} 1"));
    for caps in ["CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(fact(&facts, caps), "0000000000000000", "{caps}");
    }
    assert_eq!(fact(&facts, "NoNewPrivs"), "1");
    assert_eq!(fact(&facts, "pid"), "1");
    // The file it wrote belongs to the host's nobody.
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata(out.join("facts")).unwrap().uid(),
        JAILED_ID
    );
    assert_eq!(std::fs::read_dir(&state).unwrap().count(), 0);
}

fn user_namespace_jail_cannot_use_a_device_its_host_uid_cannot_open() {
    use std::os::unix::fs::MetadataExt;
    let mode = std::fs::metadata("/dev/kvm").unwrap().mode();
    if mode & 0o006 == 0o006 {
        eprintln!("/dev/kvm is open to everyone here; the refusal is not reachable");
        return;
    }
    let scratch = Scratch::new("jail-userns-kvm");
    let err = Jail::new("userns-kvm")
        .ids(JAILED_ID, JAILED_ID)
        .user_namespace(true)
        .state_dir(scratch.path())
        .device("/dev/kvm")
        .enter()
        .err()
        .unwrap();
    assert!(
        matches!(&err, JailError::NoAccess { path, access: "open", .. } if path == Path::new("/dev/kvm")),
        "{err}"
    );
    assert_eq!(std::fs::read_dir(scratch.path()).unwrap().count(), 0);
}

fn jail_entered_with_threads_is_refused_and_changes_nothing() {
    let scratch = Scratch::new("jail-threads");
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let thread = std::thread::spawn(move || rx.recv());
    let err = Jail::new("threads")
        .ids(JAILED_ID, JAILED_ID)
        .state_dir(scratch.path())
        .enter()
        .err()
        .unwrap();
    drop(tx);
    let _ = thread.join();
    assert!(matches!(err, JailError::Threads(2)), "{err}");
    assert_eq!(std::fs::read_dir(scratch.path()).unwrap().count(), 0);
}

fn jail_whose_ids_cannot_read_a_resource_fails_in_the_caller_and_leaves_nothing() {
    let scratch = Scratch::new("jail-noaccess");
    let secret = scratch.path().join("kernel");
    std::fs::write(&secret, b"root only").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let state = scratch.path().join("state");
    let mounts_before = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let err = Jail::new("noaccess")
        .ids(JAILED_ID, JAILED_ID)
        .state_dir(&state)
        .read_only(&secret)
        .enter()
        .err()
        .unwrap();
    assert!(
        matches!(&err, JailError::NoAccess { path, access: "read", uid: JAILED_ID, .. } if *path == secret),
        "{err}"
    );
    assert_eq!(std::fs::read_dir(&state).unwrap().count(), 0);
    assert_eq!(
        mounts_before,
        std::fs::read_to_string("/proc/self/mountinfo").unwrap()
    );
    // The helpers were reaped: this process has no children left.
    // SAFETY: waitpid with WNOHANG and a null status pointer.
    let waited = unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) };
    assert_eq!(waited, -1, "a child of the failed jail is left");
}

/// Whether the cgroup v2 root offers the memory controller.
fn v2_memory_controller() -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|l| {
            let (fields, rest) = l.split_once(" - ")?;
            (rest.split_whitespace().next()? == "cgroup2")
                .then(|| fields.split_whitespace().nth(4))?
        })
        .next()
        .and_then(|root| std::fs::read_to_string(Path::new(root).join("cgroup.controllers")).ok())
        .is_some_and(|c| c.split_whitespace().any(|c| c == "memory"))
}

fn cgroup_limits_without_their_controller_are_refused_and_leave_nothing() {
    if v2_memory_controller() {
        // This host delegates memory to cgroup v2: the nested tier's
        // `jail` scenario checks the limits themselves in a jail.
        eprintln!("cgroup v2 has the memory controller here; the refusal is not reachable");
        return;
    }
    let scratch = Scratch::new("jail-cgroup");
    let err = Jail::new("cgroup")
        .ids(JAILED_ID, JAILED_ID)
        .state_dir(scratch.path())
        .cgroup(CgroupLimits {
            memory_max: Some(256 << 20),
            ..CgroupLimits::default()
        })
        .enter()
        .err()
        .unwrap();
    assert!(
        matches!(
            err,
            JailError::ControllerMissing {
                controller: "memory",
                ..
            } | JailError::NoCgroupV2
        ),
        "{err}"
    );
    assert_eq!(std::fs::read_dir(scratch.path()).unwrap().count(), 0);
}

fn main() {
    match std::env::var(ROLE).as_deref() {
        Ok("jailed") => return jailed_main(),
        Ok("jailed-userns") => return jailed_userns_main(),
        _ => {}
    }
    let tests: [(&str, fn()); 6] = [
        (
            "user_namespace_jail_is_root_inside_and_nobody_outside_without_capabilities",
            user_namespace_jail_is_root_inside_and_nobody_outside_without_capabilities,
        ),
        (
            "user_namespace_jail_cannot_use_a_device_its_host_uid_cannot_open",
            user_namespace_jail_cannot_use_a_device_its_host_uid_cannot_open,
        ),
        (
            "jailed_process_has_the_ids_namespaces_root_and_runs_a_guest_and_leaves_nothing",
            jailed_process_has_the_ids_namespaces_root_and_runs_a_guest_and_leaves_nothing,
        ),
        (
            "jail_entered_with_threads_is_refused_and_changes_nothing",
            jail_entered_with_threads_is_refused_and_changes_nothing,
        ),
        (
            "jail_whose_ids_cannot_read_a_resource_fails_in_the_caller_and_leaves_nothing",
            jail_whose_ids_cannot_read_a_resource_fails_in_the_caller_and_leaves_nothing,
        ),
        (
            "cgroup_limits_without_their_controller_are_refused_and_leave_nothing",
            cgroup_limits_without_their_controller_are_refused_and_leave_nothing,
        ),
    ];
    let args: Vec<String> = std::env::args().collect();
    if !args
        .iter()
        .any(|a| a == "--ignored" || a == "--include-ignored")
    {
        for (name, _) in &tests {
            println!("test {name} ... ignored, needs root, namespaces and /dev/kvm (--include-ignored; cargo xtask test runs it)");
        }
        println!(
            "\ntest result: ok. 0 passed; 0 failed; {} ignored",
            tests.len()
        );
        return;
    }
    if !common::kvm_available("jail") {
        return;
    }
    let mut failed = 0;
    for (name, test) in tests {
        // One at a time, in this thread: each may fork.
        match std::panic::catch_unwind(test) {
            Ok(()) => println!("test {name} ... ok"),
            Err(_) => {
                println!("test {name} ... FAILED");
                failed += 1;
            }
        }
    }
    println!(
        "\ntest result: {}. {} passed; {failed} failed",
        if failed == 0 { "ok" } else { "FAILED" },
        tests.len() - failed
    );
    if failed > 0 {
        std::process::exit(1);
    }
}
