//! The FUSE request handlers of one layer.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use arbor_fetch::{Fetcher, LayerHandle};
use fuser::{
    Errno, FileHandle, FileType, Filesystem, Generation, INodeNo, InitFlags, IoctlFlags,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyDirectoryPlus,
    ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};
use tracing::{debug, warn};

use crate::tree::Tree;

/// The filesystem of one layer.
pub struct LayerFs {
    tree: Tree,
    layer: Arc<LayerHandle>,
    fetcher: Arc<Fetcher>,
    rt: tokio::runtime::Handle,
    /// How long the kernel may cache entries and attributes: the layer never changes.
    ttl: Duration,
}

impl LayerFs {
    /// Number of inodes of the layer's tree (numbered from 1, the root).
    pub fn inodes(&self) -> u64 {
        self.tree.nodes.len() as u64
    }

    pub fn new(
        layer: Arc<LayerHandle>,
        fetcher: Arc<Fetcher>,
        rt: tokio::runtime::Handle,
    ) -> LayerFs {
        LayerFs {
            tree: Tree::build(&layer.index),
            layer,
            fetcher,
            rt,
            ttl: Duration::from_secs(24 * 3600),
        }
    }

    pub fn tree(&self) -> &Tree {
        &self.tree
    }
}

fn xattr_reply(reply: ReplyXattr, data: &[u8], size: u32) {
    if size == 0 {
        reply.size(data.len() as u32);
    } else if data.len() > size as usize {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(data);
    }
}

impl Filesystem for LayerFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let wanted = InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_CACHE_SYMLINKS
            | InitFlags::FUSE_ASYNC_READ
            | InitFlags::FUSE_NO_OPEN_SUPPORT
            | InitFlags::FUSE_NO_OPENDIR_SUPPORT;
        if let Err(unsupported) = config.add_capabilities(wanted) {
            debug!(?unsupported, "kernel lacks some FUSE capabilities");
            let _ = config.add_capabilities(wanted - unsupported);
        }
        let _ = config.set_max_readahead(1 << 20);
        let _ = config.set_max_background(64);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if self.layer.is_poisoned() {
            return reply.error(Errno::EIO);
        }
        match self.tree.lookup(parent.0, name) {
            Some(ino) => match self.tree.get(ino) {
                Some(n) => reply.entry(&self.ttl, &n.attr(ino), Generation(0)),
                None => reply.error(Errno::ENOENT),
            },
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if self.layer.is_poisoned() {
            return reply.error(Errno::EIO);
        }
        match self.tree.get(ino.0) {
            Some(n) => reply.attr(&self.ttl, &n.attr(ino.0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        if self.layer.is_poisoned() {
            return reply.error(Errno::EIO);
        }
        match self.tree.get(ino.0).and_then(|n| n.link.as_ref()) {
            Some(l) => reply.data(l.as_bytes()),
            None => reply.error(Errno::EINVAL),
        }
    }

    /// Answered ENOSYS: with FUSE_NO_OPEN_SUPPORT the kernel then opens files without asking
    /// (read-only is enforced by the mount) and keeps their pages cached across opens, and
    /// sends no RELEASE either: three round trips per file saved.
    fn open(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.error(Errno::ENOSYS);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(node) = self.tree.get(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let Some(entry) = node.entry else {
            return reply.data(&[]);
        };
        if offset >= node.size {
            return reply.data(&[]);
        }
        let (fetcher, layer) = (Arc::clone(&self.fetcher), Arc::clone(&self.layer));
        self.rt.spawn(async move {
            match fetcher.read_file(&layer, entry, offset, size as u64).await {
                Ok(data) => reply.data(&data),
                Err(e) => {
                    fetcher
                        .metrics()
                        .read_errors
                        .fetch_add(1, Ordering::Relaxed);
                    warn!(layer = %layer.digest, entry, offset, error = %e, "read failed: EIO");
                    reply.error(Errno::EIO)
                }
            }
        });
    }

    /// ENOSYS: the kernel stops sending FLUSH (nothing is ever written).
    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOSYS);
    }

    /// ENOSYS, like `open`: with FUSE_NO_OPENDIR_SUPPORT the kernel caches directory listings.
    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.error(Errno::ENOSYS);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if self.layer.is_poisoned() {
            return reply.error(Errno::EIO);
        }
        let Some(n) = self.tree.get(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let dots = [(OsStr::new("."), ino.0), (OsStr::new(".."), n.parent)];
        let all = dots
            .into_iter()
            .chain(n.children.iter().map(|(name, i)| (name.as_os_str(), *i)));
        for (i, (name, child)) in all.enumerate().skip(offset as usize) {
            let kind = self
                .tree
                .get(child)
                .map_or(FileType::RegularFile, |c| c.kind);
            if reply.add(INodeNo(child), (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        if self.layer.is_poisoned() {
            return reply.error(Errno::EIO);
        }
        let Some(n) = self.tree.get(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let dots = [(OsStr::new("."), ino.0), (OsStr::new(".."), n.parent)];
        let all = dots
            .into_iter()
            .chain(n.children.iter().map(|(name, i)| (name.as_os_str(), *i)));
        for (i, (name, child)) in all.enumerate().skip(offset as usize) {
            let Some(c) = self.tree.get(child) else {
                continue;
            };
            if reply.add(
                INodeNo(child),
                (i + 1) as u64,
                name,
                &self.ttl,
                &c.attr(child),
                Generation(0),
            ) {
                break;
            }
        }
        reply.ok();
    }

    /// No ioctls (overlayfs asks for inode flags, FS_IOC_GETFLAGS, on copy-up): "not a
    /// typewriter", as for a file system without flags, rather than ENOSYS.
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        reply.error(Errno::ENOTTY);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self.tree.total_size.div_ceil(4096);
        let files = self.tree.nodes.len() as u64;
        reply.statfs(blocks, 0, 0, files, 0, 4096, 255, 4096);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        if self.layer.is_poisoned() {
            return reply.error(Errno::EIO);
        }
        let Some(n) = self.tree.get(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        match n.xattrs.iter().find(|(k, _)| k == name) {
            Some((_, v)) => xattr_reply(reply, v, size),
            None => reply.error(Errno::NO_XATTR),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        if self.layer.is_poisoned() {
            return reply.error(Errno::EIO);
        }
        let Some(n) = self.tree.get(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let mut list = Vec::new();
        for (k, _) in &n.xattrs {
            list.extend_from_slice(k.as_bytes());
            list.push(0);
        }
        xattr_reply(reply, &list, size);
    }
}
