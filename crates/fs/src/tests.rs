//! Crafted FUSE requests through the handler against real temporary
//! directories: every escape class the device must stop, malformed
//! requests, read-only shares and the open-file cap.

use std::fs;
use std::os::unix::fs::{symlink, MetadataExt};

use fuse_backend_rs::abi::fuse_abi::{
    Attr, CreateIn, EntryOut, ForgetIn, InHeader, InitIn, LinkIn, MkdirIn, MknodIn, Opcode, OpenIn,
    OpenOut, ReadIn, RenameIn, SetattrIn, WriteIn, ROOT_ID,
};
use vm_memory::ByteValued;

use crate::confine::Policy;
use crate::idmap::{IdMap, IdRange};
use crate::test_utils::{body, name, FuseDriver, Reply, TempTree, NEXT, REPLY, REQUEST, WRITE};
use crate::MAX_REQUEST_BYTES;
use chitin_virtio::test_utils::TestDescriptor;

const SECRET: &[u8] = b"host secret outside the share\n";
const FATTR_MODE: u32 = 1;
const FATTR_UID: u32 = 1 << 1;
const FATTR_SIZE: u32 = 1 << 3;

/// `outside/secret`, and a share with a file, a subdirectory and the
/// symlinks a hostile host-side setup could leave.
struct Tree {
    _tmp: TempTree,
    share: std::path::PathBuf,
    outside: std::path::PathBuf,
}

impl Tree {
    fn new() -> Self {
        let tmp = TempTree::new("unit");
        let share = tmp.path().join("share");
        let outside = tmp.path().join("outside");
        fs::create_dir_all(share.join("sub")).unwrap();
        fs::create_dir_all(&outside).unwrap();
        fs::write(outside.join("secret"), SECRET).unwrap();
        fs::write(share.join("file"), b"inside\n").unwrap();
        symlink("/", share.join("escape")).unwrap();
        symlink(outside.join("secret"), share.join("etc-link")).unwrap();
        symlink("../outside/secret", share.join("rel-link")).unwrap();
        Tree {
            _tmp: tmp,
            share,
            outside,
        }
    }

    /// Everything outside the share as (name, bytes), to compare before
    /// and after.
    fn outside_state(&self) -> Vec<(String, Vec<u8>)> {
        let mut v: Vec<_> = fs::read_dir(&self.outside)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let bytes = fs::read(e.path()).unwrap_or_default();
                (e.file_name().to_string_lossy().into_owned(), bytes)
            })
            .collect();
        v.sort();
        v
    }
}

fn policy() -> Policy {
    Policy {
        read_only: false,
        ids: IdMap::default(),
        max_open_files: 1024,
        root_id: None,
        xattr: false,
    }
}

/// A driver that completed FUSE_INIT.
fn driver(tree: &Tree, policy: Policy) -> FuseDriver {
    let mut d = FuseDriver::new(&tree.share, policy);
    let init = InitIn {
        major: 7,
        minor: 31,
        max_readahead: 1 << 20,
        flags: 0,
    };
    let reply = d.call(Opcode::Init as u32, 0, init.as_slice());
    assert_eq!(reply.errno(), Some(0), "INIT: {reply:?}");
    d
}

fn lookup(d: &mut FuseDriver, parent: u64, n: &str) -> Result<EntryOut, i32> {
    let reply = d.call(Opcode::Lookup as u32, parent, &name(n));
    ok_obj(reply)
}

fn ok_obj<T: ByteValued>(reply: Reply) -> Result<T, i32> {
    match reply.errno() {
        Some(0) => Ok(reply.obj()),
        Some(e) => Err(e),
        None => panic!("no reply: {reply:?}"),
    }
}

fn open(d: &mut FuseDriver, node: u64, flags: i32) -> Result<u64, i32> {
    let reply = d.call(
        Opcode::Open as u32,
        node,
        OpenIn {
            flags: flags as u32,
            fuse_flags: 0,
        }
        .as_slice(),
    );
    ok_obj::<OpenOut>(reply).map(|o| o.fh)
}

fn read(d: &mut FuseDriver, node: u64, fh: u64, size: u32) -> Result<Vec<u8>, i32> {
    let reply = d.call(
        Opcode::Read as u32,
        node,
        ReadIn {
            fh,
            size,
            ..Default::default()
        }
        .as_slice(),
    );
    match reply.errno() {
        Some(0) => Ok(reply.body),
        Some(e) => Err(e),
        None => panic!("no reply"),
    }
}

fn errno_of(reply: Reply) -> i32 {
    reply.errno().expect("a reply")
}

fn mknod(d: &mut FuseDriver, parent: u64, n: &str, mode: u32, rdev: u32) -> Result<EntryOut, i32> {
    let reply = d.call(
        Opcode::Mknod as u32,
        parent,
        &body(
            MknodIn {
                mode,
                rdev,
                umask: 0,
                padding: 0,
            },
            &name(n),
        ),
    );
    ok_obj(reply)
}

/// CREATE `n` under `parent` with open `flags` and `mode`.
fn create_with(d: &mut FuseDriver, parent: u64, n: &str, flags: i32, mode: u32) -> Reply {
    let args = CreateIn {
        flags: flags as u32,
        mode,
        umask: 0,
        fuse_flags: 0,
    };
    d.call(Opcode::Create as u32, parent, &body(args, &name(n)))
}

fn create(d: &mut FuseDriver, parent: u64, n: &str) -> Result<(EntryOut, OpenOut), i32> {
    let reply = create_with(d, parent, n, libc::O_RDWR, libc::S_IFREG | 0o644);
    match reply.errno() {
        Some(0) => {
            let entry: EntryOut = reply.obj();
            let open = *OpenOut::from_slice(
                &reply.body[std::mem::size_of::<EntryOut>()
                    ..std::mem::size_of::<EntryOut>() + std::mem::size_of::<OpenOut>()],
            )
            .unwrap();
            Ok((entry, open))
        }
        Some(e) => Err(e),
        None => panic!("no reply"),
    }
}

fn write(d: &mut FuseDriver, node: u64, fh: u64, offset: u64, data: &[u8]) -> Result<u32, i32> {
    let reply = d.call(
        Opcode::Write as u32,
        node,
        &body(
            WriteIn {
                fh,
                offset,
                size: data.len() as u32,
                ..Default::default()
            },
            data,
        ),
    );
    match reply.errno() {
        Some(0) => Ok(u32::from_le_bytes(reply.body[..4].try_into().unwrap())),
        Some(e) => Err(e),
        None => panic!("no reply"),
    }
}

/// SETATTR of `node` with `attr` (its `valid` says what changes); the
/// errno.
fn setattr(d: &mut FuseDriver, node: u64, attr: SetattrIn) -> i32 {
    errno_of(d.call(Opcode::Setattr as u32, node, attr.as_slice()))
}

fn chmod(d: &mut FuseDriver, node: u64, mode: u32) -> i32 {
    setattr(
        d,
        node,
        SetattrIn {
            valid: FATTR_MODE,
            mode,
            ..Default::default()
        },
    )
}

fn rename(d: &mut FuseDriver, olddir: u64, old: &str, newdir: u64, new: &str) -> i32 {
    let mut rest = name(old);
    rest.extend(name(new));
    errno_of(d.call(
        Opcode::Rename as u32,
        olddir,
        &body(RenameIn { newdir }, &rest),
    ))
}

#[test]
fn dotdot_at_the_root_is_the_root_and_below_it_is_refused() {
    let tree = Tree::new();
    let mut d = driver(&tree, policy());
    let root_ino = fs::metadata(&tree.share).unwrap().ino();

    let up = lookup(&mut d, ROOT_ID, "..").expect("lookup .. at the root");
    assert_eq!(up.attr.ino, root_ino, ".. of the root is the root");
    let dot = lookup(&mut d, ROOT_ID, ".").expect("lookup .");
    assert_eq!(dot.attr.ino, root_ino);

    let sub = lookup(&mut d, ROOT_ID, "sub").unwrap();
    assert_eq!(lookup(&mut d, sub.nodeid, "..").err(), Some(libc::ENOENT));
    // Names with a slash never walk host paths (libkrun #329).
    for bad in [
        "../outside/secret",
        "sub/../../outside",
        "/etc/passwd",
        "a/b",
    ] {
        assert_eq!(
            lookup(&mut d, ROOT_ID, bad).err(),
            Some(libc::EINVAL),
            "{bad}"
        );
    }
    assert_eq!(
        lookup(&mut d, sub.nodeid, "../file").err(),
        Some(libc::EINVAL)
    );
    assert!(d.faults().count("lookup of .. below the root") >= 1);
}

#[test]
fn symlinks_out_of_the_share_are_never_followed_on_the_host() {
    let tree = Tree::new();
    let before = tree.outside_state();
    let mut d = driver(&tree, policy());

    for link in ["escape", "etc-link", "rel-link"] {
        let entry = lookup(&mut d, ROOT_ID, link).unwrap();
        assert_eq!(entry.attr.mode & libc::S_IFMT, libc::S_IFLNK, "{link}");
        // Opening the link's inode never opens its target.
        let opened = open(&mut d, entry.nodeid, libc::O_RDONLY);
        assert!(opened.is_err(), "{link} opened: {opened:?}");
        // A lookup through it fails: a symlink is no directory.
        assert_eq!(
            lookup(&mut d, entry.nodeid, "etc").err(),
            Some(libc::ENOTDIR),
            "{link}"
        );
        // readlink hands the target text to the guest.
        let reply = d.call(Opcode::Readlink as u32, entry.nodeid, &[]);
        assert_eq!(reply.errno(), Some(0));
        assert!(!reply.body.is_empty());
    }
    // Creating a file through the link name fails: the name exists.
    assert!(create(&mut d, ROOT_ID, "etc-link").is_err());
    assert_eq!(tree.outside_state(), before);
}

#[test]
fn device_nodes_are_refused_and_special_files_never_opened() {
    let tree = Tree::new();
    let mut d = driver(&tree, policy());

    // A block device (8,0 is sda) and a character device (1,1 is mem).
    assert_eq!(
        mknod(&mut d, ROOT_ID, "sda", libc::S_IFBLK | 0o666, 8 << 8).err(),
        Some(libc::EPERM)
    );
    assert_eq!(
        mknod(&mut d, ROOT_ID, "mem", libc::S_IFCHR | 0o666, (1 << 8) | 1).err(),
        Some(libc::EPERM)
    );
    assert!(!tree.share.join("sda").exists() && !tree.share.join("mem").exists());
    assert_eq!(
        mknod(&mut d, ROOT_ID, "dir", libc::S_IFDIR | 0o755, 0).err(),
        Some(libc::EINVAL)
    );

    // A FIFO may be made, but the host never opens it (that would block
    // the share's thread until a writer came).
    let fifo = mknod(&mut d, ROOT_ID, "fifo", libc::S_IFIFO | 0o644, 0).unwrap();
    assert!(open(&mut d, fifo.nodeid, libc::O_RDONLY).is_err());
    assert!(open(&mut d, fifo.nodeid, libc::O_RDWR | libc::O_NONBLOCK).is_err());
    assert_eq!(d.faults().count("device node in a share"), 2);
}

#[test]
fn new_names_must_be_single_components() {
    let tree = Tree::new();
    let before = tree.outside_state();
    let mut d = driver(&tree, policy());
    let sub = lookup(&mut d, ROOT_ID, "sub").unwrap();

    for bad in ["..", ".", "", "../outside/new", "x/y"] {
        assert_eq!(
            create(&mut d, ROOT_ID, bad).err(),
            Some(libc::EINVAL),
            "{bad:?}"
        );
        let mkdir = d.call(
            Opcode::Mkdir as u32,
            ROOT_ID,
            &body(
                MkdirIn {
                    mode: 0o755,
                    umask: 0,
                },
                &name(bad),
            ),
        );
        assert_eq!(errno_of(mkdir), libc::EINVAL, "mkdir {bad:?}");
    }
    let long = "n".repeat(256);
    assert_eq!(
        create(&mut d, ROOT_ID, &long).err(),
        Some(libc::ENAMETOOLONG)
    );

    // Rename out of the share: only by a name with a slash or dotdot.
    assert_eq!(
        rename(&mut d, ROOT_ID, "file", sub.nodeid, "../../outside/x"),
        libc::EINVAL
    );
    assert_eq!(rename(&mut d, ROOT_ID, "file", ROOT_ID, ".."), libc::EINVAL);
    // A hard link can only name something inside the share.
    let file = lookup(&mut d, ROOT_ID, "file").unwrap();
    let link = d.call(
        Opcode::Link as u32,
        sub.nodeid,
        &body(
            LinkIn {
                oldnodeid: file.nodeid,
            },
            &name("../../outside/hard"),
        ),
    );
    assert_eq!(errno_of(link), libc::EINVAL);
    // A symlink is made as text; nothing follows it on the host.
    let mut rest = name("to-secret");
    rest.extend(name("/etc/passwd"));
    let made = d.call(Opcode::Symlink as u32, ROOT_ID, &rest);
    assert_eq!(made.errno(), Some(0));
    assert_eq!(
        fs::read_link(tree.share.join("to-secret")).unwrap(),
        std::path::Path::new("/etc/passwd")
    );
    assert!(tree.share.join("file").exists());
    assert_eq!(tree.outside_state(), before);
}

#[test]
fn directory_moved_out_by_the_host_gives_no_way_up() {
    let tree = Tree::new();
    let mut d = driver(&tree, policy());
    let sub = lookup(&mut d, ROOT_ID, "sub").unwrap();
    // A host process moves the directory out of the share, next to the
    // secret, while the guest holds it.
    fs::rename(tree.share.join("sub"), tree.outside.join("sub")).unwrap();

    assert_eq!(lookup(&mut d, sub.nodeid, "..").err(), Some(libc::ENOENT));
    assert_eq!(
        lookup(&mut d, sub.nodeid, "../secret").err(),
        Some(libc::EINVAL)
    );
    assert_eq!(
        lookup(&mut d, sub.nodeid, "secret").err(),
        Some(libc::ENOENT)
    );
}

#[test]
fn create_write_read_and_fsync_reach_the_host_file() {
    let tree = Tree::new();
    let mut d = driver(&tree, policy());

    let (entry, opened) = create(&mut d, ROOT_ID, "new").unwrap();
    assert_eq!(
        write(&mut d, entry.nodeid, opened.fh, 0, b"hello ").unwrap(),
        6
    );
    assert_eq!(
        write(&mut d, entry.nodeid, opened.fh, 6, b"world").unwrap(),
        5
    );
    let fsync = d.call(
        Opcode::Fsync as u32,
        entry.nodeid,
        fuse_backend_rs::abi::fuse_abi::FsyncIn {
            fh: opened.fh,
            ..Default::default()
        }
        .as_slice(),
    );
    assert_eq!(fsync.errno(), Some(0));
    assert_eq!(fs::read(tree.share.join("new")).unwrap(), b"hello world");
    assert_eq!(
        read(&mut d, entry.nodeid, opened.fh, 64).unwrap(),
        b"hello world"
    );

    // Truncate through setattr.
    let truncate = SetattrIn {
        valid: FATTR_SIZE,
        size: 5,
        ..Default::default()
    };
    assert_eq!(setattr(&mut d, entry.nodeid, truncate), 0);
    assert_eq!(fs::read(tree.share.join("new")).unwrap(), b"hello");
}

#[test]
fn read_only_share_refuses_every_change_and_still_reads() {
    let tree = Tree::new();
    let mut d = driver(
        &tree,
        Policy {
            read_only: true,
            ..policy()
        },
    );
    let file = lookup(&mut d, ROOT_ID, "file").unwrap();
    let sub = lookup(&mut d, ROOT_ID, "sub").unwrap();

    assert_eq!(create(&mut d, ROOT_ID, "new").err(), Some(libc::EROFS));
    assert_eq!(
        mknod(&mut d, ROOT_ID, "fifo", libc::S_IFIFO | 0o644, 0).err(),
        Some(libc::EROFS)
    );
    let mkdir = d.call(
        Opcode::Mkdir as u32,
        ROOT_ID,
        &body(
            MkdirIn {
                mode: 0o755,
                umask: 0,
            },
            &name("d"),
        ),
    );
    assert_eq!(errno_of(mkdir), libc::EROFS);
    assert_eq!(
        errno_of(d.call(Opcode::Unlink as u32, ROOT_ID, &name("file"))),
        libc::EROFS
    );
    assert_eq!(
        errno_of(d.call(Opcode::Rmdir as u32, ROOT_ID, &name("sub"))),
        libc::EROFS
    );
    assert_eq!(
        rename(&mut d, ROOT_ID, "file", sub.nodeid, "moved"),
        libc::EROFS
    );
    let mut rest = name("s");
    rest.extend(name("file"));
    assert_eq!(
        errno_of(d.call(Opcode::Symlink as u32, ROOT_ID, &rest)),
        libc::EROFS
    );
    let link = d.call(
        Opcode::Link as u32,
        sub.nodeid,
        &body(
            LinkIn {
                oldnodeid: file.nodeid,
            },
            &name("hard"),
        ),
    );
    assert_eq!(errno_of(link), libc::EROFS);
    let chown = SetattrIn {
        valid: FATTR_UID,
        uid: 1234,
        ..Default::default()
    };
    assert_eq!(setattr(&mut d, file.nodeid, chown), libc::EROFS);
    for flags in [libc::O_WRONLY, libc::O_RDWR, libc::O_RDONLY | libc::O_TRUNC] {
        assert_eq!(
            open(&mut d, file.nodeid, flags),
            Err(libc::EROFS),
            "{flags:#o}"
        );
    }

    let fh = open(&mut d, file.nodeid, libc::O_RDONLY).unwrap();
    assert_eq!(read(&mut d, file.nodeid, fh, 64).unwrap(), b"inside\n");
    // A forged write on the read-only handle is refused too.
    assert_eq!(write(&mut d, file.nodeid, fh, 0, b"x"), Err(libc::EROFS));
    assert_eq!(fs::read(tree.share.join("file")).unwrap(), b"inside\n");
    assert_eq!(
        fs::read_dir(&tree.share).unwrap().count(),
        5,
        "nothing was created"
    );
}

#[test]
fn open_file_cap_refuses_lookups_and_opens_past_it() {
    let tree = Tree::new();
    for i in 0..4 {
        fs::write(tree.share.join(format!("f{i}")), b"x").unwrap();
    }
    let mut d = driver(
        &tree,
        Policy {
            max_open_files: 3,
            ..policy()
        },
    );
    let f0 = lookup(&mut d, ROOT_ID, "f0").unwrap();
    lookup(&mut d, ROOT_ID, "f1").unwrap();
    // A second lookup of a held inode takes no new fd.
    lookup(&mut d, ROOT_ID, "f1").unwrap();
    let fh = open(&mut d, f0.nodeid, libc::O_RDONLY).unwrap();
    assert_eq!(d.fs().open_files(), 3);
    assert_eq!(lookup(&mut d, ROOT_ID, "f2").err(), Some(libc::ENFILE));
    assert_eq!(open(&mut d, f0.nodeid, libc::O_RDONLY), Err(libc::EMFILE));
    assert_eq!(create(&mut d, ROOT_ID, "new").err(), Some(libc::EMFILE));
    assert_eq!(d.fs().open_files(), 3);

    // Releasing the handle and forgetting f0 makes room again.
    let release = d.call(
        Opcode::Release as u32,
        f0.nodeid,
        fuse_backend_rs::abi::fuse_abi::ReleaseIn {
            fh,
            ..Default::default()
        }
        .as_slice(),
    );
    assert_eq!(release.errno(), Some(0));
    let forget = d.call(
        Opcode::Forget as u32,
        f0.nodeid,
        ForgetIn { nlookup: 1 }.as_slice(),
    );
    assert_eq!(forget.used, 0, "FORGET has no reply");
    assert_eq!(d.fs().open_files(), 1);
    lookup(&mut d, ROOT_ID, "f2").unwrap();
    lookup(&mut d, ROOT_ID, "f3").unwrap();
    assert_eq!(lookup(&mut d, ROOT_ID, "f0").err(), Some(libc::ENFILE));
    assert!(d.faults().count("open file limit") >= 4);
}

#[test]
fn ids_are_mapped_both_ways() {
    let tree = Tree::new();
    let host_uid = fs::metadata(tree.share.join("file")).unwrap().uid();
    let mut d = driver(
        &tree,
        Policy {
            ids: IdMap {
                uids: Some(IdRange {
                    guest: 5000,
                    host: host_uid,
                    count: 1,
                }),
                gids: None,
            },
            ..policy()
        },
    );
    let file = lookup(&mut d, ROOT_ID, "file").unwrap();
    assert_eq!(
        file.attr.uid, 5000,
        "the host owner is shown as its guest id"
    );
    let other = lookup(&mut d, ROOT_ID, "sub").unwrap();
    assert_eq!(other.attr.uid, 5000);
}

#[test]
fn malformed_requests_get_errors_not_panics() {
    let tree = Tree::new();
    let before = tree.outside_state();
    let mut d = driver(&tree, policy());

    // Shorter than a header: no reply, counted.
    let short = d.raw(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 4096);
    assert_eq!(short.used, 0);
    assert!(d.faults().count("request the server cannot parse") >= 1);

    // An opcode that does not exist.
    let unknown = d.call(9999, ROOT_ID, &[]);
    assert_eq!(unknown.errno(), Some(libc::ENOSYS));

    // A header that claims more than the chain holds, and a lookup name
    // without its NUL.
    let mut lying = InHeader {
        len: 1 << 30,
        opcode: Opcode::Lookup as u32,
        unique: 77,
        nodeid: ROOT_ID,
        ..Default::default()
    }
    .as_slice()
    .to_vec();
    lying.extend_from_slice(b"file");
    let reply = d.raw(&lying, 4096);
    assert!(reply.used == 0 || reply.errno() != Some(0), "{reply:?}");

    // A huge name: longer than any component.
    let huge = "x".repeat(8000);
    assert!(lookup(&mut d, ROOT_ID, &huge).is_err());

    // A READ asking for far more than the reply buffer holds.
    let file = lookup(&mut d, ROOT_ID, "file").unwrap();
    let fh = open(&mut d, file.nodeid, libc::O_RDONLY).unwrap();
    let mut req = InHeader {
        len: 80,
        opcode: Opcode::Read as u32,
        unique: 78,
        nodeid: file.nodeid,
        ..Default::default()
    }
    .as_slice()
    .to_vec();
    req.extend_from_slice(
        ReadIn {
            fh,
            size: u32::MAX,
            ..Default::default()
        }
        .as_slice(),
    );
    let reply = d.raw(&req, 64);
    assert!(reply.used <= 64, "{reply:?}");

    // No writable part at all: nowhere to reply.
    let reply = d.raw(
        &body(
            InHeader {
                len: 40 + 5,
                opcode: Opcode::Lookup as u32,
                unique: 79,
                nodeid: ROOT_ID,
                ..Default::default()
            },
            &name("file"),
        ),
        0,
    );
    assert_eq!(reply.used, 0);

    // A chain larger than the request limit is refused before parsing.
    let reply = d.chain(&[
        TestDescriptor::new(REQUEST, 64, NEXT),
        TestDescriptor::new(REPLY, (MAX_REQUEST_BYTES + 1) as u32, WRITE),
    ]);
    assert_eq!(reply.used, 0);
    assert_eq!(d.faults().count("request larger than the limit"), 1);

    // A buffer outside guest memory.
    let reply = d.chain(&[
        TestDescriptor::new(REQUEST, 64, NEXT),
        TestDescriptor::new(1 << 40, 4096, WRITE),
    ]);
    assert_eq!(reply.used, 0);
    assert!(d.faults().count("reply buffer not in guest memory") >= 1);

    // The device still serves correct requests afterwards.
    assert!(lookup(&mut d, ROOT_ID, "file").is_ok());
    assert_eq!(tree.outside_state(), before);
    assert_eq!(Attr::default().ino, 0);
}

fn release(d: &mut FuseDriver, node: u64, fh: u64) -> i32 {
    errno_of(
        d.call(
            Opcode::Release as u32,
            node,
            fuse_backend_rs::abi::fuse_abi::ReleaseIn {
                fh,
                ..Default::default()
            }
            .as_slice(),
        ),
    )
}

#[test]
fn release_naming_another_inode_keeps_the_handle_counted() {
    let tree = Tree::new();
    let mut d = driver(&tree, policy());
    let file = lookup(&mut d, ROOT_ID, "file").unwrap();
    let fh = open(&mut d, file.nodeid, libc::O_RDONLY).unwrap();
    assert_eq!(d.fs().open_files(), 2);
    // The wrong inode: the layer below keeps the fd open, so must the
    // count.
    assert_ne!(release(&mut d, ROOT_ID, fh), 0);
    assert_eq!(d.fs().open_files(), 2);
    assert_eq!(release(&mut d, file.nodeid, fh), 0);
    assert_eq!(d.fs().open_files(), 1);
}

#[test]
fn create_over_an_existing_name_leaks_nothing() {
    let tree = Tree::new();
    let mut d = driver(&tree, policy());
    let base = d.fs().open_files();
    for _ in 0..20 {
        // A directory cannot be opened for writing, a FIFO not at all.
        let reply = create_with(
            &mut d,
            ROOT_ID,
            "sub",
            libc::O_WRONLY,
            libc::S_IFREG | 0o644,
        );
        assert_ne!(reply.errno(), Some(0));
        assert_eq!(d.fs().open_files(), base, "a failed create holds nothing");
    }
    // Creating an existing file without O_EXCL opens it (and truncates).
    let (entry, opened) = create(&mut d, ROOT_ID, "file").unwrap();
    assert_eq!(d.fs().open_files(), base + 2);
    assert_eq!(release(&mut d, entry.nodeid, opened.fh), 0);
}

#[test]
fn link_past_the_cap_makes_no_link() {
    let tree = Tree::new();
    let mut d = driver(
        &tree,
        Policy {
            max_open_files: 2,
            ..policy()
        },
    );
    let file = lookup(&mut d, ROOT_ID, "file").unwrap();
    lookup(&mut d, ROOT_ID, "sub").unwrap();
    let link = d.call(
        Opcode::Link as u32,
        ROOT_ID,
        &body(
            LinkIn {
                oldnodeid: file.nodeid,
            },
            &name("hard"),
        ),
    );
    assert_eq!(errno_of(link), libc::EMFILE);
    assert!(!tree.share.join("hard").exists());
}

#[test]
fn directories_are_never_opened_for_writing() {
    let tree = Tree::new();
    let mut d = driver(&tree, policy());
    let sub = lookup(&mut d, ROOT_ID, "sub").unwrap();
    for flags in [libc::O_WRONLY, libc::O_RDWR, libc::O_TMPFILE | libc::O_RDWR] {
        let reply = d.call(
            Opcode::Opendir as u32,
            sub.nodeid,
            OpenIn {
                flags: flags as u32,
                fuse_flags: 0,
            }
            .as_slice(),
        );
        assert_eq!(errno_of(reply), libc::EISDIR, "{flags:#o}");
    }
    assert_eq!(fs::read_dir(tree.share.join("sub")).unwrap().count(), 0);
}

#[test]
fn setid_bits_cannot_be_set() {
    let tree = Tree::new();
    let mut d = driver(&tree, policy());
    let reply = create_with(
        &mut d,
        ROOT_ID,
        "suid",
        libc::O_RDWR,
        libc::S_IFREG | 0o6755,
    );
    assert_eq!(reply.errno(), Some(0));
    let mode = |p: &str| fs::metadata(tree.share.join(p)).unwrap().mode();
    assert_eq!(mode("suid") & 0o7777, 0o755);
    let file = lookup(&mut d, ROOT_ID, "file").unwrap();
    assert_eq!(chmod(&mut d, file.nodeid, libc::S_IFREG | 0o4755), 0);
    assert_eq!(mode("file") & 0o7777, 0o755);
    // A directory may be set-group-ID (group inheritance), not set-user-ID.
    let sub = lookup(&mut d, ROOT_ID, "sub").unwrap();
    assert_eq!(chmod(&mut d, sub.nodeid, libc::S_IFDIR | 0o6775), 0);
    assert_eq!(mode("sub") & 0o7777, 0o2775);
}

#[test]
fn requests_run_with_the_guest_users_host_permissions() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not run: switching to a request's ids needs root");
        return;
    }
    let tree = Tree::new();
    let perms = std::os::unix::fs::PermissionsExt::from_mode;
    // Explicit modes: another test's FUSE_INIT may have left the process
    // umask at 0.
    fs::set_permissions(&tree.share, perms(0o755)).unwrap();
    fs::write(tree.share.join("private"), b"root only").unwrap();
    fs::set_permissions(tree.share.join("private"), perms(0o600)).unwrap();
    let mut d = driver(&tree, policy());
    let private = lookup(&mut d, ROOT_ID, "private").unwrap();
    let as_user = |d: &mut FuseDriver, opcode: u32, node: u64, body: &[u8]| {
        d.call_as(opcode, node, body, 1000, 1000)
    };
    let open_in = OpenIn {
        flags: libc::O_RDONLY as u32,
        fuse_flags: 0,
    };
    let denied = as_user(
        &mut d,
        Opcode::Open as u32,
        private.nodeid,
        open_in.as_slice(),
    );
    assert_eq!(errno_of(denied), libc::EACCES);
    let unlink = as_user(&mut d, Opcode::Unlink as u32, ROOT_ID, &name("private"));
    assert_eq!(
        errno_of(unlink),
        libc::EACCES,
        "the share's root is 0755 root's"
    );
    assert!(tree.share.join("private").exists());
    // Root still can, and the thread is root again after each request.
    assert!(open(&mut d, private.nodeid, libc::O_RDONLY).is_ok());
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0);
}

#[test]
fn xattrs_are_off_by_default_and_user_only_when_on() {
    let tree = Tree::new();
    let getxattr = |d: &mut FuseDriver, n: &str| {
        let mut b = 256u32.to_le_bytes().to_vec();
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend(name(n));
        errno_of(d.call(Opcode::Getxattr as u32, ROOT_ID, &b))
    };
    let setxattr = |d: &mut FuseDriver, n: &str| {
        let mut b = 1u32.to_le_bytes().to_vec();
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend(name(n));
        b.push(b'x');
        errno_of(d.call(Opcode::Setxattr as u32, ROOT_ID, &b))
    };
    let mut off = driver(&tree, policy());
    // ENOSYS: the guest's kernel stops asking after the first.
    assert_eq!(getxattr(&mut off, "security.capability"), libc::ENOSYS);
    assert_eq!(setxattr(&mut off, "user.x"), libc::ENOSYS);
    let mut on = driver(
        &tree,
        Policy {
            xattr: true,
            ..policy()
        },
    );
    assert_eq!(getxattr(&mut on, "security.capability"), libc::ENODATA);
    assert_eq!(setxattr(&mut on, "trusted.x"), libc::EPERM);
    assert_eq!(setxattr(&mut on, "security.capability"), libc::EPERM);
}

#[test]
fn nothing_is_served_before_init_or_when_the_root_was_replaced() {
    let tree = Tree::new();
    let mut fresh = FuseDriver::new(&tree.share, policy());
    assert_eq!(lookup(&mut fresh, ROOT_ID, "file").err(), Some(libc::EIO));
    // A root that is not the directory the share was configured with (a
    // host process replaced it): INIT fails, and so does everything after.
    let mut replaced = FuseDriver::new(
        &tree.share,
        Policy {
            root_id: Some((0, 0)),
            ..policy()
        },
    );
    let init = InitIn {
        major: 7,
        minor: 31,
        max_readahead: 0,
        flags: 0,
    };
    let reply = replaced.call(Opcode::Init as u32, 0, init.as_slice());
    assert_eq!(reply.errno(), Some(libc::EIO));
    assert_eq!(
        lookup(&mut replaced, ROOT_ID, "file").err(),
        Some(libc::EIO)
    );
    // DESTROY makes the layer below open the root's path again; still
    // nothing is served.
    replaced.call(Opcode::Destroy as u32, 0, &[]);
    assert_eq!(
        lookup(&mut replaced, ROOT_ID, "file").err(),
        Some(libc::EIO)
    );
}
