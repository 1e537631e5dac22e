//! Models of directory trees as the kernel shows them (for comparing mounts).

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sha2::Digest as _;

/// What `lstat`, `readlink`, `read` and `getxattr` show of one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub kind: char,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub size: u64,
    pub rdev: u64,
    pub content: Option<String>,
    pub link: Option<String>,
    pub xattrs: BTreeMap<String, Vec<u8>>,
}

pub fn xattrs(p: &Path) -> BTreeMap<String, Vec<u8>> {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    let mut names = vec![0u8; 65536];
    // SAFETY: valid path and buffer.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    let mut out = BTreeMap::new();
    if n <= 0 {
        return out;
    }
    for name in names[..n as usize]
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
    {
        let cn = CString::new(name).unwrap();
        let mut v = vec![0u8; 65536];
        // SAFETY: valid path, name and buffer.
        let m = unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        if m >= 0 {
            v.truncate(m as usize);
            out.insert(String::from_utf8_lossy(name).into_owned(), v);
        }
    }
    out
}

/// `Meta` of one path. A name that readdir lists but lstat cannot find (overlayfs shows
/// whiteouts that way in directories that exist in one layer only) gets kind `'x'`.
pub fn meta(p: &Path, with_content: bool) -> Meta {
    let m = match std::fs::symlink_metadata(p) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Meta {
                kind: 'x',
                mode: 0,
                uid: 0,
                gid: 0,
                mtime: 0,
                size: 0,
                rdev: 0,
                content: None,
                link: None,
                xattrs: BTreeMap::new(),
            };
        }
        Err(e) => panic!("lstat {}: {e}", p.display()),
    };
    let ft = m.file_type();
    use std::os::unix::fs::FileTypeExt;
    let kind = if ft.is_dir() {
        'd'
    } else if ft.is_symlink() {
        'l'
    } else if ft.is_char_device() {
        'c'
    } else if ft.is_block_device() {
        'b'
    } else if ft.is_fifo() {
        'p'
    } else {
        'f'
    };
    let content = (kind == 'f' && with_content).then(|| {
        let data = std::fs::read(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
        hex::encode(sha2::Sha256::digest(&data))
    });
    Meta {
        kind,
        mode: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        mtime: m.mtime(),
        size: if kind == 'd' { 0 } else { m.size() },
        rdev: m.rdev(),
        content,
        link: (kind == 'l').then(|| {
            std::fs::read_link(p)
                .unwrap()
                .to_string_lossy()
                .into_owned()
        }),
        xattrs: xattrs(p),
    }
}

/// Every path below `root` (relative) with its [`Meta`].
pub fn walk(root: &Path, with_content: bool) -> BTreeMap<String, Meta> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let r = rel.join(e.file_name());
            let m = meta(&root.join(&r), with_content);
            if m.kind == 'd' {
                stack.push(r.clone());
            }
            out.insert(r.to_string_lossy().into_owned(), m);
        }
    }
    out
}

pub fn sha(data: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(data))
}
