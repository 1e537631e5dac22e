//! The FUSE kernel protocol, as much of it as a read-only filesystem speaks: opcodes, the
//! request header, the argument layouts read, and writers for the replies and notifications
//! (`<linux/fuse.h>`, protocol 7.x; every structure is native-endian and 64-bit aligned).
//!
//! Requests are parsed from the bytes `read(2)` returned with bounds checks, never by
//! casting: a short or odd request is an error answered EINVAL, not a crash.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub const KERNEL_VERSION: u32 = 7;
/// The highest minor version this implementation answers with: requests it does not know
/// are answered ENOSYS, and no layout it reads changed after 7.23.
pub const MAX_MINOR: u32 = 40;
/// The lowest minor version it accepts (full `fuse_init_out`, READDIRPLUS, max_pages).
pub const MIN_MINOR: u32 = 28;

pub const FUSE_ROOT_ID: u64 = 1;
/// Set by the kernel in `unique` of a request it queued again after `NOTIFY_RESEND`.
pub const UNIQUE_RESEND: u64 = 1 << 63;

pub mod op {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const READLINK: u32 = 5;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const GETXATTR: u32 = 22;
    pub const LISTXATTR: u32 = 23;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const INTERRUPT: u32 = 36;
    pub const DESTROY: u32 = 38;
    pub const IOCTL: u32 = 39;
    pub const BATCH_FORGET: u32 = 42;
    pub const READDIRPLUS: u32 = 44;
}

pub mod notify {
    pub const INVAL_INODE: i32 = 2;
    /// Write data into the page cache of an inode the kernel knows (7.15).
    pub const STORE: i32 = 4;
    /// Linux 6.9 (7.40): queue again every request read but not answered.
    pub const RESEND: i32 = 7;
}

pub mod init {
    pub const ASYNC_READ: u64 = 1 << 0;
    pub const BIG_WRITES: u64 = 1 << 5;
    pub const DO_READDIRPLUS: u64 = 1 << 13;
    pub const READDIRPLUS_AUTO: u64 = 1 << 14;
    pub const NO_OPEN_SUPPORT: u64 = 1 << 17;
    pub const PARALLEL_DIROPS: u64 = 1 << 18;
    pub const MAX_PAGES: u64 = 1 << 22;
    pub const CACHE_SYMLINKS: u64 = 1 << 23;
    pub const NO_OPENDIR_SUPPORT: u64 = 1 << 24;
    pub const INIT_EXT: u64 = 1 << 30;
    /// Announced by kernels that accept `NOTIFY_RESEND`.
    pub const HAS_RESEND: u64 = 1 << 39;
}

/// `sizeof(struct fuse_in_header)`.
pub const IN_HEADER: usize = 40;
/// `sizeof(struct fuse_out_header)`.
pub const OUT_HEADER: usize = 16;

/// A request as read from `/dev/fuse`.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
    /// The arguments after the header.
    pub body: &'a [u8],
}

/// A request the kernel could not have sent (shorter than its header says).
#[derive(Debug, thiserror::Error)]
#[error("malformed FUSE request: {0}")]
pub struct Malformed(pub &'static str);

pub fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

pub fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

impl<'a> Request<'a> {
    pub fn parse(buf: &'a [u8]) -> Result<Request<'a>, Malformed> {
        let len = u32_at(buf, 0).ok_or(Malformed("short header"))? as usize;
        if len < IN_HEADER || len > buf.len() {
            return Err(Malformed("length out of range"));
        }
        let field = |o| u32_at(buf, o).ok_or(Malformed("short header"));
        Ok(Request {
            opcode: field(4)?,
            unique: u64_at(buf, 8).ok_or(Malformed("short header"))?,
            nodeid: u64_at(buf, 16).ok_or(Malformed("short header"))?,
            uid: field(24)?,
            gid: field(28)?,
            pid: field(32)?,
            body: &buf[IN_HEADER..len],
        })
    }

    /// The NUL-terminated name at the start of the body (LOOKUP, GETXATTR after its args).
    pub fn name_at(&self, off: usize) -> Result<&'a [u8], Malformed> {
        let rest = self.body.get(off..).ok_or(Malformed("short arguments"))?;
        let end = rest
            .iter()
            .position(|&c| c == 0)
            .ok_or(Malformed("name without NUL"))?;
        Ok(&rest[..end])
    }

    pub fn arg_u32(&self, off: usize) -> Result<u32, Malformed> {
        u32_at(self.body, off).ok_or(Malformed("short arguments"))
    }

    pub fn arg_u64(&self, off: usize) -> Result<u64, Malformed> {
        u64_at(self.body, off).ok_or(Malformed("short arguments"))
    }
}

/// What the kernel offered in FUSE_INIT.
#[derive(Debug, Clone, Copy)]
pub struct InitIn {
    pub major: u32,
    pub minor: u32,
    pub max_readahead: u32,
    pub flags: u64,
}

impl InitIn {
    pub fn parse(req: &Request<'_>) -> Result<InitIn, Malformed> {
        let flags = req.arg_u32(12)? as u64;
        // flags2 exists from 7.36 and counts only with INIT_EXT.
        let flags2 = if flags & init::INIT_EXT != 0 {
            req.arg_u32(16).unwrap_or(0) as u64
        } else {
            0
        };
        Ok(InitIn {
            major: req.arg_u32(0)?,
            minor: req.arg_u32(4)?,
            max_readahead: req.arg_u32(8)?,
            flags: flags | (flags2 << 32),
        })
    }
}

/// What was agreed at FUSE_INIT: kept with the connection's fd so that a successor serves it
/// the same way without the INIT the kernel sends only once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Negotiated {
    /// The kernel's protocol minor version.
    pub kernel_minor: u32,
    /// The minor version answered (`min(kernel, MAX_MINOR)`).
    pub minor: u32,
    /// Flags granted (wanted ∩ offered).
    pub flags: u64,
    pub max_readahead: u32,
    pub max_write: u32,
    pub max_pages: u16,
}

impl Negotiated {
    /// Whether the kernel takes `NOTIFY_RESEND`.
    pub fn can_resend(&self) -> bool {
        self.flags & init::HAS_RESEND != 0 || self.kernel_minor >= 40
    }
}

/// Bytes written to the kernel: a reply body or a notification.
#[derive(Default)]
pub struct Out(pub Vec<u8>);

impl Out {
    pub fn with_capacity(n: usize) -> Out {
        Out(Vec::with_capacity(n))
    }
    pub fn u16(&mut self, v: u16) -> &mut Out {
        self.0.extend_from_slice(&v.to_ne_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Out {
        self.0.extend_from_slice(&v.to_ne_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Out {
        self.0.extend_from_slice(&v.to_ne_bytes());
        self
    }
    pub fn zeros(&mut self, n: usize) -> &mut Out {
        self.0.resize(self.0.len() + n, 0);
        self
    }
    pub fn bytes(&mut self, b: &[u8]) -> &mut Out {
        self.0.extend_from_slice(b);
        self
    }
    /// Pads to the next 8-byte boundary (directory records).
    pub fn align8(&mut self) -> &mut Out {
        let pad = self.0.len().next_multiple_of(8) - self.0.len();
        self.zeros(pad)
    }
}

/// `struct fuse_init_out` (64 bytes).
pub fn init_out(n: &Negotiated, max_background: u16) -> Out {
    let mut o = Out::with_capacity(64);
    o.u32(KERNEL_VERSION)
        .u32(n.minor)
        .u32(n.max_readahead)
        .u32(n.flags as u32)
        .u16(max_background)
        .u16(max_background * 3 / 4)
        .u32(n.max_write)
        .u32(1) // time_gran: nanoseconds
        .u16(n.max_pages)
        .u16(0) // map_alignment
        .u32((n.flags >> 32) as u32)
        .zeros(28);
    o
}

/// The kind of an inode, as `st_mode`'s type bits and a directory entry's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileType {
    NamedPipe,
    CharDevice,
    BlockDevice,
    Directory,
    RegularFile,
    Symlink,
}

impl FileType {
    pub fn mode_bits(self) -> u32 {
        match self {
            FileType::NamedPipe => libc::S_IFIFO,
            FileType::CharDevice => libc::S_IFCHR,
            FileType::BlockDevice => libc::S_IFBLK,
            FileType::Directory => libc::S_IFDIR,
            FileType::RegularFile => libc::S_IFREG,
            FileType::Symlink => libc::S_IFLNK,
        }
    }
    /// `d_type`.
    pub fn dirent_type(self) -> u32 {
        self.mode_bits() >> 12
    }
}

/// `struct fuse_attr`'s content.
#[derive(Debug, Clone, Copy)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    pub mtime: SystemTime,
    pub kind: FileType,
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
}

fn split_time(t: SystemTime) -> (u64, u32) {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs(), d.subsec_nanos()),
        // Before 1970: the kernel takes seconds as signed.
        Err(e) => {
            let d = e.duration();
            let (s, n) = (d.as_secs() as i64, d.subsec_nanos());
            if n == 0 {
                ((-s) as u64, 0)
            } else {
                ((-s - 1) as u64, 1_000_000_000 - n)
            }
        }
    }
}

impl Attr {
    /// `struct fuse_attr` (88 bytes).
    pub fn write(&self, o: &mut Out) {
        let (secs, nanos) = split_time(self.mtime);
        o.u64(self.ino)
            .u64(self.size)
            .u64(self.size.div_ceil(512))
            .u64(secs)
            .u64(secs)
            .u64(secs)
            .u32(nanos)
            .u32(nanos)
            .u32(nanos)
            .u32(self.kind.mode_bits() | self.perm as u32)
            .u32(self.nlink)
            .u32(self.uid)
            .u32(self.gid)
            .u32(self.rdev)
            .u32(4096) // blksize
            .u32(0); // flags
    }
}

/// `struct fuse_entry_out` (128 bytes).
pub fn entry_out(o: &mut Out, attr: &Attr, ttl: Duration) {
    o.u64(attr.ino)
        .u64(0) // generation
        .u64(ttl.as_secs())
        .u64(ttl.as_secs())
        .u32(ttl.subsec_nanos())
        .u32(ttl.subsec_nanos());
    attr.write(o);
}

/// A `struct fuse_entry_out` saying "no such name" (node id 0) that the kernel may cache for
/// `ttl`, as a negative dentry: unlike ENOENT, which it forgets at once, so every later
/// lookup of the name (each new overlay mount over the layer asks again) is a round trip.
pub fn negative_entry_out(o: &mut Out, ttl: Duration) {
    o.u64(0) // node id: none
        .u64(0) // generation
        .u64(ttl.as_secs())
        .u64(0) // attr_valid: there are no attributes
        .u32(ttl.subsec_nanos())
        .u32(0);
    o.0.extend_from_slice(&[0u8; 88]); // struct fuse_attr, unused
}

/// `struct fuse_attr_out` (104 bytes).
pub fn attr_out(attr: &Attr, ttl: Duration) -> Out {
    let mut o = Out::with_capacity(104);
    o.u64(ttl.as_secs()).u32(ttl.subsec_nanos()).u32(0);
    attr.write(&mut o);
    o
}

/// Appends a `struct fuse_dirent` record to a READDIR reply of at most `max` bytes; false
/// when it does not fit.
pub fn dirent(o: &mut Out, max: usize, ino: u64, off: u64, kind: FileType, name: &[u8]) -> bool {
    let len = (24 + name.len()).next_multiple_of(8);
    if o.0.len() + len > max {
        return false;
    }
    o.u64(ino)
        .u64(off)
        .u32(name.len() as u32)
        .u32(kind.dirent_type())
        .bytes(name)
        .align8();
    true
}

/// Appends a `struct fuse_direntplus` record to a READDIRPLUS reply of at most `max` bytes.
pub fn direntplus(
    o: &mut Out,
    max: usize,
    attr: &Attr,
    ttl: Duration,
    off: u64,
    name: &[u8],
) -> bool {
    let len = (128 + 24 + name.len()).next_multiple_of(8);
    if o.0.len() + len > max {
        return false;
    }
    entry_out(o, attr, ttl);
    o.u64(attr.ino)
        .u64(off)
        .u32(name.len() as u32)
        .u32(attr.kind.dirent_type())
        .bytes(name)
        .align8();
    true
}

/// `struct fuse_kstatfs` (80 bytes).
pub fn statfs_out(blocks: u64, files: u64, bsize: u32, namelen: u32) -> Out {
    let mut o = Out::with_capacity(80);
    o.u64(blocks)
        .u64(0)
        .u64(0)
        .u64(files)
        .u64(0)
        .u32(bsize)
        .u32(namelen)
        .u32(bsize)
        .u32(0)
        .zeros(24);
    o
}

/// `struct fuse_getxattr_out`: the size a value or list needs.
pub fn xattr_size(size: u32) -> Out {
    let mut o = Out::with_capacity(8);
    o.u32(size).u32(0);
    o
}

/// `struct fuse_notify_inval_inode_out`: drop cached attributes and pages of `ino`.
pub fn inval_inode(ino: u64) -> Out {
    let mut o = Out::with_capacity(24);
    o.u64(ino).u64(0).u64(0);
    o
}

/// `struct fuse_notify_store_out`: `size` bytes at `offset` of `ino` follow.
pub fn store_out(ino: u64, offset: u64, size: u32) -> Out {
    let mut o = Out::with_capacity(24);
    o.u64(ino).u64(offset).u32(size).u32(0);
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_the_kernel_sizes() {
        let n = Negotiated {
            kernel_minor: 44,
            minor: 40,
            flags: init::ASYNC_READ | init::HAS_RESEND,
            max_readahead: 1 << 20,
            max_write: 4096,
            max_pages: 256,
        };
        assert_eq!(init_out(&n, 64).0.len(), 64);
        let attr = Attr {
            ino: 5,
            size: 1000,
            mtime: UNIX_EPOCH,
            kind: FileType::RegularFile,
            perm: 0o644,
            nlink: 1,
            uid: 0,
            gid: 0,
            rdev: 0,
        };
        let mut e = Out::default();
        entry_out(&mut e, &attr, Duration::from_secs(1));
        assert_eq!(e.0.len(), 128);
        assert_eq!(attr_out(&attr, Duration::from_secs(1)).0.len(), 104);
        assert_eq!(statfs_out(1, 1, 4096, 255).0.len(), 80);
        assert_eq!(store_out(1, 0, 1).0.len(), 24);
        let mut d = Out::default();
        assert!(dirent(&mut d, 4096, 1, 1, FileType::Directory, b"abc"));
        assert_eq!(d.0.len(), 32);
        let mut p = Out::default();
        assert!(direntplus(&mut p, 4096, &attr, Duration::ZERO, 1, b"a"));
        assert_eq!(p.0.len(), 160);
        assert!(!direntplus(&mut p, 200, &attr, Duration::ZERO, 2, b"b"));
        assert!(n.can_resend());
    }

    #[test]
    fn short_requests_are_errors() {
        assert!(Request::parse(&[0; 10]).is_err());
        let mut b = vec![0u8; 40];
        b[0..4].copy_from_slice(&100u32.to_ne_bytes());
        assert!(Request::parse(&b).is_err());
        b[0..4].copy_from_slice(&40u32.to_ne_bytes());
        let r = Request::parse(&b).unwrap();
        assert!(r.name_at(0).is_err());
        assert!(r.arg_u64(0).is_err());
    }

    #[test]
    fn times_before_1970_are_signed() {
        let t = UNIX_EPOCH - Duration::from_millis(1500);
        let (s, n) = split_time(t);
        assert_eq!(s as i64, -2);
        assert_eq!(n, 500_000_000);
    }
}
