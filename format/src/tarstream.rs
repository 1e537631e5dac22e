//! A streaming tar parser that keeps every entry's raw header bytes.
//!
//! The writer re-emits each entry's headers byte for byte, so a converted layer carries exactly
//! the metadata of its source (PAX records, GNU long names, xattrs, uname/gname). The parser is
//! strict about what could mislead a reader: bad checksums, truncated records, unsafe names and
//! unsupported entry kinds (GNU sparse, multi-volume) are errors, never guesses.

use std::collections::BTreeMap;
use std::io::{self, Read};

use crate::error::{Error, Result};
use crate::path;

const BLOCK: usize = 512;
/// Upper bound for one PAX or GNU long-name record; real ones are a few KiB.
const MAX_EXTENSION: u64 = 1 << 20;

/// What kind of file a tar entry makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EntryKind {
    Regular,
    Dir,
    Symlink,
    HardLink,
    Char,
    Block,
    Fifo,
}

/// A modification time with nanosecond precision (PAX `mtime` may carry a fraction).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, PartialOrd, Ord)]
pub struct Timestamp {
    pub secs: i64,
    pub nanos: u32,
}

/// One parsed entry: metadata plus the raw header records it was read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Normalized name (see [`crate::path::normalize`]).
    pub name: String,
    pub kind: EntryKind,
    /// Permission bits, setuid/setgid/sticky included (`& 0o7777`).
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub uname: String,
    pub gname: String,
    pub mtime: Timestamp,
    /// Content length; 0 for every kind but regular files.
    pub size: u64,
    /// Symlink target as stored, or hard-link target normalized.
    pub link_name: String,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// Every header block of this entry (extension records included), as read.
    pub raw_header: Vec<u8>,
    /// Offset of `raw_header` in the source stream.
    pub stream_offset: u64,
}

impl Entry {
    /// Zero bytes that follow `size` bytes of content to fill the last 512-byte block.
    pub fn padding(&self) -> usize {
        padding_for(self.size)
    }
}

/// Padding after `size` bytes of content.
pub fn padding_for(size: u64) -> usize {
    ((BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64) as usize
}

/// Reads entries one after another from an uncompressed tar stream.
pub struct TarReader<R> {
    inner: R,
    pos: u64,
    /// Content bytes of the current entry not read yet, and its padding.
    remaining: u64,
    padding: usize,
    done: bool,
}

#[derive(Default)]
struct Extensions {
    /// Raw bytes: names are checked to be UTF-8 (and named in the error) once the entry is known.
    path: Option<Vec<u8>>,
    link: Option<Vec<u8>>,
    size: Option<u64>,
    uid: Option<u64>,
    gid: Option<u64>,
    uname: Option<String>,
    gname: Option<String>,
    mtime: Option<Timestamp>,
    xattrs: BTreeMap<String, Vec<u8>>,
}

impl<R: Read> TarReader<R> {
    pub fn new(inner: R) -> Self {
        TarReader {
            inner,
            pos: 0,
            remaining: 0,
            padding: 0,
            done: false,
        }
    }

    /// Bytes consumed from the source so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    fn err(&self, reason: impl Into<String>) -> Error {
        Error::Tar {
            offset: self.pos,
            reason: reason.into(),
        }
    }

    fn read_full(&mut self, buf: &mut [u8]) -> Result<usize> {
        let mut got = 0;
        while got < buf.len() {
            match self.inner.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.pos += got as u64;
        Ok(got)
    }

    fn skip(&mut self, mut n: u64) -> Result<()> {
        let mut buf = [0u8; 8192];
        while n > 0 {
            let want = n.min(buf.len() as u64) as usize;
            let got = self.read_full(&mut buf[..want])?;
            if got < want {
                return Err(self.err("stream ends inside an entry's content"));
            }
            n -= got as u64;
        }
        Ok(())
    }

    /// Reads content of the current entry; 0 at its end.
    pub fn read_content(&mut self, buf: &mut [u8]) -> Result<usize> {
        if self.remaining == 0 {
            return Ok(0);
        }
        let want = self.remaining.min(buf.len() as u64) as usize;
        let got = self.read_full(&mut buf[..want])?;
        if got == 0 {
            return Err(self.err("stream ends inside an entry's content"));
        }
        self.remaining -= got as u64;
        Ok(got)
    }

    /// Fills `buf` entirely from the current entry's content.
    pub fn read_content_exact(&mut self, buf: &mut [u8]) -> Result<()> {
        let mut off = 0;
        while off < buf.len() {
            let n = self.read_content(&mut buf[off..])?;
            if n == 0 {
                return Err(self.err("entry content shorter than its header says"));
            }
            off += n;
        }
        Ok(())
    }

    fn read_block(&mut self, block: &mut [u8; BLOCK]) -> Result<bool> {
        let got = self.read_full(block)?;
        match got {
            0 => Ok(false),
            BLOCK => Ok(true),
            _ => Err(self.err("stream ends inside a header block")),
        }
    }

    fn read_extension(&mut self, size: u64, raw: &mut Vec<u8>) -> Result<Vec<u8>> {
        if size > MAX_EXTENSION {
            return Err(self.err(format!("extension record of {size} bytes is too large")));
        }
        let padded = size as usize + padding_for(size);
        let mut data = vec![0u8; padded];
        if self.read_full(&mut data)? < padded {
            return Err(self.err("stream ends inside an extension record"));
        }
        raw.extend_from_slice(&data);
        data.truncate(size as usize);
        Ok(data)
    }

    /// The next entry, or `None` at the end of the archive. Unread content of the previous
    /// entry is skipped.
    pub fn next_entry(&mut self) -> Result<Option<Entry>> {
        if self.done {
            return Ok(None);
        }
        let rest = self.remaining + self.padding as u64;
        self.skip(rest)?;
        self.remaining = 0;
        self.padding = 0;

        let start = self.pos;
        let mut raw = Vec::with_capacity(BLOCK);
        let mut ext = Extensions::default();
        let mut block = [0u8; BLOCK];
        loop {
            if !self.read_block(&mut block)? {
                // End of stream without the end-of-archive blocks: accepted, as GNU tar does.
                self.done = true;
                return Ok(None);
            }
            if block.iter().all(|&b| b == 0) {
                self.done = true;
                return Ok(None);
            }
            verify_checksum(&block).map_err(|r| self.err(r))?;
            raw.extend_from_slice(&block);
            let typeflag = block[156];
            let size = parse_numeric(&block[124..136]).map_err(|r| self.err(r))?;
            match typeflag {
                b'x' => {
                    let data = self.read_extension(size as u64, &mut raw)?;
                    parse_pax(&data, &mut ext).map_err(|r| self.err(r))?;
                }
                b'g' => {
                    let data = self.read_extension(size as u64, &mut raw)?;
                    let mut global = Extensions::default();
                    parse_pax(&data, &mut global).map_err(|r| self.err(r))?;
                    if global.path.is_some()
                        || global.link.is_some()
                        || global.size.is_some()
                        || global.uid.is_some()
                        || global.gid.is_some()
                        || global.mtime.is_some()
                        || !global.xattrs.is_empty()
                    {
                        return Err(Error::Unsupported {
                            name: String::new(),
                            reason: "global PAX header that changes entry metadata".into(),
                        });
                    }
                    // A comment-only global header affects nothing; it is not carried over.
                    raw.clear();
                }
                b'L' => {
                    let data = self.read_extension(size as u64, &mut raw)?;
                    ext.path = Some(cstr_bytes(&data).to_vec());
                }
                b'K' => {
                    let data = self.read_extension(size as u64, &mut raw)?;
                    ext.link = Some(cstr_bytes(&data).to_vec());
                }
                _ => {
                    return self
                        .finish_entry(&block, typeflag, ext, raw, start)
                        .map(Some);
                }
            }
        }
    }

    fn finish_entry(
        &mut self,
        block: &[u8; BLOCK],
        typeflag: u8,
        ext: Extensions,
        raw_header: Vec<u8>,
        start: u64,
    ) -> Result<Entry> {
        let ustar = &block[257..263] == b"ustar\0";
        let raw_name = match ext.path {
            Some(p) => p,
            None => {
                let name = cstr_bytes(&block[0..100]);
                let prefix = if ustar {
                    cstr_bytes(&block[345..500])
                } else {
                    &[]
                };
                if prefix.is_empty() {
                    name.to_vec()
                } else {
                    [prefix, b"/", name].concat()
                }
            }
        };
        // Names are refused, not converted lossily, when they are not UTF-8: the TOC holds
        // UTF-8 strings, and a replacement character would name a different file.
        let raw_name = String::from_utf8(raw_name).map_err(|e| Error::UnsafePath {
            name: String::from_utf8_lossy(e.as_bytes()).into_owned(),
            reason: "is not valid UTF-8 (the TOC can only hold UTF-8 names)",
        })?;
        let name = path::normalize(&raw_name)?;
        let unsupported = |reason: &str| Error::Unsupported {
            name: raw_name.clone(),
            reason: reason.to_string(),
        };
        let kind = match typeflag {
            b'0' | b'\0' | b'7' if raw_name.ends_with('/') => EntryKind::Dir,
            b'0' | b'\0' | b'7' => EntryKind::Regular,
            b'1' => EntryKind::HardLink,
            b'2' => EntryKind::Symlink,
            b'3' => EntryKind::Char,
            b'4' => EntryKind::Block,
            b'5' => EntryKind::Dir,
            b'6' => EntryKind::Fifo,
            b'S' => return Err(unsupported("GNU sparse files")),
            b'M' | b'V' | b'N' => return Err(unsupported("GNU multi-volume or volume records")),
            other => {
                return Err(unsupported(&format!(
                    "unknown type flag {:?}",
                    other as char
                )));
            }
        };
        let num = |r: &[u8]| parse_numeric(r).map_err(|e| self.err(e));
        let header_size = num(&block[124..136])?;
        let size = ext.size.map_or(header_size, |s| s as i64);
        if size < 0 {
            return Err(self.err("negative size"));
        }
        let raw_link = ext
            .link
            .unwrap_or_else(|| cstr_bytes(&block[157..257]).to_vec());
        let is_link = matches!(kind, EntryKind::HardLink | EntryKind::Symlink);
        let mut link_name = if is_link {
            String::from_utf8(raw_link).map_err(|e| Error::Unsupported {
                name: raw_name.clone(),
                reason: format!(
                    "link target {:?} is not valid UTF-8 (the TOC can only hold UTF-8 names)",
                    String::from_utf8_lossy(e.as_bytes())
                ),
            })?
        } else {
            // Other entries do not use the field; it is kept as it was read.
            String::from_utf8_lossy(&raw_link).into_owned()
        };
        if is_link && link_name.len() > path::MAX_PATH_LEN {
            return Err(Error::Unsupported {
                name: raw_name.clone(),
                reason: format!(
                    "link target of {} bytes is longer than PATH_MAX (4095)",
                    link_name.len()
                ),
            });
        }
        if kind == EntryKind::HardLink {
            link_name = path::normalize(&link_name)?;
            if link_name == "." {
                return Err(Error::UnsafePath {
                    name: raw_name,
                    reason: "hard link to the root directory",
                });
            }
        }
        let mode = (num(&block[100..108])? as u64 & 0o7777) as u32;
        // Linux ids and device numbers are 32-bit; anything else cannot be represented.
        let id = |pax: Option<u64>, field: &[u8], what: &str| -> Result<u64> {
            let v = match pax {
                Some(v) => i128::from(v),
                None => i128::from(num(field)?),
            };
            if (0..=i128::from(u32::MAX)).contains(&v) {
                Ok(v as u64)
            } else {
                Err(self.err(format!("{what} {v} of {raw_name:?} is out of range")))
            }
        };
        let uid = id(ext.uid, &block[108..116], "uid")?;
        let gid = id(ext.gid, &block[116..124], "gid")?;
        let mtime = match ext.mtime {
            Some(t) => t,
            None => Timestamp {
                secs: num(&block[136..148])?,
                nanos: 0,
            },
        };
        let (dev_major, dev_minor) = if matches!(kind, EntryKind::Char | EntryKind::Block) {
            (
                id(None, &block[329..337], "device major")? as u32,
                id(None, &block[337..345], "device minor")? as u32,
            )
        } else {
            (0, 0)
        };
        let content = if kind == EntryKind::Regular {
            size as u64
        } else {
            0
        };
        self.remaining = content;
        self.padding = padding_for(content);
        Ok(Entry {
            name,
            kind,
            mode,
            uid,
            gid,
            uname: ext.uname.unwrap_or_else(|| cstr(&block[265..297])),
            gname: ext.gname.unwrap_or_else(|| cstr(&block[297..329])),
            mtime,
            size: content,
            link_name,
            dev_major,
            dev_minor,
            xattrs: ext.xattrs,
            raw_header,
            stream_offset: start,
        })
    }
}

fn cstr(b: &[u8]) -> String {
    String::from_utf8_lossy(cstr_bytes(b)).into_owned()
}

/// The bytes of a NUL-terminated (or full-width) header field.
fn cstr_bytes(b: &[u8]) -> &[u8] {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    &b[..end]
}

fn verify_checksum(block: &[u8; BLOCK]) -> std::result::Result<(), String> {
    let stored = parse_numeric(&block[148..156])?;
    let mut unsigned: i64 = 0;
    let mut signed: i64 = 0;
    for (i, &b) in block.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { b };
        unsigned += b as i64;
        signed += (b as i8) as i64;
    }
    if stored == unsigned || stored == signed {
        Ok(())
    } else {
        Err(format!(
            "header checksum mismatch (stored {stored}, computed {unsigned})"
        ))
    }
}

/// Parses an octal (NUL/space padded) or base-256 numeric header field.
fn parse_numeric(field: &[u8]) -> std::result::Result<i64, String> {
    if let Some(&first) = field.first()
        && first & 0x80 != 0
    {
        // Base-256: big-endian two's complement once the marker bit is replaced by the sign.
        let negative = first & 0x40 != 0;
        let mut v: i128 = if negative { -1 } else { 0 };
        for (i, &b) in field.iter().enumerate() {
            let b = if i == 0 {
                (b & 0x7f) | ((b & 0x40) << 1)
            } else {
                b
            };
            v = (v << 8) | b as i128;
        }
        return i64::try_from(v).map_err(|_| "base-256 number out of range".to_string());
    }
    let s: Vec<u8> = field
        .iter()
        .copied()
        .skip_while(|&b| b == b' ' || b == 0)
        .take_while(|&b| b != b' ' && b != 0)
        .collect();
    if s.is_empty() {
        return Ok(0);
    }
    let text = std::str::from_utf8(&s).map_err(|_| "non-ASCII numeric field".to_string())?;
    i64::from_str_radix(text, 8).map_err(|_| format!("bad octal number {text:?}"))
}

fn parse_pax(mut data: &[u8], ext: &mut Extensions) -> std::result::Result<(), String> {
    while !data.is_empty() {
        let sp = data
            .iter()
            .position(|&b| b == b' ')
            .ok_or("PAX record without length")?;
        let len: usize = std::str::from_utf8(&data[..sp])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or("bad PAX record length")?;
        if len <= sp + 1 || len > data.len() || data[len - 1] != b'\n' {
            return Err("PAX record length out of range".into());
        }
        let record = &data[sp + 1..len - 1];
        let eq = record
            .iter()
            .position(|&b| b == b'=')
            .ok_or("PAX record without '='")?;
        let key = std::str::from_utf8(&record[..eq])
            .map_err(|_| {
                format!(
                    "PAX record key {:?} is not valid UTF-8",
                    String::from_utf8_lossy(&record[..eq])
                )
            })?
            .to_string();
        let value = &record[eq + 1..];
        let text = || String::from_utf8_lossy(value).into_owned();
        let int = || -> std::result::Result<u64, String> {
            text()
                .parse()
                .map_err(|_| format!("bad PAX number for {key}"))
        };
        match key.as_str() {
            "path" => ext.path = Some(value.to_vec()),
            "linkpath" => ext.link = Some(value.to_vec()),
            "size" => ext.size = Some(int()?),
            "uid" => ext.uid = Some(int()?),
            "gid" => ext.gid = Some(int()?),
            "uname" => ext.uname = Some(text()),
            "gname" => ext.gname = Some(text()),
            "mtime" => ext.mtime = Some(parse_pax_time(&text())?),
            k if k.starts_with("SCHILY.xattr.") => {
                ext.xattrs
                    .insert(k["SCHILY.xattr.".len()..].to_string(), value.to_vec());
            }
            k if k.starts_with("GNU.sparse.") => {
                return Err("GNU sparse files are not supported".into());
            }
            _ => {}
        }
        data = &data[len..];
    }
    Ok(())
}

fn parse_pax_time(s: &str) -> std::result::Result<Timestamp, String> {
    let bad = || format!("bad PAX time {s:?}");
    let (neg, s2) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s),
    };
    let (int, frac) = s2.split_once('.').unwrap_or((s2, ""));
    let secs: i64 = int.parse().map_err(|_| bad())?;
    let mut nanos: u32 = 0;
    if !frac.is_empty() {
        if !frac.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let digits: String = frac.chars().chain("000000000".chars()).take(9).collect();
        nanos = digits.parse().map_err(|_| bad())?;
    }
    if neg {
        // -1.5 means 1.5 s before the epoch: secs -2, nanos 5e8.
        let neg_secs = secs.checked_neg().ok_or_else(bad)?;
        if nanos > 0 {
            Ok(Timestamp {
                secs: neg_secs.checked_sub(1).ok_or_else(bad)?,
                nanos: 1_000_000_000 - nanos,
            })
        } else {
            Ok(Timestamp {
                secs: neg_secs,
                nanos: 0,
            })
        }
    } else {
        Ok(Timestamp { secs, nanos })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_fields() {
        assert_eq!(parse_numeric(b"0000644\0").unwrap(), 0o644);
        assert_eq!(parse_numeric(b"  755 \0").unwrap(), 0o755);
        assert_eq!(parse_numeric(b"\0\0\0\0").unwrap(), 0);
        let mut big = [0u8; 12];
        big[0] = 0x80;
        big[11] = 0x01;
        big[10] = 0x02;
        assert_eq!(parse_numeric(&big).unwrap(), 0x0201);
        assert!(parse_numeric(b"12x4\0").is_err());
    }

    #[test]
    fn pax_times() {
        assert_eq!(
            parse_pax_time("1700000000.25").unwrap(),
            Timestamp {
                secs: 1_700_000_000,
                nanos: 250_000_000
            }
        );
        assert_eq!(
            parse_pax_time("-1.5").unwrap(),
            Timestamp {
                secs: -2,
                nanos: 500_000_000
            }
        );
        assert!(parse_pax_time("1.x").is_err());
        // Found by fuzzing: negating i64::MIN overflowed.
        assert!(parse_pax_time("--9223372036854775808").is_err());
        assert!(parse_pax_time("-9223372036854775808.5").is_err());
    }

    #[test]
    fn pax_records_are_bounded() {
        let mut ext = Extensions::default();
        assert!(parse_pax(b"999 path=x\n", &mut ext).is_err());
        assert!(parse_pax(b"3 x", &mut ext).is_err());
        parse_pax(b"11 path=ab\n", &mut ext).unwrap();
        assert_eq!(ext.path.as_deref(), Some(&b"ab"[..]));
    }
}
