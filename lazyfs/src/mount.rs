//! Mounting a layer filesystem.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arbor_fetch::{Fetcher, LayerHandle};
use fuser::{BackgroundSession, Config, MountOption, Session, SessionACL};
use tracing::{info, warn};

use crate::fs::LayerFs;

/// How to mount.
#[derive(Debug, Clone)]
pub struct MountOptions {
    /// FUSE worker threads (each with its own cloned `/dev/fuse` fd).
    pub threads: usize,
    /// Let every user, not only root (the mounter), use the mount: FUSE's `allow_other`.
    /// arbord needs it (containers run as many uids); `arbor mount` only with
    /// `--allow-other`. Off by default.
    pub allow_other: bool,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            threads: 2,
            allow_other: false,
        }
    }
}

/// What files of an image may grant: setuid/setgid bits honoured on exec (`suid`) and device
/// nodes that can be opened (`dev`). Images are untrusted, so both are off unless a front end
/// asks for them ([`Privileges::NONE`]: `nosuid,nodev`).
///
/// The choice per front end (see `docs/architecture.md`):
/// * `arbor mount` stacks the layers itself and mounts the union with `nosuid,nodev` unless
///   `--allow-suid` / `--allow-dev` are given (see [`crate::overlay`]).
/// * arbord's layers are lower directories of the overlays containerd mounts for containers
///   (with `allow_other`: containers run as many uids). overlayfs decides setuid and device
///   access by *its own* mount's flags, not by its lower directories' (tested in
///   `lazyfs/tests/privileges.rs`), so `nosuid,nodev` on a layer's FUSE mount takes nothing
///   from containers: sudo and ping in a container work as on containerd's overlayfs
///   snapshotter, and what a container may do is decided by containerd and runc (user
///   namespaces, capabilities, no_new_privs). The layer mounts themselves are reachable only
///   by root: they live under arbord's root directory, root-owned and 0700 (as containerd's
///   `/var/lib/containerd`). [`Privileges::ALL`] is for a front end that exposes a layer mount
///   directly (a bind of it) and wants containerd's semantics there too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Privileges {
    /// Honour setuid/setgid bits (otherwise `nosuid`).
    pub suid: bool,
    /// Let device nodes be opened (otherwise `nodev`).
    pub dev: bool,
}

impl Privileges {
    /// `nosuid,nodev`: the default.
    pub const NONE: Privileges = Privileges {
        suid: false,
        dev: false,
    };
    /// `suid,dev`: what a layer directory of containerd's overlayfs snapshotter allows.
    pub const ALL: Privileges = Privileges {
        suid: true,
        dev: true,
    };
}

/// A mounted layer; unmounted on [`Mounted::unmount`] or drop.
pub struct Mounted {
    session: Option<BackgroundSession>,
    dir: PathBuf,
    layer: Arc<LayerHandle>,
    /// Inodes of the layer's tree: 1 (the root) ..= this.
    inodes: u64,
}

/// Mounts `layer` read-only at `dir` (which must exist) with `nosuid,nodev`
/// ([`Privileges::NONE`]). Reads run on `rt`.
pub fn mount_layer(
    layer: Arc<LayerHandle>,
    fetcher: Arc<Fetcher>,
    rt: tokio::runtime::Handle,
    dir: &Path,
    opts: &MountOptions,
) -> std::io::Result<Mounted> {
    mount_layer_with(layer, fetcher, rt, dir, opts, Privileges::NONE)
}

/// [`mount_layer`] with explicit [`Privileges`].
pub fn mount_layer_with(
    layer: Arc<LayerHandle>,
    fetcher: Arc<Fetcher>,
    rt: tokio::runtime::Handle,
    dir: &Path,
    opts: &MountOptions,
    privileges: Privileges,
) -> std::io::Result<Mounted> {
    let fs = LayerFs::new(Arc::clone(&layer), fetcher, rt);
    let inodes = fs.inodes();
    let mut cfg = Config::default();
    cfg.mount_options = vec![
        MountOption::FSName(format!("arbor:{}", &layer.digest)),
        MountOption::Subtype("arbor".into()),
        MountOption::RO,
        MountOption::DefaultPermissions,
        if privileges.dev {
            MountOption::Dev
        } else {
            MountOption::NoDev
        },
        if privileges.suid {
            MountOption::Suid
        } else {
            MountOption::NoSuid
        },
        MountOption::Exec,
        MountOption::NoAtime,
    ];
    if opts.allow_other {
        cfg.acl = SessionACL::All;
    }
    cfg.n_threads = Some(opts.threads.max(1));
    cfg.clone_fd = opts.threads > 1;
    let session = Session::new(fs, dir, &cfg)?.spawn()?;
    info!(layer = %layer.digest, dir = %dir.display(), "layer mounted");
    Ok(Mounted {
        session: Some(session),
        dir: dir.to_path_buf(),
        layer,
        inodes,
    })
}

impl Mounted {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stops serving the layer (it was proved to lie): from now on every lookup, stat and read
    /// that reaches it fails with EIO ([`LayerHandle::poison`]), and the kernel is told to drop
    /// what it cached of every inode (attributes and pages), so that processes already using
    /// the mount (containers running on it, through their overlays) cannot go on reading it.
    /// Call it before unmounting: a detached mount stays reachable from those overlays.
    pub fn poison(&self) {
        self.layer.poison();
        let Some(session) = &self.session else {
            return;
        };
        let notifier = session.notifier();
        let mut failed = 0u64;
        for ino in 1..=self.inodes {
            // ENOENT for inodes the kernel never looked up: nothing cached, nothing to drop.
            if let Err(e) = notifier.inval_inode(fuser::INodeNo(ino), 0, 0)
                && e.raw_os_error() != Some(libc::ENOENT)
            {
                failed += 1;
            }
        }
        warn!(
            layer = %self.layer.digest,
            dir = %self.dir.display(),
            inodes = self.inodes,
            failed,
            "layer poisoned: every further access answers EIO; kernel caches invalidated"
        );
    }

    /// Unmounts and waits (up to [`JOIN_WAIT`]) for the FUSE threads to finish. A layer
    /// still held by someone the unmount cannot see, an overlay of a running container (it
    /// keeps its own reference to each lower mount), keeps being served by its thread until the
    /// last holder goes: the caller is not blocked on it (serving a poisoned layer, that thread
    /// only answers EIO).
    pub fn unmount(mut self) -> std::io::Result<()> {
        match self.session.take() {
            Some(s) => finish(s, &self.dir),
            None => Ok(()),
        }
    }
}

/// How long [`Mounted::unmount`] waits for the FUSE threads after the unmount.
pub const JOIN_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

fn finish(s: BackgroundSession, dir: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `path` is a valid NUL-terminated string for the duration of the call.
    if unsafe { libc::umount2(path.as_ptr(), 0) } != 0 {
        // Busy (a process has a file or its cwd in it): the caller decides (detach); dropping
        // `s` leaves its thread running for whoever still holds the mount.
        return Err(std::io::Error::last_os_error());
    }
    let deadline = std::time::Instant::now() + JOIN_WAIT;
    while !s.guard.is_finished() {
        if std::time::Instant::now() > deadline {
            warn!(
                dir = %dir.display(),
                "unmounted, but still held (an overlay of a running container): its FUSE thread \
                 serves it until the last holder goes"
            );
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    s.join()
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(s) = self.session.take()
            && let Err(e) = finish(s, &self.dir)
        {
            // Busy (files still open in it): detach it, so nothing is left mounted; it goes
            // away with its last user.
            warn!(dir = %self.dir.display(), error = %e, "unmount failed; detaching");
            detach(&self.dir);
        }
    }
}

/// Lazily detaches whatever is mounted at `dir` (`umount -l`).
fn detach(dir: &Path) {
    use std::os::unix::ffi::OsStrExt;
    if let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) {
        // SAFETY: `path` is a valid NUL-terminated string for the duration of the call.
        unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
    }
}
