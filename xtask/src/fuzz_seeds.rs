//! Seed inputs for the fuzz targets, written from source so the repo holds
//! no binary files. Each seed follows the input layout its target's module
//! doc describes (`fuzz/fuzz_targets/*.rs`).

/// A virtio descriptor as the blk and vsock targets read it.
fn desc(addr: u64, len: u32, flags: u16, next: u16) -> Vec<u8> {
    let mut d = addr.to_le_bytes().to_vec();
    d.extend_from_slice(&len.to_le_bytes());
    d.extend_from_slice(&flags.to_le_bytes());
    d.extend_from_slice(&next.to_le_bytes());
    d
}

const NEXT: u16 = 1;
const WRITE: u16 = 2;
/// Where both targets copy the rest of the input in guest memory.
const DATA_AREA: u64 = 0x4000;

/// One `virtio_mmio` operation: kind (bit 0 = write), offset, width code
/// (2 = 4 bytes), value.
fn mmio_op(write: bool, offset: u16, width: u8, value: u32) -> Vec<u8> {
    let mut op = vec![u8::from(write)];
    op.extend_from_slice(&offset.to_le_bytes());
    op.push(width);
    op.extend_from_slice(&value.to_le_bytes());
    op
}

fn virtio_mmio() -> Vec<(&'static str, Vec<u8>)> {
    const W: u8 = 2;
    let (r, w) = (false, true);
    // A driver bring-up: magic, version, device id, status, feature
    // windows, queue 0 setup, DRIVER_OK, notify, interrupt ack, config
    // reads, reset.
    let bringup: &[(bool, u16, u8, u32)] = &[
        (r, 0x000, W, 0),
        (r, 0x004, W, 0),
        (r, 0x008, W, 0),
        (w, 0x070, W, 1),
        (w, 0x070, W, 3),
        (w, 0x014, W, 0),
        (r, 0x010, W, 0),
        (w, 0x014, W, 1),
        (r, 0x010, W, 0),
        (w, 0x024, W, 0),
        (w, 0x020, W, 1 << 9),
        (w, 0x024, W, 1),
        (w, 0x020, W, 1),
        (w, 0x070, W, 11),
        (r, 0x070, W, 0),
        (w, 0x030, W, 0),
        (r, 0x034, W, 0),
        (w, 0x038, W, 16),
        (w, 0x080, W, 0x1000),
        (w, 0x084, W, 0),
        (w, 0x090, W, 0x2000),
        (w, 0x094, W, 0),
        (w, 0x0a0, W, 0x3000),
        (w, 0x0a4, W, 0),
        (w, 0x044, W, 1),
        (w, 0x070, W, 15),
        (w, 0x050, W, 0),
        (r, 0x060, W, 0),
        (w, 0x064, W, 1),
        (r, 0x100, 0, 0),
        (r, 0x108, 3, 0),
        (w, 0x070, W, 0),
    ];
    let ops = |list: &[(bool, u16, u8, u32)]| -> Vec<u8> {
        list.iter()
            .flat_map(|&(wr, off, width, val)| mmio_op(wr, off, width, val))
            .collect()
    };
    let reset = ops(&[(w, 0x070, W, 1), (w, 0x070, W, 0), (r, 0x0fc, W, 0)]);
    vec![("bringup", ops(bringup)), ("reset", reset)]
}

/// A virtio-blk request header: type, reserved, sector.
fn blk_header(kind: u32, sector: u64) -> Vec<u8> {
    let mut h = kind.to_le_bytes().to_vec();
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&sector.to_le_bytes());
    h
}

fn blk_request() -> Vec<(&'static str, Vec<u8>)> {
    // IN (0) and OUT (1): header, 512-byte data buffer, status byte.
    let data_request = |kind: u32, data_flags: u16| {
        let mut input = vec![0, 3, 1];
        input.extend(desc(DATA_AREA, 16, NEXT, 1));
        input.extend(desc(DATA_AREA + 0x100, 512, NEXT | data_flags, 2));
        input.extend(desc(DATA_AREA + 0x400, 1, WRITE, 0));
        input.push(0); // head 0
        input.extend(blk_header(kind, 1));
        input.resize(input.len() + 0x100 - 16, 0);
        input.extend((0..512).map(|i| (i % 256) as u8));
        input
    };
    // FLUSH (4): header and status only.
    let mut flush = vec![0, 2, 1];
    flush.extend(desc(DATA_AREA, 16, NEXT, 1));
    flush.extend(desc(DATA_AREA + 0x400, 1, WRITE, 0));
    flush.push(0);
    flush.extend(blk_header(4, 0));
    vec![
        ("read", data_request(0, WRITE)),
        ("write", data_request(1, 0)),
        ("flush", flush),
    ]
}

/// A virtio-vsock header (44 bytes) from CID 3 port 1000 to CID 2 port
/// 5000, stream type, with 256 KiB of advertised buffer.
fn vsock_header(op: u16, len: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(44);
    h.extend_from_slice(&3u64.to_le_bytes()); // src_cid
    h.extend_from_slice(&2u64.to_le_bytes()); // dst_cid
    h.extend_from_slice(&1000u32.to_le_bytes()); // src_port
    h.extend_from_slice(&5000u32.to_le_bytes()); // dst_port
    h.extend_from_slice(&len.to_le_bytes());
    h.extend_from_slice(&1u16.to_le_bytes()); // type: stream
    h.extend_from_slice(&op.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes()); // flags
    h.extend_from_slice(&(256u32 << 10).to_le_bytes()); // buf_alloc
    h.extend_from_slice(&0u32.to_le_bytes()); // fwd_cnt
    h
}

/// The input with which the vsock_packet target found an endless loop on a
/// broken RX available ring: kept as a regression seed.
const VSOCK_RX_AVAIL_FAR_AHEAD: &[u8] = &[
    1, 252, 1, 1, 0, 64, 0, 0, 0, 0, 0, 0, 44, 0, 0, 32, 0, 0, 0, 0, 0, 0, 80, 37, 0, 33, 0, 0, 0,
    0, 0, 255, 44, 16, 0, 0, 2, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 232, 3,
    0, 0, 136, 19, 0, 0, 0, 0, 0, 0, 1, 0, 1, 0,
];

/// A `vsock_packet` input: `tx` as one chain (head 0), one 4 KiB RX
/// buffer, and a data area holding `header` at its start and each
/// `(offset, bytes)` at that offset.
fn vsock_seed(tx: &[Vec<u8>], header: Vec<u8>, data: &[(usize, &[u8])]) -> Vec<u8> {
    // At most 4 descriptors here: the count fits the first byte.
    let mut seed = vec![tx.len() as u8, 1, 1, 1];
    for d in tx {
        seed.extend(d);
    }
    seed.push(0);
    seed.extend(desc(DATA_AREA + 0x1000, 44 + 4096, WRITE, 0));
    seed.push(0);
    let mut area = header;
    for (offset, bytes) in data {
        area.resize(*offset, 0);
        area.extend_from_slice(bytes);
    }
    seed.extend(area);
    seed
}

fn vsock_packet() -> Vec<(&'static str, Vec<u8>)> {
    // OP_REQUEST (1) in one TX descriptor.
    let request = vsock_seed(&[desc(DATA_AREA, 44, 0, 0)], vsock_header(1, 0), &[]);
    // OP_RW (5) with 16 data bytes in a second descriptor.
    let rw = vsock_seed(
        &[
            desc(DATA_AREA, 44, NEXT, 1),
            desc(DATA_AREA + 0x100, 16, 0, 0),
        ],
        vsock_header(5, 16),
        &[(0x100, &[b'x'; 16])],
    );
    // OP_RW with the header split over two descriptors and 16 data bytes
    // in two fragments, the way Linux 6.7+ lays out non-linear packets.
    let fragments = vsock_seed(
        &[
            desc(DATA_AREA, 20, NEXT, 1),
            desc(DATA_AREA + 20, 24, NEXT, 2),
            desc(DATA_AREA + 0x100, 8, NEXT, 3),
            desc(DATA_AREA + 0x200, 8, 0, 0),
        ],
        vsock_header(5, 16),
        &[(0x100, &[b'a'; 8]), (0x200, &[b'b'; 8])],
    );
    vec![
        ("request", request),
        ("rw", rw),
        ("rw-fragments", fragments),
        (
            "regression-rx-avail-far-ahead",
            VSOCK_RX_AVAIL_FAR_AHEAD.to_vec(),
        ),
    ]
}

/// A stream of agent-to-client frames: HELLO, STARTED, STDOUT, STDERR,
/// STDIN_CREDIT, EXIT, the two end frames and a stream ERROR, as the agent
/// sends them.
fn agent_frames() -> Vec<(&'static str, Vec<u8>)> {
    use chitin_agent_protocol::{ExecRequest, ExitStatus, Frame, OutputStream, VERSION};
    let session = [
        Frame::Hello { version: VERSION },
        Frame::Started { id: 1, pid: 42 },
        Frame::Stdout {
            id: 1,
            data: b"hello\n".to_vec(),
        },
        Frame::Stderr {
            id: 1,
            data: b"oops\n".to_vec(),
        },
        Frame::StdinCredit { id: 1, bytes: 4096 },
        Frame::Exit {
            id: 1,
            status: ExitStatus::Signal(9),
        },
        Frame::Stdout {
            id: 1,
            data: Vec::new(),
        },
        Frame::Stderr {
            id: 1,
            data: Vec::new(),
        },
        Frame::Error {
            id: 2,
            message: "exec nope: No such file or directory".into(),
        },
    ];
    // And the client's side, which the same decoder reads in the agent.
    let client = [
        Frame::Exec {
            id: 3,
            request: ExecRequest::new(["sh", "-c", "cat"])
                .env("PATH", "/bin")
                .cwd("/")
                .user(1, 1)
                .with_stdin(),
        },
        Frame::Stdin {
            id: 3,
            data: vec![0; 64],
        },
        Frame::OutputCredit {
            id: 3,
            stream: OutputStream::Stdout,
            bytes: 65536,
        },
        Frame::OutputCredit {
            id: 3,
            stream: OutputStream::Stderr,
            bytes: 4096,
        },
        Frame::Signal { id: 3, signo: 9 },
        Frame::Entropy {
            bytes: (0..32).collect(),
        },
        Frame::Shutdown,
    ];
    let encode = |frames: &[Frame]| -> Vec<u8> {
        frames
            .iter()
            .flat_map(|f| f.encode().expect("seed frames are valid"))
            .collect()
    };
    vec![
        ("agent-session", encode(&session)),
        ("client-session", encode(&client)),
    ]
}

/// `net_tx`: a header-only first buffer then the frame (Linux's layout),
/// and a whole chain in one buffer with a checksum request.
fn net_tx() -> Vec<(&'static str, Vec<u8>)> {
    // CSUM and VERSION_1.
    let features = 0x21u8;
    let mut frame = vec![0xffu8; 6];
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 0x08, 0x00]);
    frame.extend((0..46).map(|i| i as u8));
    let split = {
        let mut seed = vec![2, 1, features];
        seed.extend(desc(DATA_AREA, 12, NEXT, 1));
        seed.extend(desc(DATA_AREA + 12, frame.len() as u32, 0, 0));
        seed.push(0);
        seed.extend_from_slice(&[0; 12]);
        seed.extend_from_slice(&frame);
        seed
    };
    let whole = {
        let mut seed = vec![1, 1, features];
        seed.extend(desc(DATA_AREA, 12 + frame.len() as u32, 0, 0));
        seed.push(0);
        // NEEDS_CSUM at 34 + 16 (a TCP checksum's place).
        let mut header = [0u8; 12];
        header[0] = 1;
        header[6..8].copy_from_slice(&34u16.to_le_bytes());
        header[8..10].copy_from_slice(&16u16.to_le_bytes());
        seed.extend_from_slice(&header);
        seed.extend_from_slice(&frame);
        seed
    };
    vec![("split", split), ("whole-csum", whole)]
}

/// `net_rx`: two 2 KiB buffers, mergeable, two frames.
fn net_rx() -> Vec<(&'static str, Vec<u8>)> {
    let mut seed = vec![2, 2, 1, 2];
    seed.extend(desc(DATA_AREA, 2048, WRITE, 0));
    seed.extend(desc(DATA_AREA + 0x1000, 2048, WRITE, 0));
    seed.extend_from_slice(&[0, 1]);
    seed.extend_from_slice(&100u16.to_le_bytes());
    seed.extend_from_slice(&1526u16.to_le_bytes());
    seed.extend((0..64).map(|i| i as u8));
    vec![("two-frames", seed)]
}

/// One FUSE request: a 40-byte header (as guest uid/gid 0) and `body`.
fn fuse(opcode: u32, nodeid: u64, body: &[u8]) -> Vec<u8> {
    let mut m = ((40 + body.len()) as u32).to_le_bytes().to_vec();
    m.extend_from_slice(&opcode.to_le_bytes());
    m.extend_from_slice(&u64::from(opcode).to_le_bytes()); // unique
    m.extend_from_slice(&nodeid.to_le_bytes());
    m.extend_from_slice(&[0; 16]); // uid, gid, pid, padding
    m.extend_from_slice(body);
    m
}

/// `fs_request` input: flags, then each message with its length.
fn fs_input(flags: u8, messages: &[Vec<u8>]) -> Vec<u8> {
    let mut input = vec![flags, messages.len() as u8];
    for m in messages {
        input.extend_from_slice(&(m.len() as u16).to_le_bytes());
        input.extend_from_slice(m);
    }
    input
}

fn fs_request() -> Vec<(&'static str, Vec<u8>)> {
    const LOOKUP: u32 = 1;
    const MKNOD: u32 = 8;
    const MKDIR: u32 = 9;
    const RENAME: u32 = 12;
    const OPEN: u32 = 14;
    const READ: u32 = 15;
    const CREATE: u32 = 35;
    const ROOT: u64 = 1;
    let name = |n: &str| {
        let mut v = n.as_bytes().to_vec();
        v.push(0);
        v
    };
    let with = |head: &[u32], rest: &[u8]| {
        let mut v: Vec<u8> = head.iter().flat_map(|x| x.to_le_bytes()).collect();
        v.extend_from_slice(rest);
        v
    };
    // OPEN of node 2 read-only, then READ of handle 1 (the numbers the
    // passthrough layer hands out first), 4 KiB at 0.
    let mut read = 1u64.to_le_bytes().to_vec();
    read.extend_from_slice(&[0; 8]);
    read.extend_from_slice(&4096u32.to_le_bytes());
    read.extend_from_slice(&[0; 20]);
    let browse = vec![
        fuse(LOOKUP, ROOT, &name("file")),
        fuse(OPEN, 2, &with(&[0, 0], &[])),
        fuse(READ, 2, &read),
        fuse(LOOKUP, ROOT, &name("..")),
        fuse(LOOKUP, ROOT, &name("escape")),
        fuse(LOOKUP, 4, &name("etc")),
        fuse(LOOKUP, ROOT, &name("dir")),
        fuse(LOOKUP, 5, &name("..")),
    ];
    let mut rename = 1u64.to_le_bytes().to_vec();
    rename.extend(name("file"));
    rename.extend(name("../outside/moved"));
    let change = vec![
        fuse(CREATE, ROOT, &with(&[0o102, 0o100644, 0, 0], &name("new"))),
        fuse(MKDIR, ROOT, &with(&[0o755, 0], &name("d"))),
        fuse(MKNOD, ROOT, &with(&[0o60666, 0x800, 0, 0], &name("sda"))),
        fuse(RENAME, ROOT, &rename),
        fuse(LOOKUP, ROOT, &name("../outside/secret")),
    ];
    // A LOOKUP whose reply is written over the queue's own rings (the
    // chain's writable buffer at guest address 0): the device must report
    // a broken ring, not the harness panic (found by this target).
    let mut over_rings = fs_input(2, &[]);
    over_rings.push(2);
    over_rings.extend(desc(0x1_0000, 45, NEXT, 0));
    over_rings.extend(desc(0, 4096, WRITE, 0));
    over_rings.extend(fuse(LOOKUP, ROOT, &name("file")));
    vec![
        ("reply-over-rings", over_rings),
        ("browse", fs_input(2, &browse)),
        ("change", fs_input(2, &change)),
        ("change-read-only", fs_input(3, &change)),
        ("capped", fs_input(6, &browse)),
    ]
}

/// A snapshot state payload of one vCPU, every KVM struct zeroed but
/// where the decoder checks contents (the irqchip ids): sizes are the
/// x86_64 kernel ABI's (kvm_irqchip 520, kvm_mp_state 4, kvm_regs 144,
/// kvm_sregs 312, the XSAVE region 4096, kvm_xcrs 392, kvm_debugregs 128,
/// kvm_lapic_state 1024, kvm_vcpu_events 64, kvm_cpuid_entry2 40), the
/// field order docs/snapshot.md's; with `devices`, a read-only disk
/// and the agent's vsock device, both running.
fn snapshot_payload(msrs: &[(u32, u64)], cpuid_entries: usize, devices: bool) -> Vec<u8> {
    let mut p = Vec::new();
    let blob = |p: &mut Vec<u8>, bytes: &[u8]| {
        p.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        p.extend_from_slice(bytes);
    };
    blob(&mut p, b"memory-0123456789abcdef");
    p.push(1); // vCPUs
    p.extend_from_slice(&(64u64 << 20).to_le_bytes());
    p.extend_from_slice(&[1, 0]); // ACPI, no PIT
    p.extend_from_slice(&[0, 0]); // ELF, Linux 64-bit
    p.extend_from_slice(&0x100_0000u64.to_le_bytes()); // entry
    p.extend_from_slice(&0x200_0000u64.to_le_bytes()); // kernel end
    p.push(0); // no initrd
    p.extend_from_slice(&40u64.to_le_bytes()); // command line length
    for chip in 0u32..3 {
        let mut irqchip = vec![0u8; 520];
        irqchip[..4].copy_from_slice(&chip.to_le_bytes());
        blob(&mut p, &irqchip);
    }
    p.push(0); // no PIT state
    p.extend_from_slice(&123_456u64.to_le_bytes()); // kvmclock
    for size in [4, 144, 312, 4096, 392, 128, 1024] {
        blob(&mut p, &vec![0u8; size]);
    }
    p.extend_from_slice(&(msrs.len() as u32).to_le_bytes());
    for (index, value) in msrs {
        p.extend_from_slice(&index.to_le_bytes());
        p.extend_from_slice(&value.to_le_bytes());
    }
    blob(&mut p, &[0u8; 64]); // events
    p.extend_from_slice(&2_000_000u32.to_le_bytes()); // TSC kHz
    p.extend_from_slice(&(cpuid_entries as u32).to_le_bytes());
    for _ in 0..cpuid_entries {
        blob(&mut p, &[0u8; 40]);
    }
    p.extend_from_slice(&[0, 0, 0, 1, 3, 0x60, 8, 0xb0, 0]); // COM1 registers
    blob(&mut p, b"ab"); // receive FIFO
    p.push(0x0b); // RTC index
    blob(&mut p, &[0u8; 128]);
    p.extend_from_slice(&[0x47, 0x01, 1, 0xfa, 0, 0]); // i8042: output pending
    if !devices {
        p.extend_from_slice(&0u32.to_le_bytes());
        return p;
    }
    p.extend_from_slice(&2u32.to_le_bytes());
    let u32s = |p: &mut Vec<u8>, values: &[u32]| {
        for v in values {
            p.extend_from_slice(&v.to_le_bytes());
        }
    };
    // A read-only disk of 2048 sectors with serial "root".
    p.push(0);
    blob(&mut p, b"/images/root.ext4");
    p.push(1);
    p.push(1);
    blob(&mut p, b"root");
    p.extend_from_slice(&2048u64.to_le_bytes());
    let transport = |p: &mut Vec<u8>, base: u64, gsi: u32, device_type: u32, queues: u64| {
        p.extend_from_slice(&base.to_le_bytes());
        u32s(p, &[gsi, device_type, 0xf, 1, 1]);
        p.extend_from_slice(&(1u64 << 32).to_le_bytes()); // VERSION_1
        u32s(p, &[0, 0, queues as u32]);
        for q in 0..queues {
            u32s(p, &[256]);
            p.extend_from_slice(&[0, 1]); // no invalid size, ready
            for ring in [0x10_0000, 0x10_0800, 0x10_0c00] {
                p.extend_from_slice(&(ring + q * 0x1000u64).to_le_bytes());
            }
            u32s(p, &[5, 5]);
        }
        u32s(p, &[1, 0, 0]);
        p.push(0);
    };
    transport(&mut p, 0xd000_0000, 5, 2, 1);
    // The agent's vsock device, CID 3.
    p.push(1);
    u32s(&mut p, &[3]);
    p.push(1);
    transport(&mut p, 0xd000_1000, 6, 19, 3);
    p
}

fn snapshot_state() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        (
            "one-vcpu",
            snapshot_payload(&[(0x10, 1 << 40), (0x6e0, 0)], 2, false),
        ),
        ("bare", snapshot_payload(&[], 0, false)),
        (
            "disk-and-vsock",
            snapshot_payload(&[(0x10, 1 << 40)], 1, true),
        ),
    ]
}

/// The seeds of `target`, by name.
pub fn seeds(target: &str) -> Vec<(&'static str, Vec<u8>)> {
    match target {
        "virtio_mmio" => virtio_mmio(),
        "blk_request" => blk_request(),
        "vsock_packet" => vsock_packet(),
        "agent_frames" => agent_frames(),
        "net_tx" => net_tx(),
        "net_rx" => net_rx(),
        "fs_request" => fs_request(),
        "snapshot_state" => snapshot_state(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_match_the_layouts_the_targets_parse() {
        // Every target has seeds; mmio ops are 8 bytes each.
        for target in crate::fuzz::TARGETS {
            assert!(!seeds(target).is_empty(), "{target}");
        }
        assert!(virtio_mmio().iter().all(|(_, s)| s.len() % 8 == 0));
        // A blk read seed: 3 counts, 3 descriptors, 1 head, then data.
        assert_eq!(blk_request()[0].1.len(), 3 + 3 * 16 + 1 + 0x100 + 512);
        assert_eq!(vsock_header(1, 0).len(), 44);
    }
}
