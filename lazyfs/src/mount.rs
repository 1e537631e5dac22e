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
    /// Let every user (containers run as many uids) use the mount.
    pub allow_other: bool,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            threads: 2,
            allow_other: true,
        }
    }
}

/// A mounted layer; unmounted on [`Mounted::unmount`] or drop.
pub struct Mounted {
    session: Option<BackgroundSession>,
    dir: PathBuf,
}

/// Mounts `layer` read-only at `dir` (which must exist). Reads run on `rt`.
pub fn mount_layer(
    layer: Arc<LayerHandle>,
    fetcher: Arc<Fetcher>,
    rt: tokio::runtime::Handle,
    dir: &Path,
    opts: &MountOptions,
) -> std::io::Result<Mounted> {
    let fs = LayerFs::new(Arc::clone(&layer), fetcher, rt);
    let mut cfg = Config::default();
    cfg.mount_options = vec![
        MountOption::FSName(format!("arbor:{}", &layer.digest)),
        MountOption::Subtype("arbor".into()),
        MountOption::RO,
        MountOption::DefaultPermissions,
        MountOption::Dev,
        MountOption::Suid,
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
