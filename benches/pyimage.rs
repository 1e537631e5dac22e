//! Python function images built from Debian packages (and optionally PyPI wheels), and the files
//! they read at start-up (shared by bench-lazy-start and bench-cold-start).
//!
//! A [`Recipe`] names layers of Debian packages (cached `.deb`s in `<cache>/debs`, fetched with
//! `apt-get download`), optionally a layer of PyPI wheels ([`WheelLayer`]: pinned manylinux
//! wheels cached in `<cache>/wheels`, fetched with the host's `python3 -m pip download` and
//! installed by the host's pip with `--target` into the image's
//! `/usr/local/lib/python3.11/dist-packages`, which Debian's python3.11 searches, console
//! scripts moved to `/usr/local/bin` with the image's interpreter in their `#!` line), and
//! optionally an app layer of given files on top. Every package is
//! extracted (`dpkg-deb -x`) into its layer and into a merged root; what the maintainer scripts
//! would have done is done too, in the layer of the package: the BLAS/LAPACK alternatives
//! symlinks, `ld.so.cache` (`ldconfig -X -r`) and byte-compiled modules
//! (`python3.11 -m compileall`, as `py3compile` does; timestamp-checked `.pyc` files next to
//! their sources). The wheel layer's files get a fixed mtime (so its digest only depends on the
//! wheels) and are byte-compiled the same way, by the image's interpreter, as pip does at install.
//!
//! The start-up file set is found for real: Python runs chrooted into the merged root (with
//! `/proc` mounted) and executes the recipe's start-up code under an audit hook that records
//! every `open` (`.pyc` files, data files, scripts) and, at each open and import, any file newly
//! mapped into the process (`/proc/self/maps`: the interpreter, `ld.so`, shared libraries and
//! extension modules); modules loaded before the hook come from `sys.modules`. Paths are
//! resolved inside the image, non-regular files dropped, duplicates removed; the list (open
//! order) is cached next to the image as `startup-files.txt`, the format `arbor convert
//! --prefetch-list` takes.
//!
//! Everything lands in `<cache>/<recipe name>`: layer tars, an OCI layout tagged with the
//! recipe's name, the list, and `image.json`, which says what it was built from; it is reused
//! as long as that matches.

use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, UNIX_EPOCH};

use anyhow::{Context, Result, ensure};
use arbor_testkit::{ImageSpec, LayerSource, find_in_path, tar_dir, write_oci_layout};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::common::{MB, resolve_debs, run_quiet, tail};
use crate::harness::{
    MountGuard, check_interrupted, layer_sizes, run_checked, run_timed, unmount_below,
};

/// The image cache's flags.
#[derive(clap::Args)]
pub struct CacheArgs {
    /// Where .debs, wheels, layer tars, the OCI layout and the start-up set are cached
    /// [default: <target dir>/bench-cache].
    #[arg(long = "cache-dir", value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Rebuild the image and the start-up set even if the cache is up to date.
    #[arg(long)]
    pub rebuild: bool,
}

/// The interpreter every image has.
pub const PYTHON: &str = "/usr/bin/python3.11";

/// One layer of the image: the Debian packages extracted into it.
pub struct LayerDef {
    pub name: &'static str,
    pub packages: &'static [&'static str],
}

/// About 430 MB uncompressed: what `apt-get install python3-pandas python3-scipy` puts in a
/// Debian image (less the C++ compiler that pythran recommends): `base` (libc and the libraries
/// Python links), `python` (CPython 3.11 and pure-Python dependencies) and `scientific` (numpy,
/// scipy, pandas, OpenBLAS, and what Debian's python3-scipy depends on besides: pythran and the
/// Boost headers, which nothing imports).
pub const SCIENTIFIC_LAYERS: &[LayerDef] = &[
    LayerDef {
        name: "base",
        packages: &[
            "libc6",
            "libgcc-s1",
            "libstdc++6",
            "zlib1g",
            "libssl3",
            "ca-certificates",
            "tzdata",
            "coreutils",
            "bash",
            "libexpat1",
            "libffi8",
            "libbz2-1.0",
            "liblzma5",
            "libzstd1",
            "libsqlite3-0",
            "libuuid1",
            "libncursesw6",
            "libtinfo6",
            "libreadline8",
            "readline-common",
            "libcrypt1",
            "libdb5.3",
            "media-types",
        ],
    },
    LayerDef {
        name: "python",
        packages: &[
            "python3.11-minimal",
            "libpython3.11-minimal",
            "libpython3.11-stdlib",
            "python3.11",
            "python3-minimal",
            "libpython3-stdlib",
            "python3",
            "python3-pkg-resources",
            "python3-six",
            "python3-dateutil",
            "python3-tz",
            "python3-decorator",
            "python3-gast",
            "python3-beniget",
            "python3-ply",
        ],
    },
    LayerDef {
        name: "scientific",
        packages: &[
            "python3-numpy",
            "libopenblas0-pthread",
            "libgfortran5",
            "libquadmath0",
            "python3-scipy",
            "liblbfgsb0",
            "python3-pandas",
            "python3-pandas-lib",
            "python3-pythran",
            "libxsimd-dev",
            "libboost1.74-dev",
        ],
    },
];

/// A layer of PyPI wheels (see the module docs).
pub struct WheelLayer {
    pub name: &'static str,
    /// Pinned requirements (`name==version`), dependencies included: the layer holds exactly
    /// these wheels.
    pub requirements: &'static [&'static str],
    /// The wheels' platform tags for `pip download` / `pip install` (`--platform`).
    pub platforms: &'static [&'static str],
    /// `--python-version`, `--implementation` and `--abi`.
    pub python_version: &'static str,
    pub implementation: &'static str,
    pub abi: &'static str,
    /// The image directory the wheels are installed into.
    pub site_packages: &'static str,
}

impl WheelLayer {
    /// pip's flags selecting the image's wheels (binary only).
    fn platform_args(&self) -> Vec<String> {
        let mut a = vec!["--only-binary=:all:".to_string()];
        for p in self.platforms {
            a.push("--platform".into());
            a.push((*p).into());
        }
        a.extend(
            [
                ("--python-version", self.python_version),
                ("--implementation", self.implementation),
                ("--abi", self.abi),
            ]
            .iter()
            .flat_map(|(k, v)| [k.to_string(), v.to_string()]),
        );
        a
    }
}

/// The alternatives libopenblas0-pthread's postinst installs: (link, name, target).
pub const ALTERNATIVES: &[(&str, &str, &str)] = &[
    (
        "/usr/lib/x86_64-linux-gnu/libblas.so.3",
        "libblas.so.3-x86_64-linux-gnu",
        "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    ),
    (
        "/usr/lib/x86_64-linux-gnu/liblapack.so.3",
        "liblapack.so.3-x86_64-linux-gnu",
        "/usr/lib/x86_64-linux-gnu/openblas-pthread/liblapack.so.3",
    ),
    (
        "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
        "libopenblas.so.0-x86_64-linux-gnu",
        "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    ),
];

/// Records what running CODE opens (see the module docs). argv: output file, Python code.
pub const TRACER: &str = r#"
import os, sys

def main():
    out_path, code = sys.argv[1], sys.argv[2]
    order = []
    mapped = set()
    busy = False

    def scan_maps():
        fd = os.open("/proc/self/maps", os.O_RDONLY)
        chunks = []
        try:
            while True:
                b = os.read(fd, 1 << 16)
                if not b:
                    break
                chunks.append(b)
        finally:
            os.close(fd)
        for line in b"".join(chunks).decode("utf-8", "replace").splitlines():
            parts = line.split(None, 5)
            if len(parts) == 6 and parts[5].startswith("/") and parts[5] not in mapped:
                mapped.add(parts[5])
                order.append(parts[5])

    def hook(event, args):
        nonlocal busy
        if busy or event not in ("open", "import"):
            return
        busy = True
        try:
            if event == "open" and args:
                p = args[0]
                if isinstance(p, bytes):
                    p = os.fsdecode(p)
                if isinstance(p, str):
                    order.append(os.path.abspath(p))
            scan_maps()
        finally:
            busy = False

    # Before this script: exec of the interpreter, ld.so and the libraries it mapped ...
    order.append(os.path.realpath(sys.executable))
    scan_maps()
    # ... the modules imported at start-up (their .pyc, or source without one) ...
    for name, m in list(sys.modules.items()):
        if name == "__main__":
            continue
        spec = getattr(m, "__spec__", None)
        if spec is not None and spec.origin in ("frozen", "built-in"):
            continue
        cached = getattr(m, "__cached__", None)
        f = getattr(m, "__file__", None)
        if cached and os.path.exists(cached):
            order.append(cached)
        elif f:
            order.append(f)
    # ... and the .pth files site.py read.
    import site
    for d in site.getsitepackages():
        try:
            names = sorted(n for n in os.listdir(d) if n.endswith(".pth"))
        except OSError:
            continue
        order.extend(os.path.join(d, n) for n in names)
    import stat
    sys.addaudithook(hook)
    exec(code, {})
    busy = True
    scan_maps()
    out, seen = [], set()
    for p in order:
        try:
            rp = os.path.realpath(p)
            st = os.stat(rp)
        except (OSError, ValueError):
            continue
        if stat.S_ISREG(st.st_mode) and rp not in seen and not rp.startswith(("/proc/", "/tmp/")):
            seen.add(rp)
            out.append(rp)
    with open(out_path, "w") as f:
        f.write("\n".join(out) + "\n")
    print(len(out), "files,", len(sys.modules), "modules")

main()
"#;

// ---------------------------------------------------------------------------------------------
// The image and the start-up set

/// One file of the start-up set, as in the image.
pub struct StartupFile {
    /// Absolute image path.
    pub path: String,
    pub size: u64,
    pub mtime: i64,
    pub sha256: String,
    /// Index of the layer holding it.
    pub layer: usize,
}

impl StartupFile {
    pub fn rel(&self) -> &str {
        self.path.trim_start_matches('/')
    }
}

/// A built image: an OCI layout and what is in it.
pub struct Image {
    /// The OCI layout directory and the image's tag in it.
    pub layout: PathBuf,
    pub tag: String,
    pub manifest_digest: String,
    pub layers: Vec<Value>,
    pub uncompressed_bytes: u64,
    pub regular_files: u64,
    pub regular_bytes: u64,
    pub startup: Vec<StartupFile>,
    pub prefetch_list: PathBuf,
    pub trace_output: String,
}

impl Image {
    pub fn startup_bytes(&self) -> u64 {
        self.startup.iter().map(|f| f.size).sum()
    }

    pub fn print(&self) {
        println!(
            "image: {} layers, {:.1} MB uncompressed ({} regular files, {:.1} MB of file content), \
             manifest {}",
            self.layers.len(),
            self.uncompressed_bytes as f64 / MB,
            self.regular_files,
            self.regular_bytes as f64 / MB,
            self.manifest_digest
        );
        for (i, l) in self.layers.iter().enumerate() {
            println!(
                "  layer {} {:<11} {:>7.1} MB tar {:>7.1} MB gzip {:>6} files; start-up set: {} files, {:.1} MB",
                i + 1,
                l["name"].as_str().unwrap_or("?"),
                l["uncompressed_bytes"].as_f64().unwrap_or(0.0) / MB,
                l["gzip_bytes"].as_f64().unwrap_or(0.0) / MB,
                l["regular_files"],
                self.startup.iter().filter(|f| f.layer == i).count(),
                self.startup
                    .iter()
                    .filter(|f| f.layer == i)
                    .map(|f| f.size)
                    .sum::<u64>() as f64
                    / MB,
            );
        }
        println!(
            "start-up set ({}): {} files, {:.1} MB = {:.1}% of the image's file content \
             ({:.1}% of its files); list: {}",
            self.trace_output.trim(),
            self.startup.len(),
            self.startup_bytes() as f64 / MB,
            100.0 * self.startup_bytes() as f64 / self.regular_bytes.max(1) as f64,
            100.0 * self.startup.len() as f64 / self.regular_files.max(1) as f64,
            self.prefetch_list.display()
        );
    }

    pub fn to_json(&self, gzip_sizes: &[u64]) -> Value {
        let kinds = |ext: &str| {
            let fs: Vec<&StartupFile> = self
                .startup
                .iter()
                .filter(|f| f.path.ends_with(ext))
                .collect();
            json!({"files": fs.len(), "bytes": fs.iter().map(|f| f.size).sum::<u64>()})
        };
        let so: Vec<&StartupFile> = self
            .startup
            .iter()
            .filter(|f| f.path.ends_with(".so") || f.path.contains(".so."))
            .collect();
        json!({
            "manifest_digest": self.manifest_digest,
            "layers": self.layers,
            "pushed_layer_sizes": gzip_sizes,
            "uncompressed_bytes": self.uncompressed_bytes,
            "regular_files": self.regular_files,
            "regular_bytes": self.regular_bytes,
            "startup_set": {
                "files": self.startup.len(),
                "bytes": self.startup_bytes(),
                "fraction_of_file_bytes": self.startup_bytes() as f64 / self.regular_bytes.max(1) as f64,
                "pyc": kinds(".pyc"),
                "shared_objects": {"files": so.len(), "bytes": so.iter().map(|f| f.size).sum::<u64>()},
                "per_layer": (0..self.layers.len()).map(|i| json!({
                    "files": self.startup.iter().filter(|f| f.layer == i).count(),
                    "bytes": self.startup.iter().filter(|f| f.layer == i).map(|f| f.size).sum::<u64>(),
                })).collect::<Vec<_>>(),
                "list": self.prefetch_list,
                "tracer": self.trace_output.trim(),
            },
        })
    }
}

/// A file of the app layer.
pub struct AppFile {
    /// Absolute path in the image (parents are created 0755).
    pub path: &'static str,
    pub mode: u32,
    pub data: Vec<u8>,
}

/// What to build (see the module docs).
pub struct Recipe<'a> {
    /// Cache subdirectory and OCI layout tag.
    pub name: &'a str,
    /// Bump when the way the image or the start-up set is built changes.
    pub version: u32,
    /// Package layers, bottom first.
    pub layers: Vec<&'a LayerDef>,
    /// A layer of PyPI wheels on top of the package layers.
    pub wheels: Option<&'a WheelLayer>,
    /// Files of an app layer on top of the package layers (empty: no app layer).
    pub app: Vec<AppFile>,
    /// Python code (run chrooted into the image, cwd `/`) whose opens make the start-up set.
    pub startup_code: String,
    /// What the start-up code does, in words.
    pub startup_label: String,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
}

/// The `PATH` of the images.
pub const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The cached image and start-up set of `recipe` in `cache`, building them if missing or
/// stale.
pub fn prepare_image(cache: &Path, recipe: &Recipe, rebuild: bool) -> Result<Image> {
    let debs_dir = cache.join("debs");
    fs::create_dir_all(&debs_dir)?;
    let all: Vec<&str> = recipe
        .layers
        .iter()
        .flat_map(|l| l.packages.iter().copied())
        .collect();
    let debs = resolve_debs(&debs_dir, &all)?;
    let wheels_dir = cache.join("wheels");
    let wheels = match recipe.wheels {
        Some(w) => resolve_wheels(&wheels_dir, w)?,
        None => Vec::new(),
    };
    let mut wheel_key = Vec::new();
    for (req, file) in &wheels {
        wheel_key.push(json!({
            "requirement": req,
            "wheel": file,
            "sha256": sha256_file(&wheels_dir.join(file))?,
        }));
    }
    let dir = cache.join(recipe.name);
    let stamp_path = dir.join("image.json");
    let mut key = json!({
        "recipe": recipe.version,
        "startup": recipe.startup_label,
        "startup_code": recipe.startup_code,
        "layers": recipe.layers.iter().map(|l| json!({
            "name": l.name,
            "debs": l.packages.iter().map(|p| &debs[*p]).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "app": recipe.app.iter().map(|f| json!({
            "path": f.path,
            "mode": f.mode,
            "sha256": hex(&Sha256::digest(&f.data)),
        })).collect::<Vec<_>>(),
        "entrypoint": recipe.entrypoint,
        "cmd": recipe.cmd,
        "env": recipe.env,
    });
    // Only recipes with wheels have the field: the other images' keys stay what they were
    // (their caches stay valid, also for benches built before wheels existed).
    if let Some(w) = recipe.wheels {
        key["wheels"] = json!({
            "name": w.name,
            "site_packages": w.site_packages,
            "wheels": wheel_key,
        });
    }
    if !rebuild && let Some(img) = load_cached(&dir, recipe.name, &stamp_path, &key) {
        println!("image: cached in {}", dir.display());
        return Ok(img);
    }
    println!("image: building in {}", dir.display());
    let t_all = Instant::now();
    if dir.exists() {
        unmount_below(&dir);
        fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    fs::create_dir_all(&dir)?;
    let root = dir.join("rootfs");
    // Package layers, the wheel layer, then the app layer.
    let n_content = recipe.layers.len() + usize::from(recipe.wheels.is_some());
    let n_layers = n_content + usize::from(!recipe.app.is_empty());
    let layer_dirs: Vec<PathBuf> = (0..n_layers)
        .map(|i| dir.join(format!("layer-{i}")))
        .collect();
    let package_dirs = &layer_dirs[..recipe.layers.len()];
    let content_dirs = &layer_dirs[..n_content];

    // Extract every package into its layer and into the merged root.
    let t = Instant::now();
    for (def, ldir) in recipe.layers.iter().zip(package_dirs) {
        for target in [ldir, &root] {
            fs::create_dir_all(target)?;
            for pkg in def.packages {
                let deb = debs_dir.join(&debs[*pkg]);
                check_interrupted()?;
                run_quiet(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(target))
                    .with_context(|| format!("extracting {}", deb.display()))?;
            }
        }
    }
    println!(
        "  extracted {} packages in {:.1} s",
        all.len(),
        t.elapsed().as_secs_f64()
    );
    if let Some(w) = recipe.wheels {
        let t = Instant::now();
        let wdir = &layer_dirs[recipe.layers.len()];
        install_wheels(&wheels_dir, w, &wheels, wdir)?;
        run_quiet(
            Command::new("cp")
                .arg("-a")
                .arg(format!("{}/.", wdir.display()))
                .arg(&root),
        )
        .context("copying the wheel layer into the merged root")?;
        println!(
            "  installed {} wheels with pip in {:.1} s",
            wheels.len(),
            t.elapsed().as_secs_f64()
        );
    }

    // What maintainer scripts and the base system would have done.
    for target in [&layer_dirs[0], &root] {
        for (d, mode) in [
            ("proc", 0o555),
            ("dev", 0o755),
            ("tmp", 0o1777),
            ("root", 0o700),
        ] {
            let p = target.join(d);
            fs::create_dir_all(&p)?;
            fs::set_permissions(&p, fs::Permissions::from_mode(mode))?;
        }
    }
    let top = content_dirs.last().context("a recipe without layers")?;
    let blas = recipe
        .layers
        .iter()
        .position(|l| l.packages.contains(&"libopenblas0-pthread"));
    for target in blas.map(|i| [&package_dirs[i], &root]).iter().flatten() {
        fs::create_dir_all(target.join("etc/alternatives"))?;
        for (link, name, dest) in ALTERNATIVES {
            let alt = format!("/etc/alternatives/{name}");
            symlink_force(dest, &target.join(alt.trim_start_matches('/')))?;
            symlink_force(&alt, &target.join(link.trim_start_matches('/')))?;
        }
    }
    run_quiet(Command::new("ldconfig").arg("-X").arg("-r").arg(&root)).context("ldconfig -r")?;
    fs::create_dir_all(top.join("etc"))?;
    fs::copy(root.join("etc/ld.so.cache"), top.join("etc/ld.so.cache"))?;

    // Byte-compile like py3compile, then give each .pyc to its source's layer.
    let t = Instant::now();
    let mut c = chroot_python(&root);
    c.args([
        "-m",
        "compileall",
        "-q",
        "/usr/lib/python3.11",
        "/usr/lib/python3/dist-packages",
    ]);
    if let Some(w) = recipe.wheels {
        c.arg(w.site_packages);
    }
    // Exits 1 because a few test files in the packages are not valid Python 3: ignore that.
    let (_, _, err) = run_timed(&mut c, Duration::from_secs(1800)).context("compileall")?;
    let mut pycs = Vec::new();
    find_pycs(&root, Path::new(""), &mut pycs)?;
    ensure!(
        pycs.len() > 1000,
        "compileall made only {} .pyc files: {}",
        pycs.len(),
        tail(&err, 20)
    );
    for rel in &pycs {
        let src = pyc_source(rel).context("pyc name")?;
        let layer = content_dirs
            .iter()
            .position(|d| fs::symlink_metadata(d.join(&src)).is_ok())
            .unwrap_or(content_dirs.len() - 1);
        let dst = content_dirs[layer].join(rel);
        let parent = dst.parent().context("pyc without parent")?;
        if !parent.exists() {
            fs::create_dir_all(parent)?;
            fs::set_permissions(parent, fs::Permissions::from_mode(0o755))?;
        }
        fs::copy(root.join(rel), &dst)?;
        let m = fs::metadata(root.join(rel))?;
        set_mtime(&dst, m.mtime())?;
    }
    println!(
        "  byte-compiled {} modules in {:.1} s",
        pycs.len(),
        t.elapsed().as_secs_f64()
    );

    // The app layer.
    if let Some(app_dir) = layer_dirs.get(n_content) {
        for f in &recipe.app {
            for target in [app_dir, &root] {
                let p = target.join(f.path.trim_start_matches('/'));
                let parent = p.parent().context("app file without parent")?;
                if !parent.exists() {
                    fs::create_dir_all(parent)?;
                    fs::set_permissions(parent, fs::Permissions::from_mode(0o755))?;
                }
                fs::write(&p, &f.data).with_context(|| format!("writing {}", p.display()))?;
                fs::set_permissions(&p, fs::Permissions::from_mode(f.mode))?;
                set_mtime(&p, arbor_testkit::DEFAULT_MTIME as i64)?;
            }
        }
    }

    // The start-up set.
    let trace_output = trace_startup(
        &root,
        &recipe.startup_code,
        &recipe.startup_label,
        &dir.join("startup-files.txt"),
    )?;
    let list = fs::read_to_string(dir.join("startup-files.txt"))?;
    let mut startup = Vec::new();
    for path in list.lines().filter(|l| !l.is_empty()) {
        let rel = path.trim_start_matches('/');
        let full = root.join(rel);
        let m = fs::metadata(&full).with_context(|| format!("start-up file {path}"))?;
        let layer = layer_dirs
            .iter()
            .rposition(|d| fs::symlink_metadata(d.join(rel)).is_ok_and(|m| m.is_file()))
            .with_context(|| format!("start-up file {path} is in no layer"))?;
        startup.push(json!({
            "path": path,
            "size": m.len(),
            "mtime": m.mtime(),
            "sha256": sha256_file(&full)?,
            "layer": layer,
        }));
    }

    // Layer tars and the OCI layout.
    let mut layers = Vec::new();
    let mut tars = Vec::new();
    for (i, ldir) in layer_dirs.iter().enumerate() {
        check_interrupted()?;
        let (files, bytes) = tree_stats(ldir)?;
        let tar_path = dir.join(format!("layer-{i}.tar"));
        {
            let mut out = BufWriter::with_capacity(1 << 20, File::create(&tar_path)?);
            tar_dir(ldir, &mut out).with_context(|| format!("tarring {}", ldir.display()))?;
            out.flush()?;
        }
        let what = match (recipe.layers.get(i), recipe.wheels) {
            (Some(def), _) => json!({
                "name": def.name,
                "packages": def.packages,
                "debs": def.packages.iter().map(|p| &debs[*p]).collect::<Vec<_>>(),
            }),
            (None, Some(w)) if i < n_content => json!({
                "name": w.name,
                "requirements": w.requirements,
                "wheels": wheels.iter().map(|(_, f)| f).collect::<Vec<_>>(),
                "site_packages": w.site_packages,
            }),
            _ => json!({
                "name": "app",
                "files": recipe.app.iter().map(|f| f.path).collect::<Vec<_>>(),
            }),
        };
        let mut l = what;
        l["tar"] = json!(
            tar_path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        );
        l["uncompressed_bytes"] = json!(fs::metadata(&tar_path)?.len());
        l["regular_files"] = json!(files);
        l["regular_bytes"] = json!(bytes);
        layers.push(l);
        tars.push(tar_path);
    }
    let layout = dir.join("oci");
    let spec = ImageSpec {
        layers: tars.iter().cloned().map(LayerSource::TarFile).collect(),
        entrypoint: recipe.entrypoint.clone(),
        cmd: recipe.cmd.clone(),
        env: recipe.env.clone(),
        ..ImageSpec::default()
    };
    let manifest_digest = write_oci_layout(&layout, recipe.name, &spec)?;
    let manifest: Value =
        serde_json::from_slice(&fs::read(layout_blob(&layout, &manifest_digest))?)?;
    for (l, size) in layers.iter_mut().zip(layer_sizes(&manifest)?) {
        l["gzip_bytes"] = json!(size);
    }
    for d in &layer_dirs {
        fs::remove_dir_all(d)?;
    }
    fs::remove_dir_all(&root)?;
    let stamp = json!({
        "key": key,
        "manifest_digest": manifest_digest,
        "layers": layers,
        "startup": startup,
        "trace_output": trace_output,
    });
    fs::write(&stamp_path, serde_json::to_vec_pretty(&stamp)?)?;
    println!("  image built in {:.1} s", t_all.elapsed().as_secs_f64());
    load_cached(&dir, recipe.name, &stamp_path, &key)
        .context("the image just built does not read back")
}

/// Maps each pinned requirement of `w` to its wheel in `dir`, downloading the missing ones with
/// the host's `python3 -m pip download` (for the image's platform and Python, not the host's).
pub fn resolve_wheels(dir: &Path, w: &WheelLayer) -> Result<Vec<(String, String)>> {
    fs::create_dir_all(dir)?;
    let find_all = || -> Result<Vec<(String, Option<String>)>> {
        w.requirements
            .iter()
            .map(|r| Ok((r.to_string(), find_wheel(dir, r)?)))
            .collect()
    };
    let found = find_all()?;
    if found.iter().any(|(_, f)| f.is_none()) {
        let before = wheel_files(dir)?;
        let pip = host_pip()?;
        println!(
            "pip download of {} pinned wheels into {}",
            w.requirements.len(),
            dir.display()
        );
        run_quiet(
            Command::new(&pip[0])
                .args(&pip[1..])
                .args(["download", "--disable-pip-version-check", "-d"])
                .arg(dir)
                .args(w.platform_args())
                .args(w.requirements),
        )
        .context("pip download of the image's wheels")?;
        // Everything pip fetched must be pinned: the layer holds exactly the pinned set.
        let unpinned: Vec<String> = wheel_files(dir)?
            .into_iter()
            .filter(|f| !before.contains(f))
            .filter(|f| {
                !w.requirements
                    .iter()
                    .any(|r| wheel_matches(f, r).unwrap_or(false))
            })
            .collect();
        ensure!(
            unpinned.is_empty(),
            "pip download fetched wheels whose requirements are not pinned (add them to the \
             recipe's requirements): {}",
            unpinned.join(", ")
        );
    }
    find_all()?
        .into_iter()
        .map(|(r, f)| {
            let f = f.with_context(|| format!("no wheel for {r} in {}", dir.display()))?;
            Ok((r, f))
        })
        .collect()
}

/// The `.whl` files in `dir`.
fn wheel_files(dir: &Path) -> Result<Vec<String>> {
    let mut v = Vec::new();
    for e in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let name = e?.file_name().to_string_lossy().into_owned();
        if name.ends_with(".whl") {
            v.push(name);
        }
    }
    v.sort();
    Ok(v)
}

/// Whether wheel file `file` is the distribution and version of `requirement` (`name==ver`;
/// names compared as PEP 503 normalizes them, wheel names have `_` for `-`).
fn wheel_matches(file: &str, requirement: &str) -> Result<bool> {
    let (name, version) = requirement
        .split_once("==")
        .with_context(|| format!("requirement {requirement:?} is not pinned (name==version)"))?;
    let norm = |s: &str| s.to_ascii_lowercase().replace(['-', '.'], "_");
    let mut parts = file.splitn(3, '-');
    Ok(match (parts.next(), parts.next()) {
        (Some(n), Some(v)) => norm(n) == norm(name) && v == version,
        _ => false,
    })
}

/// The wheel of `requirement` in `dir` (the first in name order if several platforms match).
fn find_wheel(dir: &Path, requirement: &str) -> Result<Option<String>> {
    for f in wheel_files(dir)? {
        if wheel_matches(&f, requirement)? {
            return Ok(Some(f));
        }
    }
    Ok(None)
}

/// The host's pip: `python3 -m pip`.
pub fn host_pip() -> Result<Vec<String>> {
    let python = find_in_path("python3").context(
        "no python3 on the host: the PyPI image's wheels are downloaded and installed with the \
         host's pip (`python3 -m pip`); install python3 and pip (e.g. apt-get install \
         python3-pip)",
    )?;
    let pip = vec![
        python.to_string_lossy().into_owned(),
        "-m".to_string(),
        "pip".to_string(),
    ];
    run_quiet(Command::new(&pip[0]).args(&pip[1..]).arg("--version")).with_context(|| {
        format!(
            "`{} -m pip` does not work: the PyPI image's wheels are downloaded and installed \
             with the host's pip; install pip for it (e.g. apt-get install python3-pip, or \
             python3 -m ensurepip)",
            python.display()
        )
    })?;
    Ok(pip)
}

/// Installs `wheels` (file names in `dir`) into `layer` as pip would in the image, without
/// network: `pip install --no-index --no-deps --target LAYER/SITE_PACKAGES`, console scripts
/// moved to `/usr/local/bin` with the image's interpreter, mtimes fixed. Not byte-compiled here
/// (the image's interpreter does that).
fn install_wheels(
    dir: &Path,
    w: &WheelLayer,
    wheels: &[(String, String)],
    layer: &Path,
) -> Result<()> {
    let site = layer.join(w.site_packages.trim_start_matches('/'));
    fs::create_dir_all(&site)?;
    let pip = host_pip()?;
    run_quiet(
        Command::new(&pip[0])
            .args(&pip[1..])
            .args([
                "install",
                "--disable-pip-version-check",
                "--no-index",
                "--no-deps",
                "--no-compile",
                "--no-warn-script-location",
                "--find-links",
            ])
            .arg(dir)
            .args(w.platform_args())
            .arg("--target")
            .arg(&site)
            .args(wheels.iter().map(|(_, f)| dir.join(f)))
            .env("PIP_ROOT_USER_ACTION", "ignore"),
    )
    .context("pip install of the image's wheels")?;
    // --target leaves scripts in SITE/bin with the host's interpreter in `#!`.
    let bin = site.join("bin");
    if bin.is_dir() {
        let dest = layer.join("usr/local/bin");
        fs::create_dir_all(&dest)?;
        for e in fs::read_dir(&bin)? {
            let e = e?;
            let data = fs::read(e.path())?;
            let data = match data.strip_prefix(b"#!") {
                Some(rest)
                    if rest
                        .split(|b| *b == b'\n')
                        .next()
                        .is_some_and(|l| String::from_utf8_lossy(l).contains("python")) =>
                {
                    let body = rest
                        .iter()
                        .position(|b| *b == b'\n')
                        .map_or(&[][..], |i| &rest[i..]);
                    [format!("#!{PYTHON}").as_bytes(), body].concat()
                }
                _ => data,
            };
            let out = dest.join(e.file_name());
            fs::write(&out, data)?;
            fs::set_permissions(&out, fs::Permissions::from_mode(0o755))?;
        }
        fs::remove_dir_all(&bin)?;
    }
    // Reproducible layer: every file gets the same mtime (the .pyc files record it).
    let mut stack = vec![layer.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d)? {
            let e = e?;
            let ft = e.file_type()?;
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                set_mtime(&e.path(), arbor_testkit::DEFAULT_MTIME as i64)?;
            }
        }
    }
    Ok(())
}

/// The image cached in `dir` if its stamp says it was built from `key` and its blobs are there.
pub fn load_cached(dir: &Path, tag: &str, stamp_path: &Path, key: &Value) -> Option<Image> {
    let stamp: Value = serde_json::from_slice(&fs::read(stamp_path).ok()?).ok()?;
    if &stamp["key"] != key {
        return None;
    }
    let layers = stamp["layers"].as_array()?.clone();
    let layout = dir.join("oci");
    let manifest_digest = stamp["manifest_digest"].as_str()?.to_string();
    let manifest: Value =
        serde_json::from_slice(&fs::read(layout_blob(&layout, &manifest_digest)).ok()?).ok()?;
    for (l, d) in layers.iter().zip(manifest["layers"].as_array()?) {
        let blob = layout_blob(&layout, d["digest"].as_str()?);
        if fs::metadata(blob).ok()?.len() != l["gzip_bytes"].as_u64()? {
            return None;
        }
    }
    let startup: Vec<StartupFile> = stamp["startup"]
        .as_array()?
        .iter()
        .map(|f| {
            Some(StartupFile {
                path: f["path"].as_str()?.to_string(),
                size: f["size"].as_u64()?,
                mtime: f["mtime"].as_i64()?,
                sha256: f["sha256"].as_str()?.to_string(),
                layer: f["layer"].as_u64()? as usize,
            })
        })
        .collect::<Option<_>>()?;
    let prefetch_list = dir.join("startup-files.txt");
    if !prefetch_list.is_file() || startup.is_empty() {
        return None;
    }
    let sum = |k: &str| layers.iter().filter_map(|l| l[k].as_u64()).sum::<u64>();
    Some(Image {
        layout,
        tag: tag.to_string(),
        manifest_digest,
        uncompressed_bytes: sum("uncompressed_bytes"),
        regular_files: sum("regular_files"),
        regular_bytes: sum("regular_bytes"),
        layers,
        startup,
        prefetch_list,
        trace_output: stamp["trace_output"].as_str().unwrap_or("").to_string(),
    })
}

pub fn layout_blob(layout: &Path, digest: &str) -> PathBuf {
    layout
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"))
}

/// `python3.11` chrooted into `root`, with a clean environment and no bytecode writing.
pub fn chroot_python(root: &Path) -> Command {
    // Absolute: the cleared environment's PATH is the image's, used to find the program.
    let chroot = find_in_path("chroot").unwrap_or_else(|| PathBuf::from("/usr/sbin/chroot"));
    let mut c = Command::new(chroot);
    c.arg(root)
        .arg(PYTHON)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", "/root")
        .env("LANG", "C.UTF-8")
        .env("PYTHONDONTWRITEBYTECODE", "1");
    c
}

/// Runs the tracer on `code` in `root` (with /proc mounted) and writes the start-up list to
/// `out`; returns what the tracer printed.
pub fn trace_startup(root: &Path, code: &str, label: &str, out: &Path) -> Result<String> {
    let proc_dir = root.join("proc");
    run_quiet(
        Command::new("mount")
            .args(["-t", "proc", "proc"])
            .arg(&proc_dir),
    )
    .context("mounting /proc in the image root")?;
    let guard = MountGuard(proc_dir);
    let script = root.join("tmp/arbor-trace.py");
    fs::write(&script, TRACER)?;
    let mut c = chroot_python(root);
    c.args(["/tmp/arbor-trace.py", "/tmp/arbor-startup.txt", code]);
    let stdout = run_checked(&mut c, Duration::from_secs(300))
        .with_context(|| format!("tracing the start-up ({label})"))?;
    drop(guard);
    fs::remove_file(&script)?;
    fs::rename(root.join("tmp/arbor-startup.txt"), out)?;
    println!("  traced {label}: {}", stdout.trim());
    Ok(stdout)
}

pub fn symlink_force(target: &str, link: &Path) -> Result<()> {
    if let Some(p) = link.parent() {
        fs::create_dir_all(p)?;
    }
    if fs::symlink_metadata(link).is_ok() {
        fs::remove_file(link)?;
    }
    std::os::unix::fs::symlink(target, link)
        .with_context(|| format!("symlink {} -> {target}", link.display()))
}

/// Sets the mtime of `p` (a file or a directory).
pub fn set_mtime(p: &Path, mtime: i64) -> Result<()> {
    let f = File::open(p)?;
    f.set_modified(UNIX_EPOCH + Duration::from_secs(mtime.max(0) as u64))?;
    Ok(())
}

/// Relative paths of the `.pyc` files in `__pycache__` dirs below `root/rel`.
pub fn find_pycs(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for e in fs::read_dir(root.join(rel))? {
        let e = e?;
        let r = rel.join(e.file_name());
        let ft = e.file_type()?;
        if ft.is_dir() {
            find_pycs(root, &r, out)?;
        } else if ft.is_file()
            && r.extension().is_some_and(|x| x == "pyc")
            && rel.file_name().is_some_and(|n| n == "__pycache__")
        {
            out.push(r);
        }
    }
    Ok(())
}

/// `a/b/__pycache__/mod.cpython-311.pyc` → `a/b/mod.py`.
pub fn pyc_source(pyc: &Path) -> Option<PathBuf> {
    let name = pyc.file_name()?.to_str()?;
    let module = name.split('.').next()?;
    Some(pyc.parent()?.parent()?.join(format!("{module}.py")))
}

/// (regular files, their bytes) below `dir` (hard links counted once).
pub fn tree_stats(dir: &Path) -> Result<(u64, u64)> {
    let mut files = 0;
    let mut bytes = 0;
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d)? {
            let e = e?;
            let m = fs::symlink_metadata(e.path())?;
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() && seen.insert((m.dev(), m.ino())) {
                files += 1;
                bytes += m.len();
            }
        }
    }
    Ok((files, bytes))
}

pub fn sha256_file(p: &Path) -> Result<String> {
    sha256_file_with(p, &mut vec![0u8; 1 << 20])
}

/// [`sha256_file`] reading through `buf`: a caller hashing many files reuses one buffer
/// (a fresh 1 MiB buffer per file is a fresh mapping whose pages the kernel zeroes).
pub fn sha256_file_with(p: &Path, buf: &mut [u8]) -> Result<String> {
    let mut f = File::open(p).with_context(|| format!("opening {}", p.display()))?;
    let mut h = Sha256::new();
    loop {
        let n = match f.read(buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {}", p.display())),
        };
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A PyPI-built scientific Python layer (bench-cold-start's PyPI image, bench-fuse-read's
/// `--pypi` tree): numpy, scipy, scikit-learn, pandas and flask, and what
/// they depend on, pinned to what `pip download` resolved on 2026-11-29 (the wheels are cached
/// in `<cache>/wheels`).
pub const SCIENTIFIC_WHEELS: WheelLayer = WheelLayer {
    name: "pypi",
    requirements: &[
        "numpy==2.2.6",
        "scipy==1.16.3",
        "scikit-learn==1.7.2",
        "pandas==2.3.2",
        "flask==3.1.3",
        // Their dependencies.
        "blinker==1.9.0",
        "click==8.5.1",
        "cloudpickle==3.1.3",
        "itsdangerous==2.2.0",
        "jinja2==3.1.6",
        "joblib==1.6.0",
        "markupsafe==3.0.4",
        "python-dateutil==4.0.0",
        "pytz==2026.6",
        "threadpoolctl==3.8.0",
        "tzdata==2026.6",
        "werkzeug==3.1.9",
    ],
    platforms: &["manylinux2014_x86_64", "manylinux_2_17_x86_64"],
    python_version: "3.11",
    implementation: "cp",
    abi: "cp311",
    site_packages: "/usr/local/lib/python3.11/dist-packages",
};

/// A wheel layer of numpy and Flask with their dependencies (a subset of bench-cold-start's
/// pinned set, whose wheels it shares in `<cache>/wheels`): bench-provision's and
/// bench-invoke's functions.
pub const NUMPY_FLASK_WHEELS: WheelLayer = WheelLayer {
    name: "pypi",
    requirements: &[
        "numpy==2.2.6",
        "flask==3.1.3",
        "blinker==1.9.0",
        "click==8.5.1",
        "itsdangerous==2.2.0",
        "jinja2==3.1.6",
        "markupsafe==3.0.4",
        "werkzeug==3.1.9",
    ],
    platforms: &["manylinux2014_x86_64", "manylinux_2_17_x86_64"],
    python_version: "3.11",
    implementation: "cp",
    abi: "cp311",
    site_packages: "/usr/local/lib/python3.11/dist-packages",
};
