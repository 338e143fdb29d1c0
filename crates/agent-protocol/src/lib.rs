//! The protocol between chitin's host and its guest agent, shared by both
//! sides and doing no I/O policy of its own: where the agent listens
//! ([`PORT`]), what starts it ([`CMDLINE_ENTRY`]), the version, the typed
//! frames and their byte encoding, and the flow-control [`window`].
//!
//! One byte stream (vsock in the guest, a Unix socket on the host side)
//! carries length-prefixed frames:
//!
//! ```text
//! u32 LE length   bytes that follow (type + stream id + payload)
//! u8     type     one of the `TYPE_*` constants
//! u32 LE stream   the client-chosen exec id; 0 = the connection itself
//! payload         type-specific, see docs/agent-protocol.md
//! ```
//!
//! Inside payloads, byte strings are `u32 LE length + bytes` and lists are
//! `u32 LE count + items`. Every length and count read from the peer is
//! checked against a cap *before* anything is allocated for it, and a frame
//! is capped at [`MAX_PAYLOAD`] + header: decoding never panics and never
//! allocates by a peer-supplied size beyond those caps.
//!
//! This crate owns only the encoding; it never does process or thread work.

pub mod window;

use std::ffi::{OsStr, OsString};
use std::io::{self, Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};

/// Protocol version spoken by this build (HELLO payload). Version 2 added
/// per-stream flow control (the two CREDIT frames and [`WINDOW`]); version
/// 3 gives stdout and stderr a window each, sends EXIT as soon as the
/// process is reaped, and ends each output stream with an empty frame.
/// Version 5 added ENTROPY; version 6 an EXEC's container mounts and
/// process attributes (groups, umask, rlimits, capabilities,
/// no-new-privileges, OOM score); version 7 terminals (EXEC's tty,
/// RESIZE).
pub const VERSION: u32 = 7;
/// The vsock port the guest agent listens on.
pub const PORT: u32 = 1024;
/// The kernel command-line key the agent reads to decide whether to serve.
pub const CMDLINE_KEY: &str = "chitin.agent";
/// The command-line entry that makes the agent serve the protocol.
pub const CMDLINE_ENTRY: &str = "chitin.agent=1";

/// Largest payload of one frame: 1 MiB.
pub const MAX_PAYLOAD: usize = 1 << 20;
/// Bytes counted by the length prefix before the payload: type + stream id.
pub const HEADER_LEN: usize = 1 + 4;
/// Largest value of the length prefix.
pub const MAX_FRAME_LEN: usize = MAX_PAYLOAD + HEADER_LEN;
/// Largest STDOUT/STDERR/STDIN chunk the agent and client send per frame.
pub const MAX_CHUNK: usize = 64 << 10;
/// Per stream and direction, the most data bytes (STDOUT, STDERR and STDIN
/// each) a sender may have sent that its peer has not returned as credit. A sender never goes beyond it; a receiver that sees
/// more closes the connection as a protocol violation.
pub const WINDOW: u32 = 256 << 10;
/// Most argv entries in one EXEC.
pub const MAX_ARGS: usize = 4096;
/// Most environment entries in one EXEC.
pub const MAX_ENV: usize = 4096;
/// Most container mounts in one EXEC.
pub const MAX_MOUNTS: usize = 64;
/// Most supplementary groups in one EXEC (Linux's `NGROUPS_MAX` is far
/// larger; no container needs more).
pub const MAX_GROUPS: usize = 256;
/// Most rlimits in one EXEC (Linux has 16).
pub const MAX_RLIMITS: usize = 32;
/// Longest single string in an EXEC or ERROR: Linux's `MAX_ARG_STRLEN`.
pub const MAX_STRING: usize = 128 << 10;

/// HELLO {version: u32}, both directions, stream 0.
pub const TYPE_HELLO: u8 = 0x01;
/// EXEC {argv, env, cwd, uid, gid, stdin, root, hostname, mounts}, client
/// → agent.
pub const TYPE_EXEC: u8 = 0x02;
/// STDIN {bytes}, client → agent; empty bytes close the child's stdin.
pub const TYPE_STDIN: u8 = 0x03;
/// SIGNAL {signo: i32}, client → agent.
pub const TYPE_SIGNAL: u8 = 0x04;
/// SHUTDOWN {}, client → agent, stream 0.
pub const TYPE_SHUTDOWN: u8 = 0x05;
/// OUTPUT_CREDIT {stream: u8 (1 stdout, 2 stderr), bytes: u32}, client →
/// agent: that much more of that output may be sent on the stream.
pub const TYPE_OUTPUT_CREDIT: u8 = 0x06;
/// ENTROPY {bytes}, client → agent, stream 0: host random bytes for the
/// guest kernel's pool, mixed in (and the pool reseeded) before the agent
/// reads the next frame.
pub const TYPE_ENTROPY: u8 = 0x07;
/// RESIZE {rows: u16, cols: u16}, client → agent: a terminal's new size.
pub const TYPE_RESIZE: u8 = 0x08;
/// Most bytes in one ENTROPY.
pub const MAX_ENTROPY: usize = 256;
/// STARTED {pid: u32}, agent → client.
pub const TYPE_STARTED: u8 = 0x81;
/// STDOUT {bytes}, agent → client; empty bytes: end of the process's
/// stdout.
pub const TYPE_STDOUT: u8 = 0x82;
/// STDERR {bytes}, agent → client; empty bytes: end of its stderr.
pub const TYPE_STDERR: u8 = 0x83;
/// EXIT {kind: u8 (0 code, 1 signal), value: i32}, agent → client.
pub const TYPE_EXIT: u8 = 0x84;
/// ERROR {message}, agent → client; stream 0 = fatal for the connection.
pub const TYPE_ERROR: u8 = 0x85;
/// STDIN_CREDIT {bytes: u32}, agent → client: that much more STDIN may be
/// sent on the stream.
pub const TYPE_STDIN_CREDIT: u8 = 0x86;

/// Why a frame could not be read, decoded or encoded.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The stream failed.
    #[error("stream i/o")]
    Io(#[source] io::Error),
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame")]
    Truncated,
    /// The length prefix is above [`MAX_FRAME_LEN`].
    #[error("frame length {0} over the cap of {MAX_FRAME_LEN}")]
    FrameTooLarge(usize),
    /// The length prefix is below [`HEADER_LEN`].
    #[error("frame length {0} shorter than the header")]
    FrameTooShort(usize),
    /// The type byte is not one of the `TYPE_*` constants.
    #[error("unknown frame type {0:#04x}")]
    UnknownType(u8),
    /// A payload field is missing, over its cap or invalid.
    #[error("malformed frame payload: {0}")]
    Malformed(&'static str),
}

/// How a process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// A signal with this number killed it.
    Signal(i32),
}

impl ExitStatus {
    /// True for `Code(0)`.
    pub fn success(&self) -> bool {
        *self == ExitStatus::Code(0)
    }
}

/// Which output of a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OutputStream {
    /// Its stdout (wire value 1).
    Stdout,
    /// Its stderr (wire value 2).
    Stderr,
}

impl OutputStream {
    /// Both, in index order (see [`OutputStream::index`]).
    pub const BOTH: [OutputStream; 2] = [OutputStream::Stdout, OutputStream::Stderr];

    /// 0 for stdout, 1 for stderr: for per-stream arrays.
    pub fn index(self) -> usize {
        match self {
            OutputStream::Stdout => 0,
            OutputStream::Stderr => 1,
        }
    }

    /// The name, for messages.
    pub fn name(self) -> &'static str {
        match self {
            OutputStream::Stdout => "stdout",
            OutputStream::Stderr => "stderr",
        }
    }

    fn wire(self) -> u8 {
        self.index() as u8 + 1
    }

    fn from_wire(b: u8) -> Result<Self, ProtocolError> {
        match b {
            1 => Ok(OutputStream::Stdout),
            2 => Ok(OutputStream::Stderr),
            _ => Err(ProtocolError::Malformed("output stream is neither 1 nor 2")),
        }
    }
}

/// One process to start: the EXEC payload.
///
/// Strings are raw bytes ([`OsString`]) so non-UTF-8 arguments survive.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExecRequest {
    /// Program and arguments; `argv[0]` is looked up in `PATH`.
    pub argv: Vec<OsString>,
    /// The whole environment of the process (nothing is inherited).
    pub env: Vec<(OsString, OsString)>,
    /// Working directory; `None` keeps the agent's.
    pub cwd: Option<OsString>,
    /// User id to run as; `None` keeps the agent's.
    pub uid: Option<u32>,
    /// Group id to run as; `None` keeps the agent's.
    pub gid: Option<u32>,
    /// Pipe stdin from STDIN frames; otherwise stdin is /dev/null.
    pub stdin: bool,
    /// Run as a container process with this directory (in the guest) as
    /// its root: own mount and UTS namespaces, `pivot_root`, fresh
    /// `/proc`, `/sys`, `/dev`, `/tmp`. `cwd` is then inside it.
    pub root: Option<OsString>,
    /// Hostname of a container process (only with `root`).
    pub hostname: Option<OsString>,
    /// Run on a new terminal of this size: stdin, stdout and stderr are
    /// its slave side, the process leads a new session with it as its
    /// controlling terminal, and everything it writes comes as STDOUT
    /// (STDERR ends at once).
    pub tty: Option<WindowSize>,
    /// Mounts inside a container process's root, in order, after its
    /// `/proc`, `/sys`, `/dev` and `/tmp` (only with `root`).
    pub mounts: Vec<MountRequest>,
    /// The container process's attributes beyond its ids (only with
    /// `root`). Boxed: most requests carry none, and every frame is as
    /// large as its largest kind.
    pub attributes: Box<Attributes>,
}

/// A container process's attributes beyond its user and group: what an
/// OCI process carries besides them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Attributes {
    /// Supplementary groups (none when empty).
    pub groups: Vec<u32>,
    /// The file mode creation mask; `None` keeps the agent's.
    pub umask: Option<u32>,
    /// Resource limits, set before the process runs.
    pub rlimits: Vec<Rlimit>,
    /// Capability sets; `None` keeps every capability (root's).
    pub capabilities: Option<Capabilities>,
    /// `PR_SET_NO_NEW_PRIVS`: no privileges gained through exec.
    pub no_new_privileges: bool,
    /// `/proc/self/oom_score_adj`, -1000 to 1000.
    pub oom_score_adj: Option<i32>,
}

/// One resource limit: `RLIMIT_*` number (Linux's), soft and hard values
/// (`u64::MAX` is unlimited).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rlimit {
    /// `RLIMIT_NOFILE` and the like.
    pub resource: u32,
    /// The soft limit.
    pub soft: u64,
    /// The hard limit.
    pub hard: u64,
}

/// Capability sets as bit masks (bit `n` is capability number `n`, as in
/// `/proc/<pid>/status`). Bits past the guest kernel's last capability
/// are ignored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// The bounding set.
    pub bounding: u64,
    /// The effective set.
    pub effective: u64,
    /// The permitted set.
    pub permitted: u64,
    /// The inheritable set.
    pub inheritable: u64,
    /// The ambient set.
    pub ambient: u64,
}

/// A terminal's size in characters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WindowSize {
    /// Lines.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

/// What a container mount is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MountKind {
    /// A bind of a path in the guest (typically in a share).
    Bind,
    /// A fresh tmpfs.
    Tmpfs,
}

/// A container mount: read-only.
pub const MOUNT_READ_ONLY: u32 = 1;
/// A container mount: no set-user-id programs.
pub const MOUNT_NOSUID: u32 = 2;
/// A container mount: no device nodes.
pub const MOUNT_NODEV: u32 = 4;
/// A container mount: no programs run from it.
pub const MOUNT_NOEXEC: u32 = 8;
/// Every `MOUNT_*` bit.
pub const MOUNT_FLAGS: u32 = MOUNT_READ_ONLY | MOUNT_NOSUID | MOUNT_NODEV | MOUNT_NOEXEC;

/// One mount inside a container's root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountRequest {
    /// Bind or tmpfs.
    pub kind: MountKind,
    /// A bind's source, a path in the guest; empty for a tmpfs.
    pub source: OsString,
    /// Where in the container: an absolute path, resolved inside its root
    /// (symlinks included); missing directories, and for a bind of a file
    /// the file, are made.
    pub destination: OsString,
    /// `MOUNT_*` bits.
    pub flags: u32,
    /// A tmpfs's options (`size=64m,mode=1777`); empty for a bind.
    pub options: OsString,
}

impl ExecRequest {
    /// A request for `argv` with an empty environment and no stdin.
    pub fn new<I, A>(argv: I) -> Self
    where
        I: IntoIterator<Item = A>,
        A: AsRef<OsStr>,
    {
        Self {
            argv: argv
                .into_iter()
                .map(|a| a.as_ref().to_os_string())
                .collect(),
            ..Self::default()
        }
    }

    /// Add one environment variable.
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.env
            .push((key.as_ref().to_os_string(), value.as_ref().to_os_string()));
        self
    }

    /// Set the working directory.
    pub fn cwd(mut self, dir: impl AsRef<OsStr>) -> Self {
        self.cwd = Some(dir.as_ref().to_os_string());
        self
    }

    /// Run as this user and group.
    pub fn user(mut self, uid: u32, gid: u32) -> Self {
        self.uid = Some(uid);
        self.gid = Some(gid);
        self
    }

    /// Pipe stdin (see [`ExecRequest::stdin`]).
    pub fn with_stdin(mut self) -> Self {
        self.stdin = true;
        self
    }

    /// Run in `root` as a container process (see [`ExecRequest::root`]).
    pub fn root(mut self, root: impl AsRef<OsStr>) -> Self {
        self.root = Some(root.as_ref().to_os_string());
        self
    }
}

/// One decoded frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// Version handshake, both directions.
    Hello {
        /// The sender's protocol version.
        version: u32,
    },
    /// Start a process under client-chosen stream `id`.
    Exec {
        /// Stream id, unique per connection, never 0.
        id: u32,
        /// What to run.
        request: ExecRequest,
    },
    /// Bytes for the process's stdin; empty closes it.
    Stdin {
        /// Stream id.
        id: u32,
        /// The bytes.
        data: Vec<u8>,
    },
    /// Send a signal to a running process.
    Signal {
        /// Stream id.
        id: u32,
        /// Signal number.
        signo: i32,
    },
    /// A running process's terminal has a new size.
    Resize {
        /// Stream id.
        id: u32,
        /// The size.
        size: WindowSize,
    },
    /// Stop the guest (sync, then reboot).
    Shutdown,
    /// Host random bytes for the guest kernel's pool (a restored clone
    /// must not go on with its snapshot's random state).
    Entropy {
        /// At most [`MAX_ENTROPY`] bytes.
        bytes: Vec<u8>,
    },
    /// The client consumed `bytes` more of one of the stream's outputs.
    OutputCredit {
        /// Stream id.
        id: u32,
        /// Which output.
        stream: OutputStream,
        /// Bytes returned to the agent's window for that output.
        bytes: u32,
    },
    /// The process is running.
    Started {
        /// Stream id.
        id: u32,
        /// Its pid in the guest.
        pid: u32,
    },
    /// A chunk of the process's stdout; empty: its end.
    Stdout {
        /// Stream id.
        id: u32,
        /// At most [`MAX_CHUNK`] bytes.
        data: Vec<u8>,
    },
    /// A chunk of the process's stderr; empty: its end.
    Stderr {
        /// Stream id.
        id: u32,
        /// At most [`MAX_CHUNK`] bytes.
        data: Vec<u8>,
    },
    /// The process ended (its output may still follow, up to the two
    /// empty end frames).
    Exit {
        /// Stream id.
        id: u32,
        /// How it ended.
        status: ExitStatus,
    },
    /// A request failed; stream 0 means the connection is closing.
    Error {
        /// Stream id, or 0 for the connection.
        id: u32,
        /// What went wrong, for a human.
        message: String,
    },
    /// The agent handed `bytes` more of the stream's stdin to the process
    /// (or dropped them because its stdin is gone).
    StdinCredit {
        /// Stream id.
        id: u32,
        /// Bytes returned to the client's stdin window.
        bytes: u32,
    },
}

impl Frame {
    /// The type byte of this frame.
    pub fn type_byte(&self) -> u8 {
        match self {
            Frame::Hello { .. } => TYPE_HELLO,
            Frame::Exec { .. } => TYPE_EXEC,
            Frame::Stdin { .. } => TYPE_STDIN,
            Frame::Signal { .. } => TYPE_SIGNAL,
            Frame::Resize { .. } => TYPE_RESIZE,
            Frame::Shutdown => TYPE_SHUTDOWN,
            Frame::Entropy { .. } => TYPE_ENTROPY,
            Frame::OutputCredit { .. } => TYPE_OUTPUT_CREDIT,
            Frame::Started { .. } => TYPE_STARTED,
            Frame::Stdout { .. } => TYPE_STDOUT,
            Frame::Stderr { .. } => TYPE_STDERR,
            Frame::Exit { .. } => TYPE_EXIT,
            Frame::Error { .. } => TYPE_ERROR,
            Frame::StdinCredit { .. } => TYPE_STDIN_CREDIT,
        }
    }

    /// The stream id in the header (0 for connection frames).
    pub fn stream_id(&self) -> u32 {
        match self {
            Frame::Hello { .. } | Frame::Shutdown | Frame::Entropy { .. } => 0,
            Frame::Exec { id, .. }
            | Frame::Stdin { id, .. }
            | Frame::Signal { id, .. }
            | Frame::Resize { id, .. }
            | Frame::Started { id, .. }
            | Frame::Stdout { id, .. }
            | Frame::Stderr { id, .. }
            | Frame::Exit { id, .. }
            | Frame::Error { id, .. }
            | Frame::OutputCredit { id, .. }
            | Frame::StdinCredit { id, .. } => *id,
        }
    }

    /// The whole frame as bytes, length prefix included.
    ///
    /// Fails if a field is over its cap or the frame over [`MAX_FRAME_LEN`],
    /// so an encoder never produces what a decoder rejects.
    pub fn encode(&self) -> Result<Vec<u8>, ProtocolError> {
        let mut out = vec![0u8; 4];
        out.push(self.type_byte());
        put_u32(&mut out, self.stream_id());
        match self {
            Frame::Hello { version } => put_u32(&mut out, *version),
            Frame::Exec { request, .. } => encode_exec(&mut out, request)?,
            Frame::Stdin { data, .. } | Frame::Stdout { data, .. } | Frame::Stderr { data, .. } => {
                out.extend_from_slice(data)
            }
            Frame::Signal { signo, .. } => put_u32(&mut out, *signo as u32),
            Frame::Resize { size, .. } => {
                out.extend_from_slice(&size.rows.to_le_bytes());
                out.extend_from_slice(&size.cols.to_le_bytes());
            }
            Frame::Shutdown => {}
            Frame::Entropy { bytes } => {
                if bytes.len() > MAX_ENTROPY {
                    return Err(ProtocolError::Malformed(
                        "more entropy bytes than MAX_ENTROPY",
                    ));
                }
                out.extend_from_slice(bytes);
            }
            Frame::OutputCredit { stream, bytes, .. } => {
                out.push(stream.wire());
                put_u32(&mut out, *bytes);
            }
            Frame::StdinCredit { bytes, .. } => put_u32(&mut out, *bytes),
            Frame::Started { pid, .. } => put_u32(&mut out, *pid),
            Frame::Exit { status, .. } => {
                let (kind, value) = match status {
                    ExitStatus::Code(c) => (0u8, *c),
                    ExitStatus::Signal(s) => (1u8, *s),
                };
                out.push(kind);
                put_u32(&mut out, value as u32);
            }
            Frame::Error { message, .. } => put_bytes(&mut out, message.as_bytes())?,
        }
        let len = out.len() - 4;
        if len > MAX_FRAME_LEN {
            return Err(ProtocolError::FrameTooLarge(len));
        }
        out[..4].copy_from_slice(&(len as u32).to_le_bytes());
        Ok(out)
    }

    /// Decode a frame from its type byte, stream id and payload.
    pub fn decode(type_byte: u8, id: u32, payload: &[u8]) -> Result<Frame, ProtocolError> {
        let mut r = Cursor { buf: payload };
        let frame = match type_byte {
            TYPE_HELLO => Frame::Hello { version: r.u32()? },
            TYPE_EXEC => Frame::Exec {
                id,
                request: decode_exec(&mut r)?,
            },
            TYPE_STDIN => Frame::Stdin { id, data: r.rest() },
            TYPE_SIGNAL => Frame::Signal {
                id,
                signo: r.u32()? as i32,
            },
            TYPE_RESIZE => Frame::Resize {
                id,
                size: r.window_size()?,
            },
            TYPE_SHUTDOWN => Frame::Shutdown,
            TYPE_ENTROPY => {
                let bytes = r.rest();
                if bytes.len() > MAX_ENTROPY {
                    return Err(ProtocolError::Malformed(
                        "more entropy bytes than MAX_ENTROPY",
                    ));
                }
                Frame::Entropy { bytes }
            }
            TYPE_OUTPUT_CREDIT => Frame::OutputCredit {
                id,
                stream: OutputStream::from_wire(r.u8()?)?,
                bytes: r.u32()?,
            },
            TYPE_STDIN_CREDIT => Frame::StdinCredit {
                id,
                bytes: r.u32()?,
            },
            TYPE_STARTED => Frame::Started { id, pid: r.u32()? },
            TYPE_STDOUT => Frame::Stdout { id, data: r.rest() },
            TYPE_STDERR => Frame::Stderr { id, data: r.rest() },
            TYPE_EXIT => {
                let kind = r.u8()?;
                let value = r.u32()? as i32;
                let status = match kind {
                    0 => ExitStatus::Code(value),
                    1 => ExitStatus::Signal(value),
                    _ => return Err(ProtocolError::Malformed("exit kind is neither 0 nor 1")),
                };
                Frame::Exit { id, status }
            }
            TYPE_ERROR => Frame::Error {
                id,
                message: String::from_utf8_lossy(&r.bytes(MAX_STRING)?).into_owned(),
            },
            other => return Err(ProtocolError::UnknownType(other)),
        };
        if !r.buf.is_empty() {
            return Err(ProtocolError::Malformed("trailing bytes after payload"));
        }
        Ok(frame)
    }
}

/// Read one frame. `Ok(None)` is a clean end of stream between frames.
pub fn read_frame<R: Read>(reader: &mut R) -> Result<Option<Frame>, ProtocolError> {
    let mut len_bytes = [0u8; 4];
    match read_full(reader, &mut len_bytes)? {
        0 => return Ok(None),
        4 => {}
        _ => return Err(ProtocolError::Truncated),
    }
    let len = u32::from_le_bytes(len_bytes) as usize;
    if len > MAX_FRAME_LEN {
        return Err(ProtocolError::FrameTooLarge(len));
    }
    if len < HEADER_LEN {
        return Err(ProtocolError::FrameTooShort(len));
    }
    // `len` is capped above; read through `take` so a peer that announces a
    // large frame and sends nothing does not make us allocate it up front.
    let mut body = Vec::new();
    reader
        .take(len as u64)
        .read_to_end(&mut body)
        .map_err(ProtocolError::Io)?;
    if body.len() != len {
        return Err(ProtocolError::Truncated);
    }
    let id = u32::from_le_bytes([body[1], body[2], body[3], body[4]]);
    Frame::decode(body[0], id, &body[HEADER_LEN..]).map(Some)
}

/// Encode and write one frame (no flush).
pub fn write_frame<W: Write>(writer: &mut W, frame: &Frame) -> Result<(), ProtocolError> {
    let bytes = frame.encode()?;
    writer.write_all(&bytes).map_err(ProtocolError::Io)
}

/// Fill `buf` as far as the stream goes; returns bytes read (short = EOF).
fn read_full<R: Read>(reader: &mut R, buf: &mut [u8]) -> Result<usize, ProtocolError> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ProtocolError::Io(e)),
        }
    }
    Ok(filled)
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) -> Result<(), ProtocolError> {
    if b.len() > MAX_STRING {
        return Err(ProtocolError::Malformed("string over the length cap"));
    }
    put_u32(out, b.len() as u32);
    out.extend_from_slice(b);
    Ok(())
}

fn put_count(out: &mut Vec<u8>, n: usize, cap: usize) -> Result<(), ProtocolError> {
    if n > cap {
        return Err(ProtocolError::Malformed("list over the count cap"));
    }
    put_u32(out, n as u32);
    Ok(())
}

fn put_opt_u32(out: &mut Vec<u8>, v: Option<u32>) {
    out.push(u8::from(v.is_some()));
    put_u32(out, v.unwrap_or(0));
}

/// EXEC payload: argv list, env list of (key, value), cwd flag + string,
/// uid flag + u32, gid flag + u32, stdin flag, root flag + string,
/// hostname flag + string, tty flag + u16 rows + u16 cols, mounts list of (kind u8: 1 bind, 2 tmpfs;
/// flags u32; source, destination, options strings), then the
/// attributes: groups list of u32, umask flag + u32, rlimits list of
/// (resource u32, soft u64, hard u64), capabilities flag + five u64
/// (bounding, effective, permitted, inheritable, ambient), the
/// no-new-privileges flag, OOM score flag + i32.
fn encode_exec(out: &mut Vec<u8>, req: &ExecRequest) -> Result<(), ProtocolError> {
    put_count(out, req.argv.len(), MAX_ARGS)?;
    for a in &req.argv {
        put_bytes(out, a.as_bytes())?;
    }
    put_count(out, req.env.len(), MAX_ENV)?;
    for (k, v) in &req.env {
        put_bytes(out, k.as_bytes())?;
        put_bytes(out, v.as_bytes())?;
    }
    out.push(u8::from(req.cwd.is_some()));
    if let Some(cwd) = &req.cwd {
        put_bytes(out, cwd.as_bytes())?;
    }
    put_opt_u32(out, req.uid);
    put_opt_u32(out, req.gid);
    out.push(u8::from(req.stdin));
    for field in [&req.root, &req.hostname] {
        out.push(u8::from(field.is_some()));
        if let Some(value) = field {
            put_bytes(out, value.as_bytes())?;
        }
    }
    out.push(u8::from(req.tty.is_some()));
    let tty = req.tty.unwrap_or_default();
    out.extend_from_slice(&tty.rows.to_le_bytes());
    out.extend_from_slice(&tty.cols.to_le_bytes());
    put_count(out, req.mounts.len(), MAX_MOUNTS)?;
    for m in &req.mounts {
        out.push(match m.kind {
            MountKind::Bind => 1,
            MountKind::Tmpfs => 2,
        });
        put_u32(out, m.flags);
        for s in [&m.source, &m.destination, &m.options] {
            put_bytes(out, s.as_bytes())?;
        }
    }
    let a = &req.attributes;
    put_count(out, a.groups.len(), MAX_GROUPS)?;
    for g in &a.groups {
        put_u32(out, *g);
    }
    put_opt_u32(out, a.umask);
    put_count(out, a.rlimits.len(), MAX_RLIMITS)?;
    for r in &a.rlimits {
        put_u32(out, r.resource);
        out.extend_from_slice(&r.soft.to_le_bytes());
        out.extend_from_slice(&r.hard.to_le_bytes());
    }
    out.push(u8::from(a.capabilities.is_some()));
    if let Some(c) = &a.capabilities {
        for set in [
            c.bounding,
            c.effective,
            c.permitted,
            c.inheritable,
            c.ambient,
        ] {
            out.extend_from_slice(&set.to_le_bytes());
        }
    }
    out.push(u8::from(a.no_new_privileges));
    put_opt_u32(out, a.oom_score_adj.map(|v| v as u32));
    Ok(())
}

fn decode_exec(r: &mut Cursor<'_>) -> Result<ExecRequest, ProtocolError> {
    let argc = r.count(MAX_ARGS)?;
    let mut argv = Vec::with_capacity(argc);
    for _ in 0..argc {
        argv.push(r.os_string()?);
    }
    let envc = r.count(MAX_ENV)?;
    let mut env = Vec::with_capacity(envc);
    for _ in 0..envc {
        let key = r.os_string()?;
        env.push((key, r.os_string()?));
    }
    let cwd = if r.flag()? {
        Some(r.os_string()?)
    } else {
        None
    };
    let uid = r.opt_u32()?;
    let gid = r.opt_u32()?;
    let stdin = r.flag()?;
    let mut optional = || -> Result<Option<OsString>, ProtocolError> {
        Ok(if r.flag()? {
            Some(r.os_string()?)
        } else {
            None
        })
    };
    let root = optional()?;
    let hostname = optional()?;
    let has_tty = r.flag()?;
    let size = r.window_size()?;
    let tty = has_tty.then_some(size);
    let count = r.count(MAX_MOUNTS)?;
    let mut mounts = Vec::with_capacity(count);
    for _ in 0..count {
        let kind = match r.u8()? {
            1 => MountKind::Bind,
            2 => MountKind::Tmpfs,
            _ => return Err(ProtocolError::Malformed("mount kind is neither 1 nor 2")),
        };
        let flags = r.u32()?;
        if flags & !MOUNT_FLAGS != 0 {
            return Err(ProtocolError::Malformed("unknown mount flags"));
        }
        mounts.push(MountRequest {
            kind,
            flags,
            source: r.os_string()?,
            destination: r.os_string()?,
            options: r.os_string()?,
        });
    }
    let attributes = Box::new(decode_attributes(r)?);
    Ok(ExecRequest {
        argv,
        env,
        cwd,
        uid,
        gid,
        stdin,
        root,
        hostname,
        tty,
        mounts,
        attributes,
    })
}

fn decode_attributes(r: &mut Cursor<'_>) -> Result<Attributes, ProtocolError> {
    let count = r.count(MAX_GROUPS)?;
    let mut groups = Vec::with_capacity(count);
    for _ in 0..count {
        groups.push(r.u32()?);
    }
    let umask = r.opt_u32()?;
    if umask.is_some_and(|m| m > 0o777) {
        return Err(ProtocolError::Malformed("umask over 0777"));
    }
    let count = r.count(MAX_RLIMITS)?;
    let mut rlimits = Vec::with_capacity(count);
    for _ in 0..count {
        rlimits.push(Rlimit {
            resource: r.u32()?,
            soft: r.u64()?,
            hard: r.u64()?,
        });
    }
    let capabilities = if r.flag()? {
        Some(Capabilities {
            bounding: r.u64()?,
            effective: r.u64()?,
            permitted: r.u64()?,
            inheritable: r.u64()?,
            ambient: r.u64()?,
        })
    } else {
        None
    };
    let no_new_privileges = r.flag()?;
    let oom_score_adj = r.opt_u32()?.map(|v| v as i32);
    if oom_score_adj.is_some_and(|v| !(-1000..=1000).contains(&v)) {
        return Err(ProtocolError::Malformed(
            "OOM score adjustment outside -1000..=1000",
        ));
    }
    Ok(Attributes {
        groups,
        umask,
        rlimits,
        capabilities,
        no_new_privileges,
        oom_score_adj,
    })
}

/// A bounds-checked reader over one payload.
struct Cursor<'a> {
    buf: &'a [u8],
}

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], ProtocolError> {
        if n > self.buf.len() {
            return Err(ProtocolError::Malformed("payload shorter than its fields"));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, ProtocolError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u16(&mut self) -> Result<u16, ProtocolError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn window_size(&mut self) -> Result<WindowSize, ProtocolError> {
        Ok(WindowSize {
            rows: self.u16()?,
            cols: self.u16()?,
        })
    }

    fn u64(&mut self) -> Result<u64, ProtocolError> {
        let b = self.take(8)?;
        let mut le = [0u8; 8];
        le.copy_from_slice(b);
        Ok(u64::from_le_bytes(le))
    }

    fn flag(&mut self) -> Result<bool, ProtocolError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(ProtocolError::Malformed("flag is neither 0 nor 1")),
        }
    }

    fn opt_u32(&mut self) -> Result<Option<u32>, ProtocolError> {
        let present = self.flag()?;
        let v = self.u32()?;
        Ok(present.then_some(v))
    }

    /// A list count, checked against `cap` and against the bytes left (each
    /// item takes at least 4), so `Vec::with_capacity(count)` is bounded.
    fn count(&mut self, cap: usize) -> Result<usize, ProtocolError> {
        let n = self.u32()? as usize;
        if n > cap {
            return Err(ProtocolError::Malformed("list count over its cap"));
        }
        if n > self.buf.len() / 4 {
            return Err(ProtocolError::Malformed("list count beyond the payload"));
        }
        Ok(n)
    }

    fn bytes(&mut self, cap: usize) -> Result<Vec<u8>, ProtocolError> {
        let n = self.u32()? as usize;
        if n > cap {
            return Err(ProtocolError::Malformed("string length over its cap"));
        }
        Ok(self.take(n)?.to_vec())
    }

    fn os_string(&mut self) -> Result<OsString, ProtocolError> {
        Ok(OsString::from_vec(self.bytes(MAX_STRING)?))
    }

    fn rest(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf).to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(frame: &Frame) -> Frame {
        let bytes = frame.encode().unwrap();
        read_frame(&mut bytes.as_slice()).unwrap().unwrap()
    }

    /// A frame header with a length prefix covering `payload`.
    fn raw(type_byte: u8, id: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = ((HEADER_LEN + payload.len()) as u32).to_le_bytes().to_vec();
        out.push(type_byte);
        out.extend_from_slice(&id.to_le_bytes());
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn bad_mounts_and_attributes_are_malformed() {
        let mut request = ExecRequest::new(["true"]).root("/r");
        request.mounts.push(MountRequest {
            kind: MountKind::Tmpfs,
            source: "".into(),
            destination: "/t".into(),
            flags: 0,
            options: "".into(),
        });
        let frame = Frame::Exec { id: 1, request };
        let good = frame.encode().unwrap();
        // The mount's kind byte follows its count, 19 bytes before the
        // default attributes (kind, flags, then the source, "/t" and the
        // options, each with its 4-byte length). The attributes: groups
        // count, umask, rlimits count, capabilities flag, the
        // no-new-privileges flag, OOM score.
        let attributes = 4 + (1 + 4) + 4 + 1 + 1 + (1 + 4);
        let kind_at = good.len() - attributes - (1 + 4 + 4 + (4 + 2) + 4);
        assert_eq!(good[kind_at], 2);
        let mut bad_kind = good.clone();
        bad_kind[kind_at] = 3;
        let mut bad_flags = good.clone();
        bad_flags[kind_at + 1] = 0x10;
        let mut too_many = good.clone();
        too_many[kind_at - 4..kind_at].copy_from_slice(&(MAX_MOUNTS as u32 + 1).to_le_bytes());
        // umask 0o1000; OOM score 1001.
        let umask_at = good.len() - attributes + 4;
        let mut bad_umask = good.clone();
        bad_umask[umask_at] = 1;
        bad_umask[umask_at + 1..umask_at + 5].copy_from_slice(&0o1000u32.to_le_bytes());
        let oom_at = good.len() - 5;
        let mut bad_oom = good.clone();
        bad_oom[oom_at] = 1;
        bad_oom[oom_at + 1..].copy_from_slice(&1001u32.to_le_bytes());
        for bad in [bad_kind, bad_flags, too_many, bad_umask, bad_oom] {
            assert!(
                matches!(
                    read_frame(&mut bad.as_slice()),
                    Err(ProtocolError::Malformed(_))
                ),
                "{bad:?}"
            );
        }
        assert_eq!(read_frame(&mut good.as_slice()).unwrap().unwrap(), frame);
    }

    #[test]
    fn frame_every_type_round_trips() {
        let request = ExecRequest::new(["sh", "-c", "echo \u{e9}"])
            .env("PATH", "/bin")
            .cwd("/tmp")
            .user(1000, 1001)
            .with_stdin()
            .root("/mnt/rootfs");
        let mut named = ExecRequest::new(["hostname"]).root("/r");
        named.hostname = Some("box".into());
        named.mounts = vec![
            MountRequest {
                kind: MountKind::Bind,
                source: "/run/chitin/pod/c1/m0".into(),
                destination: "/etc/hosts".into(),
                flags: MOUNT_READ_ONLY,
                options: "".into(),
            },
            MountRequest {
                kind: MountKind::Tmpfs,
                source: "".into(),
                destination: "/cache".into(),
                flags: MOUNT_NOSUID | MOUNT_NODEV | MOUNT_NOEXEC,
                options: "size=64m,mode=1777".into(),
            },
        ];
        named.attributes = Box::new(Attributes {
            groups: vec![10, 20],
            umask: Some(0o027),
            rlimits: vec![Rlimit {
                resource: 7,
                soft: 1024,
                hard: u64::MAX,
            }],
            capabilities: Some(Capabilities {
                bounding: 1 << 21,
                effective: 1,
                permitted: 3,
                inheritable: 0,
                ambient: 1 << 40,
            }),
            no_new_privileges: true,
            oom_score_adj: Some(-999),
        });
        let frames = [
            Frame::Exec {
                id: 9,
                request: named,
            },
            Frame::Hello { version: VERSION },
            Frame::Exec { id: 7, request },
            Frame::Exec {
                id: 10,
                request: ExecRequest {
                    tty: Some(WindowSize {
                        rows: 33,
                        cols: 101,
                    }),
                    ..ExecRequest::new(["sh"])
                },
            },
            Frame::Resize {
                id: 10,
                size: WindowSize {
                    rows: 50,
                    cols: u16::MAX,
                },
            },
            Frame::Exec {
                id: 8,
                request: ExecRequest::new(["true"]),
            },
            Frame::Stdin {
                id: 7,
                data: b"in".to_vec(),
            },
            Frame::Stdin {
                id: 7,
                data: Vec::new(),
            },
            Frame::OutputCredit {
                id: 7,
                stream: OutputStream::Stdout,
                bytes: WINDOW,
            },
            Frame::OutputCredit {
                id: 7,
                stream: OutputStream::Stderr,
                bytes: 1,
            },
            Frame::StdinCredit { id: 7, bytes: 1 },
            Frame::Signal { id: 7, signo: 9 },
            Frame::Shutdown,
            Frame::Entropy {
                bytes: vec![0x5a; MAX_ENTROPY],
            },
            Frame::Entropy { bytes: Vec::new() },
            Frame::Started { id: 7, pid: 42 },
            Frame::Stdout {
                id: 7,
                data: vec![0xff; MAX_CHUNK],
            },
            Frame::Stderr {
                id: 7,
                data: b"err".to_vec(),
            },
            Frame::Exit {
                id: 7,
                status: ExitStatus::Code(-3),
            },
            Frame::Exit {
                id: 7,
                status: ExitStatus::Signal(9),
            },
            Frame::Error {
                id: 0,
                message: "no such file".into(),
            },
        ];
        for frame in &frames {
            assert_eq!(&round_trip(frame), frame);
        }
    }

    #[test]
    fn read_frame_non_utf8_argv_round_trips() {
        let request = ExecRequest {
            argv: vec![OsString::from_vec(vec![b'a', 0xff, 0xfe])],
            ..ExecRequest::default()
        };
        let frame = Frame::Exec { id: 1, request };
        assert_eq!(round_trip(&frame), frame);
    }

    #[test]
    fn read_frame_empty_stream_is_clean_end() {
        assert!(read_frame(&mut [].as_slice()).unwrap().is_none());
    }

    #[test]
    fn read_frame_every_truncation_errors() {
        let bytes = Frame::Exec {
            id: 3,
            request: ExecRequest::new(["echo", "hello"]).env("A", "B"),
        }
        .encode()
        .unwrap();
        // Every proper prefix except the empty one stops inside a frame.
        for cut in 1..bytes.len() {
            let result = read_frame(&mut &bytes[..cut]);
            assert!(matches!(result, Err(ProtocolError::Truncated)), "cut {cut}");
        }
    }

    #[test]
    fn read_frame_oversized_length_errors_before_reading() {
        let bytes = ((MAX_FRAME_LEN + 1) as u32).to_le_bytes();
        let result = read_frame(&mut bytes.as_slice());
        assert!(matches!(result, Err(ProtocolError::FrameTooLarge(_))));
        let huge = u32::MAX.to_le_bytes();
        let result = read_frame(&mut huge.as_slice());
        assert!(matches!(result, Err(ProtocolError::FrameTooLarge(_))));
    }

    #[test]
    fn read_frame_length_below_header_errors() {
        // Length 4: a type byte and only 3 of the 4 stream id bytes.
        let bytes = [4, 0, 0, 0, TYPE_SHUTDOWN, 0, 0, 0];
        let result = read_frame(&mut bytes.as_slice());
        assert!(matches!(result, Err(ProtocolError::FrameTooShort(4))));
    }

    #[test]
    fn read_frame_unknown_type_errors() {
        let bytes = raw(0x7f, 0, &[]);
        let result = read_frame(&mut bytes.as_slice());
        assert!(matches!(result, Err(ProtocolError::UnknownType(0x7f))));
    }

    #[test]
    fn read_frame_argv_count_over_cap_errors() {
        // A count of MAX_ARGS + 1 with no items: rejected by the cap, not
        // by running out of bytes after reserving space for it.
        let payload = ((MAX_ARGS + 1) as u32).to_le_bytes();
        let bytes = raw(TYPE_EXEC, 1, &payload);
        let result = read_frame(&mut bytes.as_slice());
        assert!(matches!(result, Err(ProtocolError::Malformed(m)) if m.contains("cap")));
    }

    #[test]
    fn read_frame_argv_count_beyond_payload_errors() {
        // Under the cap, but 100 items cannot fit in zero remaining bytes.
        let payload = 100u32.to_le_bytes();
        let bytes = raw(TYPE_EXEC, 1, &payload);
        let result = read_frame(&mut bytes.as_slice());
        assert!(matches!(result, Err(ProtocolError::Malformed(_))));
    }

    #[test]
    fn read_frame_string_length_over_cap_errors() {
        let mut payload = 1u32.to_le_bytes().to_vec();
        payload.extend_from_slice(&((MAX_STRING + 1) as u32).to_le_bytes());
        let bytes = raw(TYPE_EXEC, 1, &payload);
        let result = read_frame(&mut bytes.as_slice());
        assert!(matches!(result, Err(ProtocolError::Malformed(_))));
    }

    #[test]
    fn entropy_over_its_cap_is_refused_both_ways() {
        let bytes = raw(TYPE_ENTROPY, 0, &[1; MAX_ENTROPY + 1]);
        let result = read_frame(&mut bytes.as_slice());
        assert!(matches!(result, Err(ProtocolError::Malformed(_))));
        let frame = Frame::Entropy {
            bytes: vec![1; MAX_ENTROPY + 1],
        };
        assert!(matches!(frame.encode(), Err(ProtocolError::Malformed(_))));
    }

    #[test]
    fn read_frame_string_longer_than_payload_errors() {
        let mut payload = 1u32.to_le_bytes().to_vec();
        payload.extend_from_slice(&10u32.to_le_bytes());
        payload.extend_from_slice(b"abc");
        let bytes = raw(TYPE_EXEC, 1, &payload);
        let result = read_frame(&mut bytes.as_slice());
        assert!(matches!(result, Err(ProtocolError::Malformed(_))));
    }

    #[test]
    fn read_frame_trailing_bytes_error() {
        let bytes = raw(TYPE_HELLO, 0, &[1, 0, 0, 0, 0xaa]);
        let result = read_frame(&mut bytes.as_slice());
        assert!(matches!(result, Err(ProtocolError::Malformed(_))));
    }

    #[test]
    fn read_frame_credit_without_count_errors() {
        for type_byte in [TYPE_OUTPUT_CREDIT, TYPE_STDIN_CREDIT] {
            let bytes = raw(type_byte, 3, &[1, 0]);
            assert!(matches!(
                read_frame(&mut bytes.as_slice()),
                Err(ProtocolError::Malformed(_))
            ));
        }
    }

    #[test]
    fn read_frame_output_credit_for_stream_3_errors() {
        let bytes = raw(TYPE_OUTPUT_CREDIT, 3, &[3, 1, 0, 0, 0]);
        let result = read_frame(&mut bytes.as_slice());
        assert!(matches!(result, Err(ProtocolError::Malformed(m)) if m.contains("stream")));
    }

    #[test]
    fn read_frame_bad_exit_kind_errors() {
        let bytes = raw(TYPE_EXIT, 1, &[2, 0, 0, 0, 0]);
        let result = read_frame(&mut bytes.as_slice());
        assert!(matches!(result, Err(ProtocolError::Malformed(_))));
    }

    #[test]
    fn read_frame_arbitrary_bytes_never_panic() {
        // A fixed xorshift stream: short garbage frames of every type.
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 40) as usize;
            let mut payload = Vec::with_capacity(len);
            let mut y = x;
            for _ in 0..len {
                y = y.rotate_left(9) ^ 0x9e37_79b9_7f4a_7c15;
                payload.push(y as u8);
            }
            let bytes = raw((x >> 40) as u8, 1, &payload);
            let _ = read_frame(&mut bytes.as_slice());
        }
    }

    #[test]
    fn encode_stdin_over_max_payload_errors() {
        let frame = Frame::Stdin {
            id: 1,
            data: vec![0; MAX_PAYLOAD + 1],
        };
        assert!(matches!(
            frame.encode(),
            Err(ProtocolError::FrameTooLarge(_))
        ));
    }

    #[test]
    fn encode_argv_over_cap_errors() {
        let request = ExecRequest::new(vec!["x"; MAX_ARGS + 1]);
        let frame = Frame::Exec { id: 1, request };
        assert!(matches!(frame.encode(), Err(ProtocolError::Malformed(_))));
    }
}
