//! Issue #9: `arbor mount` of an untrusted image grants nothing by default. The mount at DIR
//! is `nosuid,nodev`, a setuid-root binary from the image runs as the caller and a device node
//! cannot be opened; the chunk cache and the per-layer mount points are private (0700) and
//! another user cannot traverse them. `--allow-suid --allow-dev --allow-other` lift it.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use arbor_testkit::{
    Entry, ImageSpec, LayerSource, Registry, layer_tar, skip_unless_root, skip_unless_tools,
    skopeo_push, write_oci_layout,
};

struct Mount {
    child: Child,
    dir: std::path::PathBuf,
}

impl Mount {
    fn start(reference: &str, dir: &Path, work: &Path, extra: &[&str]) -> Mount {
        let child = Command::new(env!("CARGO_BIN_EXE_arbor"))
            .args(["mount", "--plain-http", "--no-prefetch", "--cache-dir"])
            .arg(work.join("cache"))
            .arg("--state-dir")
            .arg(work.join("state"))
            .args(extra)
            .arg(reference)
            .arg(dir)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let t = Instant::now();
        while !arbor_testkit::is_mounted(dir) {
            assert!(t.elapsed() < Duration::from_secs(60), "not mounted");
            std::thread::sleep(Duration::from_millis(100));
        }
        Mount {
            child,
            dir: dir.to_path_buf(),
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
        let t = Instant::now();
        while self.child.try_wait().ok().flatten().is_none()
            && t.elapsed() < Duration::from_secs(20)
        {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn options(target: &Path) -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let want = target.to_str().unwrap();
    let line = info
        .lines()
        .rfind(|l| l.split(' ').nth(4) == Some(want))
        .unwrap();
    let fields: Vec<&str> = line.split(' ').collect();
    fields[5].split(',').map(String::from).collect()
}

fn nobody(args: &[&str]) -> (bool, String) {
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .args(args)
        .stderr(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
    )
}

#[test]
fn arbor_mount_of_hostile_image_grants_nothing() {
    let t = "arbor_mount_of_hostile_image_grants_nothing";
    if skip_unless_root(t)
        || skip_unless_tools(t, &["docker-registry", "skopeo", "fusermount3", "setpriv"])
    {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let reg = Registry::start().unwrap();
    let id = std::fs::read("/usr/bin/id").unwrap();
    let hostile = vec![
        Entry::dir("bin"),
        Entry::file("bin/id", id).with_mode(0o4755).with_owner(0, 0),
        Entry::dir("dev"),
        Entry::char_dev("dev/null", 1, 3).with_mode(0o666),
    ];
    // Two layers: overlayfs at DIR, which reads its layers with the mounter's credentials.
    let spec = ImageSpec {
        layers: vec![
            LayerSource::Tar(layer_tar(&hostile)),
            LayerSource::Tar(layer_tar(&[Entry::file("hello", "hello\n")])),
        ],
        ..Default::default()
    };
    let layout = work.path().join("layout");
    write_oci_layout(&layout, "v1", &spec).unwrap();
    let (src, dst) = (reg.reference("priv/x:v1"), reg.reference("priv/x:arbor"));
    skopeo_push(&layout, "v1", &src, None).unwrap();
    let st = Command::new(env!("CARGO_BIN_EXE_arbor"))
        .args(["convert", "--plain-http", &src, &dst])
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());

    let dir = work.path().join("mnt");
    std::fs::create_dir(&dir).unwrap();
    {
        let m = Mount::start(&dst, &dir, work.path(), &[]);
        let o = options(&dir);
        assert!(
            o.iter().any(|x| x == "nosuid") && o.iter().any(|x| x == "nodev"),
            "{o:?}"
        );
        // Device node: refused even to root.
        let e = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("dev/null"))
            .unwrap_err();
        assert!(
            matches!(e.raw_os_error(), Some(libc::EACCES) | Some(libc::EPERM)),
            "{e}"
        );
        // Setuid-root binary: runs as the caller. (overlayfs reads its layers with the
        // mounter's credentials, so without --allow-other a multi-layer mount is readable as
        // DIR's permissions allow; only the single-layer bind is root-only.)
        let (ok, euid) = nobody(&[dir.join("bin/id").to_str().unwrap(), "-u"]);
        assert!(ok);
        assert_eq!(euid, "65534", "the image's setuid binary ran as root");
        // Private directories: the cache and this mount's layer mount points.
        let state = work
            .path()
            .join("state")
            .join(format!("mount-{}", m.child.id()));
        for d in [work.path().join("cache"), state.clone()] {
            let mode = std::fs::metadata(&d).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o700, "{}: {mode:o}", d.display());
            let (ok, _) = nobody(&["ls", d.to_str().unwrap()]);
            assert!(!ok, "nobody listed {}", d.display());
        }
        let (ok, _) = nobody(&["cat", state.join("layer-0/bin/id").to_str().unwrap()]);
        assert!(!ok, "nobody reached a layer mount");
    }
    // Opting in.
    let m = Mount::start(
        &dst,
        &dir,
        work.path(),
        &["--allow-suid", "--allow-dev", "--allow-other"],
    );
    let o = options(&dir);
    assert!(!o.iter().any(|x| x == "nosuid" || x == "nodev"), "{o:?}");
    let (ok, euid) = nobody(&[dir.join("bin/id").to_str().unwrap(), "-u"]);
    assert!(ok);
    assert_eq!(euid, "0", "--allow-suid");
    drop(m);
}
