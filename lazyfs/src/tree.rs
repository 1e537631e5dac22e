//! The inode tree of one layer: [`arbor_format::tree::LayerTree`] with FUSE's types.

use std::ffi::{OsStr, OsString};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::abi::{Attr, FileType};
use arbor_format::index::LayerIndex;
use arbor_format::tarstream::Timestamp;
use arbor_format::tree::{LayerTree, NodeKind};

pub use arbor_format::tree::{OPAQUE_XATTR, ROOT};

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
    /// Where this inode is in its parent's `children` (a hard link: its first name there).
    pub pos: u32,
    /// Positions in `children` of the files with content (a TOC entry), ascending: what a
    /// reader going through the directory in order reads ([`crate::push`]).
    pub files: Vec<u32>,
}

impl Node {
    /// The attributes the kernel sees for inode `ino`.
    pub fn attr(&self, ino: u64) -> Attr {
        Attr {
            ino,
            size: self.size,
            mtime: self.mtime,
            kind: self.kind,
            perm: self.perm,
            nlink: self.nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: self.rdev,
        }
    }
}

/// The whole tree; inode `n` is `nodes[n - 1]`.
#[derive(Debug, Clone)]
pub struct Tree {
    pub nodes: Vec<Node>,
    /// Sum of regular file sizes (for statfs).
    pub total_size: u64,
    /// Whether any inode has an extended attribute (an opaque directory's marker included).
    pub has_xattrs: bool,
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

impl Tree {
    /// Builds the tree of a validated layer index (later entries win, as in tar): the
    /// FUSE view of [`LayerTree::build`], which keeps it a tree whatever the index holds
    /// (no recursion, no second name for a directory, no empty or dot names).
    pub fn build(index: &LayerIndex) -> Tree {
        let now = SystemTime::now();
        let LayerTree { nodes, total_size } = LayerTree::build(index);
        let mut nodes = nodes
            .into_iter()
            .map(|n| Node {
                kind: match n.kind {
                    NodeKind::Dir => FileType::Directory,
                    NodeKind::Regular => FileType::RegularFile,
                    NodeKind::Symlink => FileType::Symlink,
                    NodeKind::Char => FileType::CharDevice,
                    NodeKind::Block => FileType::BlockDevice,
                    NodeKind::Fifo => FileType::NamedPipe,
                },
                perm: (n.mode & 0o7777) as u16,
                uid: n.uid,
                gid: n.gid,
                // A directory the layer does not list but needs: dated the mount time, as
                // an unpacker would date the directory it creates.
                mtime: n.mtime.map_or(now, time),
                size: n.size,
                rdev: encode_dev(n.dev_major, n.dev_minor),
                nlink: n.nlink,
                entry: n.entry,
                link: n.link.map(OsString::from),
                xattrs: n
                    .xattrs
                    .into_iter()
                    .map(|(k, v)| (OsString::from(k), v))
                    .collect(),
                children: n
                    .children
                    .into_iter()
                    .map(|(name, ino)| (OsString::from(name), ino))
                    .collect(),
                parent: n.parent,
                pos: 0,
                files: Vec::new(),
            })
            .collect::<Vec<Node>>();
        // Each inode's place under its parent (a hard link: its first name there), and each
        // directory's files with content.
        let mut placed = vec![false; nodes.len()];
        for p in 0..nodes.len() {
            let parent = (p + 1) as u64;
            let kids: Vec<usize> = nodes[p]
                .children
                .iter()
                .map(|&(_, c)| (c as usize).wrapping_sub(1))
                .collect();
            let mut files = Vec::new();
            for (i, c) in kids.into_iter().enumerate() {
                let Some(child) = nodes.get_mut(c) else {
                    continue;
                };
                if child.entry.is_some() {
                    files.push(i as u32);
                }
                if child.parent == parent && !placed[c] {
                    placed[c] = true;
                    child.pos = i as u32;
                }
            }
            nodes[p].files = files;
        }
        let has_xattrs = nodes.iter().any(|n| !n.xattrs.is_empty());
        Tree {
            nodes,
            total_size,
            has_xattrs,
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

#[cfg(test)]
mod tests {
    use arbor_format::index::IndexEntry;
    use arbor_format::tarstream::EntryKind;

    use super::*;

    fn raw(kind: EntryKind, name: &str, link: &str) -> IndexEntry {
        IndexEntry::bare(kind, name, link)
    }

    fn build(entries: Vec<IndexEntry>) -> Tree {
        Tree::build(&LayerIndex {
            entries,
            data_end: 0,
            arbor: None,
        })
    }

    fn names(t: &Tree, ino: u64) -> Vec<String> {
        t.get(ino)
            .unwrap()
            .children
            .iter()
            .map(|(n, _)| n.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn deep_path_tree_does_not_overflow_the_stack() {
        // 20 000 components (an index built by hand: the reader refuses more than 512), built
        // on a 256 KiB stack. The old builder recursed once per component and kept every
        // prefix of the path as a key (O(depth²) memory).
        let deep = vec!["a"; 20_000].join("/");
        std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(move || {
                let t = build(vec![raw(EntryKind::Regular, &format!("{deep}/f"), "")]);
                assert_eq!(t.nodes.len(), 20_002);
                let mut cur = ROOT;
                for _ in 0..20_000 {
                    let next = t.lookup(cur, OsStr::new("a")).unwrap();
                    assert_eq!(t.get(next).unwrap().parent, cur);
                    assert_eq!(t.get(next).unwrap().kind, FileType::Directory);
                    cur = next;
                }
                assert!(t.lookup(cur, OsStr::new("f")).is_some());
            })
            .unwrap()
            .join()
            .expect("building a deep tree overflowed or panicked");
    }

    #[test]
    fn hard_link_to_directory_is_refused() {
        let t = build(vec![
            raw(EntryKind::Dir, "d", ""),
            raw(EntryKind::HardLink, "d/loop", "d"),
            raw(EntryKind::HardLink, "up", "."),
            raw(EntryKind::Regular, "f", ""),
            raw(EntryKind::HardLink, "d/f2", "f"),
        ]);
        assert_eq!(names(&t, ROOT), ["d", "f"]);
        let d = t.lookup(ROOT, OsStr::new("d")).unwrap();
        assert_eq!(names(&t, d), ["f2"]);
        assert_eq!(t.get(d).unwrap().nlink, 2);
        assert_eq!(t.get(ROOT).unwrap().nlink, 3);
        let f = t.lookup(ROOT, OsStr::new("f")).unwrap();
        assert_eq!(t.lookup(d, OsStr::new("f2")), Some(f));
        assert_eq!(t.get(f).unwrap().nlink, 2);
    }

    #[test]
    fn empty_whiteout_is_ignored() {
        let t = build(vec![
            raw(EntryKind::Regular, ".wh.", ""),
            raw(EntryKind::Regular, ".wh..", ""),
            raw(EntryKind::Regular, "d/.wh...", ""),
            raw(EntryKind::Regular, "d/.wh.x", ""),
        ]);
        assert_eq!(names(&t, ROOT), ["d"]);
        let d = t.lookup(ROOT, OsStr::new("d")).unwrap();
        assert_eq!(names(&t, d), ["x"]);
        let x = t.get(t.lookup(d, OsStr::new("x")).unwrap()).unwrap();
        assert_eq!((x.kind, x.rdev, x.perm), (FileType::CharDevice, 0, 0));
    }

    #[test]
    fn file_then_child_keeps_a_tree() {
        let t = build(vec![
            raw(EntryKind::Regular, "a", ""),
            raw(EntryKind::Regular, "a/b", ""),
            raw(EntryKind::Symlink, "s", "/etc"),
            raw(EntryKind::Regular, "s/passwd", ""),
        ]);
        for name in ["a", "s"] {
            let ino = t.lookup(ROOT, OsStr::new(name)).unwrap();
            let n = t.get(ino).unwrap();
            assert_eq!((n.kind, n.parent), (FileType::Directory, ROOT));
            assert_eq!(n.children.len(), 1);
        }
    }
}
