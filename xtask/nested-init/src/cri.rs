//! A small client of the Kubernetes Container Runtime Interface, as the
//! kubelet speaks it to containerd: gRPC over HTTP/2 on a unix socket.
//!
//! Only what the `shim-cri` scenario calls is here, so the messages are
//! written and read by field number ([`Message`], [`Fields`]) against
//! `runtime.v1`'s `api.proto`, with no code generator and no protoc. The
//! transport is the `h2` crate; every call has a deadline, sent to the
//! server as `grpc-timeout` and kept here too, and an answer larger than
//! [`MAX_ANSWER`] is refused.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;

/// The largest answer read (ExecSync caps its output at 16 MiB a stream).
pub const MAX_ANSWER: usize = 40 << 20;

/// A protobuf message being written: fields in the order they are added.
#[derive(Clone, Debug, Default)]
pub struct Message(Vec<u8>);

/// Protobuf wire types.
const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LENGTH: u8 = 2;
const FIXED32: u8 = 5;

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

impl Message {
    /// An empty message.
    pub fn new() -> Self {
        Self::default()
    }

    fn key(&mut self, field: u32, wire: u8) {
        put_varint(&mut self.0, (u64::from(field) << 3) | u64::from(wire));
    }

    /// A `bytes` field (or a nested message's encoding).
    pub fn bytes(mut self, field: u32, value: &[u8]) -> Self {
        self.key(field, LENGTH);
        put_varint(&mut self.0, value.len() as u64);
        self.0.extend_from_slice(value);
        self
    }

    /// A `string` field.
    pub fn string(self, field: u32, value: &str) -> Self {
        self.bytes(field, value.as_bytes())
    }

    /// A `repeated string` field.
    pub fn strings(self, field: u32, values: &[&str]) -> Self {
        values.iter().fold(self, |m, v| m.string(field, v))
    }

    /// An integer field (`uint32`, `uint64`, `int64`, `bool`, an enum).
    pub fn varint(mut self, field: u32, value: u64) -> Self {
        self.key(field, VARINT);
        put_varint(&mut self.0, value);
        self
    }

    /// A nested message.
    pub fn message(self, field: u32, value: Message) -> Self {
        self.bytes(field, &value.0)
    }

    /// One entry of a `map<string, string>` field.
    pub fn map_entry(self, field: u32, key: &str, value: &str) -> Self {
        self.message(field, Message::new().string(1, key).string(2, value))
    }

    /// The encoding.
    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }
}

/// One field's value as it came on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Value<'a> {
    /// An integer of any varint type.
    Varint(u64),
    /// `bytes`, `string`, a nested message, or a packed array.
    Bytes(&'a [u8]),
    /// A `fixed64`, `sfixed64` or `double`.
    Fixed64(u64),
    /// A `fixed32`, `sfixed32` or `float`.
    Fixed32(u32),
}

/// A message's fields as read: `(field number, value)` in wire order.
#[derive(Clone, Debug, Default)]
pub struct Fields<'a>(Vec<(u32, Value<'a>)>);

fn take_varint(buf: &mut &[u8]) -> Result<u64, String> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = buf.split_first().ok_or("a varint runs past the end")?;
        *buf = rest;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err("a varint longer than 10 bytes".into())
}

fn take<'a>(buf: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
    if buf.len() < n {
        return Err(format!("a field of {n} bytes with {} left", buf.len()));
    }
    let (head, rest) = buf.split_at(n);
    *buf = rest;
    Ok(head)
}

impl<'a> Fields<'a> {
    /// Read a message's encoding; malformed input is an error, never a
    /// panic.
    pub fn parse(mut buf: &'a [u8]) -> Result<Self, String> {
        let mut fields = Vec::new();
        while !buf.is_empty() {
            let key = take_varint(&mut buf)?;
            let field =
                u32::try_from(key >> 3).map_err(|_| format!("field number {}", key >> 3))?;
            let value = match (key & 7) as u8 {
                VARINT => Value::Varint(take_varint(&mut buf)?),
                LENGTH => {
                    let len = usize::try_from(take_varint(&mut buf)?)
                        .map_err(|_| "a length past usize".to_string())?;
                    Value::Bytes(take(&mut buf, len)?)
                }
                FIXED64 => {
                    let b = take(&mut buf, 8)?;
                    Value::Fixed64(u64::from_le_bytes(b.try_into().map_err(|_| "fixed64")?))
                }
                FIXED32 => {
                    let b = take(&mut buf, 4)?;
                    Value::Fixed32(u32::from_le_bytes(b.try_into().map_err(|_| "fixed32")?))
                }
                wire => return Err(format!("field {field}: wire type {wire}")),
            };
            fields.push((field, value));
        }
        Ok(Self(fields))
    }

    /// The last value of `field` that is length-delimited (protobuf's
    /// rule: the last one wins).
    pub fn bytes(&self, field: u32) -> Option<&'a [u8]> {
        self.0.iter().rev().find_map(|&(f, v)| match v {
            Value::Bytes(b) if f == field => Some(b),
            _ => None,
        })
    }

    /// `field` as a string (empty when absent, as proto3 reads it).
    pub fn string(&self, field: u32) -> Result<String, String> {
        let b = self.bytes(field).unwrap_or_default();
        String::from_utf8(b.to_vec()).map_err(|_| format!("field {field} is not UTF-8"))
    }

    /// `field` as an integer (0 when absent).
    pub fn varint(&self, field: u32) -> u64 {
        self.0
            .iter()
            .rev()
            .find_map(|&(f, v)| match v {
                Value::Varint(n) if f == field => Some(n),
                _ => None,
            })
            .unwrap_or(0)
    }

    /// `field` as a nested message (empty when absent).
    pub fn message(&self, field: u32) -> Result<Fields<'a>, String> {
        Fields::parse(self.bytes(field).unwrap_or_default())
    }
}

/// Frame one message as gRPC sends it: no compression, 4-byte length.
pub fn frame(message: &[u8]) -> Result<Vec<u8>, String> {
    let len = u32::try_from(message.len()).map_err(|_| "a message over 4 GiB")?;
    let mut out = Vec::with_capacity(message.len() + 5);
    out.push(0);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(message);
    Ok(out)
}

/// The one message of a unary call's answer body.
pub fn unframe(body: &[u8]) -> Result<&[u8], String> {
    let (head, rest) = body
        .split_at_checked(5)
        .ok_or_else(|| format!("an answer of {} bytes has no gRPC frame", body.len()))?;
    if head[0] != 0 {
        return Err(format!("a compressed answer (flag {})", head[0]));
    }
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if rest.len() != len {
        return Err(format!(
            "a gRPC frame of {len} bytes holds {} bytes",
            rest.len()
        ));
    }
    Ok(rest)
}

/// `grpc-message` is percent-encoded.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b[i], hex) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A failed call's status, from headers or trailers (`None`: status 0 or
/// no status there).
fn failure(headers: &http::HeaderMap) -> Option<String> {
    let code = headers.get("grpc-status")?.to_str().unwrap_or("?");
    if code == "0" {
        return None;
    }
    let message = headers
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .map(percent_decode)
        .unwrap_or_default();
    Some(format!("gRPC status {code}: {message}"))
}

/// A connection to a CRI socket.
pub struct Client {
    runtime: tokio::runtime::Runtime,
    send: h2::client::SendRequest<Bytes>,
}

impl Client {
    /// Connect to the gRPC server at `socket` (HTTP/2 without TLS, as
    /// the kubelet does on a unix socket), within `timeout`.
    pub fn connect(socket: &Path, timeout: Duration) -> Result<Self, String> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("tokio runtime: {e}"))?;
        let send = runtime.block_on(async {
            let handshake = async {
                let io = tokio::net::UnixStream::connect(socket)
                    .await
                    .map_err(|e| format!("connect {}: {e}", socket.display()))?;
                let (send, connection) = h2::client::handshake(io)
                    .await
                    .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
                // The connection is driven whenever a call is waited on.
                tokio::spawn(async move {
                    let _ = connection.await;
                });
                Ok::<_, String>(send)
            };
            tokio::time::timeout(timeout, handshake)
                .await
                .map_err(|_| format!("no HTTP/2 connection within {timeout:?}"))?
        })?;
        Ok(Self { runtime, send })
    }

    /// Call `/{service}/{method}` with `request`; the answer's message.
    pub fn call(
        &mut self,
        service: &str,
        method: &str,
        request: Message,
        timeout: Duration,
    ) -> Result<Vec<u8>, String> {
        let send = self.send.clone();
        let body = frame(&request.into_bytes())?;
        let path = format!("/{service}/{method}");
        let call = Self::unary(send, &path, body, timeout);
        self.runtime
            .block_on(async { tokio::time::timeout(timeout, call).await })
            .map_err(|_| format!("{method}: no answer within {timeout:?}"))?
            .map_err(|e| format!("{method}: {e}"))
    }

    async fn unary(
        send: h2::client::SendRequest<Bytes>,
        path: &str,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, String> {
        let request = http::Request::builder()
            .method("POST")
            .uri(format!("http://localhost{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("grpc-timeout", format!("{}m", timeout.as_millis()))
            .body(())
            .map_err(|e| format!("request: {e}"))?;
        let mut send = send.ready().await.map_err(|e| format!("connection: {e}"))?;
        let (answer, mut stream) = send
            .send_request(request, false)
            .map_err(|e| format!("send: {e}"))?;
        stream
            .send_data(Bytes::from(body), true)
            .map_err(|e| format!("send: {e}"))?;
        let answer = answer.await.map_err(|e| format!("answer: {e}"))?;
        if answer.status() != http::StatusCode::OK {
            return Err(format!("HTTP status {}", answer.status()));
        }
        // A "trailers-only" answer carries its status in the headers.
        if let Some(failed) = failure(answer.headers()) {
            return Err(failed);
        }
        let mut body = answer.into_body();
        let mut got = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.map_err(|e| format!("answer body: {e}"))?;
            let _ = body.flow_control().release_capacity(chunk.len());
            if got.len() + chunk.len() > MAX_ANSWER {
                return Err(format!("an answer over {MAX_ANSWER} bytes"));
            }
            got.extend_from_slice(&chunk);
        }
        let trailers = body
            .trailers()
            .await
            .map_err(|e| format!("trailers: {e}"))?
            .ok_or("an answer without trailers (no gRPC status)")?;
        if let Some(failed) = failure(&trailers) {
            return Err(failed);
        }
        if trailers.get("grpc-status").is_none() {
            return Err("trailers without grpc-status".into());
        }
        unframe(&got).map(<[u8]>::to_vec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_read_back_as_written() {
        let inner = Message::new().string(1, "pod").varint(4, 3);
        let bytes = Message::new()
            .message(1, inner)
            .string(2, "chitin")
            .strings(3, &["a", "bé"])
            .map_entry(6, "k", "v")
            .varint(9, u64::MAX)
            .into_bytes();
        let f = Fields::parse(&bytes).unwrap();
        let m = f.message(1).unwrap();
        assert_eq!(m.string(1).unwrap(), "pod");
        assert_eq!(m.varint(4), 3);
        assert_eq!(f.string(2).unwrap(), "chitin");
        // The last of a repeated field, as a singular read takes it.
        assert_eq!(f.string(3).unwrap(), "bé");
        let entry = f.message(6).unwrap();
        assert_eq!(
            (entry.string(1).unwrap(), entry.string(2).unwrap()),
            ("k".into(), "v".into())
        );
        assert_eq!(f.varint(9), u64::MAX);
        // Absent fields read as proto3 defaults.
        assert_eq!(f.string(7).unwrap(), "");
        assert_eq!(f.varint(8), 0);
    }

    #[test]
    fn a_negative_int32_reads_back() {
        // int32 -1 goes on the wire as a 10-byte varint.
        let bytes = Message::new().varint(3, -1i64 as u64).into_bytes();
        assert_eq!(bytes.len(), 11);
        assert_eq!(Fields::parse(&bytes).unwrap().varint(3) as i64 as i32, -1);
    }

    #[test]
    fn known_encoding() {
        // Field 1, string "hi"; field 2, varint 300.
        let bytes = Message::new().string(1, "hi").varint(2, 300).into_bytes();
        assert_eq!(bytes, [0x0a, 2, b'h', b'i', 0x10, 0xac, 0x02]);
        let f = Fields::parse(&[0x0d, 1, 0, 0, 0, 0x11, 2, 0, 0, 0, 0, 0, 0, 0]).unwrap();
        assert_eq!(f.0, vec![(1, Value::Fixed32(1)), (2, Value::Fixed64(2))]);
    }

    #[test]
    fn malformed_messages_are_errors() {
        for bad in [
            &[0x0a, 5, b'a'][..], // length past the end
            &[0x08, 0x80][..],    // varint cut short
            &[
                0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1,
            ][..],
            &[0x0b][..],       // wire type 3 (groups)
            &[0x0d, 1, 2][..], // fixed32 cut short
            &[0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f][..],
        ] {
            assert!(Fields::parse(bad).is_err(), "{bad:?}");
        }
        let not_utf8 = Message::new().bytes(1, &[0xff]).into_bytes();
        assert!(Fields::parse(&not_utf8).unwrap().string(1).is_err());
    }

    #[test]
    fn frames_round_trip_and_bad_frames_are_errors() {
        let framed = frame(b"abc").unwrap();
        assert_eq!(framed, [0, 0, 0, 0, 3, b'a', b'b', b'c']);
        assert_eq!(unframe(&framed).unwrap(), b"abc");
        assert!(unframe(&[0, 0, 0]).is_err());
        assert!(unframe(&[1, 0, 0, 0, 0]).is_err());
        assert!(unframe(&[0, 0, 0, 0, 4, 1]).is_err());
        assert!(unframe(&[0, 0, 0, 0, 1, 1, 2]).is_err());
    }

    /// A gRPC server on `socket` answering each call by `answer(path,
    /// request message)`: `Ok` is the message, `Err` the grpc-status
    /// and message (in trailers).
    /// How the test server answers a call: a message, or a status.
    type Answer = fn(&str, &[u8]) -> Result<Vec<u8>, (u32, &'static str)>;

    fn serve(socket: &Path, answer: Answer) {
        let listener = std::os::unix::net::UnixListener::bind(socket).unwrap();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                listener.set_nonblocking(true).unwrap();
                let listener = tokio::net::UnixListener::from_std(listener).unwrap();
                let (io, _) = listener.accept().await.unwrap();
                let mut conn = h2::server::handshake(io).await.unwrap();
                while let Some(call) = conn.accept().await {
                    let (request, mut respond) = call.unwrap();
                    let path = request.uri().path().to_string();
                    assert_eq!(request.headers()["content-type"], "application/grpc");
                    assert!(request.headers().contains_key("grpc-timeout"));
                    let mut body = request.into_body();
                    let mut got = Vec::new();
                    while let Some(chunk) = body.data().await {
                        got.extend_from_slice(&chunk.unwrap());
                    }
                    let message = unframe(&got).unwrap().to_vec();
                    let mut stream = respond
                        .send_response(http::Response::new(()), false)
                        .unwrap();
                    let mut trailers = http::HeaderMap::new();
                    match answer(&path, &message) {
                        Ok(m) => {
                            stream.send_data(frame(&m).unwrap().into(), false).unwrap();
                            trailers.insert("grpc-status", "0".parse().unwrap());
                        }
                        Err((code, text)) => {
                            trailers.insert("grpc-status", code.to_string().parse().unwrap());
                            trailers.insert("grpc-message", text.parse().unwrap());
                        }
                    }
                    stream.send_trailers(trailers).unwrap();
                }
            });
        });
    }

    #[test]
    fn calls_reach_a_grpc_server_and_statuses_come_back() {
        let dir = std::env::temp_dir().join(format!("chitin-cri-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("cri.sock");
        serve(&socket, |path, request| match path {
            // Echo the request's field 1 back as field 2.
            "/runtime.v1.RuntimeService/Version" => {
                let f = Fields::parse(request).unwrap();
                Ok(Message::new().string(2, &f.string(1).unwrap()).into_bytes())
            }
            _ => Err((12, "unknown%20method")),
        });
        let mut client = Client::connect(&socket, Duration::from_secs(10)).unwrap();
        let t = Duration::from_secs(10);
        let answer = client
            .call(
                "runtime.v1.RuntimeService",
                "Version",
                Message::new().string(1, "v1"),
                t,
            )
            .unwrap();
        assert_eq!(Fields::parse(&answer).unwrap().string(2).unwrap(), "v1");
        let err = client
            .call("runtime.v1.RuntimeService", "Nope", Message::new(), t)
            .unwrap_err();
        assert_eq!(err, "Nope: gRPC status 12: unknown method");
        // The connection serves calls after a failed one.
        assert!(client
            .call("runtime.v1.RuntimeService", "Version", Message::new(), t)
            .is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_server_that_never_answers_times_out() {
        let dir = std::env::temp_dir().join(format!("chitin-cri-mute-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("cri.sock");
        // Accepts, never speaks HTTP/2.
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let held = std::thread::spawn(move || listener.accept().map(|(s, _)| s));
        let t = Duration::from_millis(300);
        let err = Client::connect(&socket, t)
            .and_then(|mut c| c.call("runtime.v1.RuntimeService", "Version", Message::new(), t))
            .unwrap_err();
        assert!(
            err.contains("no HTTP/2 connection") || err.contains("no answer within"),
            "{err}"
        );
        drop(held.join());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn status_messages_are_percent_decoded() {
        assert_eq!(percent_decode("no%20such%3A pod%"), "no such: pod%");
        let mut h = http::HeaderMap::new();
        assert_eq!(failure(&h), None);
        h.insert("grpc-status", "0".parse().unwrap());
        assert_eq!(failure(&h), None);
        h.insert("grpc-status", "5".parse().unwrap());
        h.insert("grpc-message", "not%20found".parse().unwrap());
        assert_eq!(failure(&h).unwrap(), "gRPC status 5: not found");
    }
}
