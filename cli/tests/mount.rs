//! `arbor mount` as a user runs it: a converted multi-layer image (whiteouts and opaque
//! directories included) mounted lazily from a real registry and stacked with overlayfs
//! shows exactly the tree stock containerd unpacks from the original image.

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use arbor_testkit::tree::walk;
use arbor_testkit::{
    Containerd, Entry, LayerSource, Registry, busybox_image, corpus, layer_tar, skip_unless_root,
    skip_unless_tools, skopeo_push, write_oci_layout,
};

struct Mount {
    child: Child,
    dir: std::path::PathBuf,
}

impl Mount {
    fn start(reference: &str, dir: &Path, work: &Path, extra: &[&str]) -> Mount {
        let child = Command::new(env!("CARGO_BIN_EXE_arbor"))
            .args(["mount", "--plain-http", "--cache-dir"])
            .arg(work.join("cache"))
            .arg("--state-dir")
            .arg(work.join("state"))
            .args(extra)
            .arg(reference)
            .arg(dir)
            .spawn()
            .unwrap();
        let t = Instant::now();
        while !arbor_testkit::is_mounted(dir) {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "arbor mount did not mount {}",
                dir.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Mount {
            child,
            dir: dir.to_path_buf(),
        }
    }

    /// Unmounts the way a user would (`umount DIR`) and waits for arbor to clean up and exit.
    fn stop(mut self) {
        assert!(
            Command::new("umount")
                .arg(&self.dir)
                .status()
                .unwrap()
                .success()
        );
        self.wait_exit();
    }

    fn wait_exit(&mut self) {
        let t = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "arbor mount exited with {status}");
                return;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "arbor mount did not exit after umount"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        // On a failed test: stop arbor the way Ctrl-C would, then make sure it is gone.
        if self.child.try_wait().ok().flatten().is_none() {
            // SAFETY: sending SIGTERM to our own child.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let t = Instant::now();
            while self.child.try_wait().ok().flatten().is_none()
                && t.elapsed() < Duration::from_secs(10)
            {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[test]
fn mounted_image_equals_containerd_unpack() {
    let test = "mounted_image_equals_containerd_unpack";
    if skip_unless_root(test)
        || skip_unless_tools(
            test,
            &[
                "docker-registry",
                "skopeo",
                "containerd",
                "ctr",
                "fusermount3",
            ],
        )
    {
        return;
    }
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let work = tempfile::tempdir().unwrap();
    let reg = Registry::start().unwrap();
    let mut spec = busybox_image(
        vec![
            Entry::dir("app"),
            Entry::file("app/hello.txt", "hello\n"),
            Entry::file("app/removed.txt", "whited out above\n"),
            Entry::dir("app/opaque"),
            Entry::file("app/opaque/old.txt", "hidden by an opaque dir\n"),
        ],
        &["/bin/true"],
    );
    let mut top = corpus();
    top.extend([
        Entry::dir("app"),
        Entry::whiteout("app", "removed.txt"),
        Entry::dir("app/opaque"),
        Entry::opaque("app/opaque"),
        Entry::file("app/opaque/new.txt", "new\n"),
        Entry::whiteout("bin", "ls"),
    ]);
    spec.layers.push(LayerSource::Tar(layer_tar(&top)));
    let layout = work.path().join("layout");
    write_oci_layout(&layout, "v1", &spec).unwrap();
    let src = reg.reference("mnt/app:v1");
    let dst = reg.reference("mnt/app:arbor");
    skopeo_push(&layout, "v1", &src, None).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_arbor"))
        .args(["convert", "--plain-http", &src, &dst])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let lazy = work.path().join("lazy");
    std::fs::create_dir(&lazy).unwrap();
    let m = Mount::start(&dst, &lazy, work.path(), &["--no-prefetch"]);

    let ctd = Containerd::start().unwrap();
    ctd.pull(&src, &[]).unwrap();
    let unpacked = work.path().join("unpacked");
    std::fs::create_dir(&unpacked).unwrap();
    ctd.ctr(&[
        "images",
        "mount",
        "--snapshotter",
        "overlayfs",
        &src,
        unpacked.to_str().unwrap(),
    ])
    .unwrap();

    let a = walk(&unpacked, true);
    let b = walk(&lazy, true);
    ctd.ctr(&["images", "unmount", unpacked.to_str().unwrap()])
        .unwrap();
    assert!(a.contains_key("app/opaque/new.txt") && !a.contains_key("app/opaque/old.txt"));
    assert!(!a.contains_key("app/removed.txt") && !a.contains_key("bin/ls"));
    let mut diffs = Vec::new();
    for (p, ma) in &a {
        match b.get(p) {
            None => diffs.push(format!("{p}: missing in the lazy mount")),
            // A directory an unpacker had to create (not listed in its layer) is dated when
            // it was created: by containerd at unpack, by arbor at mount. Both are "now".
            Some(mb)
                if ma.kind == 'd' && ma.mtime >= started && mb.mtime >= started && {
                    let mut x = mb.clone();
                    x.mtime = ma.mtime;
                    x == *ma
                } => {}
            Some(mb) if ma != mb => {
                diffs.push(format!("{p}:\n  containerd {ma:?}\n  arbor      {mb:?}"))
            }
            _ => {}
        }
    }
    for p in b.keys().filter(|p| !a.contains_key(*p)) {
        diffs.push(format!("{p}: only in the lazy mount"));
    }
    assert!(
        diffs.is_empty(),
        "{} differences:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
    m.stop();
    assert!(!arbor_testkit::is_mounted(&lazy));
    assert!(
        std::fs::read_dir(work.path().join("state"))
            .unwrap()
            .next()
            .is_none(),
        "arbor mount left state behind"
    );
}
