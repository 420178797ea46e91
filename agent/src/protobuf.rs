//! The protobuf wire format and gRPC's message framing, for the few messages
//! the agent speaks (OTLP spans out, Envoy's `ext_authz` check and its
//! answer): a dozen fields each, not worth a code generator and its build
//! step.

use bytes::{BufMut as _, Bytes, BytesMut};

/// The most bytes one gRPC message the agent reads may have.
pub const MAX_MESSAGE: usize = 64 * 1024;

pub fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

pub fn tag(out: &mut Vec<u8>, field: u32, wire: u8) {
    varint(out, u64::from(field) << 3 | u64::from(wire));
}

/// A varint field (`int64`, `int32`, `bool`, an enum): negative values as
/// ten bytes of two's complement, as protobuf has them.
pub fn varint_field(out: &mut Vec<u8>, field: u32, v: u64) {
    tag(out, field, 0);
    varint(out, v);
}

pub fn fixed64(out: &mut Vec<u8>, field: u32, v: u64) {
    tag(out, field, 1);
    out.extend_from_slice(&v.to_le_bytes());
}

pub fn fixed32(out: &mut Vec<u8>, field: u32, v: u32) {
    tag(out, field, 5);
    out.extend_from_slice(&v.to_le_bytes());
}

pub fn bytes(out: &mut Vec<u8>, field: u32, b: &[u8]) {
    tag(out, field, 2);
    varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

pub fn string(out: &mut Vec<u8>, field: u32, s: &str) {
    bytes(out, field, s.as_bytes());
}

/// A nested message: written after its length, which is known only once
/// it is written, so it is built apart first.
pub fn message(out: &mut Vec<u8>, field: u32, build: impl FnOnce(&mut Vec<u8>)) {
    let mut inner = Vec::new();
    build(&mut inner);
    bytes(out, field, &inner);
}

/// One entry of a `map<string, string>` field.
pub fn map_entry(out: &mut Vec<u8>, field: u32, key: &str, value: &str) {
    message(out, field, |e| {
        string(e, 1, key);
        string(e, 2, value);
    });
}

/// A field's value as read off the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Value<'a> {
    Varint(u64),
    Fixed64(u64),
    Fixed32(u32),
    /// A string, bytes, a nested message or a packed repeated field.
    Bytes(&'a [u8]),
}

impl<'a> Value<'a> {
    pub fn as_u64(self) -> Option<u64> {
        match self {
            Self::Varint(v) | Self::Fixed64(v) => Some(v),
            Self::Fixed32(v) => Some(u64::from(v)),
            Self::Bytes(_) => None,
        }
    }

    pub fn as_bytes(self) -> Option<&'a [u8]> {
        match self {
            Self::Bytes(b) => Some(b),
            _ => None,
        }
    }

    /// A `string` field's text (protobuf strings are UTF-8).
    pub fn as_str(self) -> Result<&'a str, DecodeError> {
        let b = self.as_bytes().ok_or(DecodeError::WrongType)?;
        std::str::from_utf8(b).map_err(|_| DecodeError::NotUtf8)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("the message ends inside a field")]
    Truncated,
    #[error("a varint is longer than ten bytes")]
    LongVarint,
    #[error("unknown wire type {0}")]
    WireType(u8),
    #[error("field number 0")]
    FieldZero,
    #[error("a field has the wrong wire type")]
    WrongType,
    #[error("a string is not UTF-8")]
    NotUtf8,
}

/// A message's fields in wire order: `(number, value)`. Unknown fields are
/// the reader's to skip, as protobuf wants.
pub struct Fields<'a> {
    rest: &'a [u8],
}

impl<'a> Fields<'a> {
    pub fn new(message: &'a [u8]) -> Self {
        Self { rest: message }
    }

    fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut v = 0u64;
        for (i, &b) in self.rest.iter().enumerate().take(10) {
            v |= u64::from(b & 0x7f) << (7 * i);
            if b < 0x80 {
                self.rest = &self.rest[i + 1..];
                return Ok(v);
            }
        }
        Err(if self.rest.len() >= 10 {
            DecodeError::LongVarint
        } else {
            DecodeError::Truncated
        })
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.rest.len() < n {
            return Err(DecodeError::Truncated);
        }
        let (head, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(head)
    }

    fn field(&mut self) -> Result<(u32, Value<'a>), DecodeError> {
        let key = self.varint()?;
        let number = u32::try_from(key >> 3).map_err(|_| DecodeError::FieldZero)?;
        if number == 0 {
            return Err(DecodeError::FieldZero);
        }
        let value = match (key & 7) as u8 {
            0 => Value::Varint(self.varint()?),
            1 => Value::Fixed64(u64::from_le_bytes(
                self.take(8)?.try_into().expect("eight bytes"),
            )),
            2 => {
                let n = usize::try_from(self.varint()?).map_err(|_| DecodeError::Truncated)?;
                Value::Bytes(self.take(n)?)
            }
            5 => Value::Fixed32(u32::from_le_bytes(
                self.take(4)?.try_into().expect("four bytes"),
            )),
            // Groups (3, 4) are proto2's and long deprecated.
            other => return Err(DecodeError::WireType(other)),
        };
        Ok((number, value))
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(u32, Value<'a>), DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let field = self.field();
        if field.is_err() {
            // Nothing after a broken field can be read.
            self.rest = &[];
        }
        Some(field)
    }
}

/// A gRPC message on the wire: uncompressed, its length in four bytes, big
/// endian.
pub fn grpc_frame(message: &[u8]) -> Bytes {
    let mut framed = BytesMut::with_capacity(5 + message.len());
    framed.put_u8(0);
    framed.put_u32(message.len() as u32);
    framed.put_slice(message);
    framed.freeze()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("no message")]
    Empty,
    #[error("the message is cut short")]
    Truncated,
    #[error("the message is compressed, which was not asked for")]
    Compressed,
    #[error("more than one message")]
    Trailing,
    #[error("the message is over {MAX_MESSAGE} bytes")]
    TooLong,
}

/// The one message of a unary gRPC answer's body.
pub fn grpc_unframe(body: &[u8]) -> Result<&[u8], FrameError> {
    let Some((&flag, rest)) = body.split_first() else {
        return Err(FrameError::Empty);
    };
    let Some((len, rest)) = rest.split_first_chunk::<4>() else {
        return Err(FrameError::Truncated);
    };
    if flag != 0 {
        return Err(FrameError::Compressed);
    }
    let len = u32::from_be_bytes(*len) as usize;
    if len > MAX_MESSAGE {
        return Err(FrameError::TooLong);
    }
    match rest.len().cmp(&len) {
        std::cmp::Ordering::Less => Err(FrameError::Truncated),
        std::cmp::Ordering::Greater => Err(FrameError::Trailing),
        std::cmp::Ordering::Equal => Ok(rest),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_and_fields_follow_the_protobuf_wire_format() {
        let mut out = Vec::new();
        varint(&mut out, 300);
        assert_eq!(out, [0xac, 0x02]);
        out.clear();
        string(&mut out, 5, "GET");
        assert_eq!(out, [0x2a, 3, b'G', b'E', b'T']);
        out.clear();
        fixed64(&mut out, 7, 1);
        assert_eq!(out, [0x39, 1, 0, 0, 0, 0, 0, 0, 0]);
        out.clear();
        // Field 16 needs a two-byte tag.
        tag(&mut out, 16, 5);
        assert_eq!(out, [0x85, 0x01]);
        out.clear();
        // Negative int64: ten-byte varint.
        varint_field(&mut out, 9, -1i64 as u64);
        assert_eq!(out.len(), 11);
    }

    #[test]
    fn what_is_written_reads_back_and_broken_messages_are_errors() {
        let mut out = Vec::new();
        varint_field(&mut out, 1, -1i64 as u64);
        message(&mut out, 2, |m| string(m, 1, "héllo"));
        fixed32(&mut out, 3, 7);
        fixed64(&mut out, 4, 8);
        let fields: Vec<_> = Fields::new(&out).collect::<Result<_, _>>().expect("reads");
        assert_eq!(fields[0], (1, Value::Varint(u64::MAX)));
        let inner = fields[1].1.as_bytes().expect("bytes");
        let inner: Vec<_> = Fields::new(inner).collect::<Result<_, _>>().expect("reads");
        assert_eq!(inner[0].1.as_str(), Ok("héllo"));
        assert_eq!(fields[2], (3, Value::Fixed32(7)));
        assert_eq!(fields[3], (4, Value::Fixed64(8)));

        // Cut anywhere inside a field: an error, then nothing.
        for cut in [1, 3, out.len() - 1] {
            let mut fields = Fields::new(&out[..cut]);
            let got: Vec<_> = fields.by_ref().collect();
            assert!(got.last().is_some_and(Result::is_err), "cut at {cut}");
            assert!(fields.next().is_none());
        }
        let bad = |b: &[u8]| Fields::new(b).find_map(Result::err);
        assert_eq!(bad(&[0x0b]), Some(DecodeError::WireType(3)));
        assert_eq!(bad(&[0x00, 0x00]), Some(DecodeError::FieldZero));
        assert_eq!(
            bad(&[
                0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01
            ]),
            Some(DecodeError::LongVarint)
        );
        assert_eq!(Value::Bytes(&[0xff]).as_str(), Err(DecodeError::NotUtf8));
        assert_eq!(Value::Varint(1).as_str(), Err(DecodeError::WrongType));
    }

    #[test]
    fn one_grpc_message_is_framed_and_unframed() {
        let framed = grpc_frame(b"abc");
        assert_eq!(&framed[..], b"\0\0\0\0\x03abc");
        assert_eq!(grpc_unframe(&framed), Ok(&b"abc"[..]));
        assert_eq!(grpc_unframe(b""), Err(FrameError::Empty));
        assert_eq!(grpc_unframe(b"\0\0\0"), Err(FrameError::Truncated));
        assert_eq!(grpc_unframe(&framed[..6]), Err(FrameError::Truncated));
        assert_eq!(grpc_unframe(b"\x01\0\0\0\0"), Err(FrameError::Compressed));
        assert_eq!(grpc_unframe(b"\0\0\0\0\0x"), Err(FrameError::Trailing));
        assert_eq!(grpc_unframe(b"\0\0\x01\0\x01"), Err(FrameError::TooLong));
    }
}
