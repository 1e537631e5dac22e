//! Mounting a layer filesystem.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arbor_fetch::{Fetcher, LayerHandle};
use fuser::{BackgroundSession, Config, MountOption, Session, SessionACL};
use tracing::info;

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
    })
}

impl Mounted {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Unmounts and waits for the FUSE threads to finish.
    pub fn unmount(mut self) -> std::io::Result<()> {
        match self.session.take() {
            Some(s) => s.umount_and_join(),
            None => Ok(()),
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            let _ = s.umount_and_join();
        }
    }
}
