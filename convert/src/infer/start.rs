//! From an image's entrypoint to the files its start will read, in the order it reads them.
//!
//! The walk follows what the files themselves say:
//! * the entrypoint (`Entrypoint` + `Cmd`, looked up in the config's `PATH`, relative to
//!   `WorkingDir`), through `#!` lines (`/usr/bin/env python3` included) to an executable;
//! * an ELF executable's interpreter (the dynamic loader), `/etc/ld.so.cache`, and its shared
//!   libraries, found the way the loader finds them (`DT_RPATH`, `LD_LIBRARY_PATH`,
//!   `DT_RUNPATH` with `$ORIGIN`, `ld.so.conf`, the default directories), breadth first;
//! * a Python interpreter's start (`encodings`, `site`, the `.pth` files of its site
//!   directories, `sitecustomize`), then the script or `-m` module, and every module they
//!   import at import time, depth first in source order (the order Python runs them), each
//!   resolved on the interpreter's `sys.path` as its import system would (packages, extension
//!   modules, `__pycache__/*.cpython-XY.pyc` in place of sources that have them), extension
//!   modules followed into their shared libraries.
//!
//! What it cannot see it leaves to on-demand fetching: imports inside functions, dynamic
//! imports (`importlib.import_module`, lazy `__getattr__` loaders), data files, programs a
//! shell script runs. It only ever adds files that exist in the image, bounded by
//! [`Limits`].

use std::collections::{HashMap, HashSet, VecDeque};

use super::tree::{Kind, Tree};

/// What to follow: the container's argv, environment and working directory.
#[derive(Debug, Clone, Default)]
pub struct Entrypoint {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: String,
}

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

impl Entrypoint {
    /// From an OCI image config (`config.Entrypoint`, `Cmd`, `Env`, `WorkingDir`); `None`
    /// when it names nothing to run.
    pub fn from_config(config: &serde_json::Value) -> Option<Entrypoint> {
        let c = config.get("config")?;
        let strings = |k: &str| -> Vec<String> {
            c.get(k)
                .and_then(|v| v.as_array())
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default()
        };
        let mut argv = strings("Entrypoint");
        argv.extend(strings("Cmd"));
        if argv.is_empty() {
            return None;
        }
        let env = strings("Env")
            .into_iter()
            .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.into(), v.into())))
            .collect();
        let cwd = c
            .get("WorkingDir")
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty())
            .unwrap_or("/")
            .to_string();
        Some(Entrypoint { argv, env, cwd })
    }

    fn var(&self, k: &str) -> Option<&str> {
        self.env
            .iter()
            .rev()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    }
}

/// Bounds of one inference.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_files: usize,
    pub max_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_files: 100_000,
            max_bytes: 4 << 30,
        }
    }
}

/// The inferred start-up files.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Inferred {
    /// Absolute paths in the image, in the order the start is expected to read them.
    pub files: Vec<String>,
    /// Their total size.
    pub bytes: u64,
    /// What was followed, and what could not be (for the conversion report).
    pub notes: Vec<String>,
}

/// The start-up files of `ep` in `tree`.
pub fn infer(tree: &Tree, ep: &Entrypoint, limits: Limits) -> Inferred {
    let mut w = Walker {
        tree,
        ep,
        limits,
        out: Inferred::default(),
        seen: HashSet::new(),
        py: None,
        modules: HashMap::new(),
        ld_dirs: None,
        depth: 0,
    };
    w.entrypoint();
    w.out
}

/// A module found on `sys.path`.
#[derive(Debug, Clone)]
enum Found {
    /// A regular package: its directory.
    Package(String),
    /// A namespace package portion: its directory (nothing to load).
    Namespace(String),
    /// A module file: a source, bytecode or extension module.
    Module(String),
    Missing,
}

struct Python {
    /// `cpython-311`
    tag: String,
    path: Vec<String>,
}

struct Walker<'a> {
    tree: &'a Tree,
    ep: &'a Entrypoint,
    limits: Limits,
    out: Inferred,
    seen: HashSet<String>,
    py: Option<Python>,
    modules: HashMap<String, Found>,
    ld_dirs: Option<Vec<String>>,
    /// Nested imports being followed (bounded by [`MAX_DEPTH`]).
    depth: usize,
}

/// Deepest chain of nested imports followed.
const MAX_DEPTH: usize = 256;

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() || dir == "." {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

fn dir_of(name: &str) -> &str {
    name.rsplit_once('/').map_or("", |(d, _)| d)
}

fn base_of(name: &str) -> &str {
    name.rsplit_once('/').map_or(name, |(_, b)| b)
}

/// `python3.11` → `3.11`; `python3`/`python` → `""`; anything else → `None`.
fn python_version(base: &str) -> Option<&str> {
    let v = base.strip_prefix("python")?;
    let v = v.strip_suffix("-config").map_or(v, |_| "x");
    if v.is_empty() || v == "3" {
        return Some("");
    }
    let mut parts = v.split('.');
    let ok = parts.next() == Some("3")
        && parts
            .next()
            .is_some_and(|m| !m.is_empty() && m.bytes().all(|b| b.is_ascii_digit()))
        && parts.next().is_none();
    ok.then_some(v)
}

impl Walker<'_> {
    fn full(&self) -> bool {
        self.out.files.len() >= self.limits.max_files || self.out.bytes >= self.limits.max_bytes
    }

    /// Adds a regular file (a normalized name; symlinks to it are followed) once.
    fn add(&mut self, name: &str) -> bool {
        let Some(name) = self.tree.file(name) else {
            return false;
        };
        let name = name.as_str();
        if self.full() || !self.seen.insert(name.to_string()) {
            return false;
        }
        let size = self.tree.get(name).map_or(0, |n| n.size);
        self.out.files.push(format!("/{name}"));
        self.out.bytes += size;
        true
    }

    /// A path as the container would resolve it from its working directory.
    fn abs(&self, p: &str) -> String {
        if p.starts_with('/') {
            p.to_string()
        } else {
            format!("{}/{}", self.ep.cwd.trim_end_matches('/'), p)
        }
    }

    fn which(&self, prog: &str) -> Option<String> {
        if prog.contains('/') {
            return self.tree.file(&self.abs(prog));
        }
        let path = self.ep.var("PATH").unwrap_or(DEFAULT_PATH);
        path.split(':')
            .filter(|d| !d.is_empty())
            .find_map(|d| self.tree.file(&format!("{}/{prog}", self.abs(d))))
    }

    fn entrypoint(&mut self) {
        let mut argv = self.ep.argv.clone();
        for _ in 0..4 {
            let Some(prog) = argv.first().cloned() else {
                return;
            };
            let Some(file) = self.which(&prog) else {
                self.out
                    .notes
                    .push(format!("entrypoint {prog} is not a file in the image"));
                return;
            };
            let node = self.tree.get(&file).cloned();
            let Some(node) = node else { return };
            if let Some(line) = node.shebang.clone() {
                // `#!interp [arg]`: the kernel runs interp [arg] script args...
                let mut words = line.split_whitespace();
                let Some(interp) = words.next() else { return };
                let arg = words.collect::<Vec<_>>().join(" ");
                let mut next = vec![interp.to_string()];
                if base_of(interp) == "env" {
                    // `/usr/bin/env [-S] python3`: the program comes from PATH.
                    let prog = arg
                        .split_whitespace()
                        .find(|w| !w.starts_with('-'))
                        .unwrap_or_default();
                    next = vec![prog.to_string()];
                } else if !arg.is_empty() {
                    next.push(arg);
                }
                next.push(format!("/{file}"));
                next.extend(argv.into_iter().skip(1));
                argv = next;
                continue;
            }
            if node.elf.is_some() {
                self.elf(&file);
            } else {
                self.add(&file);
            }
            let resolved_base = base_of(&file).to_string();
            let named_base = base_of(&prog).to_string();
            if let Some(v) = python_version(&resolved_base).or(python_version(&named_base)) {
                let v = v.to_string();
                self.python(&file, &v, &argv[1..]);
            }
            return;
        }
        self.out
            .notes
            .push("more than 4 #! interpreters in a row".into());
    }

    // ---- ELF -----------------------------------------------------------------------------

    fn ld_dirs(&mut self) -> Vec<String> {
        if let Some(d) = &self.ld_dirs {
            return d.clone();
        }
        let mut dirs = Vec::new();
        let mut texts = Vec::new();
        if let Some(t) = self.tree.get("etc/ld.so.conf").and_then(|n| n.text.clone()) {
            texts.push(t);
        }
        for (name, n) in self.tree.children("etc/ld.so.conf.d") {
            if name.ends_with(".conf")
                && let Some(t) = &n.text
            {
                texts.push(t.clone());
            }
        }
        for t in texts {
            for line in t.lines() {
                let line = line.split('#').next().unwrap_or_default().trim();
                if line.starts_with('/') && !line.contains(' ') {
                    dirs.push(line.to_string());
                }
            }
        }
        for d in [
            "/lib/x86_64-linux-gnu",
            "/usr/lib/x86_64-linux-gnu",
            "/lib/aarch64-linux-gnu",
            "/usr/lib/aarch64-linux-gnu",
            "/lib64",
            "/usr/lib64",
            "/lib",
            "/usr/lib",
        ] {
            dirs.push(d.to_string());
        }
        self.ld_dirs = Some(dirs.clone());
        dirs
    }

    /// An ELF file and everything the loader will map for it, breadth first.
    fn elf(&mut self, file: &str) {
        let mut queue = VecDeque::from([file.to_string()]);
        let mut cache_added = false;
        while let Some(f) = queue.pop_front() {
            if !self.add(&f) {
                continue;
            }
            let Some(deps) = self.tree.get(&f).and_then(|n| n.elf.clone()) else {
                continue;
            };
            if let Some(interp) = &deps.interp
                && let Some(i) = self.tree.file(interp)
            {
                queue.push_back(i);
            }
            if deps.needed.is_empty() {
                continue;
            }
            if !cache_added && self.tree.file("etc/ld.so.cache").is_some() {
                cache_added = true;
                self.add("etc/ld.so.cache");
            }
            let origin = format!("/{}", dir_of(&f));
            let expand = |p: &String| p.replace("${ORIGIN}", &origin).replace("$ORIGIN", &origin);
            let mut dirs: Vec<String> = Vec::new();
            if deps.runpath.is_empty() {
                dirs.extend(deps.rpath.iter().map(expand));
            }
            if let Some(l) = self.ep.var("LD_LIBRARY_PATH") {
                dirs.extend(l.split(':').filter(|d| !d.is_empty()).map(str::to_string));
            }
            dirs.extend(deps.runpath.iter().map(expand));
            dirs.extend(self.ld_dirs());
            for lib in &deps.needed {
                let found = if lib.contains('/') {
                    self.tree.file(lib)
                } else {
                    dirs.iter()
                        .find_map(|d| self.tree.file(&format!("{d}/{lib}")))
                };
                if let Some(l) = found {
                    queue.push_back(l);
                }
            }
        }
    }

    // ---- Python --------------------------------------------------------------------------

    fn python(&mut self, interp: &str, version: &str, args: &[String]) {
        // The interpreter's prefix: `<prefix>/bin/python3.X`; a venv's `pyvenv.cfg` names the
        // base installation's bin directory (`home`).
        let bin = dir_of(interp).to_string();
        let prefix = dir_of(&bin).to_string();
        let mut base_prefix = prefix.clone();
        let venv = self
            .tree
            .get(&join(&prefix, "pyvenv.cfg"))
            .and_then(|n| n.text.clone());
        if let Some(cfg) = &venv {
            for line in cfg.lines() {
                if let Some((k, v)) = line.split_once('=')
                    && k.trim() == "home"
                    && let Some(home) = self.tree.resolve(v.trim())
                {
                    base_prefix = dir_of(&home).to_string();
                }
            }
        }
        let version = if version.is_empty() {
            // `python3`: the newest `lib/python3.N` with an `os.py` under the prefixes.
            let mut best: Option<(u32, String)> = None;
            for p in [&base_prefix, &prefix, &"usr".to_string()] {
                for (name, _) in self.tree.children(&join(p, "lib")) {
                    if let Some(minor) = name.strip_prefix("python3.")
                        && let Ok(m) = minor.parse::<u32>()
                        && self
                            .tree
                            .file(&join(&join(p, "lib"), &format!("{name}/os.py")))
                            .is_some()
                        && best.as_ref().is_none_or(|(b, _)| m > *b)
                    {
                        best = Some((m, format!("3.{m}")));
                    }
                }
            }
            match best {
                Some((_, v)) => v,
                None => {
                    self.out
                        .notes
                        .push(format!("no standard library found for /{interp}"));
                    return;
                }
            }
        } else {
            version.to_string()
        };
        let tag = format!("cpython-{}", version.replace('.', ""));
        let lib = format!("python{version}");

        // Where the script or module comes from.
        let mut script: Option<String> = None;
        let mut module: Option<String> = None;
        let mut it = args.iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "-c" => break,
                "-m" => {
                    module = it.next().cloned();
                    break;
                }
                "-X" | "-W" | "--check-hash-based-pycs" => {
                    it.next();
                }
                s if s.starts_with('-') && s.len() > 1 => {
                    // -m/-c glued to their argument (`-mhttp.server`).
                    if let Some(m) = s.strip_prefix("-m") {
                        module = Some(m.to_string());
                        break;
                    }
                    if s.starts_with("-c") {
                        break;
                    }
                }
                s => {
                    script = Some(s.to_string());
                    break;
                }
            }
        }

        let mut path: Vec<String> = Vec::new();
        match &script {
            Some(s) => path.push(dir_of(&self.abs(s)).trim_start_matches('/').to_string()),
            None => path.push(self.ep.cwd.trim_start_matches('/').to_string()),
        }
        if let Some(pp) = self.ep.var("PYTHONPATH") {
            path.extend(
                pp.split(':')
                    .filter(|d| !d.is_empty())
                    .map(|d| self.abs(d).trim_start_matches('/').to_string()),
            );
        }
        let stdlib = join(&base_prefix, &format!("lib/{lib}"));
        path.push(stdlib.clone());
        path.push(join(&stdlib, "lib-dynload"));
        let mut site_dirs = vec![join(&prefix, &format!("lib/{lib}/site-packages"))];
        if venv.is_none() {
            // Debian's layout (site.py patched): /usr/local/lib/pythonX.Y/dist-packages,
            // /usr/lib/python3/dist-packages, /usr/lib/pythonX.Y/dist-packages.
            site_dirs.push(format!("usr/local/lib/{lib}/dist-packages"));
            site_dirs.push("usr/lib/python3/dist-packages".into());
            site_dirs.push(format!("usr/lib/{lib}/dist-packages"));
            site_dirs.push(format!("usr/local/lib/{lib}/site-packages"));
        }
        let mut seen_dirs = HashSet::new();
        let mut resolved_path = Vec::new();
        for d in path {
            if let Some(r) = self.tree.resolve(&d)
                && self.tree.is_dir(&r)
                && seen_dirs.insert(r.clone())
            {
                resolved_path.push(r);
            }
        }
        let mut sites = Vec::new();
        for d in site_dirs {
            if let Some(r) = self.tree.resolve(&d)
                && self.tree.is_dir(&r)
                && seen_dirs.insert(r.clone())
            {
                resolved_path.push(r.clone());
                sites.push(r);
            }
        }
        self.py = Some(Python {
            tag,
            path: resolved_path,
        });

        // The interpreter's own start.
        for m in ["encodings", "encodings.aliases", "encodings.utf_8", "site"] {
            self.module(m);
        }
        // `.pth` files: paths appended to sys.path, `import` lines run.
        let mut pth_imports = Vec::new();
        for site in &sites {
            let pths: Vec<(String, String)> = self
                .tree
                .children(site)
                .filter(|(n, _)| n.ends_with(".pth"))
                .filter_map(|(n, node)| node.text.clone().map(|t| (join(site, n), t)))
                .collect();
            for (name, text) in pths {
                self.add(&name);
                for line in text.lines() {
                    let line = line.trim();
                    if line.starts_with("import ") || line.starts_with("import\t") {
                        pth_imports.extend(super::python::imports(line.as_bytes()));
                    } else if !line.is_empty() && !line.starts_with('#') {
                        let d = if line.starts_with('/') {
                            line.trim_start_matches('/').to_string()
                        } else {
                            join(site, line)
                        };
                        if let Some(r) = self.tree.resolve(&d)
                            && self.tree.is_dir(&r)
                            && let Some(py) = &mut self.py
                            && !py.path.contains(&r)
                        {
                            py.path.push(r);
                        }
                    }
                }
            }
        }
        self.imports(&pth_imports, "");
        for m in ["sitecustomize", "usercustomize"] {
            self.module(m);
        }

        match (script, module) {
            (Some(s), _) => {
                let Some(file) = self.tree.file(&self.abs(&s)) else {
                    self.out
                        .notes
                        .push(format!("script {s} is not a file in the image"));
                    return;
                };
                self.add(&file);
                let imports = self
                    .tree
                    .get(&file)
                    .and_then(|n| n.imports.clone())
                    .unwrap_or_default();
                self.imports(&imports, "");
            }
            (None, Some(m)) => {
                self.module(&m);
                if matches!(self.modules.get(&m), Some(Found::Package(_))) {
                    self.module(&format!("{m}.__main__"));
                }
            }
            (None, None) => {}
        }
    }

    /// Finds `name` (a single component) in the directories `dirs`, as a path entry finder.
    fn find_in(&self, dirs: &[String], name: &str) -> Found {
        let tag = self.py.as_ref().map_or("", |p| p.tag.as_str());
        let mut namespace = None;
        for d in dirs {
            let pkg = join(d, name);
            if self.tree.is_dir(&pkg) {
                let init = join(&pkg, "__init__.py");
                let init_pyc = join(&pkg, &format!("__pycache__/__init__.{tag}.pyc"));
                if self.tree.file(&init).is_some() || self.tree.file(&init_pyc).is_some() {
                    return Found::Package(self.tree.resolve(&pkg).unwrap_or(pkg));
                }
                if namespace.is_none() {
                    namespace = Some(pkg.clone());
                }
            }
            // Extension modules first, then source, then bytecode (importlib's order).
            let ext = self
                .tree
                .children(d)
                .find(|(n, node)| {
                    node.kind != Kind::Dir
                        && n.strip_prefix(name).is_some_and(|rest| {
                            rest == ".so"
                                || (rest.starts_with(&format!(".{tag}")) && rest.ends_with(".so"))
                                || rest == ".abi3.so"
                        })
                })
                .map(|(n, _)| join(d, n));
            if let Some(e) = ext.and_then(|e| self.tree.file(&e)) {
                return Found::Module(e);
            }
            // As found on the path (a symlinked source keeps its `__pycache__` here).
            for f in [
                join(d, &format!("{name}.py")),
                join(d, &format!("{name}.pyc")),
            ] {
                if self.tree.file(&f).is_some() {
                    return Found::Module(f);
                }
            }
        }
        namespace.map_or(Found::Missing, Found::Namespace)
    }

    /// Imports module `full` (its parents first), adding the files Python will read.
    fn module(&mut self, full: &str) {
        if self.full() || self.modules.contains_key(full) || self.py.is_none() {
            return;
        }
        if full.is_empty() || full.split('.').any(|c| c.is_empty()) || full.len() > 512 {
            return;
        }
        if self.depth >= MAX_DEPTH {
            return;
        }
        self.depth += 1;
        self.module_inner(full);
        self.depth -= 1;
    }

    fn module_inner(&mut self, full: &str) {
        let (parent, name) = match full.rsplit_once('.') {
            Some((p, n)) => (Some(p.to_string()), n.to_string()),
            None => (None, full.to_string()),
        };
        let dirs = match &parent {
            Some(p) => {
                self.module(p);
                match self.modules.get(p) {
                    Some(Found::Package(d)) | Some(Found::Namespace(d)) => vec![d.clone()],
                    _ => {
                        self.modules.insert(full.to_string(), Found::Missing);
                        return;
                    }
                }
            }
            None => self.py.as_ref().map(|p| p.path.clone()).unwrap_or_default(),
        };
        let found = self.find_in(&dirs, &name);
        self.modules.insert(full.to_string(), found.clone());
        let tag = self.py.as_ref().map_or(String::new(), |p| p.tag.clone());
        match found {
            Found::Package(dir) => {
                let source = join(&dir, "__init__.py");
                let pyc = join(&dir, &format!("__pycache__/__init__.{tag}.pyc"));
                self.load(&source, &pyc, full);
            }
            Found::Module(file) => {
                if file.ends_with(".so") {
                    let Some(file) = self.tree.file(&file) else {
                        return;
                    };
                    self.elf(&file);
                    self.extension_imports(&file, full);
                } else if let Some(stem) = file.strip_suffix(".py") {
                    let pyc = format!("{}/__pycache__/{}.{tag}.pyc", dir_of(stem), base_of(stem));
                    let pkg = parent.clone().unwrap_or_default();
                    self.load(&file, &pyc, &pkg);
                } else {
                    self.add(&file);
                }
            }
            Found::Namespace(_) | Found::Missing => {}
        }
    }

    /// The modules an extension module names (a Cython module imports what it cimports and
    /// its module-level imports when it is loaded): each name that is a module in the image,
    /// under a top-level package or module found on `sys.path`.
    fn extension_imports(&mut self, file: &str, full: &str) {
        let names = self
            .tree
            .get(file)
            .and_then(|n| n.ext_names.clone())
            .unwrap_or_default();
        let path = self.py.as_ref().map(|p| p.path.clone()).unwrap_or_default();
        for name in names {
            if self.full() || name == full || name.starts_with(&format!("{full}.")) {
                continue;
            }
            let top = name.split('.').next().unwrap_or_default();
            let known = match self.modules.get(top) {
                Some(Found::Package(_)) => true,
                Some(_) => false,
                None => matches!(self.find_in(&path, top), Found::Package(_)),
            };
            // Only names whose parent is a package: `pkg.module`, never `module.attribute`.
            if known && self.is_submodule(&name) {
                self.module(&name);
            }
        }
    }

    /// Whether dotted `name` is a module file or package under packages that exist, without
    /// importing anything.
    fn is_submodule(&self, name: &str) -> bool {
        let path = self.py.as_ref().map(|p| p.path.clone()).unwrap_or_default();
        let mut parts = name.split('.');
        let Some(top) = parts.next() else {
            return false;
        };
        let mut found = self.find_in(&path, top);
        for part in parts {
            match found {
                Found::Package(d) | Found::Namespace(d) => found = self.find_in(&[d], part),
                _ => return false,
            }
        }
        !matches!(found, Found::Missing)
    }

    /// Loads a module from its source (or its cached bytecode, which Python reads instead)
    /// and follows the source's imports, relative ones from package `pkg`.
    fn load(&mut self, source: &str, pyc: &str, pkg: &str) {
        let pyc = self.tree.file(pyc);
        let src = self.tree.file(source);
        match (&pyc, &src) {
            (Some(p), _) => self.add(p),
            (None, Some(s)) => self.add(s),
            (None, None) => return,
        };
        let imports = src
            .and_then(|s| self.tree.get(&s).and_then(|n| n.imports.clone()))
            .unwrap_or_default();
        self.imports(&imports, pkg);
    }

    fn imports(&mut self, imports: &[super::python::Import], pkg: &str) {
        for imp in imports {
            if self.full() {
                return;
            }
            let base = if imp.level == 0 {
                imp.module.clone()
            } else {
                let mut parts: Vec<&str> = pkg.split('.').filter(|p| !p.is_empty()).collect();
                let up = imp.level as usize - 1;
                if up > parts.len() || parts.is_empty() {
                    continue;
                }
                parts.truncate(parts.len() - up);
                let mut b = parts.join(".");
                if !imp.module.is_empty() {
                    b = format!("{b}.{}", imp.module);
                }
                b
            };
            if base.is_empty() {
                continue;
            }
            self.module(&base);
            if matches!(
                self.modules.get(&base),
                Some(Found::Package(_)) | Some(Found::Namespace(_))
            ) {
                for n in &imp.names {
                    if n != "*" {
                        let sub = format!("{base}.{n}");
                        // Only a submodule that exists: `from pkg import function` is no file.
                        if let Some(Found::Package(d)) | Some(Found::Namespace(d)) =
                            self.modules.get(&base).cloned()
                            && !matches!(self.find_in(&[d], n), Found::Missing)
                        {
                            self.module(&sub);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::elf::ElfDeps;
    use super::super::python;
    use super::super::tree::{Kind, Node, Tree};
    use super::*;

    fn node(kind: Kind, size: u64) -> Node {
        Node::new(kind, size, 0o755)
    }

    struct B(Tree);

    impl B {
        fn dirs(&mut self, name: &str) {
            let mut p = name;
            while let Some((d, _)) = p.rsplit_once('/') {
                self.0.nodes.entry(d.into()).or_insert(node(Kind::Dir, 0));
                p = d;
            }
        }
        fn file(&mut self, name: &str, size: u64) -> &mut Node {
            self.dirs(name);
            self.0.nodes.insert(name.into(), node(Kind::File, size));
            self.0.nodes.get_mut(name).unwrap()
        }
        fn py(&mut self, name: &str, src: &str) {
            self.file(name, src.len() as u64).imports = Some(python::imports(src.as_bytes()));
        }
        fn link(&mut self, name: &str, target: &str) {
            self.dirs(name);
            self.0
                .nodes
                .insert(name.into(), node(Kind::Symlink(target.into()), 0));
        }
        fn elf(&mut self, name: &str, interp: Option<&str>, needed: &[&str], runpath: &[&str]) {
            self.file(name, 1000).elf = Some(ElfDeps {
                interp: interp.map(str::to_string),
                needed: needed.iter().map(|s| s.to_string()).collect(),
                runpath: runpath.iter().map(|s| s.to_string()).collect(),
                rpath: Vec::new(),
            });
        }
    }

    fn image() -> B {
        let mut b = B(Tree::default());
        b.elf(
            "usr/bin/python3.11",
            Some("/lib64/ld-linux-x86-64.so.2"),
            &["libm.so.6", "libc.so.6"],
            &[],
        );
        b.link("usr/bin/python3", "python3.11");
        b.link("lib64", "usr/lib64");
        b.elf("usr/lib64/ld-linux-x86-64.so.2", None, &[], &[]);
        b.elf("usr/lib/x86_64-linux-gnu/libc.so.6", None, &[], &[]);
        b.elf(
            "usr/lib/x86_64-linux-gnu/libm.so.6",
            None,
            &["libc.so.6"],
            &[],
        );
        b.file("etc/ld.so.cache", 100);
        let stdlib = "usr/lib/python3.11";
        b.py(&format!("{stdlib}/os.py"), "import abc\nimport sys\n");
        b.file(&format!("{stdlib}/__pycache__/os.cpython-311.pyc"), 50);
        b.py(&format!("{stdlib}/abc.py"), "");
        b.py(&format!("{stdlib}/site.py"), "import os\n");
        b.py(
            &format!("{stdlib}/encodings/__init__.py"),
            "from . import aliases\n",
        );
        b.py(&format!("{stdlib}/encodings/aliases.py"), "");
        b.py(&format!("{stdlib}/encodings/utf_8.py"), "import codecs\n");
        b.py(
            &format!("{stdlib}/json/__init__.py"),
            "from .decoder import JSONDecoder\n",
        );
        b.py(&format!("{stdlib}/json/decoder.py"), "import re\n");
        b.py(&format!("{stdlib}/unused.py"), "import os\n");
        let site = "usr/local/lib/python3.11/dist-packages";
        b.py(
            &format!("{site}/numpy/__init__.py"),
            "from . import _core\nfrom .lib import stride_tricks, helper_function\n\
             def f():\n    import numpy.testing\n",
        );
        b.file(
            &format!("{site}/numpy/__pycache__/__init__.cpython-311.pyc"),
            10,
        );
        b.py(
            &format!("{site}/numpy/_core/__init__.py"),
            "from . import _multiarray_umath\n",
        );
        b.elf(
            &format!("{site}/numpy/_core/_multiarray_umath.cpython-311-x86_64-linux-gnu.so"),
            None,
            &["libopenblas.so", "libm.so.6"],
            &["$ORIGIN/../../numpy.libs"],
        );
        b.0.nodes
            .get_mut(&format!(
                "{site}/numpy/_core/_multiarray_umath.cpython-311-x86_64-linux-gnu.so"
            ))
            .unwrap()
            .ext_names = Some(vec![
            "dateutil.parser".into(),
            "json.decoder.JSONDecoder".into(),
            "notinstalled.x".into(),
            "numpy._core._multiarray_umath.add".into(),
        ]);
        b.py(&format!("{site}/dateutil/__init__.py"), "");
        b.py(&format!("{site}/dateutil/parser.py"), "");
        b.py(&format!("{site}/dateutil/unused.py"), "");
        b.elf(&format!("{site}/numpy.libs/libopenblas.so"), None, &[], &[]);
        b.py(&format!("{site}/numpy/lib/__init__.py"), "");
        b.py(&format!("{site}/numpy/lib/stride_tricks.py"), "");
        b.py(&format!("{site}/numpy/testing/__init__.py"), "");
        b.file(&format!("{site}/distutils-precedence.pth"), 30).text =
            Some("import _distutils_hack\n".into());
        b.py(&format!("{site}/_distutils_hack/__init__.py"), "");
        b.py(
            "app/server.py",
            "import json\nimport numpy as np\nimport missing_module\n",
        );
        b.file("app/data.bin", 5);
        // Debian's sitecustomize: a symlink into /etc, its bytecode beside the link.
        b.py("etc/python3.11/sitecustomize.py", "");
        b.link(
            &format!("{stdlib}/sitecustomize.py"),
            "../../../etc/python3.11/sitecustomize.py",
        );
        b.file(
            &format!("{stdlib}/__pycache__/sitecustomize.cpython-311.pyc"),
            5,
        );
        b
    }

    fn ep(argv: &[&str], cwd: &str) -> Entrypoint {
        Entrypoint {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: vec![("PATH".into(), "/usr/local/bin:/usr/bin".into())],
            cwd: cwd.into(),
        }
    }

    fn pos(files: &[String], f: &str) -> usize {
        files
            .iter()
            .position(|x| x == f)
            .unwrap_or_else(|| panic!("{f} not in {files:#?}"))
    }

    #[test]
    fn a_python_function_is_followed_through_its_imports_and_libraries() {
        let b = image();
        let got = infer(
            &b.0,
            &ep(&["python3", "server.py"], "/app"),
            Limits::default(),
        );
        let f = &got.files;
        // The interpreter, its loader and libraries first, breadth first.
        assert_eq!(f[0], "/usr/bin/python3.11");
        assert_eq!(f[1], "/etc/ld.so.cache");
        assert_eq!(f[2], "/usr/lib64/ld-linux-x86-64.so.2");
        assert!(
            pos(f, "/usr/lib/x86_64-linux-gnu/libm.so.6") < pos(f, "/usr/lib/python3.11/site.py")
        );
        // Bytecode instead of a source that has it; sources otherwise.
        assert!(f.contains(&"/usr/lib/python3.11/__pycache__/os.cpython-311.pyc".into()));
        assert!(!f.contains(&"/usr/lib/python3.11/os.py".into()));
        assert!(f.contains(&"/usr/lib/python3.11/abc.py".into()));
        assert!(
            f.contains(&"/usr/lib/python3.11/__pycache__/sitecustomize.cpython-311.pyc".into())
        );
        // .pth imports run at start.
        assert!(
            f.contains(&"/usr/local/lib/python3.11/dist-packages/distutils-precedence.pth".into())
        );
        assert!(f.contains(
            &"/usr/local/lib/python3.11/dist-packages/_distutils_hack/__init__.py".into()
        ));
        // The script, then its imports in order, packages before their modules.
        let script = pos(f, "/app/server.py");
        let json = pos(f, "/usr/lib/python3.11/json/__init__.py");
        let dec = pos(f, "/usr/lib/python3.11/json/decoder.py");
        let np = pos(
            f,
            "/usr/local/lib/python3.11/dist-packages/numpy/__pycache__/__init__.cpython-311.pyc",
        );
        let core = pos(
            f,
            "/usr/local/lib/python3.11/dist-packages/numpy/_core/__init__.py",
        );
        let ext = pos(
            f,
            "/usr/local/lib/python3.11/dist-packages/numpy/_core/_multiarray_umath.cpython-311-x86_64-linux-gnu.so",
        );
        let blas = pos(
            f,
            "/usr/local/lib/python3.11/dist-packages/numpy.libs/libopenblas.so",
        );
        let st = pos(
            f,
            "/usr/local/lib/python3.11/dist-packages/numpy/lib/stride_tricks.py",
        );
        assert!(script < json && json < dec && dec < np && np < core && core < ext && ext < blas);
        assert!(blas < st);
        // A Cython-style extension module's imports, found by name.
        assert!(
            pos(
                f,
                "/usr/local/lib/python3.11/dist-packages/dateutil/parser.py"
            ) > ext
        );
        assert!(!f.iter().any(|x| x.contains("dateutil/unused")));
        // Not imported at import time, or not there at all.
        assert!(!f.iter().any(|x| x.contains("numpy/testing")));
        assert!(!f.iter().any(|x| x.contains("unused")));
        assert!(!f.contains(&"/app/data.bin".into()));
        let unique: HashSet<&String> = f.iter().collect();
        assert_eq!(unique.len(), f.len());
        assert_eq!(
            got.bytes,
            f.iter()
                .map(|x| b.0.get(&x[1..]).unwrap().size)
                .sum::<u64>()
        );
    }

    #[test]
    fn shebang_scripts_and_modules_are_followed() {
        let mut b = image();
        b.file("usr/local/bin/serve", 40).shebang = Some("/usr/bin/env python3".into());
        b.0.nodes.get_mut("usr/local/bin/serve").unwrap().imports =
            Some(python::imports(b"import json\n"));
        let got = infer(&b.0, &ep(&["serve"], "/"), Limits::default());
        assert_eq!(got.files[0], "/usr/bin/python3.11");
        assert!(got.files.contains(&"/usr/local/bin/serve".into()));
        assert!(
            got.files
                .contains(&"/usr/lib/python3.11/json/decoder.py".into())
        );

        let got = infer(
            &b.0,
            &ep(&["/usr/bin/python3", "-u", "-m", "json"], "/"),
            Limits::default(),
        );
        assert!(
            got.files
                .contains(&"/usr/lib/python3.11/json/decoder.py".into())
        );
    }

    #[test]
    fn a_plain_executable_gets_its_libraries_and_nothing_else() {
        let mut b = image();
        b.elf(
            "usr/bin/tool",
            Some("/lib64/ld-linux-x86-64.so.2"),
            &["libm.so.6", "libnope.so"],
            &[],
        );
        let got = infer(&b.0, &ep(&["tool", "--flag"], "/"), Limits::default());
        assert_eq!(
            got.files,
            vec![
                "/usr/bin/tool",
                "/etc/ld.so.cache",
                "/usr/lib64/ld-linux-x86-64.so.2",
                "/usr/lib/x86_64-linux-gnu/libm.so.6",
                "/usr/lib/x86_64-linux-gnu/libc.so.6",
            ]
        );
        let none = infer(&b.0, &ep(&["not-there"], "/"), Limits::default());
        assert!(none.files.is_empty());
        assert!(none.notes[0].contains("not-there"));
    }

    #[test]
    fn limits_and_cycles_bound_the_walk() {
        let mut b = image();
        // a imports b imports a; a long chain of packages.
        let site = "usr/local/lib/python3.11/dist-packages";
        b.py(&format!("{site}/cyc_a.py"), "import cyc_b\n");
        b.py(&format!("{site}/cyc_b.py"), "import cyc_a\n");
        let mut chain = String::new();
        for i in 0..1000 {
            chain.push_str(&format!("m{i}/"));
            b.py(
                &format!("{site}/{chain}__init__.py"),
                &format!("from . import m{}\n", i + 1),
            );
        }
        b.py("app/server.py", "import cyc_a\nimport m0\n");
        let got = infer(
            &b.0,
            &ep(&["python3", "server.py"], "/app"),
            Limits::default(),
        );
        assert!(got.files.iter().any(|f| f.ends_with("cyc_b.py")));
        assert!(
            got.files.len() < 1000,
            "depth is bounded: {}",
            got.files.len()
        );
        let small = infer(
            &b.0,
            &ep(&["python3", "server.py"], "/app"),
            Limits {
                max_files: 3,
                max_bytes: u64::MAX,
            },
        );
        assert_eq!(small.files.len(), 3);
    }
}
