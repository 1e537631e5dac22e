//! A container's snapshot mounted read-only for a moment, so that user and group names are
//! looked up in its `/etc/passwd` and `/etc/group` (containerd's `mount.WithReadonlyTempMount`):
//! an overlay's upper directory becomes its top lower directory (nothing is written, its
//! work directory is not touched), a bind becomes a read-only bind; always `nosuid,nodev`.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;

use arbor_proto::Mount;

use crate::error::{Context as _, Error, Result};

/// A read-only mount of a snapshot at a private temporary directory, unmounted on drop.
pub struct TempMount {
    dir: Option<tempfile::TempDir>,
    mounted: usize,
}

impl TempMount {
    /// Mounts `mounts` (a snapshot's, from containerd) read-only at a new temporary directory.
    pub fn mount(mounts: &[Mount]) -> Result<TempMount> {
        let dir = tempfile::Builder::new()
            .prefix("arbor-rootfs-")
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .tempdir()
            .ctx("creating a directory to mount the rootfs at")?;
        let mut tm = TempMount {
            dir: Some(dir),
            mounted: 0,
        };
        let target = tm.path().to_path_buf();
        for m in mounts {
            mount_ro(m, &target)?;
            tm.mounted += 1;
        }
        Ok(tm)
    }

    pub fn path(&self) -> &Path {
        self.dir.as_ref().map_or(Path::new("/"), |d| d.path())
    }
}

impl Drop for TempMount {
    fn drop(&mut self) {
        let Some(dir) = self.dir.take() else { return };
        let Ok(c) = CString::new(dir.path().as_os_str().as_bytes()) else {
            return;
        };
        for _ in 0..self.mounted {
            // SAFETY: umount2 of a NUL-terminated path.
            if unsafe { libc::umount2(c.as_ptr(), 0) } != 0 {
                let e = std::io::Error::last_os_error();
                tracing::warn!(dir = %dir.path().display(), error = %e, "unmounting the temporary rootfs; detaching it");
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
        let path = dir.path().to_path_buf();
        if let Err(e) = dir.close() {
            tracing::warn!(dir = %path.display(), error = %e, "removing the temporary rootfs directory");
        }
    }
}

/// Runs `f` on a thread of its own in a private mount namespace (unshared from the
/// process's, every mount in it private) and returns what `f` returns. What `f` mounts
/// there is invisible outside and goes with the thread, even if the process is killed
/// before it unmounts (a daemon dying mid cold start leaves no `arbor-rootfs-*` mount on
/// the node). Without the right to make a namespace (not root), `f` runs in the process's.
pub async fn in_private_mounts<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("arbor-rootfs".into())
        .spawn(move || {
            if let Err(e) = private_mount_namespace() {
                tracing::debug!(error = %e, "no private mount namespace; mounting in the process's");
            }
            let _ = tx.send(f());
        })
        .ctx("starting a thread to mount the rootfs")?;
    rx.await.map_err(|e| Error::Other {
        what: "mounting the rootfs".into(),
        cause: Box::new(e),
    })
}

/// Moves the calling thread into a new mount namespace whose mounts are all private.
fn private_mount_namespace() -> std::io::Result<()> {
    // SAFETY: unshare and mount with valid (NUL-terminated or null) arguments; they affect
    // only the calling thread, which is ours alone.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Flags of mount(2) options, as containerd's `parseMountOptions`: (set, clear).
fn flag(o: &str) -> Option<(libc::c_ulong, libc::c_ulong)> {
    Some(match o {
        "async" => (0, libc::MS_SYNCHRONOUS),
        "atime" => (0, libc::MS_NOATIME),
        "bind" => (libc::MS_BIND, 0),
        "defaults" => (0, 0),
        "dev" => (0, libc::MS_NODEV),
        "diratime" => (0, libc::MS_NODIRATIME),
        "dirsync" => (libc::MS_DIRSYNC, 0),
        "exec" => (0, libc::MS_NOEXEC),
        "noatime" => (libc::MS_NOATIME, 0),
        "nodev" => (libc::MS_NODEV, 0),
        "nodiratime" => (libc::MS_NODIRATIME, 0),
        "noexec" => (libc::MS_NOEXEC, 0),
        "nosuid" => (libc::MS_NOSUID, 0),
        "rbind" => (libc::MS_BIND | libc::MS_REC, 0),
        "relatime" => (libc::MS_RELATIME, 0),
        "ro" => (libc::MS_RDONLY, 0),
        "rw" => (0, libc::MS_RDONLY),
        "strictatime" => (libc::MS_STRICTATIME, 0),
        "suid" => (0, libc::MS_NOSUID),
        "sync" => (libc::MS_SYNCHRONOUS, 0),
        _ => return None,
    })
}

/// `m`'s options as (flags, data), made read-only: an overlay's upper directory joins its
/// lower directories and `workdir`/`upperdir` go.
pub(crate) fn ro_options(m: &Mount) -> (libc::c_ulong, String) {
    let mut flags: libc::c_ulong = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;
    let mut data: Vec<String> = Vec::new();
    let mut upper = None;
    for o in &m.options {
        match flag(o) {
            Some((set, clear)) => {
                flags |= set;
                flags &= !(clear & !(libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV));
            }
            None if m.r#type == "overlay" && o.starts_with("upperdir=") => {
                upper = Some(o["upperdir=".len()..].to_string())
            }
            None if m.r#type == "overlay" && o.starts_with("workdir=") => {}
            None => data.push(o.clone()),
        }
    }
    if let Some(u) = upper {
        match data.iter_mut().find(|d| d.starts_with("lowerdir=")) {
            Some(l) => *l = format!("lowerdir={u}:{}", &l["lowerdir=".len()..]),
            None => data.push(format!("lowerdir={u}")),
        }
    }
    (flags, data.join(","))
}

fn mount_ro(m: &Mount, target: &Path) -> Result<()> {
    let (flags, data) = ro_options(m);
    let what = || format!("mounting the rootfs ({} {}) read-only", m.r#type, m.source);
    let c = |s: &[u8]| CString::new(s).map_err(|_| Error::Invalid(what()));
    let src = c(m.source.as_bytes())?;
    let tgt = c(target.as_os_str().as_bytes())?;
    let typ = c(m.r#type.as_bytes())?;
    let dat = c(data.as_bytes())?;
    let bind = flags & libc::MS_BIND != 0;
    // SAFETY: mount(2) with NUL-terminated strings that outlive the calls.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            tgt.as_ptr(),
            typ.as_ptr(),
            flags,
            if data.is_empty() {
                std::ptr::null()
            } else {
                dat.as_ptr().cast()
            },
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).ctx(what());
    }
    if bind {
        // A bind ignores MS_RDONLY until remounted.
        let rc = unsafe {
            libc::mount(
                std::ptr::null(),
                tgt.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REMOUNT | (flags & !libc::MS_REC),
                std::ptr::null(),
            )
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            unsafe { libc::umount2(tgt.as_ptr(), libc::MNT_DETACH) };
            return Err(e).ctx(what());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(typ: &str, opts: &[&str]) -> Mount {
        Mount {
            r#type: typ.into(),
            source: "src".into(),
            target: String::new(),
            options: opts.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn overlay_becomes_lower_only_and_read_only() {
        let (flags, data) = ro_options(&m(
            "overlay",
            &["index=off", "workdir=/w", "upperdir=/u", "lowerdir=/l1:/l2"],
        ));
        assert_eq!(data, "index=off,lowerdir=/u:/l1:/l2");
        assert_ne!(flags & libc::MS_RDONLY, 0);
        assert_ne!(flags & libc::MS_NOSUID, 0);
        assert_ne!(flags & libc::MS_NODEV, 0);
    }

    #[test]
    fn bind_rw_stays_read_only() {
        let (flags, data) = ro_options(&m("bind", &["rbind", "rw"]));
        assert_eq!(data, "");
        assert_ne!(flags & libc::MS_BIND, 0);
        assert_ne!(flags & libc::MS_REC, 0);
        assert_ne!(flags & libc::MS_RDONLY, 0, "rw must not lift read-only");
    }

    /// A bind mount of the snapshot made through `in_private_mounts` is seen by the work
    /// done there and never by the rest of the process (nor the node).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn temp_mounts_stay_in_their_own_namespace() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: mount namespaces and mounts need root");
            return;
        }
        let snap = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(snap.path().join("etc")).unwrap();
        std::fs::write(
            snap.path().join("etc/passwd"),
            "app:x:1000:1000::/:/bin/sh\n",
        )
        .unwrap();
        let mounts = vec![Mount {
            r#type: "bind".into(),
            source: snap.path().display().to_string(),
            target: String::new(),
            options: vec!["rbind".into(), "rw".into()],
        }];
        // The mount stays while the rest of the process looks for it.
        let (seen_tx, seen_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let work = tokio::spawn(in_private_mounts(move || {
            let tm = TempMount::mount(&mounts).unwrap();
            let at = tm.path().to_path_buf();
            let passwd = std::fs::read_to_string(at.join("etc/passwd")).unwrap();
            let inside = std::fs::read_to_string("/proc/thread-self/mountinfo").unwrap();
            seen_tx.send((at.clone(), passwd, inside)).unwrap();
            let _ = done_rx.recv();
            drop(tm);
            at
        }));
        let (at, passwd, inside) = seen_rx.recv().unwrap();
        assert!(passwd.starts_with("app:"));
        let name = at.display().to_string();
        assert!(inside.contains(&name), "mounted inside: {name}");
        let outside = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(
            !outside.contains(&name),
            "{name} leaked into the process's mounts"
        );
        done_tx.send(()).unwrap();
        assert_eq!(work.await.unwrap().unwrap(), at);
        assert!(!at.exists(), "the temporary directory is removed");
    }
}
