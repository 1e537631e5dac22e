//! What the kernel may keep, it keeps: a layer without extended attributes answers GETXATTR
//! once (ENOSYS, and the kernel stops asking), and a name missing from a directory is a
//! negative entry the kernel caches like a positive one. Both matter under overlayfs, which
//! asks every layer above the one holding a name for it and for its `trusted.overlay.*`
//! attributes, again for each container's new overlay mount.

mod common;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::Command;

use arbor_testkit::{Entry, Registry};
use common::*;

fn getxattr(p: &Path, name: &str) -> Result<Vec<u8>, i32> {
    let path = CString::new(p.as_os_str().as_bytes()).unwrap();
    let name = CString::new(name).unwrap();
    let mut buf = vec![0u8; 256];
    // SAFETY: valid C strings and a writable buffer of the length given.
    let n = unsafe {
        libc::getxattr(
            path.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.len(),
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
    }
    buf.truncate(n as usize);
    Ok(buf)
}

fn listxattr(p: &Path) -> isize {
    let path = CString::new(p.as_os_str().as_bytes()).unwrap();
    let mut buf = vec![0u8; 256];
    // SAFETY: a valid C string and a writable buffer of the length given.
    unsafe {
        libc::listxattr(
            path.as_ptr(),
            buf.as_mut_ptr() as *mut libc::c_char,
            buf.len(),
        )
    }
}

fn missing(p: &Path) -> bool {
    matches!(std::fs::symlink_metadata(p), Err(e) if e.kind() == std::io::ErrorKind::NotFound)
}

struct Overlay(std::path::PathBuf);

impl Overlay {
    fn mount(at: &Path, lower: &[&Path]) -> Overlay {
        std::fs::create_dir_all(at).unwrap();
        let lowerdir = lower
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(":");
        let st = Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o"])
            .arg(format!("ro,lowerdir={lowerdir}"))
            .arg(at)
            .status()
            .unwrap();
        assert!(st.success(), "mounting the overlay at {}", at.display());
        Overlay(at.to_path_buf())
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn missing_names_and_absent_xattrs_cost_one_round_trip() {
    if skip("missing_names_and_absent_xattrs_cost_one_round_trip") {
        return;
    }
    let rt = runtime();
    let reg = Registry::start().unwrap();
    let spec = tar_spec(&[
        Entry::dir("app"),
        Entry::dir("app/pkg"),
        Entry::file("app/pkg/mod.py", b"print('hi')\n".to_vec()),
        Entry::file("app/main.py", b"import pkg.mod\n".to_vec()),
    ]);
    let layer = one_layer(&rt, &reg, &spec, "fs/kernel-cache");
    let m = mount(&rt, layer.handle.clone(), &layer.fetcher, layer.dir.path());
    let metrics = std::sync::Arc::clone(layer.fetcher.metrics());
    let root = layer.dir.path();

    // No xattrs in the layer: the first GETXATTR is answered ENOSYS, the kernel remembers.
    let f = root.join("app/main.py");
    for _ in 0..3 {
        let e = getxattr(&f, "user.origin").unwrap_err();
        assert!(
            e == libc::EOPNOTSUPP || e == libc::ENODATA,
            "getxattr: errno {e}"
        );
        let e = getxattr(&root.join("app"), "trusted.overlay.opaque").unwrap_err();
        assert!(e == libc::EOPNOTSUPP || e == libc::ENODATA);
    }
    assert_eq!(metrics.fuse_requests("getxattr"), 1, "GETXATTR round trips");
    // Listing stays answered (an empty list, as on a filesystem without xattrs).
    assert_eq!(listxattr(&f), 0);

    // A missing name: one LOOKUP, then the kernel's negative entry.
    assert!(root.join("app/pkg").is_dir());
    let before = metrics.fuse_requests("lookup");
    for _ in 0..5 {
        assert!(missing(&root.join("app/pkg/__init__.py")));
        assert!(missing(&root.join("app/nope")));
    }
    assert_eq!(
        metrics.fuse_requests("lookup") - before,
        2,
        "LOOKUPs for two missing names looked up five times each"
    );
    // Still missing on a parent that does not exist, and the existing file still reads.
    assert!(missing(&root.join("nope/deeper")));
    assert_eq!(std::fs::read(&f).unwrap(), b"import pkg.mod\n");

    // Two overlays over the layer, as two containers of the image: the layer on top of an
    // empty lower directory, so overlayfs checks it for whiteouts and opaque directories.
    // The second overlay resolves what the first did without a single FUSE request.
    let scratch = tempfile::tempdir().unwrap();
    let empty = scratch.path().join("empty");
    std::fs::create_dir_all(empty.join("app")).unwrap();
    let names = [
        "app/main.py",
        "app/pkg/mod.py",
        "app/pkg/__init__.py",
        "app/pkg/missing.so",
        "app/site.py",
    ];
    let walk = |top: &Path| {
        for n in names {
            let p = top.join(n);
            if n.ends_with("mod.py") || n.ends_with("main.py") {
                assert!(std::fs::metadata(&p).unwrap().is_file(), "{n}");
            } else {
                assert!(missing(&p), "{n}");
            }
        }
    };
    let first = Overlay::mount(&scratch.path().join("ovl1"), &[root, &empty]);
    walk(&first.0);
    let mod_py = std::fs::read(first.0.join("app/pkg/mod.py")).unwrap();
    // (Mounting an overlay asks its layers for STATFS: not counted here.)
    let total = |m: &arbor_fetch::Metrics| {
        ["lookup", "getattr", "read", "getxattr"]
            .iter()
            .map(|op| m.fuse_requests(op))
            .sum::<u64>()
    };
    let before = total(&metrics);
    let second = Overlay::mount(&scratch.path().join("ovl2"), &[root, &empty]);
    walk(&second.0);
    assert_eq!(
        std::fs::read(second.0.join("app/pkg/mod.py")).unwrap(),
        mod_py
    );
    assert_eq!(mod_py, b"print('hi')\n");
    assert_eq!(
        total(&metrics) - before,
        0,
        "FUSE requests of the second overlay: {}",
        metrics.render()
    );
    drop(second);
    drop(first);
    drop(m);
}
