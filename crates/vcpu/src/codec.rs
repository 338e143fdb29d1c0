//! The byte encoding of saved state: little-endian integers and
//! length-prefixed byte strings, written in order and read back in the
//! same order. A reader never panics and never allocates more than its
//! input holds: every length is checked against what is left.

use zerocopy::{FromBytes, Immutable, IntoBytes};

/// What a reader found wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The input ended inside `what`.
    #[error("truncated in {what}")]
    Truncated {
        /// The field being read.
        what: &'static str,
    },
    /// `what` holds a value no writer produces.
    #[error("invalid {what}: {detail}")]
    Invalid {
        /// The field.
        what: &'static str,
        /// What is wrong with it.
        detail: String,
    },
}

/// Appends fields to a byte buffer.
#[derive(Debug, Default)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    /// An empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// One byte.
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }

    /// A little-endian `u32`.
    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    /// A little-endian `u64`.
    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    /// A byte string, its length first (a `u32`).
    pub fn bytes(&mut self, v: &[u8]) {
        // Nothing chitin saves comes near 4 GiB in one field.
        self.u32(u32::try_from(v.len()).unwrap_or(u32::MAX));
        self.buf.extend_from_slice(v);
    }

    /// A plain-data KVM struct, as its bytes.
    pub fn raw<T: IntoBytes + Immutable>(&mut self, v: &T) {
        self.bytes(v.as_bytes());
    }

    /// The bytes written so far.
    pub fn finish(self) -> Vec<u8> {
        self.buf
    }
}

/// Reads fields back from a byte slice.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if n > self.buf.len() {
            return Err(DecodeError::Truncated { what });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    /// One byte.
    pub fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(1, what)?[0])
    }

    /// A little-endian `u32`.
    pub fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A little-endian `u64`.
    pub fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        let b = self.take(8, what)?;
        let mut v = [0u8; 8];
        v.copy_from_slice(b);
        Ok(u64::from_le_bytes(v))
    }

    /// A byte string written by [`Writer::bytes`].
    pub fn bytes(&mut self, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let len = self.u32(what)? as usize;
        self.take(len, what)
    }

    /// A plain-data KVM struct written by [`Writer::raw`]: exactly its size.
    pub fn raw<T: FromBytes>(&mut self, what: &'static str) -> Result<T, DecodeError> {
        let bytes = self.bytes(what)?;
        T::read_from_bytes(bytes).map_err(|_| DecodeError::Invalid {
            what,
            detail: format!(
                "{} bytes where {} belong",
                bytes.len(),
                std::mem::size_of::<T>()
            ),
        })
    }

    /// A count of items each at least `min_size` bytes long, checked
    /// against what is left so a corrupt count cannot make the caller
    /// reserve more than the input could hold.
    pub fn count(&mut self, what: &'static str, min_size: usize) -> Result<usize, DecodeError> {
        let n = self.u32(what)? as usize;
        if n.saturating_mul(min_size.max(1)) > self.remaining() {
            return Err(DecodeError::Truncated { what });
        }
        Ok(n)
    }

    /// The end: an error if anything is left.
    pub fn finish(self, what: &'static str) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Invalid {
                what,
                detail: format!("{} bytes after the end", self.buf.len()),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_read_back_in_order() {
        let mut w = Writer::new();
        w.u8(7);
        w.u32(0xdead_beef);
        w.u64(u64::MAX - 1);
        w.bytes(b"chitin");
        w.raw(&kvm_bindings::kvm_mp_state { mp_state: 3 });
        let buf = w.finish();
        let mut r = Reader::new(&buf);
        assert_eq!(r.u8("a"), Ok(7));
        assert_eq!(r.u32("b"), Ok(0xdead_beef));
        assert_eq!(r.u64("c"), Ok(u64::MAX - 1));
        assert_eq!(r.bytes("d"), Ok(&b"chitin"[..]));
        let mp: kvm_bindings::kvm_mp_state = r.raw("e").unwrap();
        assert_eq!(mp.mp_state, 3);
        assert_eq!(r.finish("end"), Ok(()));
    }

    #[test]
    fn every_truncation_and_bad_size_is_an_error() {
        let mut w = Writer::new();
        w.u32(1);
        w.bytes(&[1, 2, 3]);
        let buf = w.finish();
        for cut in 0..buf.len() {
            let mut r = Reader::new(&buf[..cut]);
            let ok = r.u32("n").is_ok() && r.bytes("b").is_ok();
            assert!(!ok, "cut at {cut}");
        }
        // Three bytes are no kvm_mp_state.
        let mut r = Reader::new(&buf[4..]);
        assert!(matches!(
            r.raw::<kvm_bindings::kvm_mp_state>("mp"),
            Err(DecodeError::Invalid { .. })
        ));
        // A count larger than the rest could hold.
        let mut w = Writer::new();
        w.u32(u32::MAX);
        let buf = w.finish();
        assert!(Reader::new(&buf).count("items", 8).is_err());
        // Leftovers are reported.
        assert!(Reader::new(&[0]).finish("end").is_err());
    }
}
