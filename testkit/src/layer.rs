//! Layer tars: entries built in memory, tars of real directories, and the feature corpus.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use anyhow::{Context, Result};
use tar::{Builder, EntryType, Header, HeaderMode};

/// Default mtime of generated entries (2023-11-14T22:13:20Z).
pub const DEFAULT_MTIME: u64 = 1_700_000_000;

/// What an [`Entry`] is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file with this content.
    File(Vec<u8>),
    /// A directory.
    Dir,
    /// A symbolic link to this target (stored verbatim).
    Symlink(String),
    /// A hard link to this earlier path in the same tar (archive-relative).
    HardLink(String),
    /// A character device (major, minor).
    CharDev(u32, u32),
    /// A block device (major, minor).
    BlockDev(u32, u32),
    /// A named pipe.
    Fifo,
}

/// One tar entry. `path` is archive-relative (a leading `/` or `./` is stripped when writing; a
/// directory gets a trailing `/`). `mode` holds the permission bits including setuid, setgid and
/// sticky (the file type comes from `kind`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub path: String,
    pub kind: EntryKind,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: u64,
    pub xattrs: Vec<(String, Vec<u8>)>,
}

impl Entry {
    /// An entry with the defaults: uid/gid 0, mtime [`DEFAULT_MTIME`], no xattrs.
    pub fn new(path: impl Into<String>, kind: EntryKind, mode: u32) -> Entry {
        Entry {
            path: path.into(),
            kind,
            mode,
            uid: 0,
            gid: 0,
            mtime: DEFAULT_MTIME,
            xattrs: Vec::new(),
        }
    }
    /// A regular file, mode 0644.
    pub fn file(path: impl Into<String>, data: impl Into<Vec<u8>>) -> Entry {
        Entry::new(path, EntryKind::File(data.into()), 0o644)
    }
    /// An executable regular file, mode 0755.
    pub fn executable(path: impl Into<String>, data: impl Into<Vec<u8>>) -> Entry {
        Entry::new(path, EntryKind::File(data.into()), 0o755)
    }
    /// A directory, mode 0755.
    pub fn dir(path: impl Into<String>) -> Entry {
        Entry::new(path, EntryKind::Dir, 0o755)
    }
    /// A symlink, mode 0777.
    pub fn symlink(path: impl Into<String>, target: impl Into<String>) -> Entry {
        Entry::new(path, EntryKind::Symlink(target.into()), 0o777)
    }
    /// A hard link to `target`, an archive path written earlier; mode 0644.
    pub fn hardlink(path: impl Into<String>, target: impl Into<String>) -> Entry {
        Entry::new(path, EntryKind::HardLink(target.into()), 0o644)
    }
    /// A character device, mode 0666.
    pub fn char_dev(path: impl Into<String>, major: u32, minor: u32) -> Entry {
        Entry::new(path, EntryKind::CharDev(major, minor), 0o666)
    }
    /// A block device, mode 0660.
    pub fn block_dev(path: impl Into<String>, major: u32, minor: u32) -> Entry {
        Entry::new(path, EntryKind::BlockDev(major, minor), 0o660)
    }
    /// A FIFO, mode 0644.
    pub fn fifo(path: impl Into<String>) -> Entry {
        Entry::new(path, EntryKind::Fifo, 0o644)
    }
    /// An OCI whiteout deleting `name` in directory `dir` (`dir/.wh.name`): an empty file.
    pub fn whiteout(dir: &str, name: &str) -> Entry {
        Entry::file(join(dir, &format!(".wh.{name}")), Vec::new())
    }
    /// An OCI opaque-directory marker (`dir/.wh..wh..opq`): an empty file.
    pub fn opaque(dir: &str) -> Entry {
        Entry::file(join(dir, ".wh..wh..opq"), Vec::new())
    }
    /// Sets the permission bits (e.g. `0o4755`).
    pub fn with_mode(mut self, mode: u32) -> Entry {
        self.mode = mode;
        self
    }
    /// Sets the owner.
    pub fn with_owner(mut self, uid: u64, gid: u64) -> Entry {
        self.uid = uid;
        self.gid = gid;
        self
    }
    /// Sets the mtime (seconds since the epoch).
    pub fn with_mtime(mut self, mtime: u64) -> Entry {
        self.mtime = mtime;
        self
    }
    /// Adds an extended attribute.
    pub fn with_xattr(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Entry {
        self.xattrs.push((name.into(), value.into()));
        self
    }
    /// The content of a regular file (empty for other kinds).
    pub fn data(&self) -> &[u8] {
        match &self.kind {
            EntryKind::File(d) => d,
            _ => &[],
        }
    }
    /// The path as written to the tar: relative, directories with a trailing `/`.
    pub fn archive_path(&self) -> String {
        let mut p = self.path.as_str();
        loop {
            if let Some(r) = p.strip_prefix("./") {
                p = r;
            } else if let Some(r) = p.strip_prefix('/') {
                p = r;
            } else {
                break;
            }
        }
        let mut p = p.to_string();
        if self.kind == EntryKind::Dir && !p.ends_with('/') {
            p.push('/');
        }
        p
    }
    fn entry_type(&self) -> EntryType {
        match self.kind {
            EntryKind::File(_) => EntryType::Regular,
            EntryKind::Dir => EntryType::Directory,
            EntryKind::Symlink(_) => EntryType::Symlink,
            EntryKind::HardLink(_) => EntryType::Link,
            EntryKind::CharDev(..) => EntryType::Char,
            EntryKind::BlockDev(..) => EntryType::Block,
            EntryKind::Fifo => EntryType::Fifo,
        }
    }
    fn link_target(&self) -> Option<&str> {
        match &self.kind {
            EntryKind::Symlink(t) => Some(t),
            EntryKind::HardLink(t) => Some(t.trim_start_matches("./")),
            _ => None,
        }
    }
    /// Sets everything but the path and link name.
    fn fill_header(&self, h: &mut Header) -> io::Result<()> {
        h.set_entry_type(self.entry_type());
        h.set_mode(self.mode & 0o7777);
        h.set_uid(self.uid);
        h.set_gid(self.gid);
        h.set_mtime(self.mtime);
        h.set_size(self.data().len() as u64);
        match self.kind {
            EntryKind::CharDev(ma, mi) | EntryKind::BlockDev(ma, mi) => {
                h.set_device_major(ma)?;
                h.set_device_minor(mi)?;
            }
            _ => {
                // ustar/GNU readers expect 0 (not blanks) in the device fields.
                h.set_device_major(0)?;
                h.set_device_minor(0)?;
            }
        }
        Ok(())
    }
}

fn join(dir: &str, name: &str) -> String {
    let d = dir.trim_end_matches('/');
    if d.is_empty() {
        name.to_string()
    } else {
        format!("{d}/{name}")
    }
}

/// Largest value an octal ustar uid/gid field holds (7 digits).
const USTAR_ID_MAX: u64 = 0o7_777_777;
/// Largest value an octal ustar mtime field holds (11 digits).
const USTAR_TIME_MAX: u64 = 0o77_777_777_777;

/// A POSIX (PAX) layer tar of `entries`, in the given order: ustar headers, with PAX extended
/// headers for names and link names longer than 100 bytes (`path`, `linkpath`), ids and mtimes
/// too large for ustar, and xattrs (`SCHILY.xattr.<name>`). Deterministic.
pub fn layer_tar(entries: &[Entry]) -> Vec<u8> {
    let mut b = Builder::new(Vec::new());
    for e in entries {
        append_pax(&mut b, e).unwrap_or_else(|err| panic!("layer_tar: {}: {err}", e.path));
    }
    b.into_inner().expect("finishing an in-memory tar")
}

fn append_pax<W: Write>(b: &mut Builder<W>, e: &Entry) -> io::Result<()> {
    let path = e.archive_path();
    let link = e.link_target();
    let mut pax: Vec<(String, Vec<u8>)> = Vec::new();
    if path.len() > 100 {
        pax.push(("path".into(), path.as_bytes().to_vec()));
    }
    if let Some(l) = link
        && l.len() > 100
    {
        pax.push(("linkpath".into(), l.as_bytes().to_vec()));
    }
    if e.uid > USTAR_ID_MAX {
        pax.push(("uid".into(), e.uid.to_string().into_bytes()));
    }
    if e.gid > USTAR_ID_MAX {
        pax.push(("gid".into(), e.gid.to_string().into_bytes()));
    }
    if e.mtime > USTAR_TIME_MAX {
        pax.push(("mtime".into(), e.mtime.to_string().into_bytes()));
    }
    for (k, v) in &e.xattrs {
        pax.push((format!("SCHILY.xattr.{k}"), v.clone()));
    }
    if !pax.is_empty() {
        b.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))?;
    }

    let mut h = Header::new_ustar();
    e.fill_header(&mut h)?;
    {
        let u = h.as_ustar_mut().expect("ustar header");
        let p = path.as_bytes();
        let n = p.len().min(u.name.len());
        u.name[..n].copy_from_slice(&p[..n]);
        if let Some(l) = link {
            let l = l.as_bytes();
            let n = l.len().min(u.linkname.len());
            u.linkname[..n].copy_from_slice(&l[..n]);
        }
    }
    h.set_cksum();
    b.append(&h, e.data())
}

/// Like [`layer_tar`] but with GNU headers and GNU long-name (`L`) and long-link (`K`) records
/// (what `tar::Builder` writes by default). Xattrs still go into PAX `SCHILY.xattr.*` headers,
/// as GNU tar does.
pub fn layer_tar_gnu(entries: &[Entry]) -> Vec<u8> {
    let mut b = Builder::new(Vec::new());
    for e in entries {
        append_gnu(&mut b, e).unwrap_or_else(|err| panic!("layer_tar_gnu: {}: {err}", e.path));
    }
    b.into_inner().expect("finishing an in-memory tar")
}

fn append_gnu<W: Write>(b: &mut Builder<W>, e: &Entry) -> io::Result<()> {
    if !e.xattrs.is_empty() {
        let pax: Vec<(String, &[u8])> = e
            .xattrs
            .iter()
            .map(|(k, v)| (format!("SCHILY.xattr.{k}"), v.as_slice()))
            .collect();
        b.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), *v)))?;
    }
    let mut h = Header::new_gnu();
    e.fill_header(&mut h)?;
    let path = e.archive_path();
    match e.link_target() {
        Some(target) => b.append_link(&mut h, &path, target),
        None => b.append_data(&mut h, &path, e.data()),
    }
}

/// Writes a tar of the directory tree below `dir` (not including `dir` itself) to `out`:
/// regular files (streamed), directories, symlinks, hard links (detected by inode: later paths
/// become links to the first), char/block devices and FIFOs; sockets are skipped. Paths are
/// relative to `dir` and sorted byte-wise within each directory, each directory before its
/// contents. Metadata (mode, uid, gid, mtime) is taken from the files; GNU headers with long-name
/// records. Xattrs are not recorded.
pub fn tar_dir(dir: &Path, out: impl Write) -> Result<()> {
    let mut b = Builder::new(out);
    b.mode(HeaderMode::Complete);
    b.follow_symlinks(false);
    let mut inodes: HashMap<(u64, u64), std::path::PathBuf> = HashMap::new();
    walk(dir, Path::new(""), &mut b, &mut inodes)?;
    let mut out = b.into_inner().context("finishing tar")?;
    out.flush()?;
    Ok(())
}

fn walk<W: Write>(
    root: &Path,
    rel_dir: &Path,
    b: &mut Builder<W>,
    inodes: &mut HashMap<(u64, u64), std::path::PathBuf>,
) -> Result<()> {
    let full_dir = root.join(rel_dir);
    let mut names: Vec<OsString> = std::fs::read_dir(&full_dir)
        .with_context(|| format!("reading {}", full_dir.display()))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<io::Result<_>>()?;
    names.sort();
    for name in names {
        let rel = rel_dir.join(&name);
        let full = root.join(&rel);
        let meta =
            std::fs::symlink_metadata(&full).with_context(|| format!("stat {}", full.display()))?;
        let ft = meta.file_type();
        if ft.is_socket() {
            continue;
        }
        let mut h = Header::new_gnu();
        h.set_metadata_in_mode(&meta, HeaderMode::Complete);
        // Permission bits only (with setuid/setgid/sticky), as GNU tar and Go write them.
        h.set_mode(meta.mode() & 0o7777);
        h.set_mtime(meta.mtime().max(0) as u64);
        let ctx = || format!("adding {}", full.display());
        if ft.is_dir() {
            h.set_size(0);
            let mut p = rel.clone().into_os_string();
            p.push("/");
            b.append_data(&mut h, &p, io::empty()).with_context(ctx)?;
            walk(root, &rel, b, inodes)?;
        } else if ft.is_symlink() {
            h.set_size(0);
            let target = std::fs::read_link(&full).with_context(ctx)?;
            b.append_link(&mut h, &rel, &target).with_context(ctx)?;
        } else if ft.is_file() {
            let key = (meta.dev(), meta.ino());
            if meta.nlink() > 1 {
                if let Some(first) = inodes.get(&key) {
                    h.set_entry_type(EntryType::Link);
                    h.set_size(0);
                    b.append_link(&mut h, &rel, first).with_context(ctx)?;
                    continue;
                }
                inodes.insert(key, rel.clone());
            }
            let f = File::open(&full).with_context(ctx)?;
            b.append_data(&mut h, &rel, f).with_context(ctx)?;
        } else {
            // char/block device or FIFO: the entry type came from the metadata.
            h.set_size(0);
            if ft.is_char_device() || ft.is_block_device() {
                let rdev = meta.rdev();
                let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
                let minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
                h.set_device_major(major as u32).with_context(ctx)?;
                h.set_device_minor(minor as u32).with_context(ctx)?;
            }
            b.append_data(&mut h, &rel, io::empty()).with_context(ctx)?;
        }
    }
    Ok(())
}

/// A seeded xorshift64* generator: reproducible "random-ish" test data.
#[derive(Clone, Debug)]
pub struct XorShift64(u64);

impl XorShift64 {
    /// A generator for `seed` (0 is replaced by a fixed non-zero seed).
    pub fn new(seed: u64) -> XorShift64 {
        XorShift64(if seed == 0 {
            0x9E37_79B9_7F4A_7C15
        } else {
            seed
        })
    }
    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Fills `buf`.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// `len` reproducible pseudo-random bytes (incompressible) for `seed`.
pub fn pseudo_random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    XorShift64::new(seed).fill(&mut v);
    v
}

/// The tar-feature corpus: one layer's entries (all below `corpus/`) covering every tar feature
/// real images use. See the source for the exact list; every entry kind of [`EntryKind`] occurs,
/// as do whiteouts, an opaque directory, names longer than 100 and 255 bytes, link targets longer
/// than 100 bytes, xattrs (including binary `security.capability`), setuid/setgid/sticky modes,
/// non-zero and large uid/gid, varied mtimes, 2,000 tiny files in one directory and unicode
/// names. About 70 MiB of file data (a 64 MiB mostly-zero file among them).
pub fn corpus() -> Vec<Entry> {
    let mut v = vec![Entry::dir("corpus")];

    // Regular files of interesting sizes.
    v.push(Entry::dir("corpus/files"));
    v.push(Entry::file("corpus/files/empty", Vec::new()));
    v.push(Entry::file("corpus/files/one", b"x".to_vec()));
    v.push(Entry::file("corpus/files/4k", pseudo_random_bytes(4, 4096)));
    v.push(Entry::file(
        "corpus/files/4k-plus-1",
        pseudo_random_bytes(5, 4097),
    ));
    v.push(Entry::file(
        "corpus/files/text",
        "hello world\n".repeat(1000).into_bytes(),
    ));
    v.push(Entry::file(
        "corpus/files/random-3m",
        pseudo_random_bytes(3, 3 * 1024 * 1024 + 17),
    ));
    v.push(Entry::file("corpus/files/sparse-64m", sparse_ish(64 << 20)));

    // Modes.
    v.push(Entry::dir("corpus/modes"));
    v.push(Entry::executable(
        "corpus/modes/exec.sh",
        b"#!/bin/sh\necho hi\n".to_vec(),
    ));
    v.push(Entry::file("corpus/modes/setuid", b"su".to_vec()).with_mode(0o4755));
    v.push(Entry::file("corpus/modes/setgid", b"sg".to_vec()).with_mode(0o2755));
    v.push(Entry::file("corpus/modes/noaccess", b"no".to_vec()).with_mode(0o000));
    v.push(
        Entry::file(
            "corpus/modes/shadow",
            b"root:*:19000:0:99999:7:::\n".to_vec(),
        )
        .with_mode(0o640)
        .with_owner(0, 42),
    );
    v.push(Entry::dir("corpus/modes/sticky-tmp").with_mode(0o1777));
    v.push(Entry::dir("corpus/modes/readonly-dir").with_mode(0o555));
    v.push(Entry::file("corpus/modes/readonly-dir/inside", b"ro".to_vec()).with_mode(0o444));
    v.push(
        Entry::dir("corpus/modes/private-dir")
            .with_mode(0o700)
            .with_owner(1000, 1000),
    );

    // Owners.
    v.push(Entry::dir("corpus/owners"));
    v.push(Entry::file("corpus/owners/user", b"1000".to_vec()).with_owner(1000, 1000));
    v.push(Entry::file("corpus/owners/nobody", b"65534".to_vec()).with_owner(65534, 65534));
    v.push(Entry::file("corpus/owners/mixed", b"33:4".to_vec()).with_owner(33, 4));
    v.push(Entry::file("corpus/owners/big", b"1e6".to_vec()).with_owner(1_000_000, 1_000_001));
    v.push(Entry::symlink("corpus/owners/link", "user").with_owner(1000, 1000));

    // Varied mtimes.
    v.push(Entry::dir("corpus/mtimes").with_mtime(1_600_000_000));
    for (name, t) in [
        ("epoch", 0u64),
        ("one", 1),
        ("y2001", 1_000_000_000),
        ("y2038-after", 2_147_483_648),
        ("y2100", 4_102_444_800),
    ] {
        v.push(
            Entry::file(format!("corpus/mtimes/{name}"), name.as_bytes().to_vec()).with_mtime(t),
        );
    }

    // Symlinks and hard links.
    v.push(Entry::dir("corpus/links"));
    v.push(Entry::symlink("corpus/links/relative", "../files/one"));
    v.push(Entry::symlink("corpus/links/absolute", "/corpus/files/4k"));
    v.push(Entry::symlink("corpus/links/dangling", "does/not/exist"));
    v.push(Entry::symlink("corpus/links/dir-link", "../files"));
    v.push(Entry::symlink("corpus/links/dot", "."));
    v.push(Entry::symlink(
        "corpus/links/escaping",
        "../../../../../../etc/hostname",
    ));
    v.push(Entry::hardlink("corpus/links/hard-4k", "corpus/files/4k"));
    v.push(Entry::hardlink(
        "corpus/links/hard-random",
        "corpus/files/random-3m",
    ));
    v.push(Entry::hardlink(
        "corpus/links/hard-empty",
        "corpus/files/empty",
    ));

    // Devices and FIFOs.
    v.push(Entry::dir("corpus/dev"));
    v.push(Entry::char_dev("corpus/dev/null", 1, 3));
    v.push(
        Entry::char_dev("corpus/dev/tty-big-minor", 136, 300_000)
            .with_mode(0o620)
            .with_owner(0, 5),
    );
    v.push(Entry::block_dev("corpus/dev/loop0", 7, 0).with_owner(0, 6));
    v.push(Entry::block_dev("corpus/dev/nvme0n1p1", 259, 65_536));
    v.push(Entry::fifo("corpus/dev/fifo").with_mode(0o600));

    // Whiteouts and an opaque directory.
    v.push(Entry::dir("corpus/whiteouts"));
    v.push(Entry::whiteout("corpus/whiteouts", "deleted-file"));
    v.push(Entry::whiteout("corpus/whiteouts", "deleted-dir"));
    v.push(Entry::dir("corpus/whiteouts/opaque"));
    v.push(Entry::opaque("corpus/whiteouts/opaque"));
    v.push(Entry::file(
        "corpus/whiteouts/opaque/new-file",
        b"new".to_vec(),
    ));

    // Long names: a 200-byte component (> 100), a path > 255 made of components <= 255 bytes,
    // and link targets > 100 bytes.
    v.push(Entry::dir("corpus/long"));
    let comp200 = format!("n{}", "a".repeat(199));
    let long_file = format!("corpus/long/{comp200}");
    v.push(Entry::file(long_file.clone(), b"long name\n".to_vec()));
    let d1 = format!("corpus/long/{}", "d".repeat(120));
    let d2 = format!("{d1}/{}", "e".repeat(120));
    let very_long_file = format!("{d2}/{}", "f".repeat(150));
    assert!(very_long_file.len() > 255 && comp200.len() > 100);
    v.push(Entry::dir(d1.clone()));
    v.push(Entry::dir(d2.clone()));
    v.push(Entry::file(
        very_long_file.clone(),
        b"very long name\n".to_vec(),
    ));
    let long_target = format!(
        "{}/{}/{}",
        "d".repeat(120),
        "e".repeat(120),
        "f".repeat(150)
    );
    v.push(Entry::symlink(
        "corpus/long/symlink-long-target",
        long_target,
    ));
    v.push(Entry::symlink(
        format!("{d2}/symlink-{}", "s".repeat(100)),
        "../../".to_string() + &comp200,
    ));
    v.push(Entry::hardlink(
        "corpus/long/hardlink-long-target",
        very_long_file.clone(),
    ));
    v.push(Entry::hardlink(
        format!("{d1}/hardlink-{}", "h".repeat(100)),
        long_file,
    ));

    // Extended attributes.
    v.push(Entry::dir("corpus/xattrs").with_xattr("user.dir", b"on a directory".to_vec()));
    v.push(
        Entry::file("corpus/xattrs/user", b"xattrs".to_vec())
            .with_xattr("user.comment", b"hello".to_vec())
            .with_xattr("user.empty", Vec::new())
            // Every byte value but '\n': tar 0.4's PAX reader splits records at newlines and
            // rejects values containing one (GNU tar and Go's archive/tar accept them).
            .with_xattr(
                "user.binary",
                (0u8..=255).filter(|b| *b != b'\n').collect::<Vec<u8>>(),
            )
            .with_xattr("user.equals", b"a=b c=d".to_vec()),
    );
    // VFS_CAP_REVISION_2 | VFS_CAP_FLAGS_EFFECTIVE, permitted = CAP_NET_BIND_SERVICE (bit 10).
    let cap: Vec<u8> = [0x0200_0001u32, 1 << 10, 0, 0, 0]
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect();
    v.push(
        Entry::executable("corpus/xattrs/capability", b"\x7fELF-ish".to_vec())
            .with_xattr("security.capability", cap),
    );
    v.push(Entry::hardlink(
        "corpus/xattrs/hard-to-capability",
        "corpus/xattrs/capability",
    ));

    // Unicode names.
    v.push(Entry::dir("corpus/unicode"));
    v.push(Entry::file(
        "corpus/unicode/héllo wörld.txt",
        b"latin\n".to_vec(),
    ));
    v.push(Entry::dir("corpus/unicode/日本語"));
    v.push(Entry::file(
        "corpus/unicode/日本語/ファイル名.txt",
        b"cjk\n".to_vec(),
    ));
    v.push(Entry::file(
        "corpus/unicode/emoji-🦀-🚀.txt",
        b"emoji\n".to_vec(),
    ));
    v.push(Entry::file("corpus/unicode/caf\u{e9}", b"nfc\n".to_vec()));
    v.push(Entry::file("corpus/unicode/cafe\u{301}", b"nfd\n".to_vec()));
    v.push(Entry::file(
        "corpus/unicode/name with spaces & 'quotes' $dollar (parens) [brackets].txt",
        b"shell\n".to_vec(),
    ));
    // 2-byte characters straddling the 100-byte boundary.
    v.push(Entry::file(
        format!("corpus/unicode/{}", "é".repeat(60)),
        b"long unicode\n".to_vec(),
    ));

    // Many tiny files in one directory.
    v.push(Entry::dir("corpus/many"));
    for i in 0..2000 {
        v.push(Entry::file(
            format!("corpus/many/f{i:04}"),
            format!("{i}\n").into_bytes(),
        ));
    }
    v
}

/// `len` bytes, mostly zeros, with pseudo-random data blocks at the start, at an unaligned
/// offset, in the middle and at the end.
fn sparse_ish(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    let mut rng = XorShift64::new(64);
    for (off, n) in [
        (0usize, 4096usize),
        ((1 << 20) + 123, 1000),
        (len / 2, 65_536),
        (len - 4096, 4096),
    ] {
        rng.fill(&mut v[off..off + n]);
    }
    v
}
