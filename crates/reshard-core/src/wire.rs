//! Protobuf wire-format primitives. The `.ckpt` reader walks the wire format by hand so that
//! tensor content stays a range of the mapped file instead of being copied into a `Vec`.

/// Wire types used by the messages we read.
pub const WT_VARINT: u8 = 0;
pub const WT_I64: u8 = 1;
pub const WT_LEN: u8 = 2;
pub const WT_I32: u8 = 5;

/// A cursor over a byte slice that reports errors as strings (the caller adds the file name).
pub struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Offset of `buf[0]` in the file, for messages and absolute content offsets.
    base: u64,
}

impl<'a> Cursor<'a> {
    pub fn new(buf: &'a [u8], base: u64) -> Self {
        Cursor { buf, pos: 0, base }
    }

    pub fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }

    /// Absolute file offset of the next byte.
    pub fn offset(&self) -> u64 {
        self.base + self.pos as u64
    }

    pub fn varint(&mut self) -> Result<u64, String> {
        let mut value: u64 = 0;
        for shift in (0..70).step_by(7) {
            let Some(&b) = self.buf.get(self.pos) else {
                return Err(format!("truncated varint at byte {}", self.offset()));
            };
            self.pos += 1;
            if shift == 63 && b > 1 {
                return Err(format!("varint overflows 64 bits at byte {}", self.offset() - 1));
            }
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(format!("varint longer than 10 bytes at byte {}", self.offset()))
    }

    /// Reads a field key: (field number, wire type).
    pub fn key(&mut self) -> Result<(u64, u8), String> {
        let at = self.offset();
        let k = self.varint()?;
        let field = k >> 3;
        let wt = (k & 7) as u8;
        if field == 0 {
            return Err(format!("field number 0 at byte {at}"));
        }
        Ok((field, wt))
    }

    /// Reads a length-delimited payload; returns it and its absolute offset.
    pub fn len_delimited(&mut self) -> Result<(&'a [u8], u64), String> {
        let len = self.varint()?;
        let start = self.pos;
        let avail = (self.buf.len() - start) as u64;
        if len > avail {
            return Err(format!("length {len} at byte {} runs past the end ({avail} bytes left)", self.offset()));
        }
        let end = start + len as usize;
        self.pos = end;
        Ok((&self.buf[start..end], self.base + start as u64))
    }

    /// Skips a field of the given wire type.
    pub fn skip(&mut self, wt: u8) -> Result<(), String> {
        let n = match wt {
            WT_VARINT => {
                self.varint()?;
                return Ok(());
            }
            WT_LEN => {
                self.len_delimited()?;
                return Ok(());
            }
            WT_I64 => 8,
            WT_I32 => 4,
            _ => return Err(format!("unsupported wire type {wt} at byte {}", self.offset())),
        };
        if self.buf.len() - self.pos < n {
            return Err(format!("truncated fixed field at byte {}", self.offset()));
        }
        self.pos += n;
        Ok(())
    }
}

/// Appends a varint.
pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Bytes a varint of `v` takes.
pub fn varint_len(v: u64) -> u64 {
    let mut n = 1;
    let mut v = v >> 7;
    while v != 0 {
        n += 1;
        v >>= 7;
    }
    n
}

/// Appends a field key.
pub fn put_key(out: &mut Vec<u8>, field: u64, wt: u8) {
    put_varint(out, (field << 3) | u64::from(wt));
}

/// Appends a field key and a varint: a varint field's value, or a length-delimited field's
/// length (its bytes follow).
pub fn put_field(out: &mut Vec<u8>, field: u64, wt: u8, v: u64) {
    put_key(out, field, wt);
    put_varint(out, v);
}

/// Appends a length-delimited field holding `bytes`.
pub fn put_bytes(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    put_field(out, field, WT_LEN, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_round_trip() {
        for v in [0u64, 1, 127, 128, 300, 1 << 32, u64::MAX] {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            assert_eq!(b.len() as u64, varint_len(v));
            let mut c = Cursor::new(&b, 0);
            assert_eq!(c.varint().unwrap(), v);
            assert!(c.is_empty());
        }
    }

    #[test]
    fn truncated_and_overlong_varints_are_errors() {
        assert!(Cursor::new(&[0x80], 0).varint().is_err());
        assert!(Cursor::new(&[0xff; 11], 0).varint().is_err());
        let mut c = Cursor::new(&[0x05, 1, 2], 0);
        assert!(c.len_delimited().is_err());
    }
}
