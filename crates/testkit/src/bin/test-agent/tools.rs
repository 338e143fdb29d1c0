//! Small test tools the test agent binary also provides, for the nested
//! tier's `vsock` and `net` scenarios (run through exec as
//! `/init <tool> ...`; the `net-*` tools are described in [`net`]):
//!
//! - `vsock-echo-client PORT BYTES`: connect to the host (CID 2) on PORT,
//!   send BYTES of pattern while reading the echo back, and print
//!   `sent=<n> sent_fnv=<hex> received=<n> received_fnv=<hex> ms=<ms>`;
//!   exit 0 only when both match.
//! - `vsock-echo-server PORT`: accept one connection on PORT, echo it until
//!   EOF, then close; prints `echoed=<n>`.
//! - `blk-write-direct DEV BYTES`: O_DIRECT writes of pattern to a raw
//!   disk, timed (the `net-limit` scenario's limited disk).
//! - `fs-mmap-write FILE OFFSET TEXT`: write TEXT into FILE at OFFSET
//!   through a shared writable mapping, then `msync` (the `fs`
//!   scenario's write-back through the page cache).
//! - `fs-read PATH`: read PATH (a file or a disk) to its end in 1 MiB
//!   reads; prints `bytes=<n> ms=<ms> fnv=<hex>` (the `fs-bench`
//!   scenario).
//! - `fs-ops DIR N`: N times create a file in DIR, write 4 KiB, `stat`
//!   it, unlink it; prints `ops=<n> ms=<ms>`.
//! - `spawn-loop N CMD [ARG...]`: N times spawn CMD and wait for it, timing
//!   each; prints `runs=<n> median_us=<m> min_us=<m>`, exit 0 only when
//!   every run exited 0. The guest's own fork/exec/wait cost: the floor
//!   under what an exec through the agent can cost.

use std::io::Write;
use std::time::Instant;

use chitin_agent::vsock;
use chitin_testkit::{receive_all, send_pattern};

use crate::net;

/// `spawn-loop`: spawn and reap `cmd` `n` times, timing each.
fn spawn_loop(n: u64, cmd: &str, args: &[String]) -> i32 {
    let mut times = Vec::new();
    let mut failed = 0;
    for _ in 0..n {
        let t = Instant::now();
        match std::process::Command::new(cmd).args(args).status() {
            Ok(status) if status.success() => {}
            Ok(_) | Err(_) => failed += 1,
        }
        times.push(t.elapsed().as_micros());
    }
    times.sort_unstable();
    println!(
        "runs={} median_us={} min_us={}",
        times.len(),
        times[times.len() / 2],
        times[0]
    );
    if failed == 0 {
        0
    } else {
        eprintln!("{failed} of {n} runs failed");
        1
    }
}

/// Run `tool` if `args` names one; `None` if it is not a tool invocation.
pub fn run(args: &[String]) -> Option<i32> {
    let tool = args.get(1)?;
    let arg = |i: usize| args.get(i).and_then(|a| a.parse::<u64>().ok());
    Some(match tool.as_str() {
        "vsock-echo-client" => match (arg(2), arg(3)) {
            (Some(port), Some(bytes)) => echo_client(port as u32, bytes),
            _ => usage(),
        },
        "vsock-echo-server" => match arg(2) {
            Some(port) => echo_server(port as u32),
            None => usage(),
        },
        "blk-write-direct" => crate::blk::write_direct_tool(&args[2..]),
        "fs-read" => match args.get(2) {
            Some(path) => read_tool(path),
            None => usage(),
        },
        "fs-ops" => match (args.get(2), arg(3)) {
            (Some(dir), Some(n)) => ops_tool(dir, n),
            _ => usage(),
        },
        "fs-mmap-write" => match (args.get(2), arg(3), args.get(4)) {
            (Some(file), Some(offset), Some(text)) => mmap_write(file, offset, text.as_bytes()),
            _ => usage(),
        },
        "spawn-loop" => match (arg(2), args.get(3)) {
            (Some(n), Some(cmd)) if n > 0 => spawn_loop(n, cmd, &args[4..]),
            _ => usage(),
        },
        "net-send" | "net-recv" | "net-echo-clients" | "net-udp-hold" => net::run(tool, &args[2..]),
        _ => return None,
    })
}

fn usage() -> i32 {
    eprintln!(
        "usage: vsock-echo-client PORT BYTES | vsock-echo-server PORT | \
         fs-mmap-write FILE OFFSET TEXT | fs-read PATH | fs-ops DIR N"
    );
    2
}

/// Read `path` to its end, timed.
fn read_tool(path: &str) -> i32 {
    use std::io::Read;
    let start = Instant::now();
    let result = (|| -> std::io::Result<(u64, u64)> {
        let mut f = std::fs::File::open(path)?;
        let mut buf = vec![0u8; 1 << 20];
        let (mut total, mut hash) = (0u64, chitin_testkit::FNV_BASIS);
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                return Ok((total, hash));
            }
            hash = chitin_testkit::fnv1a(hash, &buf[..n]);
            total += n as u64;
        }
    })();
    match result {
        Ok((bytes, hash)) => {
            println!(
                "bytes={bytes} ms={} fnv={hash:016x}",
                start.elapsed().as_millis()
            );
            0
        }
        Err(e) => {
            eprintln!("fs-read {path}: {e}");
            1
        }
    }
}

/// `n` × (create, write 4 KiB, stat, unlink) in `dir`, timed.
fn ops_tool(dir: &str, n: u64) -> i32 {
    let block = vec![0x5au8; 4096];
    let start = Instant::now();
    for i in 0..n {
        let path = std::path::Path::new(dir).join(format!("op-{i}"));
        let step = std::fs::write(&path, &block)
            .and_then(|()| std::fs::metadata(&path))
            .and_then(|m| {
                if m.len() == 4096 {
                    std::fs::remove_file(&path)
                } else {
                    Err(std::io::Error::other(format!(
                        "size {} after a 4 KiB write",
                        m.len()
                    )))
                }
            });
        if let Err(e) = step {
            eprintln!("fs-ops {}: {e}", path.display());
            return 1;
        }
    }
    println!("ops={n} ms={}", start.elapsed().as_millis());
    0
}

/// Map FILE shared and writable, copy `text` in at `offset`, `msync`.
fn mmap_write(file: &str, offset: u64, text: &[u8]) -> i32 {
    use std::os::fd::AsRawFd;
    let result = (|| -> std::io::Result<()> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(file)?;
        let end = offset as usize + text.len();
        if f.metadata()?.len() < end as u64 {
            return Err(std::io::Error::other(
                "the file is shorter than OFFSET + TEXT",
            ));
        }
        // SAFETY: a fresh shared mapping of `end` bytes of an fd we own;
        // the kernel picks the address. The result is checked below.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                end,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `map` is `end` writable bytes and `offset + text.len()`
        // is `end`; the source is a separate Rust slice.
        unsafe {
            std::ptr::copy_nonoverlapping(
                text.as_ptr(),
                map.cast::<u8>().add(offset as usize),
                text.len(),
            )
        };
        // SAFETY: `map` and `end` are the mapping made above.
        let synced = unsafe { libc::msync(map, end, libc::MS_SYNC) };
        let err = std::io::Error::last_os_error();
        // SAFETY: the same mapping, unmapped once.
        unsafe { libc::munmap(map, end) };
        if synced != 0 {
            return Err(err);
        }
        Ok(())
    })();
    match result {
        Ok(()) => {
            println!("mmap-written={}", text.len());
            0
        }
        Err(e) => {
            eprintln!("fs-mmap-write {file}: {e}");
            1
        }
    }
}

fn echo_client(port: u32, bytes: u64) -> i32 {
    let stream = match vsock::connect(vsock::HOST_CID, port) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("connect to CID 2 port {port}: {e}");
            return 1;
        }
    };
    let start = Instant::now();
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(e) => {
            eprintln!("clone: {e}");
            return 1;
        }
    };
    let sender = std::thread::spawn(move || {
        let sent = send_pattern(&mut writer, bytes);
        let _ = vsock::shutdown_write(&writer);
        sent
    });
    let mut reader = stream;
    let (received, hash) = receive_all(&mut reader);
    let (sent, sent_hash) = sender.join().unwrap_or((0, 0));
    println!(
        "sent={sent} sent_fnv={sent_hash:016x} received={received} received_fnv={hash:016x} ms={}",
        start.elapsed().as_millis()
    );
    i32::from(!(sent == bytes && received == bytes && sent_hash == hash))
}

fn echo_server(port: u32) -> i32 {
    let listener = match vsock::Listener::bind(port) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("listen on port {port}: {e}");
            return 1;
        }
    };
    // Tell the spawner the listener is up before blocking in accept.
    println!("listening={port}");
    let _ = std::io::stdout().flush();
    let mut stream = match listener.accept() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("accept: {e}");
            return 1;
        }
    };
    let echoed = chitin_testkit::echo(&mut stream);
    let _ = vsock::shutdown_write(&stream);
    println!("echoed={echoed}");
    0
}
