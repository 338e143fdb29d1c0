//! The `snapshot` scenario: a real Linux guest paused, snapshotted, and
//! restored as clones that go on where it stopped.
//!
//! The default guest boots with a read-only disk, an exec leaves a file in
//! its tmpfs and a counter running in the background, then it is paused
//! and snapshotted and stopped. Two clones are restored at once, each
//! with its own disk: in each the file is there, the counter goes on from
//! where it was, exec works (through a new agent connection, after the
//! vsock transport reset), writes stay in their clone, the kernel's
//! random numbers differ, and the disk is the clone's own. Then the
//! figure: cold start against restore to the first exec answer (what
//! clones hold against cold sandboxes is bench-boot's `--density` run).

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chitin::{Disk, ExitStatus, RunningSandbox, SandboxBuilder, Snapshot};
use chitin_testkit::Report as Checks;

use super::{agent_sandbox, seccomp_mode, sh};

const BASE: &str = "/tmp/chitin-snapshot";
/// Bytes of each disk image.
const DISK_LEN: u64 = 8 << 20;
/// Where in each image its mark is: past what the kernel reads when it
/// probes the disk.
const MARK_AT: u64 = 1 << 20;
/// Cold starts timed (the scenario's first sandbox is one of them).
const COLD_ROUNDS: usize = 3;
/// Restores timed.
const RESTORE_ROUNDS: usize = 5;
/// The longest any command may take: boots share L1's one emulated CPU.
const EXEC_TIMEOUT: Duration = Duration::from_secs(600);
/// How long the counter gets to show it runs.
const COUNTER_WAIT: Duration = Duration::from_secs(30);

/// The guest's background counter: the next number into /tmp/count every
/// 50 ms, replaced whole (a reader never sees half a number). In a session
/// of its own, so the agent's end of the exec's connection does not end
/// it.
const START_COUNTER: &str = "echo snapshot-file > /tmp/f && \
    setsid sh -c 'i=0; while :; do echo $i > /tmp/count.new && mv /tmp/count.new /tmp/count; i=$((i+1)); sleep 0.05; done' \
    </dev/null >/dev/null 2>&1 &";

/// A disk image of [`DISK_LEN`] bytes with `mark` at [`MARK_AT`].
fn image(dir: &Path, name: &str, mark: &str) -> Result<PathBuf, String> {
    let path = dir.join(name);
    let file = fs::File::create(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    file.set_len(DISK_LEN)
        .and_then(|()| file.write_all_at(mark.as_bytes(), MARK_AT))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
}

/// Run `script` in the guest; its trimmed stdout if it exited 0.
fn out(vm: &RunningSandbox, script: &str) -> Result<String, String> {
    let o = vm
        .exec(sh(script).timeout(EXEC_TIMEOUT))
        .map_err(|e| format!("{script}: {}", chitin::error_chain(&e)))?;
    if o.status != ExitStatus::Code(0) {
        return Err(format!(
            "{script}: {:?}, stderr {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
}

/// The counter's last number.
fn count(vm: &RunningSandbox) -> Result<u64, String> {
    let text = out(vm, "cat /tmp/count")?;
    text.parse()
        .map_err(|_| format!("/tmp/count holds {text:?}"))
}

/// The mark on the guest's `/dev/vda`, read past the page cache (which a
/// clone inherits from its snapshot).
fn disk_mark(vm: &RunningSandbox) -> Result<String, String> {
    out(
        vm,
        &format!(
            "echo 3 > /proc/sys/vm/drop_caches && dd if=/dev/vda bs=4096 skip={} count=1 2>/dev/null | head -c 12",
            MARK_AT / 4096
        ),
    )
}

/// The cold sandbox: the default guest with `disk` read-only.
fn cold(kernel: &str, initramfs: &str, disk: &Path) -> SandboxBuilder {
    agent_sandbox(kernel, initramfs).disk(Disk::new(disk).read_only(true))
}

fn start(builder: SandboxBuilder) -> Result<RunningSandbox, String> {
    builder
        .build()
        .and_then(|s| s.start())
        .map_err(|e| chitin::error_chain(&e))
}

/// The builder of a clone of `snapshot`, its disk `disk` (the snapshot's
/// own if `None`).
fn clone_builder(snapshot: &Snapshot, disk: Option<&Path>) -> SandboxBuilder {
    let builder = snapshot.restore_builder().seccomp(seccomp_mode());
    match disk {
        Some(disk) => builder.disk(Disk::new(disk).read_only(true)),
        None => snapshot.disks().into_iter().fold(builder, |b, d| b.disk(d)),
    }
}

/// A clone of `snapshot`, started.
fn restore(snapshot: &Snapshot, disk: Option<&Path>) -> Result<RunningSandbox, String> {
    start(clone_builder(snapshot, disk))
}

/// `start` then the first exec answered: the sandbox and the time.
fn first_answer(
    start: impl FnOnce() -> Result<RunningSandbox, String>,
) -> Result<(RunningSandbox, u64), String> {
    let t = Instant::now();
    let vm = start()?;
    out(&vm, "true")?;
    Ok((vm, t.elapsed().as_millis() as u64))
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

/// The two clones' checks.
fn clone_checks(a: &RunningSandbox, b: &RunningSandbox, at_pause: u64, c: &mut Checks) {
    let both = |f: &dyn Fn(&RunningSandbox) -> Result<String, String>| -> Result<(String, String), String> {
        Ok((f(a)?, f(b)?))
    };
    c.result(
        "clone-file",
        both(&|vm| out(vm, "cat /tmp/f")).and_then(|(x, y)| {
            if x == "snapshot-file" && y == "snapshot-file" {
                Ok("the file the original wrote is in both clones".into())
            } else {
                Err(format!("{x:?} and {y:?}"))
            }
        }),
    );
    c.result(
        "clone-counter",
        both(&|vm| {
            let first = count(vm)?;
            std::thread::sleep(Duration::from_millis(500));
            let later = count(vm)?;
            if first < at_pause || later <= first {
                return Err(format!(
                    "{at_pause} at the pause, then {first}, then {later}"
                ));
            }
            Ok(format!("{first} -> {later}"))
        })
        .map(|(x, y)| format!("at the pause {at_pause}; clone a {x}, clone b {y}")),
    );
    c.result(
        "clone-writes-isolated",
        (|| {
            out(a, "echo clone-a > /tmp/iso")?;
            let seen = out(b, "cat /tmp/iso 2>/dev/null || echo absent")?;
            if seen != "absent" {
                return Err(format!("clone b sees clone a's file: {seen:?}"));
            }
            out(b, "echo clone-b > /tmp/iso")?;
            match out(a, "cat /tmp/iso")?.as_str() {
                "clone-a" => Ok(
                    "a file written in one clone is absent from the other, and each keeps its own"
                        .into(),
                ),
                other => Err(format!("clone a reads back {other:?}")),
            }
        })(),
    );
    c.result(
        "clone-urandom",
        both(&|vm| out(vm, "head -c16 /dev/urandom | od -An -tx1 | tr -d ' \\n'")).and_then(
            |(x, y)| {
                if x.len() == 32 && x != y {
                    Ok(format!("{x} vs {y}"))
                } else {
                    Err(format!("the clones read {x:?} and {y:?}"))
                }
            },
        ),
    );
    c.result(
        "clone-disk",
        both(&disk_mark).and_then(|(x, y)| {
            if x == "disk-clone-a" && y == "disk-clone-b" {
                Ok("each clone reads its own re-targeted disk".into())
            } else {
                Err(format!("the clones read {x:?} and {y:?}"))
            }
        }),
    );
    for (name, vm) in [("clone-a-faults", a), ("clone-b-faults", b)] {
        c.result(name, super::device_faults(vm));
    }
}

pub fn checks(kernel: &str, initramfs: &str, c: &mut Checks) {
    let dir = Path::new(BASE);
    let _ = fs::remove_dir_all(dir);
    let images = fs::create_dir_all(dir)
        .map_err(|e| format!("mkdir {BASE}: {e}"))
        .and_then(|()| {
            Ok([
                image(dir, "original.img", "disk-origin")?,
                image(dir, "a.img", "disk-clone-a")?,
                image(dir, "b.img", "disk-clone-b")?,
            ])
        });
    let [original, disk_a, disk_b] = match images {
        Ok(images) => images,
        Err(e) => return c.result("setup", Err(e)),
    };

    // The original: boot, leave state behind, pause, snapshot, stop.
    let at = Instant::now();
    let vm = match start(cold(kernel, initramfs, &original)) {
        Ok(vm) => vm,
        Err(e) => return c.result("sandbox", Err(e)),
    };
    super::first_checks(&vm, at, c);
    let mut cold_ms = vec![at.elapsed().as_millis() as u64];
    let started = out(&vm, START_COUNTER).and_then(|_| {
        let t = Instant::now();
        loop {
            match count(&vm) {
                Ok(n) if n >= 3 => return Ok(n),
                _ if t.elapsed() > COUNTER_WAIT => return Err("the counter did not count".into()),
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    });
    // The number before the pause: the clones must not go back from it.
    let at_pause = match started.and_then(|_| count(&vm)) {
        Ok(n) => n,
        Err(e) => return c.result("counter", Err(e)),
    };
    let snap = dir.join("snap");
    let t = Instant::now();
    let taken = vm
        .pause()
        .map_err(|e| e.to_string())
        .and_then(|()| vm.snapshot(&snap).map_err(|e| chitin::error_chain(&e)));
    let snapshot_ms = t.elapsed().as_secs_f64() * 1e3;
    // The clones must not need the original.
    vm.stop();
    let info = match taken {
        Ok(info) => info,
        Err(e) => return c.result("snapshot", Err(e)),
    };
    c.result(
        "snapshot",
        Ok(format!(
            "paused and saved in {snapshot_ms:.1} ms: state {} KiB, memory {} MiB of which {} MiB written",
            info.state_bytes >> 10,
            info.memory_bytes >> 20,
            info.memory_written >> 20
        )),
    );
    let snapshot = match Snapshot::open(&snap) {
        Ok(s) => s,
        Err(e) => return c.result("snapshot-open", Err(chitin::error_chain(&e))),
    };

    // Two clones at once, each with its own disk.
    let clones = std::thread::scope(|s| {
        let a = s.spawn(|| first_answer(|| restore(&snapshot, Some(&disk_a))));
        let b = s.spawn(|| first_answer(|| restore(&snapshot, Some(&disk_b))));
        let join = |h: std::thread::ScopedJoinHandle<'_, _>| {
            h.join()
                .unwrap_or_else(|_| Err("a restore thread panicked".to_string()))
        };
        (join(a), join(b))
    });
    let ((a, a_ms), (b, b_ms)) = match clones {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => return c.result("clones", Err(e)),
    };
    c.result(
        "clones",
        Ok(format!(
            "two clones restored at once answered their first exec in {a_ms} ms and {b_ms} ms"
        )),
    );
    clone_checks(&a, &b, at_pause, c);
    drop((a, b));

    // Figures: cold start and restore to the first exec answer.
    let figures = (|| {
        for _ in 1..COLD_ROUNDS {
            let (vm, ms) = first_answer(|| start(cold(kernel, initramfs, &original)))?;
            cold_ms.push(ms);
            drop(vm);
        }
        let mut restore_ms = Vec::new();
        let (mut build_ms, mut start_ms, mut exec_ms) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..RESTORE_ROUNDS {
            // Phase by phase: open + build(), start(), the first answer.
            let t = Instant::now();
            let builder = clone_builder(&snapshot, None);
            let built = builder.build().map_err(|e| chitin::error_chain(&e))?;
            let t_built = Instant::now();
            let vm = built.start().map_err(|e| chitin::error_chain(&e))?;
            let t_started = Instant::now();
            out(&vm, "true")?;
            let t_answered = Instant::now();
            build_ms.push((t_built - t).as_millis() as u64);
            start_ms.push((t_started - t_built).as_millis() as u64);
            exec_ms.push((t_answered - t_started).as_millis() as u64);
            restore_ms.push((t_answered - t).as_millis() as u64);
            drop(vm);
        }
        let (cold, restored) = (median(cold_ms.clone()), median(restore_ms.clone()));
        Ok::<_, String>(format!(
            "cold build+start -> first exec median {cold} ms {cold_ms:?}, restore -> first exec median {restored} ms {restore_ms:?} (build {} ms, start {} ms, first exec {} ms): {:.1}x",
            median(build_ms),
            median(start_ms),
            median(exec_ms),
            cold as f64 / restored.max(1) as f64
        ))
    })();
    c.result("restore-vs-cold", figures);

    let _ = fs::remove_dir_all(dir);
}
