//! Issue #9, hostile images: nothing in a layer grants privilege on the node. A layer mounted
//! the way `arbor mount` mounts it (FUSE layer mounts with the defaults, stacked with
//! `overlay::mount_readonly_union`) is `nosuid,nodev`: a setuid-root binary runs with the
//! caller's uid and a device node cannot be opened, even by root. For arbord, whose layers are
//! lower directories of containerd's overlays, the overlay's own flags decide (so containers
//! keep setuid binaries such as sudo and ping).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use arbor_fetch::fetcher::FetcherOptions;
use arbor_lazyfs::{MountOptions, Mounted, mount_layer, overlay};
use arbor_testkit::{Entry, ImageSpec, LayerSource, Registry, layer_tar};
use common::*;

/// A copy of `id` owned by root with the setuid and setgid bits, and a `null` device node.
fn hostile_layer() -> Vec<Entry> {
    let id = std::fs::read("/usr/bin/id").unwrap();
    vec![
        Entry::dir("bin"),
        Entry::file("bin/id", id).with_mode(0o6755).with_owner(0, 0),
        Entry::dir("dev"),
        Entry::char_dev("dev/null", 1, 3).with_mode(0o666),
        Entry::file("hello", b"hello\n".to_vec()).with_mode(0o644),
    ]
}

/// The options of the mount at `target` in /proc/self/mountinfo (per-mount and superblock).
fn mount_options(target: &Path) -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let want = target.to_str().unwrap();
    let line = info
        .lines()
        .rfind(|l| l.split(' ').nth(4) == Some(want))
        .unwrap_or_else(|| panic!("{want} is not mounted"));
    let fields: Vec<&str> = line.split(' ').collect();
    let sep = fields.iter().position(|f| *f == "-").unwrap();
    let mut opts: Vec<String> = fields[5].split(',').map(String::from).collect();
    opts.extend(fields[sep + 3].split(',').map(String::from));
    opts
}

/// Runs `cmd` as nobody; (success, stdout, stderr).
fn as_nobody(cmd: &[&str]) -> (bool, String, String) {
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .args(cmd)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    )
}

struct Setup {
    _rt: tokio::runtime::Runtime,
    _reg: Registry,
    _cache: tempfile::TempDir,
    /// World-traversable, so that nobody reaches the mounts below it.
    root: tempfile::TempDir,
    layers: Vec<Mounted>,
}

impl Setup {
    /// The hostile layer converted and mounted `copies` times (FUSE), at root/layer-N.
    fn new(test: &str, opts: &MountOptions, copies: usize) -> Setup {
        let rt = runtime();
        let reg = Registry::start().unwrap();
        let spec = ImageSpec {
            layers: vec![LayerSource::Tar(layer_tar(&hostile_layer()))],
            ..Default::default()
        };
        let r = converted(
            &rt,
            &reg,
            &spec,
            &format!("priv/{}", test.replace('_', "-")),
        );
        let c = client(2);
        let s = store(&r, &c);
        let ls = layers(&rt, &s);
        let cache = tempfile::tempdir().unwrap();
        let (f, _) = fetcher(cache.path(), 1 << 30, FetcherOptions::default());
        let root = tempfile::tempdir().unwrap();
        std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut layers = Vec::new();
        for i in 0..copies {
            let dir = root.path().join(format!("layer-{i}"));
            std::fs::create_dir(&dir).unwrap();
            let h = handle(&s, &ls[0].0, &ls[0].1, 1 << 20);
            layers.push(mount_layer(h, f.clone(), rt.handle().clone(), &dir, opts).unwrap());
        }
        Setup {
            _rt: rt,
            _reg: reg,
            _cache: cache,
            root,
            layers,
        }
    }

    fn lowers(&self) -> Vec<PathBuf> {
        self.layers.iter().map(|m| m.dir().to_path_buf()).collect()
    }

    fn dir(&self, name: &str) -> PathBuf {
        let d = self.root.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}

struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = overlay::unmount(&self.0);
    }
}

fn allow_other() -> MountOptions {
    MountOptions {
        allow_other: true,
        ..Default::default()
    }
}

#[test]
fn setuid_file_in_layer_grants_nothing() {
    let t = "setuid_file_in_layer_grants_nothing";
    if skip(t) || arbor_testkit::skip_unless_tools(t, &["setpriv"]) {
        return;
    }
    // Even with allow_other (every user may read the mount), setuid bits grant nothing.
    let s = Setup::new(t, &allow_other(), 2);
    for m in &s.layers {
        let o = mount_options(m.dir());
        assert!(o.iter().any(|x| x == "nosuid"), "layer mount: {o:?}");
        assert!(o.iter().any(|x| x == "nodev"), "layer mount: {o:?}");
    }
    // One layer (a bind of it) and two layers (overlayfs), as `arbor mount` stacks them.
    for n in [1, 2] {
        let target = s.dir(&format!("union-{n}"));
        overlay::mount_readonly_union(&s.lowers()[..n], &target).unwrap();
        let _u = Unmount(target.clone());
        let o = mount_options(&target);
        assert!(o.iter().any(|x| x == "nosuid"), "{n} layers: {o:?}");
        assert!(o.iter().any(|x| x == "nodev"), "{n} layers: {o:?}");
        assert!(o.iter().any(|x| x == "ro"), "{n} layers: {o:?}");
        let id = target.join("bin/id");
        let mode = std::fs::metadata(&id).unwrap().permissions().mode();
        assert_eq!(
            mode & 0o6000,
            0o6000,
            "the setuid bits are shown as they are"
        );
        let (ok, euid, err) = as_nobody(&[id.to_str().unwrap(), "-u"]);
        assert!(ok, "{err}");
        assert_eq!(
            euid, "65534",
            "{n} layers: the setuid-root binary ran as root"
        );
        let (ok, egid, err) = as_nobody(&[id.to_str().unwrap(), "-g"]);
        assert!(ok, "{err}");
        assert_eq!(
            egid, "65534",
            "{n} layers: the setgid-root binary ran as group root"
        );
    }
}

#[test]
fn device_node_in_layer_cannot_be_opened() {
    let t = "device_node_in_layer_cannot_be_opened";
    if skip(t) {
        return;
    }
    let s = Setup::new(t, &MountOptions::default(), 2);
    // Not through the layer mounts, and not through the union, not even by root.
    for m in &s.layers {
        let e = std::fs::OpenOptions::new()
            .write(true)
            .open(m.dir().join("dev/null"))
            .unwrap_err();
        assert!(
            matches!(e.raw_os_error(), Some(libc::EACCES) | Some(libc::EPERM)),
            "{e}"
        );
    }
    for n in [1, 2] {
        let target = s.dir(&format!("union-{n}"));
        overlay::mount_readonly_union(&s.lowers()[..n], &target).unwrap();
        let _u = Unmount(target.clone());
        let node = target.join("dev/null");
        let meta = std::fs::metadata(&node).unwrap();
        assert!(std::os::unix::fs::FileTypeExt::is_char_device(
            &meta.file_type()
        ));
        for write in [false, true] {
            let e = std::fs::OpenOptions::new()
                .read(!write)
                .write(write)
                .open(&node)
                .unwrap_err();
            assert!(
                matches!(e.raw_os_error(), Some(libc::EACCES) | Some(libc::EPERM)),
                "{n} layers, write {write}: {e}"
            );
        }
        // Ordinary files still read.
        assert_eq!(std::fs::read(target.join("hello")).unwrap(), b"hello\n");
    }
}

#[test]
fn layer_mount_without_allow_other_is_root_only() {
    let t = "layer_mount_without_allow_other_is_root_only";
    if skip(t) || arbor_testkit::skip_unless_tools(t, &["setpriv"]) {
        return;
    }
    let s = Setup::new(t, &MountOptions::default(), 1);
    let hello = s.layers[0].dir().join("hello");
    assert_eq!(std::fs::read(&hello).unwrap(), b"hello\n");
    let (ok, _, _) = as_nobody(&["cat", hello.to_str().unwrap()]);
    assert!(!ok, "nobody read a mount made without allow_other");
    let target = s.dir("union");
    overlay::mount_readonly_union(&s.lowers(), &target).unwrap();
    let _u = Unmount(target.clone());
    let (ok, _, _) = as_nobody(&["cat", target.join("hello").to_str().unwrap()]);
    assert!(
        !ok,
        "nobody read a single-layer union made without allow_other"
    );
}

/// arbord's choice: its layer mounts (the library defaults plus allow_other) are lower
/// directories of the overlays containerd mounts for containers, and there the overlay's own
/// flags decide, as on containerd's overlayfs snapshotter: a container's setuid binaries work.
#[test]
fn container_overlay_decides_setuid_not_layer_mount() {
    let t = "container_overlay_decides_setuid_not_layer_mount";
    if skip(t) || arbor_testkit::skip_unless_tools(t, &["setpriv"]) {
        return;
    }
    let s = Setup::new(t, &allow_other(), 1);
    let (upper, work, target) = (s.dir("upper"), s.dir("work"), s.dir("rootfs"));
    let data = format!(
        "lowerdir={},upperdir={},workdir={},index=off",
        s.lowers()[0].display(),
        upper.display(),
        work.display()
    );
    let st = Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o", &data])
        .arg(&target)
        .status()
        .unwrap();
    assert!(st.success());
    let _u = Unmount(target.clone());
    let (ok, euid, err) = as_nobody(&[target.join("bin/id").to_str().unwrap(), "-u"]);
    assert!(ok, "{err}");
    assert_eq!(
        euid, "0",
        "a container's setuid binary must work as on overlayfs"
    );
}
