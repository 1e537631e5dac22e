//! The merged file tree of an image (its layers applied in order, OCI whiteouts honoured), with
//! what inference needs to know of each file: its kind and size, and, read from the layer as it
//! streams past, the imports of Python sources, the dependencies of ELF files, the `#!` line of
//! scripts and the text of the few small configuration files that say where things are looked
//! for (`.pth` files, `ld.so.conf`).
//!
//! The layers are untrusted: names that escape the root are skipped, reads are bounded, and a
//! file that cannot be parsed is kept as a plain file.

use std::collections::BTreeMap;
use std::io::Read;

use super::elf::{self, ElfDeps};
use super::python::{self, Import};

/// Python sources larger than this are not scanned for imports.
const MAX_PY: u64 = 4 << 20;
/// ELF files larger than this are not read for their dependencies.
const MAX_ELF: u64 = 512 << 20;
/// Text files (`.pth`, `ld.so.conf`) larger than this are not kept.
const MAX_TEXT: u64 = 64 << 10;
/// Longest `#!` line kept.
const MAX_SHEBANG: usize = 256;
/// Imports kept per Python source.
const MAX_IMPORTS_PER_FILE: usize = 4096;
/// Names (imports and extension modules' dotted names) kept per layer: what a hostile layer
/// can make the scan hold is bounded (about 100 MB at most), whatever its files say.
const MAX_NAMES_PER_LAYER: usize = 500_000;

/// What a file is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Symlink(String),
    Other,
}

/// One path of the merged tree.
#[derive(Debug, Clone)]
pub struct Node {
    pub kind: Kind,
    pub size: u64,
    pub mode: u32,
    /// The imports of a Python source.
    pub imports: Option<Vec<Import>>,
    /// The dependencies of an ELF file.
    pub elf: Option<ElfDeps>,
    /// A script's `#!` line, without `#!`.
    pub shebang: Option<String>,
    /// The dotted names a Python extension module holds as strings (a Cython module imports
    /// the modules it uses when it is loaded, by these names): candidates, not facts.
    pub ext_names: Option<Vec<String>>,
    /// The text of a small configuration file (`.pth`, `ld.so.conf`).
    pub text: Option<String>,
}

impl Node {
    /// A node of `kind` with nothing read from its content yet.
    pub fn new(kind: Kind, size: u64, mode: u32) -> Node {
        Node {
            kind,
            size,
            mode,
            imports: None,
            elf: None,
            shebang: None,
            ext_names: None,
            text: None,
        }
    }
}

/// The merged tree: normalized names (`usr/bin/python3`, no leading `/`) to nodes.
#[derive(Debug, Default)]
pub struct Tree {
    pub nodes: BTreeMap<String, Node>,
}

/// A layer could not be read as a tar stream.
#[derive(Debug, thiserror::Error)]
#[error("reading the layer's tar stream: {0}")]
pub struct ScanError(#[from] std::io::Error);

/// One layer's entries, scanned but not yet applied.
#[derive(Debug, Default)]
pub struct LayerScan {
    entries: Vec<(String, Node)>,
    /// Hard links: (name, target), resolved when the layer is applied.
    links: Vec<(String, String)>,
    whiteouts: Vec<String>,
    opaque: Vec<String>,
}

fn wanted_text(name: &str) -> bool {
    name.ends_with(".pth")
        || name == "etc/ld.so.conf"
        || (name.starts_with("etc/ld.so.conf.d/") && name.ends_with(".conf"))
        || name.ends_with("/pyvenv.cfg")
}

/// Reads one layer's tar stream (decompressed) and what inference needs of its files.
pub fn scan_layer<R: Read>(tar: R) -> Result<LayerScan, ScanError> {
    let mut out = LayerScan::default();
    let mut names_left = MAX_NAMES_PER_LAYER;
    let mut archive = tar::Archive::new(tar);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let raw = entry.path_bytes().into_owned();
        let Ok(raw) = String::from_utf8(raw) else {
            continue;
        };
        let Ok(name) = arbor_format::path::normalize(&raw) else {
            continue;
        };
        if name == "." {
            continue;
        }
        let (dir, base) = match name.rsplit_once('/') {
            Some((d, b)) => (d.to_string(), b),
            None => (String::new(), name.as_str()),
        };
        if base == ".wh..wh..opq" {
            out.opaque.push(dir);
            continue;
        }
        if let Some(hidden) = base.strip_prefix(".wh.") {
            out.whiteouts.push(if dir.is_empty() {
                hidden.to_string()
            } else {
                format!("{dir}/{hidden}")
            });
            continue;
        }
        let header = entry.header();
        let mode = header.mode().unwrap_or(0);
        let size = header.entry_size().unwrap_or(0);
        let et = header.entry_type();
        let mut node = Node::new(Kind::Other, 0, mode);
        if et.is_dir() {
            node.kind = Kind::Dir;
        } else if et.is_symlink() {
            let target = entry
                .link_name_bytes()
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default();
            node.kind = Kind::Symlink(target);
        } else if et.is_hard_link() {
            if let Some(t) = entry.link_name_bytes()
                && let Ok(t) = arbor_format::path::normalize(&String::from_utf8_lossy(&t))
            {
                out.links.push((name, t));
            }
            continue;
        } else if et.is_file() || et == tar::EntryType::Continuous {
            node.kind = Kind::File;
            node.size = size;
            read_content(&mut entry, &name, size, &mut node, &mut names_left)?;
        }
        out.entries.push((name, node));
    }
    Ok(out)
}

fn read_content<R: Read>(
    r: &mut R,
    name: &str,
    size: u64,
    node: &mut Node,
    names_left: &mut usize,
) -> std::io::Result<()> {
    if name.ends_with(".py") && size <= MAX_PY {
        let mut buf = Vec::with_capacity(size as usize);
        r.take(MAX_PY).read_to_end(&mut buf)?;
        let mut imports = python::imports(&buf);
        imports.truncate(MAX_IMPORTS_PER_FILE.min(*names_left));
        *names_left -= imports.len();
        node.imports = Some(imports);
        return Ok(());
    }
    if wanted_text(name) && size <= MAX_TEXT {
        let mut buf = Vec::with_capacity(size as usize);
        r.take(MAX_TEXT).read_to_end(&mut buf)?;
        node.text = Some(String::from_utf8_lossy(&buf).into_owned());
        return Ok(());
    }
    if size < 4 {
        return Ok(());
    }
    let mut head = vec![0u8; size.min(MAX_SHEBANG as u64) as usize];
    r.read_exact(&mut head)?;
    if elf::is_elf(&head) {
        if size <= MAX_ELF {
            let mut buf = Vec::with_capacity(size as usize);
            buf.extend_from_slice(&head);
            r.take(MAX_ELF).read_to_end(&mut buf)?;
            if let Ok(Some(deps)) = elf::parse(&buf) {
                node.elf = Some(deps);
            }
            if is_extension_module(name) {
                let mut names = dotted_names(&buf);
                names.truncate(*names_left);
                *names_left -= names.len();
                node.ext_names = Some(names);
            }
        }
    } else if let Some(rest) = head.strip_prefix(b"#!") {
        let line = rest.split(|&b| b == b'\n').next().unwrap_or_default();
        node.shebang = Some(String::from_utf8_lossy(line).trim().to_string());
    }
    Ok(())
}

/// Whether `name` is named like a CPython extension module (`m.cpython-311-x86_64-linux-gnu.so`,
/// `m.abi3.so`).
fn is_extension_module(name: &str) -> bool {
    let base = name.rsplit('/').next().unwrap_or(name);
    base.ends_with(".so") && (base.contains(".cpython-") || base.ends_with(".abi3.so"))
}

/// Most dotted names kept per extension module.
const MAX_EXT_NAMES: usize = 4096;

/// The NUL-terminated strings of `data` that look like dotted Python module names
/// (`dateutil.parser`), deduplicated, at most [`MAX_EXT_NAMES`].
fn dotted_names(data: &[u8]) -> Vec<String> {
    let mut out = std::collections::BTreeSet::new();
    for s in data.split(|&b| b == 0) {
        if out.len() >= MAX_EXT_NAMES {
            break;
        }
        if s.len() < 3 || s.len() > 200 || !s.contains(&b'.') {
            continue;
        }
        let ok = s.split(|&b| b == b'.').all(|part| {
            part.first()
                .is_some_and(|c| c.is_ascii_alphabetic() || *c == b'_')
                && part.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
        });
        if ok && let Ok(s) = std::str::from_utf8(s) {
            out.insert(s.to_string());
        }
    }
    out.into_iter().collect()
}

impl Tree {
    /// Applies a scanned layer over the tree: its opaque directories and whiteouts hide what
    /// the layers below have there, then its entries are added (replacing the same names).
    pub fn apply(&mut self, layer: LayerScan) {
        for dir in &layer.opaque {
            self.remove_below(dir);
        }
        for w in &layer.whiteouts {
            self.nodes.remove(w);
            self.remove_below(w);
        }
        let mut added: BTreeMap<String, Node> = BTreeMap::new();
        for (name, node) in layer.entries {
            // A new non-directory hides what was below it (a directory becoming a file).
            if node.kind != Kind::Dir {
                self.remove_below(&name);
            }
            added.insert(name, node);
        }
        for (name, target) in layer.links {
            if let Some(n) = added
                .get(&target)
                .or_else(|| self.nodes.get(&target))
                .cloned()
            {
                added.insert(name, n);
            }
        }
        // Parents a layer did not list (tars need not) are directories.
        let mut parents: Vec<String> = Vec::new();
        for name in added.keys() {
            let mut p = name.as_str();
            while let Some((d, _)) = p.rsplit_once('/') {
                if self.nodes.contains_key(d) || added.contains_key(d) {
                    break;
                }
                parents.push(d.to_string());
                p = d;
            }
        }
        self.nodes.extend(added);
        for d in parents {
            self.nodes
                .entry(d)
                .or_insert(Node::new(Kind::Dir, 0, 0o755));
        }
    }

    fn remove_below(&mut self, dir: &str) {
        let prefix = if dir.is_empty() {
            String::new()
        } else {
            format!("{dir}/")
        };
        let doomed: Vec<String> = self
            .nodes
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(k, _)| k.clone())
            .collect();
        for k in doomed {
            self.nodes.remove(&k);
        }
    }

    /// The node at `name` (normalized), symlinks not followed.
    pub fn get(&self, name: &str) -> Option<&Node> {
        self.nodes.get(name)
    }

    /// Whether `name` (normalized, symlinks followed) is a directory.
    pub fn is_dir(&self, name: &str) -> bool {
        if name.is_empty() || name == "." {
            return true;
        }
        self.resolve(name)
            .is_some_and(|r| self.nodes.get(&r).is_some_and(|n| n.kind == Kind::Dir))
    }

    /// `name` (an absolute or normalized path) with every symlink on the way resolved inside
    /// the image; `None` when it does not exist, escapes or loops.
    pub fn resolve(&self, name: &str) -> Option<String> {
        let mut hops = 0;
        let mut todo: Vec<String> = name
            .split('/')
            .filter(|c| !c.is_empty() && *c != ".")
            .rev()
            .map(str::to_string)
            .collect();
        let mut done: Vec<String> = Vec::new();
        while let Some(c) = todo.pop() {
            if c == ".." {
                done.pop();
                continue;
            }
            done.push(c);
            let here = done.join("/");
            match &self.nodes.get(&here)?.kind {
                Kind::Symlink(target) => {
                    hops += 1;
                    if hops > 40 {
                        return None;
                    }
                    done.pop();
                    if target.starts_with('/') {
                        done.clear();
                    }
                    todo.extend(
                        target
                            .split('/')
                            .filter(|c| !c.is_empty() && *c != ".")
                            .rev()
                            .map(str::to_string),
                    );
                }
                Kind::Dir | Kind::File | Kind::Other => {}
            }
        }
        Some(done.join("/"))
    }

    /// The regular file at `name` (symlinks followed), as a normalized name.
    pub fn file(&self, name: &str) -> Option<String> {
        let r = self.resolve(name)?;
        (self.nodes.get(&r)?.kind == Kind::File).then_some(r)
    }

    /// The names directly in directory `dir` (normalized, resolved).
    pub fn children<'a>(&'a self, dir: &str) -> impl Iterator<Item = (&'a str, &'a Node)> + 'a {
        let prefix = if dir.is_empty() || dir == "." {
            String::new()
        } else {
            format!("{dir}/")
        };
        let len = prefix.len();
        let start = prefix.clone();
        self.nodes
            .range(start..)
            .take_while(move |(k, _)| k.starts_with(&prefix))
            .filter_map(move |(k, n)| {
                let rest = &k[len..];
                (!rest.contains('/')).then_some((rest, n))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(entries: &[(&str, &[u8], Option<&str>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data, link) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o755);
            match link {
                Some(t) => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_size(0);
                    b.append_link(&mut h, name, t).unwrap();
                }
                None if name.ends_with('/') => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_size(0);
                    b.append_data(&mut h, name, &[][..]).unwrap();
                }
                None if name.contains("..") => {
                    // A hostile name the builder refuses to write: set the raw bytes.
                    h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
                    h.set_size(data.len() as u64);
                    h.set_cksum();
                    b.append(&h, *data).unwrap();
                }
                None => {
                    h.set_size(data.len() as u64);
                    b.append_data(&mut h, name, *data).unwrap();
                }
            }
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn layers_merge_with_whiteouts_and_symlinks_resolve() {
        let mut t = Tree::default();
        let l1 = tar_of(&[
            ("usr/", b"", None),
            ("usr/bin/", b"", None),
            ("usr/bin/python3.11", b"#!/bin/sh\necho\n", None),
            ("usr/bin/python3", b"", Some("python3.11")),
            ("app/", b"", None),
            ("app/old.py", b"import os\n", None),
            ("app/gone.py", b"", None),
            ("opt/x/", b"", None),
            ("opt/x/a", b"aaaa", None),
            ("lib", b"", Some("usr/lib")),
        ]);
        t.apply(scan_layer(&l1[..]).unwrap());
        let l2 = tar_of(&[
            ("app/.wh.gone.py", b"", None),
            ("opt/x/.wh..wh..opq", b"", None),
            ("opt/x/b", b"bbbb", None),
            ("usr/lib/", b"", None),
            ("usr/lib/libz.so.1", b"zzzz", None),
            ("../../etc/evil", b"x", None),
        ]);
        t.apply(scan_layer(&l2[..]).unwrap());
        let l3 = tar_of(&[("srv/deep/x.py", b"import a.b\n", None)]);
        t.apply(scan_layer(&l3[..]).unwrap());
        assert!(t.is_dir("srv/deep"));
        assert_eq!(t.file("/srv/deep/x.py").as_deref(), Some("srv/deep/x.py"));
        assert!(t.get("app/gone.py").is_none());
        assert!(t.get("opt/x/a").is_none());
        assert!(t.get("opt/x/b").is_some());
        assert!(t.get("etc/evil").is_none());
        assert_eq!(
            t.file("/usr/bin/python3").as_deref(),
            Some("usr/bin/python3.11")
        );
        assert_eq!(
            t.get("usr/bin/python3.11").unwrap().shebang.as_deref(),
            Some("/bin/sh")
        );
        assert_eq!(
            t.file("/lib/libz.so.1").as_deref(),
            Some("usr/lib/libz.so.1")
        );
        assert_eq!(
            t.get("app/old.py").unwrap().imports.as_ref().unwrap()[0].module,
            "os"
        );
        assert!(t.is_dir("usr/bin"));
        let kids: Vec<&str> = t.children("usr/bin").map(|(n, _)| n).collect();
        assert_eq!(kids, vec!["python3", "python3.11"]);
    }

    #[test]
    fn extension_modules_keep_their_dotted_names() {
        assert!(is_extension_module("a/b.cpython-311-x86_64-linux-gnu.so"));
        assert!(is_extension_module("a/b.abi3.so"));
        assert!(!is_extension_module("a/libb.so.6"));
        let data =
            b"\0dateutil.parser\0not a name\0x.1y\0pandas._libs.tslibs.base\0a.\0.b\0short\0";
        assert_eq!(
            dotted_names(data),
            vec!["dateutil.parser", "pandas._libs.tslibs.base"]
        );
    }

    #[test]
    fn mutated_layers_never_panic() {
        let base = tar_of(&[
            ("usr/bin/python3.11", b"#!/bin/sh\n", None),
            ("app/a.py", b"import os, sys\nfrom . import x\n", None),
            (
                "lib/x.cpython-311-x86_64-linux-gnu.so",
                b"\x7fELF\x02\x01\x01",
                None,
            ),
            ("l", b"", Some("../../x")),
        ]);
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..2000 {
            let mut t = base.clone();
            for _ in 0..(next() % 8 + 1) {
                let i = (next() as usize) % t.len();
                t[i] = next() as u8;
            }
            t.truncate((next() as usize) % (t.len() + 1));
            if let Ok(scan) = scan_layer(&t[..]) {
                let mut tree = Tree::default();
                tree.apply(scan);
                let _ = tree.resolve("l/a/b");
            }
        }
    }

    #[test]
    fn symlink_loops_and_escapes_end() {
        let mut t = Tree::default();
        let l = tar_of(&[
            ("a", b"", Some("b")),
            ("b", b"", Some("a")),
            ("up", b"", Some("../../../etc")),
        ]);
        t.apply(scan_layer(&l[..]).unwrap());
        assert_eq!(t.resolve("a/x"), None);
        // `..` at the root stays at the root, as in a chroot.
        assert_eq!(t.resolve("up"), None);
    }
}
