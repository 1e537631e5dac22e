//! Mounting a layer filesystem, adopting one a predecessor mounted, and handing one over.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arbor_fetch::{Fetcher, LayerHandle};
use tracing::{info, warn};

use crate::abi::Negotiated;
use crate::fs::LayerFs;
use crate::session::{MountSpec, Session, server};

/// How to mount.
#[derive(Debug, Clone)]
pub struct MountOptions {
    /// Worker threads of the process's FUSE server (shared by every mount; the first mount
    /// of the process decides, see [`crate::session::set_workers`]).
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

/// A mounted layer; unmounted on [`Mounted::unmount`] or drop, left mounted for a successor
/// by [`Mounted::release`].
pub struct Mounted {
    session: Option<Arc<Session>>,
    dir: PathBuf,
    layer: Arc<LayerHandle>,
    /// Inodes of the layer's tree: 1 (the root) ..= this.
    inodes: u64,
}

/// How long a fresh mount waits for the kernel's FUSE_INIT.
const INIT_WAIT: Duration = Duration::from_secs(10);

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
    crate::session::set_workers(opts.threads.max(1));
    let fs = LayerFs::new(Arc::clone(&layer), fetcher, rt);
    let inodes = fs.inodes();
    let spec = MountSpec {
        fsname: format!("arbor:{}", &layer.digest),
        subtype: "arbor".into(),
        allow_other: opts.allow_other,
        suid: privileges.suid,
        dev: privileges.dev,
    };
    let fd = crate::session::mount(dir, &spec)?;
    let session = server().serve(fd, dir, Arc::new(fs))?;
    if let Err(e) = session.wait_init(INIT_WAIT) {
        session.stop(Duration::ZERO);
        let _ = crate::session::unmount(dir, true);
        return Err(e);
    }
    info!(layer = %layer.digest, dir = %dir.display(), "layer mounted");
    Ok(Mounted {
        session: Some(session),
        dir: dir.to_path_buf(),
        layer,
        inodes,
    })
}

/// Serves again a layer mounted at `dir` by a predecessor, over `fd` (a duplicate of its
/// connection's, from the fd holder) with what was agreed at its INIT. The layer's inode
/// numbers are its TOC's, so the kernel's cached inodes stay valid. Requests the predecessor
/// read and did not answer are queued again where the kernel can (Linux 6.9+).
pub fn adopt_layer(
    layer: Arc<LayerHandle>,
    fetcher: Arc<Fetcher>,
    rt: tokio::runtime::Handle,
    dir: &Path,
    fd: OwnedFd,
    negotiated: Negotiated,
) -> std::io::Result<Mounted> {
    let fs = LayerFs::new(Arc::clone(&layer), fetcher, rt);
    let inodes = fs.inodes();
    let session = server().adopt(fd, dir, Arc::new(fs), negotiated)?;
    info!(layer = %layer.digest, dir = %dir.display(), "layer adopted");
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

    /// The connection serving the layer.
    pub fn session(&self) -> Option<&Arc<Session>> {
        self.session.as_ref()
    }

    /// Stops serving the layer and leaves it mounted, for a successor to adopt: requests
    /// already read are answered (within `timeout`), later ones wait in the kernel. Returns
    /// how many were still unanswered at the deadline.
    pub fn release(mut self, timeout: Duration) -> usize {
        match self.session.take() {
            Some(s) => s.stop(timeout),
            None => 0,
        }
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
        let mut failed = 0u64;
        for ino in 1..=self.inodes {
            // ENOENT for inodes the kernel never looked up: nothing cached, nothing to drop.
            if let Err(e) = session.inval_inode(ino)
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

    /// Unmounts and waits (up to [`JOIN_WAIT`]) for the connection to end. A layer still
    /// held by someone the unmount cannot see, an overlay of a running container (it keeps
    /// its own reference to each lower mount), keeps being served until the last holder goes:
    /// the caller is not blocked on it (serving a poisoned layer only answers EIO).
    pub fn unmount(mut self) -> std::io::Result<()> {
        match self.session.take() {
            Some(s) => finish(&s, &self.dir),
            None => Ok(()),
        }
    }
}

/// How long [`Mounted::unmount`] waits for the connection to end after the unmount.
pub const JOIN_WAIT: Duration = Duration::from_secs(5);

fn finish(s: &Session, dir: &Path) -> std::io::Result<()> {
    // Busy (a process has a file or its cwd in it): the caller decides (detach); the session
    // goes on serving whoever still holds the mount.
    crate::session::unmount(dir, false)?;
    if !s.wait_ended(JOIN_WAIT) {
        warn!(
            dir = %dir.display(),
            "unmounted, but still held (an overlay of a running container): it is served \
             until the last holder goes"
        );
    }
    Ok(())
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(s) = self.session.take()
            && let Err(e) = finish(&s, &self.dir)
        {
            // Busy (files still open in it): detach it, so nothing is left mounted; it goes
            // away with its last user.
            warn!(dir = %self.dir.display(), error = %e, "unmount failed; detaching");
            let _ = crate::session::unmount(&self.dir, true);
        }
    }
}
