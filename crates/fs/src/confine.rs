//! [`Confined`]: the policy layer between the FUSE server and the
//! passthrough file system. Every request the guest sends passes through
//! here before it can touch the host.
//!
//! What it enforces, whatever the guest sends:
//! - **Names** are single path components: not empty, no `/`, at most
//!   255 bytes, never `.` or `..` where a new name is made. A lookup of
//!   `.` is the directory itself and `..` is allowed only at the share's
//!   root, where it is the root: a guest (or a directory a host process
//!   moved out of the share) cannot climb above the root by name. Linux
//!   never sends `..` unless the file system offers NFS export, which
//!   this one does not.
//! - **No host symlink is followed**: the passthrough layer opens every
//!   component with `O_PATH | O_NOFOLLOW` relative to its parent's fd and
//!   reopens only regular files and directories; a symlink's target is
//!   returned to the guest as text and resolved in the guest.
//! - **Special files**: the guest may create FIFOs and sockets, but never
//!   character or block devices (CVE-2020-35517), and no special file, the
//!   host's own included, is ever opened on the host.
//! - **Open flags** are reduced to those that act on the opened file
//!   (access mode, append, truncate, non-blocking, sync, direct, noatime):
//!   `O_PATH`, `O_TMPFILE`, `O_NOCTTY` and the rest never reach the host.
//! - **Read-only shares** answer every request that would change the share
//!   with `EROFS` (FUSE's `statfs` reply has no mount flags: the agent
//!   mounts a read-only share `ro` as well).
//! - **Host fds**: every inode the guest holds a lookup on and every open
//!   handle is a host fd; their total is capped per share, and a request
//!   past the cap fails with `ENFILE` (lookups) or `EMFILE` (opens)
//!   instead of exhausting the VMM's fds.
//! - **Ids**: requests run as the host ids the guest's ids map to (when
//!   the VMM runs as root, the serving thread switches its effective ids
//!   for every request that resolves a name or opens, creates or changes a
//!   file, so host permissions apply to the guest's users as to host
//!   users), and attributes show host owners mapped back ([`IdMap`]).
//! - **No set-id files**: the guest cannot set the set-user-ID bit, nor
//!   set-group-ID on anything but a directory (`create`, `mknod`, `mkdir`,
//!   `chmod`), and the serving thread has no `CAP_FSETID`, so a write
//!   clears the bits of a set-id file it changes.
//! - **Extended attributes** (off unless enabled) are `user.*` only, and a
//!   reply is at most 64 KiB.
//! - **Directory listings** are plain `READDIR` (`READDIRPLUS` is not
//!   negotiated: it would take lookups the cap could only refuse by
//!   silently cutting a listing short), at most [`MAX_READDIR_BYTES`] per
//!   request.
//!
//! Anything refused is counted in the share's [`GuestFaults`].

use std::collections::{HashMap, HashSet};
use std::ffi::CStr;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use chitin_virtio::{GuestFaults, Severity};
use fuse_backend_rs::abi::fuse_abi::{CreateIn, ROOT_ID};
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileSystem, FsOptions, GetxattrReply, ListxattrReply, OpenOptions,
    SetattrValid, ZeroCopyReader, ZeroCopyWriter,
};
use fuse_backend_rs::passthrough::PassthroughFs;

use crate::idmap::IdMap;

/// The longest name one component may have (Linux's `NAME_MAX`).
pub const NAME_MAX: usize = 255;

/// Most bytes one `READDIR` reply may hold; a larger request is served
/// with this much (a short listing is legal, the guest asks again).
pub const MAX_READDIR_BYTES: u32 = 64 << 10;

/// Open flags that reach the host; the rest are dropped.
const OPEN_FLAGS_KEPT: i32 = libc::O_ACCMODE
    | libc::O_APPEND
    | libc::O_TRUNC
    | libc::O_NONBLOCK
    | libc::O_DSYNC
    | libc::O_SYNC
    | libc::O_DIRECT
    | libc::O_NOATIME
    | libc::O_LARGEFILE;

/// Flags an OPENDIR may carry (access mode read-only).
const OPENDIR_FLAGS_KEPT: i32 = libc::O_NONBLOCK | libc::O_NOATIME | libc::O_LARGEFILE;

/// Largest extended attribute value or list a reply may carry (Linux's
/// `XATTR_SIZE_MAX`).
pub const MAX_XATTR_BYTES: u32 = 64 << 10;

/// Rename flags a guest may use. `RENAME_WHITEOUT` would leave a device
/// node behind and is refused.
const RENAME_FLAGS_ALLOWED: u32 = libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE;

/// FUSE features the share asks for on top of the passthrough layer's.
fn wanted_options() -> FsOptions {
    FsOptions::BIG_WRITES
        | FsOptions::MAX_PAGES
        | FsOptions::PARALLEL_DIROPS
        | FsOptions::AUTO_INVAL_DATA
        | FsOptions::ASYNC_DIO
}

/// FUSE features never negotiated, whatever the layer below wants.
fn refused_options() -> FsOptions {
    FsOptions::DO_READDIRPLUS
        | FsOptions::READDIRPLUS_AUTO
        | FsOptions::EXPORT_SUPPORT
        | FsOptions::PERFILE_DAX
        | FsOptions::POSIX_ACL
        | FsOptions::SUBMOUNTS
}

fn errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

/// The policy of one share.
#[derive(Clone, Debug)]
pub struct Policy {
    /// Refuse every change with `EROFS`.
    pub read_only: bool,
    /// Guest ↔ host ids.
    pub ids: IdMap,
    /// Most host fds (inodes held plus open handles) the share may hold.
    pub max_open_files: usize,
    /// Serve `user.*` extended attributes; without, every xattr request
    /// is `ENOSYS`, which the guest's kernel remembers (it then stops
    /// asking for `security.capability` before every write).
    pub xattr: bool,
    /// The share's root as (st_dev, st_ino) when it was configured: a
    /// FUSE_INIT that finds another directory at the root's path (moved
    /// or replaced on the host) fails instead of serving it.
    pub root_id: Option<(u64, u64)>,
}

/// The serving thread acting as a request's host user and group; back
/// to root when dropped.
struct AsCaller {
    uid: bool,
    gid: bool,
}

fn set_effective(syscall: libc::c_long, id: u32) -> io::Result<()> {
    // SAFETY: setresuid/setresgid take ids only; -1 keeps the real and
    // saved ids. The raw syscall changes this thread alone (glibc's
    // wrappers would change every thread of the process).
    let ret = unsafe { libc::syscall(syscall, -1i64, i64::from(id), -1i64) };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl Drop for AsCaller {
    fn drop(&mut self) {
        // Only a thread whose real and saved ids are root switches, so
        // going back cannot fail.
        if self.uid {
            let _ = set_effective(libc::SYS_setresuid, 0);
        }
        if self.gid {
            let _ = set_effective(libc::SYS_setresgid, 0);
        }
    }
}

/// Host fds the guest holds: lookups per inode and open handles.
#[derive(Debug, Default)]
struct Held {
    /// Inode → lookups the guest holds on it (its FORGETs count down).
    inodes: HashMap<u64, u64>,
    handles: HashSet<u64>,
}

impl Held {
    fn total(&self) -> usize {
        self.inodes.len() + self.handles.len()
    }
}

/// The passthrough file system of one share behind its policy.
pub struct Confined {
    inner: PassthroughFs<()>,
    policy: Policy,
    held: Mutex<Held>,
    faults: GuestFaults,
    /// The VMM runs as root: switch to each request's ids.
    switch_ids: bool,
    /// A FUSE_INIT found the configured root: requests are served. Clear
    /// before INIT, after DESTROY, and after an INIT that found another
    /// directory at the root's path (the layer below then holds that
    /// directory, which must never be served).
    serving: AtomicBool,
}

impl Confined {
    /// `inner` (already configured with the share's root) behind `policy`;
    /// refusals are counted in `faults`.
    pub fn new(inner: PassthroughFs<()>, policy: Policy, faults: GuestFaults) -> Self {
        Self {
            inner,
            policy,
            held: Mutex::new(Held::default()),
            faults,
            // SAFETY: geteuid has no preconditions.
            switch_ids: unsafe { libc::geteuid() } == 0,
            serving: AtomicBool::new(false),
        }
    }

    /// `EIO` unless a verified FUSE_INIT made the share servable.
    fn served(&self) -> io::Result<()> {
        if self.serving.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(self.refuse(Severity::Malformed, "request before INIT", libc::EIO))
        }
    }

    /// The context the layer below sees in the requests it would switch
    /// credentials for itself (mkdir, mknod, symlink, create): root, so it
    /// switches nothing. The switch is this layer's (`as_caller`), for
    /// the whole request, and a VMM that is not root switches nothing at
    /// all instead of failing the request.
    fn unswitched(ctx: &Context) -> Context {
        Context {
            uid: 0,
            gid: 0,
            pid: ctx.pid,
        }
    }

    /// Act as the request's (already mapped) host ids on this thread until
    /// the guard drops. Without root there is nothing to switch to: the
    /// request runs with the VMM's own ids.
    fn as_caller(&self, ctx: &Context) -> io::Result<AsCaller> {
        let mut guard = AsCaller {
            uid: false,
            gid: false,
        };
        if !self.switch_ids {
            return Ok(guard);
        }
        // The group first: without root the group can no longer change.
        if ctx.gid != 0 {
            set_effective(libc::SYS_setresgid, ctx.gid)?;
            guard.gid = true;
        }
        if ctx.uid != 0 {
            set_effective(libc::SYS_setresuid, ctx.uid)?;
            guard.uid = true;
        }
        Ok(guard)
    }

    /// `mode` without set-user-ID, and without set-group-ID unless it is
    /// a directory's.
    fn strip_setid(&self, mode: u32, directory: bool) -> u32 {
        let mut strip = libc::S_ISUID;
        if !directory {
            strip |= libc::S_ISGID;
        }
        if mode & strip != 0 {
            self.faults
                .record(Severity::Allowed, "set-id bit dropped", &"");
        }
        mode & !strip
    }

    /// Whether xattrs are served at all.
    fn xattrs(&self) -> io::Result<()> {
        if self.policy.xattr {
            Ok(())
        } else {
            Err(errno(libc::ENOSYS))
        }
    }

    /// An xattr name the share serves: `user.*` only. Others do not exist
    /// for reading (`missing`, `ENODATA`) and cannot be set (`EPERM`).
    fn xattr_name(&self, name: &CStr, missing: i32) -> io::Result<()> {
        self.xattrs()?;
        if name.to_bytes().starts_with(b"user.") {
            Ok(())
        } else {
            Err(self.refuse(Severity::Allowed, "xattr outside user.*", missing))
        }
    }

    /// Host fds the guest holds right now (inodes plus handles).
    pub fn open_files(&self) -> usize {
        self.held().total()
    }

    fn held(&self) -> MutexGuard<'_, Held> {
        // The table is consistent after every statement: a panic elsewhere
        // while it was locked leaves nothing half-done in it.
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn refuse(&self, severity: Severity, reason: &'static str, code: i32) -> io::Error {
        self.faults.record(severity, reason, &"");
        errno(code)
    }

    fn writable(&self) -> io::Result<()> {
        if self.policy.read_only {
            return Err(self.refuse(
                Severity::Allowed,
                "change to a read-only share",
                libc::EROFS,
            ));
        }
        Ok(())
    }

    /// A name the guest wants created, removed or renamed.
    fn new_name(&self, name: &CStr) -> io::Result<()> {
        let bytes = name.to_bytes();
        if bytes.len() > NAME_MAX {
            return Err(self.refuse(Severity::Malformed, "name too long", libc::ENAMETOOLONG));
        }
        if bytes.is_empty() || bytes == b"." || bytes == b".." || bytes.contains(&b'/') {
            return Err(self.refuse(
                Severity::Malformed,
                "name is not a single path component",
                libc::EINVAL,
            ));
        }
        Ok(())
    }

    /// A name the guest looks up under `parent`.
    fn lookup_name(&self, parent: u64, name: &CStr) -> io::Result<()> {
        match name.to_bytes() {
            b"." => Ok(()),
            b".." if parent == ROOT_ID => Ok(()),
            b".." => Err(self.refuse(
                Severity::Malformed,
                "lookup of .. below the root",
                libc::ENOENT,
            )),
            _ => self.new_name(name),
        }
    }

    /// Count a lookup the passthrough layer just took on `entry.inode`,
    /// unless it is a new inode past the cap (then it is given back).
    fn admit(&self, ctx: &Context, entry: Entry) -> io::Result<Entry> {
        let mut held = self.held();
        if let Some(lookups) = held.inodes.get_mut(&entry.inode) {
            *lookups = lookups.saturating_add(1);
        } else if held.total() >= self.policy.max_open_files {
            drop(held);
            self.inner.forget(ctx, entry.inode, 1);
            return Err(self.refuse(Severity::Limit, "open file limit", libc::ENFILE));
        } else {
            held.inodes.insert(entry.inode, 1);
        }
        Ok(self.entry_to_guest(entry))
    }

    fn release_lookups(&self, inode: u64, count: u64) {
        let mut held = self.held();
        if let Some(lookups) = held.inodes.get_mut(&inode) {
            *lookups = lookups.saturating_sub(count);
            if *lookups == 0 {
                held.inodes.remove(&inode);
            }
        }
    }

    /// Room for `slots` more fds, or the error the guest gets.
    fn room_for(&self, slots: usize) -> io::Result<()> {
        if self.held().total() + slots > self.policy.max_open_files {
            return Err(self.refuse(Severity::Limit, "open file limit", libc::EMFILE));
        }
        Ok(())
    }

    fn hold_handle(&self, handle: Option<u64>) {
        if let Some(handle) = handle {
            self.held().handles.insert(handle);
        }
    }

    fn drop_handle(&self, handle: u64) {
        self.held().handles.remove(&handle);
    }

    /// Open flags as the host sees them, or `EROFS` for a write on a
    /// read-only share.
    fn open_flags(&self, flags: u32) -> io::Result<u32> {
        let flags = flags as i32;
        if self.policy.read_only
            && (flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0)
        {
            return Err(self.refuse(
                Severity::Allowed,
                "change to a read-only share",
                libc::EROFS,
            ));
        }
        Ok((flags & OPEN_FLAGS_KEPT) as u32)
    }

    fn attr_to_guest(&self, mut attr: libc::stat64) -> libc::stat64 {
        attr.st_uid = self.policy.ids.uid_to_guest(attr.st_uid);
        attr.st_gid = self.policy.ids.gid_to_guest(attr.st_gid);
        attr
    }

    fn entry_to_guest(&self, mut entry: Entry) -> Entry {
        entry.attr = self.attr_to_guest(entry.attr);
        entry
    }
}

impl FileSystem for Confined {
    type Inode = u64;
    type Handle = u64;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        self.serving.store(false, Ordering::Release);
        let want = self.inner.init(capable)?;
        if let Some((dev, ino)) = self.policy.root_id {
            let ctx = Context::default();
            let (attr, _) = self.inner.getattr(&ctx, ROOT_ID, None)?;
            if (attr.st_dev, attr.st_ino) != (dev, ino) {
                log::error!("the shared directory was replaced on the host; not serving it");
                return Err(errno(libc::EIO));
            }
        }
        self.serving.store(true, Ordering::Release);
        Ok((want | wanted_options()) - refused_options())
    }

    fn destroy(&self) {
        // The layer below opens the root's path again as it clears its
        // tables; nothing is served until an INIT has checked it.
        self.serving.store(false, Ordering::Release);
        self.inner.destroy();
        *self.held() = Held::default();
    }

    fn lookup(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        self.served()?;
        self.lookup_name(parent, name)?;
        let entry = {
            let _caller = self.as_caller(ctx)?;
            self.inner.lookup(ctx, parent, name)?
        };
        self.admit(ctx, entry)
    }

    fn forget(&self, ctx: &Context, inode: u64, count: u64) {
        self.release_lookups(inode, count);
        self.inner.forget(ctx, inode, count);
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(u64, u64)>) {
        for &(inode, count) in &requests {
            self.release_lookups(inode, count);
        }
        self.inner.batch_forget(ctx, requests);
    }

    fn getattr(
        &self,
        ctx: &Context,
        inode: u64,
        handle: Option<u64>,
    ) -> io::Result<(libc::stat64, Duration)> {
        self.served()?;
        let (attr, timeout) = self.inner.getattr(ctx, inode, handle)?;
        Ok((self.attr_to_guest(attr), timeout))
    }

    fn setattr(
        &self,
        ctx: &Context,
        inode: u64,
        mut attr: libc::stat64,
        handle: Option<u64>,
        valid: SetattrValid,
    ) -> io::Result<(libc::stat64, Duration)> {
        self.served()?;
        self.writable()?;
        if valid.contains(SetattrValid::UID) {
            attr.st_uid = self.policy.ids.uid_to_host(attr.st_uid);
        }
        if valid.contains(SetattrValid::GID) {
            attr.st_gid = self.policy.ids.gid_to_host(attr.st_gid);
        }
        if valid.contains(SetattrValid::MODE) && attr.st_mode & (libc::S_ISUID | libc::S_ISGID) != 0
        {
            let (now, _) = self.inner.getattr(ctx, inode, handle)?;
            let directory = now.st_mode & libc::S_IFMT == libc::S_IFDIR;
            attr.st_mode = self.strip_setid(attr.st_mode, directory);
        }
        let _caller = self.as_caller(ctx)?;
        let (attr, timeout) = self.inner.setattr(ctx, inode, attr, handle, valid)?;
        Ok((self.attr_to_guest(attr), timeout))
    }

    fn readlink(&self, ctx: &Context, inode: u64) -> io::Result<Vec<u8>> {
        self.served()?;
        let _caller = self.as_caller(ctx)?;
        self.inner.readlink(ctx, inode)
    }

    fn symlink(
        &self,
        ctx: &Context,
        linkname: &CStr,
        parent: u64,
        name: &CStr,
    ) -> io::Result<Entry> {
        self.served()?;
        self.writable()?;
        self.new_name(name)?;
        self.room_for(1)?;
        let entry = {
            let _caller = self.as_caller(ctx)?;
            self.inner
                .symlink(&Self::unswitched(ctx), linkname, parent, name)?
        };
        self.admit(ctx, entry)
    }

    fn mknod(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.served()?;
        self.writable()?;
        self.new_name(name)?;
        match mode & libc::S_IFMT {
            libc::S_IFREG | libc::S_IFIFO | libc::S_IFSOCK => {}
            libc::S_IFCHR | libc::S_IFBLK => {
                return Err(self.refuse(Severity::Limit, "device node in a share", libc::EPERM))
            }
            _ => return Err(self.refuse(Severity::Malformed, "mknod of a bad type", libc::EINVAL)),
        }
        self.room_for(1)?;
        let mode = self.strip_setid(mode, false);
        let entry = {
            let _caller = self.as_caller(ctx)?;
            self.inner
                .mknod(&Self::unswitched(ctx), parent, name, mode, rdev, umask)?
        };
        self.admit(ctx, entry)
    }

    fn mkdir(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.served()?;
        self.writable()?;
        self.new_name(name)?;
        self.room_for(1)?;
        let mode = self.strip_setid(mode, true);
        let entry = {
            let _caller = self.as_caller(ctx)?;
            self.inner
                .mkdir(&Self::unswitched(ctx), parent, name, mode, umask)?
        };
        self.admit(ctx, entry)
    }

    fn unlink(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        self.served()?;
        self.writable()?;
        self.new_name(name)?;
        let _caller = self.as_caller(ctx)?;
        self.inner.unlink(ctx, parent, name)
    }

    fn rmdir(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        self.served()?;
        self.writable()?;
        self.new_name(name)?;
        let _caller = self.as_caller(ctx)?;
        self.inner.rmdir(ctx, parent, name)
    }

    fn rename(
        &self,
        ctx: &Context,
        olddir: u64,
        oldname: &CStr,
        newdir: u64,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        self.served()?;
        self.writable()?;
        self.new_name(oldname)?;
        self.new_name(newname)?;
        if flags & !RENAME_FLAGS_ALLOWED != 0 {
            return Err(self.refuse(Severity::Limit, "rename flags refused", libc::EINVAL));
        }
        let _caller = self.as_caller(ctx)?;
        self.inner
            .rename(ctx, olddir, oldname, newdir, newname, flags)
    }

    fn link(&self, ctx: &Context, inode: u64, newparent: u64, newname: &CStr) -> io::Result<Entry> {
        self.served()?;
        self.writable()?;
        self.new_name(newname)?;
        // Room first: the link must not be made when its entry would then
        // be refused.
        self.room_for(1)?;
        let entry = {
            let _caller = self.as_caller(ctx)?;
            self.inner.link(ctx, inode, newparent, newname)?
        };
        self.admit(ctx, entry)
    }

    fn open(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions, Option<u32>)> {
        self.served()?;
        let flags = self.open_flags(flags)?;
        self.room_for(1)?;
        let opened = {
            let _caller = self.as_caller(ctx)?;
            self.inner.open(ctx, inode, flags, fuse_flags)?
        };
        self.hold_handle(opened.0);
        Ok(opened)
    }

    fn create(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mut args: CreateIn,
    ) -> io::Result<(Entry, Option<u64>, OpenOptions, Option<u32>)> {
        self.served()?;
        self.writable()?;
        self.new_name(name)?;
        let kept = self.open_flags(args.flags)? as i32;
        let exclusive = args.flags as i32 & libc::O_EXCL != 0;
        // The layer below is always asked for a new file: on an existing
        // name it would look the inode up and then fail to open it (a
        // directory, a FIFO) without giving the lookup back. An existing
        // name is looked up and opened here instead, both counted.
        args.flags = (kept | libc::O_CREAT | libc::O_EXCL) as u32;
        args.mode = self.strip_setid(args.mode, false);
        self.room_for(2)?;
        let created = {
            let _caller = self.as_caller(ctx)?;
            self.inner
                .create(&Self::unswitched(ctx), parent, name, args)
        };
        let (entry, handle, options, passthrough) = match created {
            Ok(created) => created,
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) && !exclusive => {
                let entry = self.lookup(ctx, parent, name)?;
                return match self.open(ctx, entry.inode, kept as u32, args.fuse_flags) {
                    Ok((handle, options, passthrough)) => Ok((entry, handle, options, passthrough)),
                    Err(e) => {
                        self.forget(ctx, entry.inode, 1);
                        Err(e)
                    }
                };
            }
            Err(e) => return Err(e),
        };
        self.hold_handle(handle);
        match self.admit(ctx, entry) {
            Ok(entry) => Ok((entry, handle, options, passthrough)),
            Err(e) => {
                if let Some(handle) = handle {
                    self.drop_handle(handle);
                    let _ = self
                        .inner
                        .release(ctx, entry.inode, 0, handle, false, false, None);
                }
                Err(e)
            }
        }
    }

    fn read(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        flags: u32,
    ) -> io::Result<usize> {
        self.served()?;
        self.inner
            .read(ctx, inode, handle, w, size, offset, lock_owner, flags)
    }

    fn write(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        delayed_write: bool,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<usize> {
        self.served()?;
        self.writable()?;
        // As the caller, so a write by anyone but the file's owner clears
        // its set-id bits as on the host.
        let _caller = self.as_caller(ctx)?;
        self.inner.write(
            ctx,
            inode,
            handle,
            r,
            size,
            offset,
            lock_owner,
            delayed_write,
            flags,
            fuse_flags,
        )
    }

    fn flush(&self, ctx: &Context, inode: u64, handle: u64, lock_owner: u64) -> io::Result<()> {
        self.served()?;
        self.inner.flush(ctx, inode, handle, lock_owner)
    }

    fn fsync(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        self.served()?;
        self.inner.fsync(ctx, inode, datasync, handle)
    }

    fn fallocate(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        self.served()?;
        self.writable()?;
        let _caller = self.as_caller(ctx)?;
        self.inner
            .fallocate(ctx, inode, handle, mode, offset, length)
    }

    fn release(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        handle: u64,
        flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        // Counted free only when the layer below closed it: a RELEASE
        // naming another inode is refused there and the fd stays open.
        self.inner
            .release(ctx, inode, flags, handle, flush, flock_release, lock_owner)?;
        self.drop_handle(handle);
        Ok(())
    }

    fn statfs(&self, ctx: &Context, inode: u64) -> io::Result<libc::statvfs64> {
        self.served()?;
        self.inner.statfs(ctx, inode)
    }

    fn setxattr(
        &self,
        ctx: &Context,
        inode: u64,
        name: &CStr,
        value: &[u8],
        flags: u32,
    ) -> io::Result<()> {
        self.served()?;
        self.xattr_name(name, libc::EPERM)?;
        self.writable()?;
        let _caller = self.as_caller(ctx)?;
        self.inner.setxattr(ctx, inode, name, value, flags)
    }

    fn getxattr(
        &self,
        ctx: &Context,
        inode: u64,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        self.served()?;
        self.xattr_name(name, libc::ENODATA)?;
        let _caller = self.as_caller(ctx)?;
        self.inner
            .getxattr(ctx, inode, name, size.min(MAX_XATTR_BYTES))
    }

    fn listxattr(&self, ctx: &Context, inode: u64, size: u32) -> io::Result<ListxattrReply> {
        self.served()?;
        self.xattrs()?;
        let _caller = self.as_caller(ctx)?;
        self.inner.listxattr(ctx, inode, size.min(MAX_XATTR_BYTES))
    }

    fn removexattr(&self, ctx: &Context, inode: u64, name: &CStr) -> io::Result<()> {
        self.served()?;
        self.xattr_name(name, libc::EPERM)?;
        self.writable()?;
        let _caller = self.as_caller(ctx)?;
        self.inner.removexattr(ctx, inode, name)
    }

    fn opendir(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions)> {
        self.served()?;
        if flags as i32 & libc::O_ACCMODE != libc::O_RDONLY {
            return Err(self.refuse(
                Severity::Malformed,
                "directory opened for writing",
                libc::EISDIR,
            ));
        }
        let flags = (flags as i32 & OPENDIR_FLAGS_KEPT) as u32;
        self.room_for(1)?;
        let opened = {
            let _caller = self.as_caller(ctx)?;
            self.inner.opendir(ctx, inode, flags)?
        };
        self.hold_handle(opened.0);
        Ok(opened)
    }

    fn readdir(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.served()?;
        self.inner.readdir(
            ctx,
            inode,
            handle,
            size.min(MAX_READDIR_BYTES),
            offset,
            add_entry,
        )
    }

    fn fsyncdir(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        self.served()?;
        self.inner.fsyncdir(ctx, inode, datasync, handle)
    }

    fn releasedir(&self, ctx: &Context, inode: u64, flags: u32, handle: u64) -> io::Result<()> {
        self.inner.releasedir(ctx, inode, flags, handle)?;
        self.drop_handle(handle);
        Ok(())
    }

    fn access(&self, ctx: &Context, inode: u64, mask: u32) -> io::Result<()> {
        self.served()?;
        if mask & libc::W_OK as u32 != 0 && self.policy.read_only {
            return Err(errno(libc::EROFS));
        }
        self.inner.access(ctx, inode, mask)
    }

    fn lseek(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        self.served()?;
        self.inner.lseek(ctx, inode, handle, offset, whence)
    }

    fn id_remap(&self, ctx: &mut Context) -> io::Result<()> {
        ctx.uid = self.policy.ids.uid_to_host(ctx.uid);
        ctx.gid = self.policy.ids.gid_to_host(ctx.gid);
        Ok(())
    }
}
