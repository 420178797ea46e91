//! Field offsets of kernel structures, read from the running kernel's BTF.
//!
//! Rust programs for BPF carry no CO-RE relocations, so the one kernel
//! structure the programs read that is not a BPF context (`struct sock`, for
//! its unread bytes) is located here and handed to them as a load-time
//! constant. Only what that needs is read: the header, the string section,
//! and each type's record length, to walk to the next one.

use std::{
    io::{Read, Seek, SeekFrom},
    path::Path,
};

/// The running kernel's BTF.
pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("not BTF: {0}")]
    Malformed(&'static str),
    #[error("no struct {0} in the kernel's BTF")]
    NoStruct(String),
    #[error("struct {strukt} has no field {field}")]
    NoField { strukt: String, field: String },
}

/// Byte offsets of the socket fields sk_msg reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketOffsets {
    /// `struct sock`'s `sk_rmem_alloc` (`sk_backlog.rmem_alloc`).
    pub sock_rmem_alloc: u32,
    /// `struct tcp_sock`'s `write_seq`.
    pub tcp_write_seq: u32,
    /// `struct tcp_sock`'s `snd_una`.
    pub tcp_snd_una: u32,
}

pub fn socket_offsets(vmlinux: &Path) -> Result<SocketOffsets, BtfError> {
    let file = std::fs::File::open(vmlinux).map_err(|source| BtfError::Read {
        path: vmlinux.display().to_string(),
        source,
    })?;
    let mut btf = Btf::open(std::io::BufReader::with_capacity(64 * 1024, file))?;
    Ok(SocketOffsets {
        sock_rmem_alloc: btf.offset_of("sock", &["sk_backlog", "rmem_alloc"])?,
        tcp_write_seq: btf.offset_of("tcp_sock", &["write_seq"])?,
        tcp_snd_una: btf.offset_of("tcp_sock", &["snd_una"])?,
    })
}

/// The kernel's BTF (5 MB and some 100,000 types), read as a stream: each
/// question is answered by a pass over the file through a small buffer, so
/// start-up does not hold (and the agent's peak memory does not count) a
/// copy of it for three numbers.
struct Btf<R> {
    r: R,
    types: (u64, u64),
    strings: (u64, u64),
}

/// A type record's header.
struct Header {
    name: u32,
    kind: u32,
    vlen: usize,
    kind_flag: bool,
    size_or_type: u32,
}

impl Header {
    /// The length of the record that follows the header, by kind (the
    /// kernel's uapi btf.h).
    fn trailer(&self) -> Result<usize, BtfError> {
        Ok(match self.kind {
            1 | 14 | 17 => 4,                  // int, var, decl_tag
            3 => 12,                           // array
            4 | 5 | 15 | 19 => 12 * self.vlen, // struct, union, datasec, enum64
            6 | 13 => 8 * self.vlen,           // enum, func_proto
            2 | 7..=12 | 16 | 18 => 0, // ptr, fwd, typedef, qualifiers, func, float, type_tag
            _ => return Err(BtfError::Malformed("unknown type kind")),
        })
    }
}

/// A struct member: name (string offset), type id, offset in bits.
type Member = (u32, u32, u32);

fn words<const N: usize>(r: &mut impl Read) -> Result<[u32; N], BtfError> {
    let mut out = [0u32; N];
    let mut b = [0u8; 4];
    for w in &mut out {
        r.read_exact(&mut b)
            .map_err(|_| BtfError::Malformed("truncated"))?;
        *w = u32::from_le_bytes(b);
    }
    Ok(out)
}

impl<R: Read + Seek> Btf<R> {
    fn open(mut r: R) -> Result<Self, BtfError> {
        let mut magic = [0u8; 4];
        r.read_exact(&mut magic)
            .map_err(|_| BtfError::Malformed("truncated"))?;
        if u16::from_le_bytes([magic[0], magic[1]]) != MAGIC {
            return Err(BtfError::Malformed("bad magic (or not little-endian)"));
        }
        let [hdr_len, type_off, type_len, str_off, str_len] = words::<5>(&mut r)?;
        let at = |off: u32| u64::from(hdr_len) + u64::from(off);
        Ok(Self {
            r,
            types: (at(type_off), u64::from(type_len)),
            strings: (at(str_off), u64::from(str_len)),
        })
    }

    fn seek(&mut self, to: u64) -> Result<(), BtfError> {
        self.r
            .seek(SeekFrom::Start(to))
            .map(drop)
            .map_err(|_| BtfError::Malformed("section out of bounds"))
    }

    /// Where `name` is in the string section (names are stored once).
    fn string(&mut self, name: &str) -> Result<Option<u32>, BtfError> {
        let needle: Vec<u8> = [&[0][..], name.as_bytes(), &[0]].concat();
        let (start, len) = self.strings;
        self.seek(start)?;
        let mut window: Vec<u8> = Vec::with_capacity(64 * 1024 + needle.len());
        // Offset in the section of window[0].
        let mut base = 0u64;
        let mut chunk = vec![0u8; 64 * 1024];
        let mut left = len;
        while left > 0 {
            let want = chunk.len().min(left as usize);
            self.r
                .read_exact(&mut chunk[..want])
                .map_err(|_| BtfError::Malformed("truncated"))?;
            left -= want as u64;
            window.extend_from_slice(&chunk[..want]);
            if let Some(i) = window.windows(needle.len()).position(|w| w == needle) {
                return Ok(Some((base + i as u64 + 1) as u32));
            }
            // Keep a needle's length, for a match across two chunks.
            let keep = window.len().min(needle.len() - 1);
            base += (window.len() - keep) as u64;
            window.drain(..window.len() - keep);
        }
        Ok(None)
    }

    /// The first type `pick` accepts (id and header), with its members
    /// when it is a struct or union.
    fn find(
        &mut self,
        mut pick: impl FnMut(u32, &Header) -> bool,
    ) -> Result<Option<(Header, Vec<Member>)>, BtfError> {
        let (start, len) = self.types;
        self.seek(start)?;
        let (mut at, mut id) = (0u64, 1u32);
        let mut skip = vec![0u8; 4096];
        while at < len {
            let [name, info, size_or_type] = words::<3>(&mut self.r)?;
            let h = Header {
                name,
                kind: (info >> 24) & 0x1f,
                vlen: (info & 0xffff) as usize,
                kind_flag: info >> 31 == 1,
                size_or_type,
            };
            let trailer = h.trailer()?;
            if pick(id, &h) {
                let mut members = Vec::new();
                if matches!(h.kind, KIND_STRUCT | KIND_UNION) {
                    for _ in 0..h.vlen {
                        let [name, type_id, offset] = words::<3>(&mut self.r)?;
                        // With kind_flag the top 8 bits are a bitfield's size.
                        let bits = if h.kind_flag {
                            offset & 0xff_ffff
                        } else {
                            offset
                        };
                        members.push((name, type_id, bits));
                    }
                }
                return Ok(Some((h, members)));
            }
            let mut left = trailer;
            while left > 0 {
                let n = left.min(skip.len());
                self.r
                    .read_exact(&mut skip[..n])
                    .map_err(|_| BtfError::Malformed("truncated"))?;
                left -= n;
            }
            at += 12 + trailer as u64;
            id += 1;
        }
        Ok(None)
    }

    /// The members of the struct or union type `id` stands for, through
    /// typedefs and qualifiers.
    fn composite(&mut self, mut id: u32) -> Result<Option<Vec<Member>>, BtfError> {
        for _ in 0..16 {
            let Some((h, members)) = self.find(|i, _| i == id)? else {
                return Ok(None);
            };
            match h.kind {
                KIND_STRUCT | KIND_UNION => return Ok(Some(members)),
                8..=11 | 18 => id = h.size_or_type,
                _ => return Ok(None),
            }
        }
        Ok(None)
    }

    /// The byte offset of `path` (a field, then fields of that field, ...)
    /// in the named struct; the first struct of that name with members.
    fn offset_of(&mut self, strukt: &str, path: &[&str]) -> Result<u32, BtfError> {
        let no_struct = || BtfError::NoStruct(strukt.into());
        let no_field = |field: &str| BtfError::NoField {
            strukt: strukt.into(),
            field: field.into(),
        };
        let name = self.string(strukt)?.ok_or_else(no_struct)?;
        let (_, mut members) = self
            .find(|_, h| h.kind == KIND_STRUCT && h.vlen > 0 && h.name == name)?
            .ok_or_else(no_struct)?;
        let mut bits = 0;
        for (i, field) in path.iter().enumerate() {
            let field_name = self.string(field)?.ok_or_else(|| no_field(field))?;
            let &(_, type_id, offset) = members
                .iter()
                .find(|m| m.0 == field_name)
                .ok_or_else(|| no_field(field))?;
            bits += offset;
            if i + 1 < path.len() {
                members = self
                    .composite(type_id)?
                    .ok_or_else(|| no_field(path[i + 1]))?;
            }
        }
        if bits % 8 != 0 {
            return Err(BtfError::Malformed("field is a bitfield"));
        }
        Ok(bits / 8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob: `int`, an anonymous struct { int rmem_alloc at 4 }, a
    /// typedef of it, and struct sock { int a; <typedef> sk_backlog at 192 }.
    fn blob() -> Vec<u8> {
        let strings = b"\0int\0rmem_alloc\0backlog_t\0sock\0a\0sk_backlog\0";
        let s = |name: &str| {
            let needle = format!("\0{name}\0");
            (strings
                .windows(needle.len())
                .position(|w| w == needle.as_bytes())
                .unwrap()
                + 1) as u32
        };
        let mut types = Vec::new();
        let mut push = |words: &[u32]| words.iter().for_each(|w| types.extend(w.to_le_bytes()));
        // 1: int (4 bytes, 32 bits)
        push(&[s("int"), 1 << 24, 4, 32]);
        // 2: anonymous struct, one member at bit 32
        push(&[0, (4 << 24) | 1, 8, s("rmem_alloc"), 1, 32]);
        // 3: typedef backlog_t -> 2
        push(&[s("backlog_t"), 8 << 24, 2]);
        // 4: struct sock { int a @0; backlog_t sk_backlog @1536 bits }
        push(&[
            s("sock"),
            (4 << 24) | 2,
            256,
            s("a"),
            1,
            0,
            s("sk_backlog"),
            3,
            192 * 8,
        ]);
        let mut out = Vec::new();
        out.extend(MAGIC.to_le_bytes());
        out.extend([1u8, 0]); // version, flags
        for word in [
            24,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            out.extend(word.to_le_bytes());
        }
        out.extend(&types);
        out.extend(strings);
        out
    }

    #[test]
    fn finds_a_nested_field_through_a_typedef() {
        let mut btf = Btf::open(std::io::Cursor::new(blob())).unwrap();
        assert_eq!(
            btf.offset_of("sock", &["sk_backlog", "rmem_alloc"])
                .unwrap(),
            196
        );
        assert_eq!(btf.offset_of("sock", &["a"]).unwrap(), 0);
        assert!(matches!(
            btf.offset_of("sock", &["sk_rcvbuf"]),
            Err(BtfError::NoField { .. })
        ));
        assert!(matches!(
            btf.offset_of("tcp_sock", &["a"]),
            Err(BtfError::NoStruct(_))
        ));
    }

    #[test]
    fn refuses_what_is_not_btf() {
        let garbage = std::io::Cursor::new(b"ELF garbage garbage garbage".to_vec());
        assert!(matches!(Btf::open(garbage), Err(BtfError::Malformed(_))));
        let mut data = blob();
        data.truncate(40);
        let mut btf = Btf::open(std::io::Cursor::new(data)).unwrap();
        assert!(btf.offset_of("sock", &["a"]).is_err());
    }

    /// The kernel this runs on (Trellis needs one with BTF).
    #[test]
    fn running_kernel_has_the_field() {
        let offsets = socket_offsets(Path::new(VMLINUX)).unwrap();
        // Inside `struct sock`, which `struct tcp_sock` begins with and extends.
        assert!(offsets.sock_rmem_alloc > 0 && offsets.sock_rmem_alloc < offsets.tcp_write_seq);
        assert!(offsets.tcp_write_seq < 8192, "{offsets:?}");
    }
}
