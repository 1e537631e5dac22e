//! The directory tree a validated layer index describes, as an unpacker would leave it: later
//! entries win (as in tar), hard links share an inode, whiteouts (`.wh.NAME`) become the 0/0
//! character devices overlayfs reads as "deleted in this layer", opaque markers
//! (`.wh..wh..opq`) mark their directory with [`OPAQUE_XATTR`].
//!
//! The lazy filesystem (`arbor-lazyfs`) serves this tree; it lives here, without FUSE types,
//! so it can be tested and fuzzed next to the validation it relies on. Whatever the index
//! holds, the result is a tree:
//! - it is built without recursion, walking each name's components from the root, with the
//!   edges keyed by (parent inode, component), so neither the stack nor memory grows with the
//!   square of a path's depth;
//! - a directory has exactly one parent: a hard link to a directory (or the root) is ignored
//!   (the index refuses it already), and a path that runs through a non-directory (file `a`,
//!   then `a/b`; or a symlink `a`) replaces it with a directory, as unpacking `a/b` after
//!   removing `a` would. Symlinks are never followed;
//! - every name is one non-empty component without `/` or NUL that is not `.` or `..`: a
//!   whiteout that would hide an empty or dot name (`.wh.`, `.wh..`, `.wh...`) is ignored;
//! - only what the root reaches is kept, numbered breadth-first from [`ROOT`] in name order;
//!   link counts are the number of names of each inode (directories: 2 + subdirectories).

use std::collections::{HashMap, VecDeque};

use crate::index::LayerIndex;
use crate::tarstream::{EntryKind, Timestamp};

/// Inode number of the root directory.
pub const ROOT: u64 = 1;
/// The xattr overlayfs reads to see that a directory hides lower layers.
pub const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
/// The name of an opaque marker.
pub const OPAQUE_MARKER: &str = ".wh..wh..opq";
/// The prefix of a whiteout's name.
pub const WHITEOUT_PREFIX: &str = ".wh.";

/// What an inode is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    Dir,
    Regular,
    Symlink,
    Char,
    Block,
    Fifo,
}

/// One inode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeNode {
    pub kind: NodeKind,
    /// Permission bits incl. setuid/setgid/sticky.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// `None` for a directory the layer does not list but needs (a parent of an entry).
    pub mtime: Option<Timestamp>,
    /// Content length (regular files) or target length (symlinks).
    pub size: u64,
    pub dev_major: u32,
    pub dev_minor: u32,
    /// Number of names (directories: 2 + subdirectories).
    pub nlink: u32,
    /// Index of the entry holding the content (regular files with content).
    pub entry: Option<usize>,
    /// Symlink target.
    pub link: Option<String>,
    pub xattrs: Vec<(String, Vec<u8>)>,
    /// Directory entries, sorted by name (bytewise), no duplicates.
    pub children: Vec<(String, u64)>,
    /// The directory holding it (for the root, the root; for a file with several names, the
    /// directory of the first name in breadth-first order).
    pub parent: u64,
}

impl TreeNode {
    fn implied_dir() -> TreeNode {
        TreeNode {
            kind: NodeKind::Dir,
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: None,
            size: 0,
            dev_major: 0,
            dev_minor: 0,
            nlink: 2,
            entry: None,
            link: None,
            xattrs: Vec::new(),
            children: Vec::new(),
            parent: ROOT,
        }
    }
}

/// A layer's tree; inode `n` is `nodes[n - 1]`.
#[derive(Debug, Clone)]
pub struct LayerTree {
    pub nodes: Vec<TreeNode>,
    /// Sum of the sizes of the regular files (each inode once).
    pub total_size: u64,
}

/// Whether `c` may be a name in a directory.
fn valid_component(c: &str) -> bool {
    !c.is_empty() && c != "." && c != ".." && !c.contains(['/', '\0'])
}

/// The components of a normalized name, or `None` when it is not one (an index built by
/// hand may hold anything; validated ones never do). The root (`.`) has none.
fn components(name: &str) -> Option<Vec<&str>> {
    if name == "." {
        return Some(Vec::new());
    }
    let parts: Vec<&str> = name.split('/').collect();
    parts.iter().all(|c| valid_component(c)).then_some(parts)
}

struct Builder {
    /// While building, numbered in creation order; renumbered by [`Builder::finish`].
    nodes: Vec<TreeNode>,
    /// Edges: directory -> name -> inode.
    children: HashMap<u64, HashMap<String, u64>>,
}

impl Builder {
    fn node(&mut self, ino: u64) -> &mut TreeNode {
        &mut self.nodes[ino as usize - 1]
    }

    fn is_dir(&self, ino: u64) -> bool {
        self.nodes[ino as usize - 1].kind == NodeKind::Dir
    }

    fn add(&mut self, node: TreeNode) -> u64 {
        self.nodes.push(node);
        self.nodes.len() as u64
    }

    fn child(&self, dir: u64, name: &str) -> Option<u64> {
        self.children.get(&dir)?.get(name).copied()
    }

    /// Points `dir/name` at `ino`, replacing what it named.
    fn link(&mut self, dir: u64, name: &str, ino: u64) {
        self.children
            .entry(dir)
            .or_default()
            .insert(name.to_string(), ino);
    }

    /// The directory reached by `parts` from the root, creating missing ones and replacing
    /// non-directories on the way. Iterative: a path's depth never reaches the stack.
    fn ensure_dir(&mut self, parts: &[&str]) -> u64 {
        let mut cur = ROOT;
        for &comp in parts {
            cur = match self.child(cur, comp) {
                Some(ino) if self.is_dir(ino) => ino,
                _ => {
                    let ino = self.add(TreeNode::implied_dir());
                    self.link(cur, comp, ino);
                    ino
                }
            };
        }
        cur
    }

    /// What `parts` names now, without creating anything or following symlinks.
    fn resolve(&self, parts: &[&str]) -> Option<u64> {
        let mut cur = ROOT;
        for &comp in parts {
            if !self.is_dir(cur) {
                return None;
            }
            cur = self.child(cur, comp)?;
        }
        Some(cur)
    }

    /// Keeps what the root reaches, numbered breadth-first in name order, and sets the
    /// children lists, parents and link counts.
    fn finish(mut self) -> LayerTree {
        let old_count = self.nodes.len();
        // Old inode -> new inode (0: not reached yet).
        let mut new_ino = vec![0u64; old_count + 1];
        let mut order: Vec<u64> = Vec::new(); // old inodes, in new order
        let mut names: Vec<u32> = vec![0; old_count + 1]; // names per old inode
        let mut first_parent: Vec<u64> = vec![0; old_count + 1]; // old inode of the first parent
        let mut queue = VecDeque::from([ROOT]);
        new_ino[ROOT as usize] = ROOT;
        order.push(ROOT);
        first_parent[ROOT as usize] = ROOT;
        // Old directory inode -> (its names, number of subdirectories).
        let mut lists: HashMap<u64, (Vec<(String, u64)>, u32)> = HashMap::new();
        while let Some(dir) = queue.pop_front() {
            let Some(kids) = self.children.remove(&dir) else {
                continue;
            };
            let mut kids: Vec<(String, u64)> = kids.into_iter().collect();
            kids.sort_unstable();
            let mut kept = Vec::with_capacity(kids.len());
            let mut subdirs = 0u32;
            for (name, ino) in kids {
                let i = ino as usize;
                if i == 0 || i > old_count {
                    continue;
                }
                let is_dir = self.nodes[i - 1].kind == NodeKind::Dir;
                if new_ino[i] == 0 {
                    order.push(ino);
                    new_ino[i] = order.len() as u64;
                    first_parent[i] = dir;
                    if is_dir {
                        queue.push_back(ino);
                    }
                } else if is_dir {
                    // A second name for a directory (or the root): never built by the
                    // builder, refused here all the same so the result stays a tree.
                    continue;
                }
                names[i] = names[i].saturating_add(1);
                subdirs = subdirs.saturating_add(u32::from(is_dir));
                kept.push((name, ino));
            }
            lists.insert(dir, (kept, subdirs));
        }
        let mut old_nodes: Vec<Option<TreeNode>> = self.nodes.into_iter().map(Some).collect();
        let mut nodes = Vec::with_capacity(order.len());
        let mut total_size = 0u64;
        for &old in &order {
            let i = old as usize;
            let Some(mut n) = old_nodes[i - 1].take() else {
                continue;
            };
            n.parent = new_ino[first_parent[i] as usize];
            let (kids, subdirs) = lists.remove(&old).unwrap_or_default();
            n.children = kids
                .into_iter()
                .map(|(name, ino)| (name, new_ino[ino as usize]))
                .collect();
            if n.kind == NodeKind::Dir {
                n.nlink = subdirs.saturating_add(2);
            } else {
                n.nlink = names[i];
                if n.kind == NodeKind::Regular {
                    total_size = total_size.saturating_add(n.size);
                }
            }
            nodes.push(n);
        }
        LayerTree { nodes, total_size }
    }
}

impl LayerTree {
    /// Builds the tree of a layer index (later entries win, as in tar); see the module docs.
    pub fn build(index: &LayerIndex) -> LayerTree {
        let mut b = Builder {
            nodes: vec![TreeNode::implied_dir()],
            children: HashMap::new(),
        };
        for (i, e) in index.entries.iter().enumerate() {
            let Some(parts) = components(&e.name) else {
                continue;
            };
            let mut node = TreeNode {
                kind: match e.kind {
                    EntryKind::Regular | EntryKind::HardLink => NodeKind::Regular,
                    EntryKind::Dir => NodeKind::Dir,
                    EntryKind::Symlink => NodeKind::Symlink,
                    EntryKind::Char => NodeKind::Char,
                    EntryKind::Block => NodeKind::Block,
                    EntryKind::Fifo => NodeKind::Fifo,
                },
                mode: e.mode & 0o7777,
                uid: e.uid as u32,
                gid: e.gid as u32,
                mtime: Some(e.mtime),
                // A symlink's size is the length of its target, as lstat reports it.
                size: match e.kind {
                    EntryKind::Symlink => e.link_name.len() as u64,
                    EntryKind::Regular => e.size,
                    _ => 0,
                },
                dev_major: e.dev_major,
                dev_minor: e.dev_minor,
                nlink: 1,
                entry: (e.kind == EntryKind::Regular && e.size > 0).then_some(i),
                link: (e.kind == EntryKind::Symlink).then(|| e.link_name.clone()),
                xattrs: e
                    .xattrs
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                children: Vec::new(),
                parent: ROOT,
            };
            let Some((&base, dir_parts)) = parts.split_last() else {
                // The root's own entry: its metadata only.
                let root = b.node(ROOT);
                root.mode = node.mode;
                root.uid = node.uid;
                root.gid = node.gid;
                root.mtime = node.mtime;
                let opaque = take_opaque(&mut root.xattrs);
                root.xattrs = node.xattrs;
                root.xattrs.extend(opaque);
                continue;
            };
            let parent = b.ensure_dir(dir_parts);
            if base == OPAQUE_MARKER {
                let p = b.node(parent);
                p.xattrs.retain(|(k, _)| k != OPAQUE_XATTR);
                p.xattrs.push((OPAQUE_XATTR.to_string(), b"y".to_vec()));
                continue;
            }
            if let Some(hidden) = base.strip_prefix(WHITEOUT_PREFIX) {
                if !valid_component(hidden) {
                    continue; // `.wh.`, `.wh..`, `.wh...`: nothing that can be hidden
                }
                // What overlayfs reads as "deleted in this layer": a 0/0 character device.
                node.kind = NodeKind::Char;
                node.mode = 0;
                node.dev_major = 0;
                node.dev_minor = 0;
                node.size = 0;
                node.entry = None;
                node.link = None;
                let ino = b.add(node);
                b.link(parent, hidden, ino);
                continue;
            }
            if e.kind == EntryKind::HardLink {
                let Some(target) = components(&e.link_name).and_then(|t| b.resolve(&t)) else {
                    continue; // validated away by the index; nothing sensible to link
                };
                if b.is_dir(target) {
                    continue; // never a second name for a directory (the index refuses it)
                }
                // As containerd and Docker unpack a hard link: the link entry's own header
                // (mode, owner, times, xattrs) is applied to the shared inode, and the chown
                // this implies drops file capabilities.
                let t = b.node(target);
                t.mode = node.mode;
                t.uid = node.uid;
                t.gid = node.gid;
                t.mtime = node.mtime;
                t.xattrs.retain(|(k, _)| k != "security.capability");
                for (k, v) in node.xattrs {
                    t.xattrs.retain(|(old, _)| *old != k);
                    t.xattrs.push((k, v));
                }
                b.link(parent, base, target);
                continue;
            }
            if e.kind == EntryKind::Dir
                && let Some(existing) = b.child(parent, base)
                && b.is_dir(existing)
            {
                let d = b.node(existing);
                d.mode = node.mode;
                d.uid = node.uid;
                d.gid = node.gid;
                d.mtime = node.mtime;
                let opaque = take_opaque(&mut d.xattrs);
                d.xattrs = node.xattrs;
                d.xattrs.extend(opaque);
                continue;
            }
            let ino = b.add(node);
            b.link(parent, base, ino);
        }
        b.finish()
    }

    pub fn get(&self, ino: u64) -> Option<&TreeNode> {
        self.nodes.get((ino as usize).checked_sub(1)?)
    }

    pub fn lookup(&self, parent: u64, name: &str) -> Option<u64> {
        let p = self.get(parent)?;
        p.children
            .binary_search_by(|(n, _)| n.as_str().cmp(name))
            .ok()
            .map(|i| p.children[i].1)
    }

    /// Checks the invariants the module docs promise, for tests and fuzzing: every node is
    /// reached from the root exactly once as a directory or by its `nlink` names, parents are
    /// right, names are single valid components, sorted and unique, directory link counts are
    /// 2 + subdirectories. Returns the first violation found.
    pub fn check(&self) -> Result<(), String> {
        let n = self.nodes.len();
        if n == 0 || self.nodes[0].kind != NodeKind::Dir {
            return Err("no root directory".into());
        }
        let mut seen_names = vec![0u32; n + 1];
        let mut dir_reached = vec![false; n + 1];
        dir_reached[ROOT as usize] = true;
        let mut queue = VecDeque::from([ROOT]);
        let mut total = 0u64;
        while let Some(dir) = queue.pop_front() {
            let d = &self.nodes[dir as usize - 1];
            if d.kind != NodeKind::Dir && !d.children.is_empty() {
                return Err(format!("non-directory {dir} has children"));
            }
            let mut subdirs = 0u32;
            for (k, (name, ino)) in d.children.iter().enumerate() {
                if !valid_component(name) {
                    return Err(format!("directory {dir} holds the name {name:?}"));
                }
                if k > 0 && d.children[k - 1].0 >= *name {
                    return Err(format!(
                        "directory {dir}: {name:?} out of order or repeated"
                    ));
                }
                if self.lookup(dir, name) != Some(*ino) {
                    return Err(format!("lookup of {name:?} in {dir} fails"));
                }
                let Some(c) = self.get(*ino) else {
                    return Err(format!("{name:?} in {dir} names a missing inode {ino}"));
                };
                let i = *ino as usize;
                if c.kind == NodeKind::Dir {
                    if dir_reached[i] {
                        return Err(format!("directory {ino} has two names (or is a cycle)"));
                    }
                    dir_reached[i] = true;
                    if c.parent != dir {
                        return Err(format!(
                            "directory {ino}'s parent is {}, not {dir}",
                            c.parent
                        ));
                    }
                    subdirs += 1;
                    queue.push_back(*ino);
                } else {
                    if !c.children.is_empty() {
                        return Err(format!("non-directory {ino} has children"));
                    }
                    if seen_names[i] == 0 && c.kind == NodeKind::Regular {
                        total = total.saturating_add(c.size);
                    }
                    seen_names[i] += 1;
                }
            }
            if d.kind == NodeKind::Dir && d.nlink != subdirs + 2 {
                return Err(format!(
                    "directory {dir} has nlink {} with {subdirs} subdirectories",
                    d.nlink
                ));
            }
        }
        for (k, c) in self.nodes.iter().enumerate() {
            let i = k + 1;
            if c.kind == NodeKind::Dir {
                if !dir_reached[i] {
                    return Err(format!("directory {i} is not reachable from the root"));
                }
            } else if seen_names[i] == 0 || seen_names[i] != c.nlink {
                return Err(format!(
                    "inode {i} has nlink {} but {} names",
                    c.nlink, seen_names[i]
                ));
            }
        }
        if self.nodes[0].parent != ROOT {
            return Err("the root's parent is not the root".into());
        }
        if total != self.total_size {
            return Err(format!(
                "total size {} but the files hold {total}",
                self.total_size
            ));
        }
        Ok(())
    }
}

fn take_opaque(xattrs: &mut Vec<(String, Vec<u8>)>) -> Vec<(String, Vec<u8>)> {
    let (opaque, rest) = std::mem::take(xattrs)
        .into_iter()
        .partition(|(k, _)| k == OPAQUE_XATTR);
    *xattrs = rest;
    opaque
}
