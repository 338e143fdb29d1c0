//! virtio-fs checks, run in L1 against the test agent guest, each with a
//! sandbox of its own sharing a directory this process makes:
//!
//! - `fs`: a tree of files (sizes around page and request boundaries, a
//!   deep path, a hard link, a symlink) read in the guest byte-exact; the
//!   guest creates, renames, truncates, appends, unlinks and
//!   `mmap`-writes files and the host sees exactly that; a host change
//!   shows in the guest; data the guest `fsync`ed survives the VMM being
//!   killed with SIGKILL (a child process runs that sandbox).
//! - `fs-escape`: host symlinks out of the share, `..` chains, device
//!   nodes, links and renames out, a directory moved out by the host
//!   while the guest sits in it: each attempt and its result printed, no
//!   host byte from outside the share ever shown, nothing outside changed.
//! - `fs-ro`: a read-only share refuses every change, both as the agent
//!   mounted it (`ro`) and mounted read-write by the guest itself (the
//!   device's own `EROFS`); reads work.
//! - `fs-bench`: sequential read of 64 MiB through virtio-fs and from a
//!   virtio-blk disk, and small-file operations on the share and on the
//!   guest's tmpfs, with their ratios.
//! - `container`: a busybox root shared read-only as the sandbox's rootfs;
//!   hostname, root listing, pivoted root, fresh mounts, /dev, user and
//!   working directory, the agent's own root on request.

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::{symlink, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Stdio as ProcStdio;
use std::time::{Duration, Instant};

use chitin::{Command, ExitStatus, RunningSandbox, SandboxBuilder, Share};
use chitin_testkit::{fnv1a, Report as Checks, FNV_BASIS};

/// Where the shares and the "outside" live in L1.
const BASE: &str = "/tmp/chitin-fs";
/// A marker only the host's secret file holds.
const SECRET: &str = "CHITIN-HOST-SECRET-7f3a91";
/// Sizes of the files read back: around pages and the 1 MiB request size.
const SIZES: &[usize] = &[0, 1, 4095, 4096, 4097, (1 << 20) + 7, 8 << 20];
/// Depth of the deep tree.
const DEPTH: usize = 24;
/// What the guest writes before it is killed.
const SYNCED_LEN: usize = 1 << 20;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed)
        .collect()
}

fn fresh(dir: &Path) -> Result<(), String> {
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))
}

/// The scenarios' sandbox: the test guest, 2 vCPUs, 256 MiB.
fn builder(kernel: &str, initramfs: &str) -> SandboxBuilder {
    super::agent_sandbox(kernel, initramfs)
}

fn start(builder: SandboxBuilder) -> Result<RunningSandbox, String> {
    let built = builder.build().map_err(|e| chitin::error_chain(&e))?;
    built.start().map_err(|e| chitin::error_chain(&e))
}

/// Build and start, then the first checks (timed from here); `None`
/// after a failed `sandbox` check.
fn booted(builder: SandboxBuilder, c: &mut Checks) -> Option<RunningSandbox> {
    let at = Instant::now();
    match start(builder) {
        Ok(vm) => {
            super::first_checks(&vm, at, c);
            Some(vm)
        }
        Err(e) => {
            c.result("sandbox", Err(e));
            None
        }
    }
}

/// What a guest shell script printed, and how it ended.
struct Out {
    code: Option<i32>,
    stdout: Vec<u8>,
    stderr: String,
}

impl Out {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).trim().to_string()
    }
}

fn run(vm: &RunningSandbox, script: &str) -> Result<Out, String> {
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(script);
    cmd.timeout(Duration::from_secs(600));
    let o = vm.exec(&cmd).map_err(|e| chitin::error_chain(&e))?;
    Ok(Out {
        code: match o.status {
            ExitStatus::Code(c) => Some(c),
            _ => None,
        },
        stdout: o.stdout,
        stderr: String::from_utf8_lossy(&o.stderr).trim().to_string(),
    })
}

/// A script that must succeed; its stdout.
fn ok(vm: &RunningSandbox, script: &str) -> Result<String, String> {
    let out = run(vm, script)?;
    if out.code != Some(0) {
        return Err(format!("`{script}`: {:?} {}", out.code, out.stderr));
    }
    Ok(out.text())
}

/// The read tree: `f-<size>` files, `deep/d0/.../d23/leaf`, `hard`
/// (a hard link to f-4096) and `link -> f-1`.
fn make_read_tree(share: &Path) -> Result<Vec<(String, Vec<u8>)>, String> {
    let io = |e: std::io::Error| e.to_string();
    let mut files = Vec::new();
    for (i, &size) in SIZES.iter().enumerate() {
        let name = format!("f-{size}");
        let bytes = pattern(size, i as u8);
        fs::write(share.join(&name), &bytes).map_err(io)?;
        files.push((name, bytes));
    }
    let mut deep = PathBuf::from("deep");
    for d in 0..DEPTH {
        deep.push(format!("d{d}"));
    }
    fs::create_dir_all(share.join(&deep)).map_err(io)?;
    let leaf = deep.join("leaf");
    fs::write(share.join(&leaf), b"at the bottom\n").map_err(io)?;
    files.push((
        leaf.to_string_lossy().into_owned(),
        b"at the bottom\n".to_vec(),
    ));
    fs::hard_link(share.join("f-4096"), share.join("hard")).map_err(io)?;
    symlink("f-1", share.join("link")).map_err(io)?;
    fs::create_dir_all(share.join("w")).map_err(io)?;
    Ok(files)
}

fn read_checks(vm: &RunningSandbox, files: &[(String, Vec<u8>)], c: &mut Checks) {
    let t = Instant::now();
    let mut total = 0;
    let mut bad = Vec::new();
    for (name, bytes) in files {
        match run(vm, &format!("cat /mnt/data/{name}")) {
            Ok(o) if o.code == Some(0) && o.stdout == *bytes => total += bytes.len(),
            Ok(o) => bad.push(format!(
                "{name}: {} bytes fnv {:016x}, want {} fnv {:016x} ({})",
                o.stdout.len(),
                fnv1a(FNV_BASIS, &o.stdout),
                bytes.len(),
                fnv1a(FNV_BASIS, bytes),
                o.stderr
            )),
            Err(e) => bad.push(format!("{name}: {e}")),
        }
    }
    c.result(
        "read-byte-exact",
        if bad.is_empty() {
            Ok(format!(
                "{} files ({total} bytes, sizes {SIZES:?} and a {DEPTH}-deep leaf) identical in {} ms",
                files.len(),
                t.elapsed().as_millis()
            ))
        } else {
            Err(bad.join("; "))
        },
    );
    c.result(
        "hard-link",
        ok(vm, "stat -c '%i %h' /mnt/data/hard /mnt/data/f-4096").and_then(|out| {
            let lines: Vec<&str> = out.lines().collect();
            match lines.as_slice() {
                [a, b] if a == b && a.ends_with(" 2") => Ok(format!("one inode, 2 links: {a}")),
                _ => Err(out),
            }
        }),
    );
    c.result(
        "symlink",
        ok(
            vm,
            "readlink /mnt/data/link && cat /mnt/data/link | od -An -tx1",
        )
        .and_then(|out| {
            let want = format!("{:02x}", pattern(1, 1)[0]);
            if out.starts_with("f-1") && out.ends_with(&want) {
                Ok(format!("link -> f-1, read through it: {want}"))
            } else {
                Err(out)
            }
        }),
    );
    c.result(
        "statfs",
        ok(vm, "stat -f -c 'type=%T blocks=%b' /mnt/data").map(|s| s.replace('\n', " ")),
    );
}

fn write_checks(vm: &RunningSandbox, share: &Path, c: &mut Checks) {
    let w = share.join("w");
    let script = "cd /mnt/data/w && echo created > new && mv new renamed \
         && printf 0123456789 > trunc && truncate -s 4 trunc \
         && echo a >> app && echo b >> app \
         && echo gone > del && rm del \
         && mkdir -p d/e && echo inner > d/e/f && rmdir d/e 2>/dev/null; \
         head -c 8192 /dev/zero > mm && /init fs-mmap-write /mnt/data/w/mm 4000 MAPPED-BYTES \
         && yes abcdefg | head -c 4194304 > big && sync";
    let guest = run(vm, script);
    let read = |n: &str| fs::read(w.join(n)).map_err(|e| format!("{n}: {e}"));
    let host = (|| -> Result<String, String> {
        let out = guest?;
        if out.code != Some(0) {
            return Err(format!("guest script: {:?} {}", out.code, out.stderr));
        }
        let mut mm = vec![0u8; 8192];
        mm[4000..4012].copy_from_slice(b"MAPPED-BYTES");
        let big: Vec<u8> = b"abcdefg\n".iter().copied().cycle().take(4 << 20).collect();
        let checks = [
            ("renamed", read("renamed")? == b"created\n"),
            ("new gone", !w.join("new").exists()),
            ("trunc", read("trunc")? == b"0123"),
            ("app", read("app")? == b"a\nb\n"),
            ("del gone", !w.join("del").exists()),
            ("d/e/f", read("d/e/f")? == b"inner\n"),
            ("mm", read("mm")? == mm),
            ("big", read("big")? == big),
        ];
        let failed: Vec<&str> = checks
            .iter()
            .filter(|(_, ok)| !ok)
            .map(|(n, _)| *n)
            .collect();
        if failed.is_empty() {
            Ok("create, rename, truncate, append, unlink, mkdir, mmap write, 4 MiB write: all as on the host".into())
        } else {
            Err(format!("host differs: {failed:?}"))
        }
    })();
    c.result("guest-writes-seen-on-host", host);

    // The host changes a file; the guest sees it once its cache times out.
    let changed = (|| -> Result<String, String> {
        ok(vm, "cat /mnt/data/w/renamed")?;
        fs::write(w.join("renamed"), b"changed on the host\n").map_err(|e| e.to_string())?;
        std::thread::sleep(Duration::from_secs(2));
        let seen = ok(vm, "cat /mnt/data/w/renamed")?;
        if seen == "changed on the host" {
            Ok("host write visible in the guest after 2 s".into())
        } else {
            Err(format!("guest still sees {seen:?}"))
        }
    })();
    c.result("host-change-seen", changed);
}

/// Start `chitin-exec-checks fs-writer` on a fresh share, wait for its
/// guest to have `fsync`ed a file, SIGKILL it, and read the file.
fn killed_vmm_check(kernel: &str, initramfs: &str) -> Result<String, String> {
    let share = Path::new(BASE).join("killed");
    fresh(&share)?;
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = std::process::Command::new(me)
        .args(["fs-writer", kernel, initramfs])
        .arg(&share)
        .stdout(ProcStdio::piped())
        .stderr(ProcStdio::inherit())
        .spawn()
        .map_err(|e| format!("spawn the writer: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let synced = line.starts_with("fs-writer: synced");
            let _ = tx.send(line);
            if synced {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut seen = Vec::new();
    let synced = loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) if line.starts_with("fs-writer: synced") => break true,
            Ok(line) => seen.push(line),
            Err(_) => break false,
        }
    };
    // SIGKILL: no destructor, no flush, no orderly stop of anything.
    let _ = child.kill();
    let status = child.wait().map_err(|e| e.to_string())?;
    if !synced {
        return Err(format!("the writer never synced: {seen:?} {status}"));
    }
    let got = fs::read(share.join("synced")).map_err(|e| e.to_string())?;
    let want = pattern(SYNCED_LEN, 9);
    if got == want {
        Ok(format!(
            "1 MiB fsynced in the guest, VMM killed ({status}): the host file holds all of it"
        ))
    } else {
        Err(format!("{} bytes on the host after the kill", got.len()))
    }
}

/// The child of [`killed_vmm_check`]: boot with the share, have the guest
/// write and `fsync` the file, say so, then wait to be killed.
pub fn writer(kernel: &str, initramfs: &str, share: &str) -> i32 {
    let vm = match start(
        builder(kernel, initramfs).share(Share::new(share, "killed").mount_at("/mnt/k")),
    ) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("fs-writer: {e}");
            return 1;
        }
    };
    // The guest has no generator of this pattern: the bytes go in
    // through stdin.
    let mut cmd = Command::new("dd");
    cmd.args(["of=/mnt/k/synced", "bs=65536", "conv=fsync"])
        .stdin(chitin::Stdio::bytes(pattern(SYNCED_LEN, 9)))
        .timeout(Duration::from_secs(600));
    match vm.exec(&cmd) {
        Ok(o) if o.status == ExitStatus::Code(0) => println!("fs-writer: synced"),
        other => {
            eprintln!("fs-writer: dd failed: {other:?}");
            return 1;
        }
    }
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

pub fn fs_checks(kernel: &str, initramfs: &str, c: &mut Checks) {
    let share = Path::new(BASE).join("data");
    let files = match fresh(&share).and_then(|()| make_read_tree(&share)) {
        Ok(f) => f,
        Err(e) => return c.result("setup", Err(e)),
    };
    let Some(vm) = booted(
        builder(kernel, initramfs).share(Share::new(&share, "data").mount_at("/mnt/data")),
        c,
    ) else {
        return;
    };
    c.result(
        "mounted",
        ok(&vm, "grep ' /mnt/data ' /proc/mounts").and_then(|m| {
            if m.contains("virtiofs") && m.contains("nodev") {
                Ok(m)
            } else {
                Err(m)
            }
        }),
    );
    read_checks(&vm, &files, c);
    write_checks(&vm, &share, c);
    c.result("device-faults", super::device_faults(&vm));
    drop(vm);
    c.result("fsync-then-sigkill", killed_vmm_check(kernel, initramfs));
}

/// One escape attempt: run `script` in the guest, print what came back,
/// fail if any output holds the host's secret or L1's own files.
fn attempt(vm: &RunningSandbox, c: &mut Checks, name: &str, script: &str, forbidden: &[&str]) {
    let result = run(vm, script).and_then(|o| {
        let all = format!("{}\n{}", String::from_utf8_lossy(&o.stdout), o.stderr);
        let shown: String = all.split_whitespace().collect::<Vec<_>>().join(" ");
        let shown = if shown.chars().count() > 160 {
            format!("{}...", shown.chars().take(160).collect::<String>())
        } else {
            shown
        };
        match forbidden.iter().find(|f| all.contains(*f)) {
            Some(f) => Err(format!("`{script}` showed host data ({f:?}): {shown}")),
            None => Ok(format!("`{script}` -> exit {:?}: {shown}", o.code)),
        }
    });
    c.result(name, result);
}

pub fn escape_checks(kernel: &str, initramfs: &str, c: &mut Checks) {
    let base = Path::new(BASE);
    let share = base.join("escape-share");
    let outside = base.join("outside");
    let setup = (|| -> Result<(), String> {
        let io = |e: std::io::Error| e.to_string();
        fresh(&share)?;
        fresh(&outside)?;
        fs::write(outside.join("secret"), format!("{SECRET}\n")).map_err(io)?;
        fs::write(share.join("file"), b"inside the share\n").map_err(io)?;
        fs::create_dir_all(share.join("sub")).map_err(io)?;
        fs::write(share.join("sub/own"), b"sub's own file\n").map_err(io)?;
        symlink("/", share.join("escape")).map_err(io)?;
        symlink("/etc/passwd", share.join("etc-link")).map_err(io)?;
        symlink(outside.join("secret"), share.join("secret-link")).map_err(io)?;
        symlink("../outside/secret", share.join("rel-link")).map_err(io)?;
        Ok(())
    })();
    if let Err(e) = setup {
        return c.result("setup", Err(e));
    }
    // L1's own files the guest must never see: its passwd's first line
    // and the names at its root the guest's initramfs lacks.
    let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
    let passwd_line = passwd.lines().next().unwrap_or("root:x:0:0").to_string();
    let outside_before = fs::read(outside.join("secret")).unwrap_or_default();
    let l1_root_before: Vec<String> = fs::read_dir("/")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let Some(vm) = booted(
        builder(kernel, initramfs).share(Share::new(&share, "escape").mount_at("/mnt/s")),
        c,
    ) else {
        return;
    };
    let forbidden = [SECRET, passwd_line.as_str()];
    let f = &forbidden[..];
    attempt(&vm, c, "cat-etc-link", "cat /mnt/s/etc-link", f);
    attempt(&vm, c, "cat-secret-link", "cat /mnt/s/secret-link", f);
    attempt(&vm, c, "cat-rel-link", "cat /mnt/s/rel-link", f);
    attempt(
        &vm,
        c,
        "ls-escape",
        "ls /mnt/s/escape/ /mnt/s/escape/tmp/",
        f,
    );
    c.result(
        "escape-is-guest-root",
        (|| {
            let through = ok(&vm, "ls /mnt/s/escape/")?;
            let guest_root = ok(&vm, "ls /")?;
            if through == guest_root {
                Ok("ls through `escape -> /` lists the guest's own root".to_string())
            } else {
                Err(format!("{through:?} vs guest / {guest_root:?}"))
            }
        })(),
    );
    attempt(
        &vm,
        c,
        "dotdot-chain",
        &format!("cat /mnt/s/../../../../..{}/secret", outside.display()),
        f,
    );
    attempt(
        &vm,
        c,
        "dotdot-from-inside",
        &format!(
            "cd /mnt/s/sub && cat ../../../../../..{}/secret; ls ../..",
            outside.display()
        ),
        f,
    );
    attempt(
        &vm,
        c,
        "mknod-block",
        "mknod /mnt/s/sda b 8 0 && cat /mnt/s/sda | head -c 64 | od -c",
        f,
    );
    attempt(
        &vm,
        c,
        "mknod-char",
        "mknod /mnt/s/mem c 1 1 && head -c 64 /mnt/s/mem | od -c",
        f,
    );
    attempt(
        &vm,
        c,
        "mkfifo",
        "mkfifo /mnt/s/fifo && ls -l /mnt/s/fifo",
        f,
    );
    attempt(&vm, c, "hard-link-out", "ln /mnt/s/file /tmp/out-link", f);
    attempt(
        &vm,
        c,
        "symlink-made",
        "ln -s /etc/shadow /mnt/s/shadow-link && cat /mnt/s/shadow-link",
        f,
    );
    attempt(
        &vm,
        c,
        "rename-out",
        "mv /mnt/s/file /tmp/moved && cat /tmp/moved",
        f,
    );
    // The host moves a directory out of the share, next to the secret,
    // while a guest shell sits in it.
    let moved = (|| -> Result<String, String> {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg("cd /mnt/s/sub && sleep 3 && ls . .. && cat ../secret; cat own")
            .stdout(chitin::Stdio::piped())
            .stderr(chitin::Stdio::piped())
            .timeout(Duration::from_secs(600));
        let child = vm.spawn(&cmd).map_err(|e| chitin::error_chain(&e))?;
        std::thread::sleep(Duration::from_secs(1));
        fs::rename(share.join("sub"), outside.join("sub")).map_err(|e| e.to_string())?;
        let o = child
            .wait_with_output()
            .map_err(|e| chitin::error_chain(&e))?;
        let all = format!(
            "{}\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        let shown = all.split_whitespace().collect::<Vec<_>>().join(" ");
        if all.contains(SECRET) {
            Err(format!("the secret showed after the move: {shown}"))
        } else {
            Ok(format!("moved out mid-`cd`: {shown}"))
        }
    })();
    c.result("dir-moved-out-by-host", moved);

    // Nothing outside the share changed; nothing appeared at L1's root.
    c.result(
        "outside-unchanged",
        (|| {
            let secret = fs::read(outside.join("secret")).map_err(|e| e.to_string())?;
            let names: Vec<String> = fs::read_dir(&outside)
                .map_err(|e| e.to_string())?
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            let mut l1_root: Vec<String> = fs::read_dir("/")
                .map_err(|e| e.to_string())?
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            let mut before = l1_root_before.clone();
            l1_root.sort();
            before.sort();
            let devices = ["sda", "mem"]
                .iter()
                .filter(|d| share.join(d).exists())
                .count();
            if secret == outside_before && l1_root == before && devices == 0 {
                Ok(format!(
                    "secret intact, outside holds {names:?} (the host's own move), L1's / unchanged, no device node in the share"
                ))
            } else {
                Err(format!(
                    "secret same: {}, outside {names:?}, root {l1_root:?} vs {before:?}, devices {devices}",
                    secret == outside_before
                ))
            }
        })(),
    );
    c.result("device-faults", super::device_faults(&vm));
}

pub fn ro_checks(kernel: &str, initramfs: &str, c: &mut Checks) {
    let share = Path::new(BASE).join("ro");
    let setup = fresh(&share).and_then(|()| {
        fs::write(share.join("file"), b"read-only content\n").map_err(|e| e.to_string())?;
        fs::create_dir_all(share.join("dir")).map_err(|e| e.to_string())
    });
    if let Err(e) = setup {
        return c.result("setup", Err(e));
    }
    let before = tree_state(&share);
    // The same directory twice: mounted `ro` by the agent, and a second
    // tag the guest mounts read-write itself, so the device's own refusal
    // is what stops the writes there.
    let Some(vm) = booted(
        builder(kernel, initramfs)
            .share(Share::new(&share, "ro").read_only(true).mount_at("/mnt/ro"))
            .share(Share::new(&share, "ro-raw").read_only(true)),
        c,
    ) else {
        return;
    };
    c.result(
        "raw-mount-rw",
        ok(&vm, "mkdir -p /mnt/raw && mount -t virtiofs ro-raw /mnt/raw && grep ' /mnt/raw ' /proc/mounts"),
    );
    let writes = [
        ("create", "touch {}/new"),
        ("overwrite", "echo x > {}/file"),
        ("append", "echo x >> {}/file"),
        ("truncate", "truncate -s 0 {}/file"),
        ("unlink", "rm {}/file"),
        ("mkdir", "mkdir {}/d"),
        ("rmdir", "rmdir {}/dir"),
        ("rename", "mv {}/file {}/moved"),
        ("symlink", "ln -s file {}/link"),
        ("hard-link", "ln {}/file {}/hard"),
        ("chmod", "chmod 600 {}/file"),
        ("mkfifo", "mkfifo {}/fifo"),
    ];
    for mount in ["/mnt/ro", "/mnt/raw"] {
        let mut refused = Vec::new();
        let mut wrong = Vec::new();
        for (name, script) in writes {
            let script = script.replace("{}", mount);
            match run(&vm, &script) {
                Ok(o) if o.code != Some(0) && o.stderr.contains("Read-only file system") => {
                    refused.push(name)
                }
                Ok(o) => wrong.push(format!("{name}: {:?} {}", o.code, o.stderr)),
                Err(e) => wrong.push(format!("{name}: {e}")),
            }
        }
        let label = if mount == "/mnt/ro" {
            "writes-refused-ro-mount"
        } else {
            "writes-refused-by-device"
        };
        c.result(
            label,
            if wrong.is_empty() {
                Ok(format!(
                    "{} of {} refused with EROFS: {refused:?}",
                    refused.len(),
                    writes.len()
                ))
            } else {
                Err(wrong.join("; "))
            },
        );
        c.result(
            &format!("reads-{}", &mount[5..]),
            ok(&vm, &format!("cat {mount}/file")).and_then(|s| {
                if s == "read-only content" {
                    Ok(s)
                } else {
                    Err(s)
                }
            }),
        );
    }
    c.result(
        "host-unchanged",
        if tree_state(&share) == before {
            Ok("every file and name as before".into())
        } else {
            Err(format!("{:?} -> {:?}", before, tree_state(&share)))
        },
    );
    c.result("device-faults", super::device_faults(&vm));
}

/// (path, mode, content) of everything under `dir`, sorted.
fn tree_state(dir: &Path) -> Vec<(String, u32, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.filter_map(|e| e.ok()) {
            let path = e.path();
            let Ok(meta) = fs::symlink_metadata(&path) else {
                continue;
            };
            if meta.is_dir() {
                stack.push(path.clone());
            }
            let content = if meta.is_file() {
                fs::read(&path).unwrap_or_default()
            } else {
                Vec::new()
            };
            out.push((path.display().to_string(), meta.mode(), content));
        }
    }
    out.sort();
    out
}

/// L1's static busybox (the harness puts it there).
const L1_BUSYBOX: &str = "/nested/busybox";

/// One container check: `cmd`'s stdout must satisfy `want`.
fn container_run(
    vm: &RunningSandbox,
    c: &mut Checks,
    name: &str,
    cmd: &mut Command,
    want: impl Fn(&str) -> bool,
) {
    cmd.timeout(Duration::from_secs(600));
    let result = vm
        .exec(cmd)
        .map_err(|e| chitin::error_chain(&e))
        .and_then(|o| {
            let out = String::from_utf8_lossy(&o.stdout).trim().to_string();
            let shown = out.split_whitespace().collect::<Vec<_>>().join(" ");
            if o.status == ExitStatus::Code(0) && want(&out) {
                Ok(shown)
            } else {
                Err(format!(
                    "{:?}: {shown} {}",
                    o.status,
                    String::from_utf8_lossy(&o.stderr).trim()
                ))
            }
        });
    c.result(name, result);
}

fn sh_in(script: &str) -> Command {
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(script);
    cmd
}

/// `examples/container.rs` through the library: a busybox root shared
/// read-only from L1 as the sandbox's rootfs, commands run in it as
/// container processes.
pub fn container_checks(kernel: &str, initramfs: &str, c: &mut Checks) {
    use chitin_testkit::rootfs::{busybox_rootfs, IMAGE_HOSTNAME, ROOTFS_DIRS, ROOTFS_NAME};
    let root = Path::new(BASE).join("rootfs");
    // A second root inside the image whose /dev is a symlink to `/`: the
    // agent must refuse it rather than mount over its own root.
    let bad = root.join("home/bad");
    // What the mounts check binds from: a writable share beside the root.
    let vols = Path::new(BASE).join("vols");
    let made = busybox_rootfs(&root, Path::new(L1_BUSYBOX)).and_then(|()| {
        for dir in ["proc", "sys", "tmp"] {
            fs::create_dir_all(bad.join(dir))?;
        }
        symlink("/", bad.join("dev"))?;
        // An image's absolute symlink: the container's /root, not L1's.
        symlink("/root", root.join("home/link"))?;
        let _ = fs::remove_dir_all(&vols);
        fs::create_dir_all(vols.join("data"))?;
        fs::write(vols.join("data/file"), "bound-dir\n")?;
        fs::write(vols.join("release"), "bound-file\n")
    });
    if let Err(e) = made {
        return c.result("setup", Err(e.to_string()));
    }
    let before = tree_state(&root);
    // `uname` is in both roots; the first exec already runs in the
    // container.
    let rootfs = Share::new(&root, "rootfs").read_only(true);
    let configured = builder(kernel, initramfs)
        .rootfs(rootfs)
        .share(Share::new(&vols, "vols").mount_at("/mnt/vols"));
    let Some(vm) = booted(configured, c) else {
        return;
    };
    mount_checks(&vm, c);
    attribute_checks(&vm, c);
    c.result("tty", tty_check(&vm));
    container_run(
        &vm,
        c,
        "default-root",
        &mut sh_in("cat /etc/os-release"),
        |o| o.contains(ROOTFS_NAME),
    );
    let want_dirs = ROOTFS_DIRS.join(" ");
    container_run(&vm, c, "ls-root", &mut sh_in("ls /"), |o| {
        o.split_whitespace().collect::<Vec<_>>().join(" ") == want_dirs
    });
    container_run(
        &vm,
        c,
        "agent-files-unreachable",
        &mut sh_in("ls /init /nested 2>&1; test ! -e /init"),
        |o| o.contains("No such file"),
    );
    container_run(
        &vm,
        c,
        "hostname",
        sh_in("cat /etc/hostname; hostname").hostname("chitin-box"),
        |o| o == "chitin-box\nchitin-box",
    );
    container_run(
        &vm,
        c,
        "image-hostname-file-kept",
        &mut sh_in("cat /etc/hostname"),
        |o| o == IMAGE_HOSTNAME,
    );
    container_run(
        &vm,
        c,
        "pivoted-root",
        &mut sh_in("grep -E '^[0-9]+ [0-9]+ [0-9]+:[0-9]+ / / ' /proc/self/mountinfo"),
        |o| o.contains("virtiofs") && o.contains("rootfs") && o.lines().count() == 1,
    );
    container_run(
        &vm,
        c,
        "fresh-mounts",
        &mut sh_in("awk '{print $5}' /proc/self/mountinfo | sort | tr '\\n' ' '"),
        |o| {
            ["/proc", "/sys", "/dev", "/dev/pts", "/dev/shm", "/tmp"]
                .iter()
                .all(|m| o.split_whitespace().any(|x| x == *m))
        },
    );
    container_run(&vm, c, "dev", &mut sh_in("ls /dev"), |o| {
        o.split_whitespace().collect::<Vec<_>>()
            == [
                "full", "null", "ptmx", "pts", "random", "shm", "tty", "urandom", "zero",
            ]
    });
    container_run(
        &vm,
        c,
        "dev-works",
        &mut sh_in("echo x > /dev/null && head -c 4 /dev/zero | od -An -tx1 && head -c 8 /dev/urandom | wc -c"),
        |o| o.starts_with("00 00 00 00") && o.ends_with('8'),
    );
    container_run(
        &vm,
        c,
        "user-and-cwd",
        sh_in("id -u; id -g; pwd; touch /tmp/mine && stat -c %u /tmp/mine")
            .uid(1000)
            .gid(1000)
            .current_dir("/tmp"),
        |o| o == "1000\n1000\n/tmp\n1000",
    );
    container_run(
        &vm,
        c,
        "root-read-only",
        &mut sh_in("touch /etc/new 2>&1; test ! -e /etc/new"),
        |o| o.contains("Read-only file system"),
    );
    container_run(
        &vm,
        c,
        "agent-root",
        Command::new("ls").arg("/").agent_root(),
        |o| o.split_whitespace().any(|x| x == "init"),
    );
    c.result(
        "bad-root-refused",
        match vm.exec(
            Command::new("true")
                .root("/no/such/root")
                .timeout(Duration::from_secs(60)),
        ) {
            Err(e) => Ok(chitin::error_chain(&e)),
            Ok(o) => Err(format!("ran: {o:?}")),
        },
    );
    c.result(
        "symlinked-mount-point-refused",
        match vm.exec(
            Command::new("true")
                .root(format!("{}/home/bad", chitin::ROOTFS_MOUNT))
                .timeout(Duration::from_secs(60)),
        ) {
            Err(e) if chitin::error_chain(&e).contains("symlink") => Ok(chitin::error_chain(&e)),
            other => Err(format!("{other:?}")),
        },
    );
    c.result(
        "missing-program-127",
        match vm.exec(Command::new("no-such-program").timeout(Duration::from_secs(60))) {
            Ok(o) if o.status == ExitStatus::Code(127) => Ok(format!(
                "exit 127: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            other => Err(format!("{other:?}")),
        },
    );
    c.result(
        "image-unchanged",
        if tree_state(&root) == before {
            Ok("the root on the host is as it was made".into())
        } else {
            Err("the container changed the shared root".into())
        },
    );
    c.result("device-faults", super::device_faults(&vm));
}

/// Mounts inside a container's (read-only) root: a tmpfs through the
/// image's absolute symlink, a share's directory bound read-only, a
/// share's file bound over the image's; a mount point the read-only root
/// lacks fails the set-up with status 125; a relative destination is
/// refused.
fn mount_checks(vm: &RunningSandbox, c: &mut Checks) {
    use chitin::Mount;
    let script = "grep -E ' /root .* tmpfs ' /proc/self/mountinfo | wc -l; \
                  touch /root/new && echo tmpfs-writable; \
                  cat /home/user/file; touch /home/user/x 2>/dev/null || echo dir-read-only; \
                  cat /etc/os-release";
    container_run(
        vm,
        c,
        "mounts",
        sh_in(script)
            .mount(
                Mount::tmpfs("/home/link")
                    .options("size=1m,mode=700")
                    .nosuid()
                    .nodev(),
            )
            .mount(Mount::bind("/mnt/vols/data", "/home/user").read_only())
            .mount(Mount::bind("/mnt/vols/release", "/etc/os-release")),
        |o| o == "1\ntmpfs-writable\nbound-dir\ndir-read-only\nbound-file",
    );
    let missing = vm.exec(
        sh_in("true")
            .mount(Mount::tmpfs("/no/such/dir"))
            .timeout(Duration::from_secs(60)),
    );
    c.result(
        "mount-point-missing",
        match missing {
            Ok(o) if o.status == ExitStatus::Code(125) => {
                let err = String::from_utf8_lossy(&o.stderr).trim().to_string();
                match err.contains("/no/such/dir") {
                    true => Ok(format!("exit 125: {err}")),
                    false => Err(err),
                }
            }
            other => Err(format!("{other:?}")),
        },
    );
    c.result(
        "mount-refused",
        match vm.exec(
            sh_in("true")
                .mount(Mount::tmpfs("relative"))
                .timeout(Duration::from_secs(60)),
        ) {
            Err(e) if chitin::error_chain(&e).contains("absolute") => Ok(chitin::error_chain(&e)),
            other => Err(format!("{other:?}")),
        },
    );
}

/// A container process's attributes as it sees them: supplementary
/// groups, umask, an rlimit, the capability sets (a user keeps its
/// ambient set; root keeps what the bounding set allows),
/// no-new-privileges and the OOM score.
fn attribute_checks(vm: &RunningSandbox, c: &mut Checks) {
    use chitin::Capabilities;
    let status = "grep -E '^(CapBnd|CapEff|NoNewPrivs)' /proc/self/status | tr -d '\\t'";
    let script = format!("id -G; umask; ulimit -n; {status}; cat /proc/self/oom_score_adj");
    // CAP_CHOWN (0) and CAP_NET_RAW (13) bound, none effective.
    let bounded = Capabilities {
        bounding: 1 | 1 << 13,
        ..Capabilities::default()
    };
    container_run(
        vm,
        c,
        "attributes",
        sh_in(&script)
            .uid(1000)
            .gid(1000)
            .groups([10, 20])
            .umask(0o027)
            .rlimit(libc::RLIMIT_NOFILE, 512, 1024)
            .capabilities(bounded)
            .no_new_privileges()
            .oom_score_adj(500),
        |o| {
            o == "1000 10 20\n0027\n512\nCapEff:0000000000000000\nCapBnd:0000000000002001\nNoNewPrivs:1\n500"
        },
    );
    // CAP_NET_BIND_SERVICE (10) kept by a user through the ambient set.
    let bind = 1 << 10;
    let ambient = Capabilities {
        bounding: bind,
        effective: bind,
        permitted: bind,
        inheritable: bind,
        ambient: bind,
    };
    container_run(
        vm,
        c,
        "ambient-capability",
        sh_in("grep CapEff /proc/self/status | tr -d '\\t'")
            .uid(1000)
            .gid(1000)
            .capabilities(ambient),
        |o| o == "CapEff:0000000000000400",
    );
    // Root keeps only what the bounding set allows: CAP_CHOWN.
    let chown = Capabilities {
        bounding: 1,
        effective: 1,
        permitted: 1,
        ..Capabilities::default()
    };
    container_run(
        vm,
        c,
        "root-bounded",
        sh_in(
            "grep CapEff /proc/self/status | tr -d '\\t'; chown 1000 /tmp && echo chown-ok; \
               mknod /tmp/n c 1 3 2>/dev/null || echo mknod-refused",
        )
        .capabilities(chown),
        |o| o == "CapEff:0000000000000001\nchown-ok\nmknod-refused",
    );
}

/// A container process on a guest terminal: stdin is a terminal, its
/// size is the one asked for, a resize reaches it, input typed reaches
/// it, and everything comes on stdout.
fn tty_check(vm: &RunningSandbox) -> Result<String, String> {
    use std::io::Write;
    let mut cmd = sh_in(
        "test -t 0 && echo is-a-tty; stat -L -c %u /proc/self/fd/0; stty size; read line; stty size; echo got-$line",
    );
    // A user's terminal is the user's.
    cmd.tty(30, 100)
        .uid(1000)
        .gid(1000)
        .stdin(chitin::Stdio::piped())
        .timeout(Duration::from_secs(120));
    let mut child = vm.spawn(&cmd).map_err(|e| chitin::error_chain(&e))?;
    let mut stdin = child.stdin.take().ok_or("no stdin")?;
    let mut stdout = BufReader::new(child.stdout.take().ok_or("no stdout")?);
    // The first size is printed before the resize.
    let mut seen = String::new();
    while !seen.contains("30 100") {
        let mut line = String::new();
        match stdout.read_line(&mut line) {
            Ok(0) | Err(_) => return Err(format!("output ended early: {seen:?}")),
            Ok(_) => seen.push_str(&line),
        }
    }
    // RESIZE goes before the line on the same connection: the shell reads
    // the line only after the new size is set.
    child
        .signaller()
        .resize(40, 120)
        .map_err(|e| chitin::error_chain(&e))?;
    stdin.write_all(b"go\n").map_err(|e| e.to_string())?;
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut stdout, &mut rest);
    let out = child
        .wait_with_output()
        .map_err(|e| chitin::error_chain(&e))?;
    let stdout = format!("{seen}{rest}").replace('\r', "");
    let lines: Vec<&str> = stdout.lines().collect();
    // The terminal echoes the typed line.
    let want = ["is-a-tty", "1000", "30 100", "go", "40 120", "got-go"];
    if out.status != ExitStatus::Code(0) || !out.stderr.is_empty() || lines != want {
        return Err(format!(
            "{:?}: stdout {stdout:?}, stderr {:?}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(format!(
        "uid 1000 on a 30x100 terminal it owns, resized to 40x120, the typed line echoed and read: {}",
        lines.join(" | ")
    ))
}

/// `key=value` from a tool's output line.
fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

/// The bench's file: 64 MiB.
const BENCH_LEN: usize = 64 << 20;

/// Read the 64 MiB file through virtio-fs and the same bytes from a
/// virtio-blk disk (raw, so no guest file system differs), and 1000 ×
/// (create, write 4 KiB, stat, unlink) on the share and on the guest's
/// tmpfs: MB/s, ops/s and their ratios.
pub fn bench_checks(kernel: &str, initramfs: &str, c: &mut Checks) {
    let base = Path::new(BASE).join("bench");
    let share = base.join("share");
    let image = base.join("disk.img");
    let bytes = pattern(BENCH_LEN, 3);
    let want_fnv = format!("{:016x}", fnv1a(FNV_BASIS, &bytes));
    let setup = fresh(&share).and_then(|()| {
        fs::write(share.join("big"), &bytes).map_err(|e| e.to_string())?;
        fs::create_dir_all(share.join("ops")).map_err(|e| e.to_string())?;
        fs::write(&image, &bytes).map_err(|e| e.to_string())
    });
    drop(bytes);
    if let Err(e) = setup {
        return c.result("setup", Err(e));
    }
    let configured = builder(kernel, initramfs)
        .share(Share::new(&share, "bench").mount_at("/mnt/b"))
        .disk(chitin::Disk::new(&image).read_only(true));
    let Some(vm) = booted(configured, c) else {
        return;
    };
    let read = |path: &str| -> Result<f64, String> {
        let line = ok(&vm, &format!("/init fs-read {path}"))?;
        let (Some(n), Some(ms)) = (field(&line, "bytes"), field(&line, "ms")) else {
            return Err(line);
        };
        if n != BENCH_LEN as u64 || !line.contains(&format!("fnv={want_fnv}")) {
            return Err(format!(
                "{path}: {line}, want {BENCH_LEN} bytes fnv={want_fnv}"
            ));
        }
        Ok(n as f64 / 1e6 / (ms.max(1) as f64 / 1000.0))
    };
    let fs_read = read("/mnt/b/big");
    let blk_read = read("/dev/vda");
    c.result(
        "bench-seq-read-64mib",
        match (fs_read, blk_read) {
            (Ok(f), Ok(b)) => Ok(format!(
                "virtio-fs {f:.1} MB/s, virtio-blk {b:.1} MB/s, fs/blk ratio {:.2}",
                f / b
            )),
            (f, b) => Err(format!("fs {f:?}, blk {b:?}")),
        },
    );
    let ops = |dir: &str| -> Result<f64, String> {
        let line = ok(&vm, &format!("mkdir -p {dir} && /init fs-ops {dir} 1000"))?;
        match (field(&line, "ops"), field(&line, "ms")) {
            (Some(n), Some(ms)) => Ok(n as f64 / (ms.max(1) as f64 / 1000.0)),
            _ => Err(line),
        }
    };
    let fs_ops = ops("/mnt/b/ops");
    let tmpfs_ops = ops("/tmp/ops");
    c.result(
        "bench-create-write-stat-unlink",
        match (fs_ops, tmpfs_ops) {
            (Ok(f), Ok(t)) => Ok(format!(
                "1000 x (create, write 4 KiB, stat, unlink): virtio-fs {f:.0} ops/s, guest tmpfs {t:.0} ops/s, fs/tmpfs ratio {:.3}",
                f / t
            )),
            (f, t) => Err(format!("fs {f:?}, tmpfs {t:?}")),
        },
    );
    c.result("device-faults", super::device_faults(&vm));
    drop(vm);
    let _ = fs::remove_dir_all(&base);
}
