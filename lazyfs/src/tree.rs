//! The inode tree of one layer.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arbor_format::index::LayerIndex;
use arbor_format::tarstream::{EntryKind, Timestamp};
use fuser::{FileAttr, FileType, INodeNo};

/// Inode number of the root directory.
pub const ROOT: u64 = 1;
/// The xattr overlayfs reads to see that a directory hides lower layers.
pub const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// One inode.
#[derive(Debug, Clone)]
pub struct Node {
    pub kind: FileType,
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub mtime: SystemTime,
    pub size: u64,
    pub rdev: u32,
    pub nlink: u32,
    /// Index of the TOC entry holding this file's content (regular files).
    pub entry: Option<usize>,
    /// Symlink target.
    pub link: Option<OsString>,
    pub xattrs: Vec<(OsString, Vec<u8>)>,
    /// Directory entries, sorted by name.
    pub children: Vec<(OsString, u64)>,
    pub parent: u64,
}

impl Node {
    /// A directory the layer does not list but needs (a parent of an entry): 0755, root's,
    /// dated `mtime` (the mount time, as an unpacker would date the directory it creates).
    fn dir(parent: u64, mtime: SystemTime) -> Node {
        Node {
            kind: FileType::Directory,
            perm: 0o755,
            uid: 0,
            gid: 0,
            mtime,
            size: 0,
            rdev: 0,
            nlink: 2,
            entry: None,
            link: None,
            xattrs: Vec::new(),
            children: Vec::new(),
            parent,
        }
    }

    /// The attributes the kernel sees for inode `ino`.
    pub fn attr(&self, ino: u64) -> FileAttr {
        FileAttr {
            ino: INodeNo(ino),
            size: self.size,
            blocks: self.size.div_ceil(512),
            atime: self.mtime,
            mtime: self.mtime,
            ctime: self.mtime,
            crtime: self.mtime,
            kind: self.kind,
            perm: self.perm,
            nlink: self.nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: self.rdev,
            blksize: 4096,
            flags: 0,
        }
    }
}

/// The whole tree; inode `n` is `nodes[n - 1]`.
#[derive(Debug, Clone)]
pub struct Tree {
    pub nodes: Vec<Node>,
    /// Sum of regular file sizes (for statfs).
    pub total_size: u64,
}

fn time(t: Timestamp) -> SystemTime {
    if t.secs >= 0 {
        UNIX_EPOCH + Duration::new(t.secs as u64, t.nanos)
    } else {
        UNIX_EPOCH - Duration::from_secs(t.secs.unsigned_abs())
            + Duration::from_nanos(t.nanos as u64)
    }
}

/// The kernel's 32-bit device number encoding (`new_encode_dev`).
pub fn encode_dev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

struct Builder {
    nodes: Vec<Node>,
    now: SystemTime,
    /// Children while building: dir ino -> name -> ino.
    children: HashMap<u64, HashMap<OsString, u64>>,
    paths: HashMap<String, u64>,
}

impl Builder {
    fn add(&mut self, node: Node) -> u64 {
        self.nodes.push(node);
        self.nodes.len() as u64
    }

    fn node(&mut self, ino: u64) -> &mut Node {
        &mut self.nodes[ino as usize - 1]
    }

    /// The directory at `path`, created (with default attributes) if missing.
    fn ensure_dir(&mut self, path: &str) -> u64 {
        if path == "." {
            return ROOT;
        }
        if let Some(&ino) = self.paths.get(path)
            && self.nodes[ino as usize - 1].kind == FileType::Directory
        {
            return ino;
        }
        let (parent_path, base) = path.rsplit_once('/').unwrap_or((".", path));
        let parent = self.ensure_dir(parent_path);
        let ino = self.add(Node::dir(parent, self.now));
        self.link(parent, base, ino);
        self.paths.insert(path.to_string(), ino);
        ino
    }

    /// Points `parent/name` at `ino`, unlinking what it named before.
    fn link(&mut self, parent: u64, name: &str, ino: u64) {
        let old = self
            .children
            .entry(parent)
            .or_default()
            .insert(OsString::from(name), ino);
        if let Some(old) = old
            && old != ino
        {
            let n = self.node(old);
            n.nlink = n.nlink.saturating_sub(1);
        }
    }
}

impl Tree {
    /// Builds the tree of a validated layer index (later entries win, as in tar).
    pub fn build(index: &LayerIndex) -> Tree {
        let now = SystemTime::now();
        let mut b = Builder {
            nodes: vec![Node::dir(ROOT, now)],
            now,
            children: HashMap::new(),
            paths: HashMap::from([(".".to_string(), ROOT)]),
        };
        let mut total_size = 0;
        for (i, e) in index.entries.iter().enumerate() {
            let mut node = Node {
                kind: match e.kind {
                    EntryKind::Regular => FileType::RegularFile,
                    EntryKind::Dir => FileType::Directory,
                    EntryKind::Symlink => FileType::Symlink,
                    EntryKind::HardLink => FileType::RegularFile,
                    EntryKind::Char => FileType::CharDevice,
                    EntryKind::Block => FileType::BlockDevice,
                    EntryKind::Fifo => FileType::NamedPipe,
                },
                perm: (e.mode & 0o7777) as u16,
                uid: e.uid as u32,
                gid: e.gid as u32,
                mtime: time(e.mtime),
                // A symlink's size is the length of its target, as lstat reports it.
                size: if e.kind == EntryKind::Symlink {
                    e.link_name.len() as u64
                } else {
                    e.size
                },
                rdev: encode_dev(e.dev_major, e.dev_minor),
                nlink: 1,
                entry: (e.kind == EntryKind::Regular && e.size > 0).then_some(i),
                link: (e.kind == EntryKind::Symlink)
                    .then(|| OsStr::from_bytes(e.link_name.as_bytes()).to_owned()),
                xattrs: e
                    .xattrs
                    .iter()
                    .map(|(k, v)| (OsString::from(k), v.clone()))
                    .collect(),
                children: Vec::new(),
                parent: ROOT,
            };
            if e.name == "." {
                let root = b.node(ROOT);
                root.perm = node.perm;
                root.uid = node.uid;
                root.gid = node.gid;
                root.mtime = node.mtime;
                root.xattrs = node.xattrs;
                continue;
            }
            let (parent_path, base) = e.name.rsplit_once('/').unwrap_or((".", e.name.as_str()));
            let parent = b.ensure_dir(parent_path);
            if base == ".wh..wh..opq" {
                let p = b.node(parent);
                p.xattrs.retain(|(k, _)| k != OPAQUE_XATTR);
                p.xattrs.push((OsString::from(OPAQUE_XATTR), b"y".to_vec()));
                continue;
            }
            if let Some(hidden) = base.strip_prefix(".wh.") {
                // What overlayfs reads as "deleted in this layer": a 0/0 character device.
                node.kind = FileType::CharDevice;
                node.perm = 0;
                node.rdev = 0;
                node.size = 0;
                node.entry = None;
                node.parent = parent;
                let ino = b.add(node);
                b.link(parent, hidden, ino);
                let path = if parent_path == "." {
                    hidden.to_string()
                } else {
                    format!("{parent_path}/{hidden}")
                };
                b.paths.insert(path, ino);
                continue;
            }
            if e.kind == EntryKind::HardLink {
                let Some(&target) = b.paths.get(&e.link_name) else {
                    continue; // validated away by the index; nothing sensible to link
                };
                // As containerd and Docker unpack a hard link: the link entry's own header
                // (mode, owner, times, xattrs) is applied to the shared inode, and the chown
                // this implies drops file capabilities.
                let t = b.node(target);
                t.nlink += 1;
                t.perm = node.perm;
                t.uid = node.uid;
                t.gid = node.gid;
                t.mtime = node.mtime;
                t.xattrs.retain(|(k, _)| k != "security.capability");
                for (k, v) in node.xattrs {
                    t.xattrs.retain(|(old, _)| *old != k);
                    t.xattrs.push((k, v));
                }
                b.link(parent, base, target);
                b.paths.insert(e.name.clone(), target);
                continue;
            }
            if e.kind == EntryKind::Dir
                && let Some(&existing) = b.paths.get(&e.name)
                && b.nodes[existing as usize - 1].kind == FileType::Directory
            {
                let d = b.node(existing);
                d.perm = node.perm;
                d.uid = node.uid;
                d.gid = node.gid;
                d.mtime = node.mtime;
                let opaque: Vec<_> = d
                    .xattrs
                    .iter()
                    .filter(|(k, _)| k == OPAQUE_XATTR)
                    .cloned()
                    .collect();
                d.xattrs = node.xattrs;
                d.xattrs.extend(opaque);
                continue;
            }
            node.parent = parent;
            let ino = b.add(node);
            b.link(parent, base, ino);
            b.paths.insert(e.name.clone(), ino);
        }
        // Freeze: sorted children, directory link counts, file sizes.
        let children = std::mem::take(&mut b.children);
        for (dir, kids) in children {
            let mut list: Vec<(OsString, u64)> = kids.into_iter().collect();
            list.sort();
            let subdirs = list
                .iter()
                .filter(|(_, ino)| b.nodes[*ino as usize - 1].kind == FileType::Directory)
                .count() as u32;
            let d = b.node(dir);
            d.children = list;
            d.nlink = 2 + subdirs;
        }
        for n in &b.nodes {
            if n.kind == FileType::RegularFile {
                total_size += n.size;
            }
        }
        Tree {
            nodes: b.nodes,
            total_size,
        }
    }

    pub fn get(&self, ino: u64) -> Option<&Node> {
        self.nodes.get((ino as usize).checked_sub(1)?)
    }

    pub fn lookup(&self, parent: u64, name: &OsStr) -> Option<u64> {
        let p = self.get(parent)?;
        p.children
            .binary_search_by(|(n, _)| n.as_os_str().cmp(name))
            .ok()
            .map(|i| p.children[i].1)
    }
}
