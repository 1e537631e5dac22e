//! The FUSE request handlers of one layer.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use arbor_fetch::{Fetcher, LayerHandle};
use tracing::warn;

use crate::abi::{self, Request, op};
use crate::push::{Push, Pusher, pushable};
use crate::session::{Handler, Reply, Session};
use crate::tree::Tree;

/// The filesystem of one layer.
pub struct LayerFs {
    tree: Arc<Tree>,
    layer: Arc<LayerHandle>,
    fetcher: Arc<Fetcher>,
    rt: tokio::runtime::Handle,
    /// How long the kernel may cache entries and attributes: the layer never changes.
    ttl: Duration,
    /// Files pushed into the page cache ahead of a reader going through a directory in
    /// order, at most this many bytes past the file it asked for (0: none).
    push_ahead: u64,
    push: Arc<Pusher>,
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
            tree: Arc::new(Tree::build(&layer.index)),
            layer,
            fetcher,
            rt,
            ttl: Duration::from_secs(24 * 3600),
            push_ahead: crate::push::push_ahead(),
            push: Arc::default(),
        }
    }

    pub fn tree(&self) -> &Tree {
        &self.tree
    }
}

/// The reply to GETXATTR/LISTXATTR: the size when asked for it (`size` 0), else the data.
fn xattr_reply(reply: Reply, data: &[u8], size: u32) {
    if size == 0 {
        reply.out(abi::xattr_size(data.len() as u32));
    } else if data.len() > size as usize {
        reply.error(libc::ERANGE);
    } else {
        reply.data(data);
    }
}

fn answer_read(
    fetcher: &Fetcher,
    layer: &LayerHandle,
    entry: usize,
    offset: u64,
    r: Result<Vec<bytes::Bytes>, arbor_fetch::fetcher::FetchError>,
    reply: Reply,
) {
    match r {
        Ok(parts) => reply.data_parts(&parts),
        Err(e) => {
            fetcher
                .metrics()
                .read_errors
                .fetch_add(1, Ordering::Relaxed);
            warn!(layer = %layer.digest, entry, offset, error = %e, "read failed: EIO");
            reply.error(libc::EIO)
        }
    }
}

/// The answer to a read, sent once a push is done.
type Answer = Box<dyn FnOnce() + Send>;

/// Pushes the files of `p.dir` from position `p.from` into the page cache, as long as they
/// are held in memory and within `budget` bytes; the last position covered, if any.
fn push_files(
    tree: &Tree,
    fetcher: &Arc<Fetcher>,
    layer: &Arc<LayerHandle>,
    session: &Session,
    p: Push,
    budget: u64,
) -> Option<u32> {
    let dir = tree.get(p.dir)?;
    let (mut bytes, mut files, mut upto) = (0u64, 0u64, None);
    for (i, (_, ino)) in dir.children.iter().enumerate().skip(p.from as usize) {
        let Some(n) = tree.get(*ino) else { break };
        if !pushable(n) {
            upto = Some(i as u32);
            continue;
        }
        let Some(entry) = n.entry else { break };
        if bytes + n.size > budget || layer.is_poisoned() {
            break;
        }
        // Only what memory holds, verified; nothing is fetched for a push.
        let Some(Ok(parts)) = fetcher.read_file_held(layer, entry, 0, n.size) else {
            break;
        };
        // ENOENT: the kernel does not know the inode (not listed or looked up yet).
        if session.notify_store(*ino, 0, &parts).is_err() {
            break;
        }
        bytes += n.size;
        files += 1;
        upto = Some(i as u32);
    }
    let m = fetcher.metrics();
    m.fuse_pushed_bytes.fetch_add(bytes, Ordering::Relaxed);
    m.fuse_pushed_files.fetch_add(files, Ordering::Relaxed);
    upto
}

impl Handler for LayerFs {
    fn handle(&self, req: &Request<'_>, reply: Reply) {
        self.fetcher.metrics().fuse_request(match req.opcode {
            op::LOOKUP => 0,
            op::GETATTR => 1,
            op::READ => 2,
            op::READDIR | op::READDIRPLUS => 3,
            op::READLINK => 4,
            op::GETXATTR => 5,
            op::LISTXATTR => 6,
            _ => 7,
        });
        // Answered without looking at the layer.
        match req.opcode {
            // ENOSYS: with FUSE_NO_OPEN_SUPPORT / FUSE_NO_OPENDIR_SUPPORT the kernel then opens
            // files and directories without asking (read-only is enforced by the mount), keeps
            // their pages and listings cached across opens, and sends no RELEASE either.
            op::OPEN | op::OPENDIR => return reply.error(libc::ENOSYS),
            // ENOSYS: the kernel stops sending FLUSH (nothing is ever written).
            op::FLUSH => return reply.error(libc::ENOSYS),
            op::RELEASE | op::RELEASEDIR => return reply.data(&[]),
            // No ioctls (overlayfs asks for inode flags, FS_IOC_GETFLAGS, on copy-up): "not a
            // typewriter", as for a file system without flags, rather than ENOSYS.
            op::IOCTL => return reply.error(libc::ENOTTY),
            op::STATFS => {
                let blocks = self.tree.total_size.div_ceil(4096);
                let files = self.tree.nodes.len() as u64;
                return reply.out(abi::statfs_out(blocks, files, 4096, 255));
            }
            op::READ => return self.read(req, reply),
            // A layer without extended attributes: ENOSYS, and the kernel stops asking on this
            // connection (getxattr(2) then fails with EOPNOTSUPP instead of ENODATA, without
            // a round trip). Overlayfs asks every lower layer for its `trusted.overlay.*`
            // attributes on each lookup: thousands of requests in a Python start.
            op::GETXATTR if !self.tree.has_xattrs => return reply.error(libc::ENOSYS),
            op::LOOKUP
            | op::GETATTR
            | op::READLINK
            | op::READDIR
            | op::READDIRPLUS
            | op::GETXATTR
            | op::LISTXATTR => {}
            _ => return reply.error(libc::ENOSYS),
        }
        if self.layer.is_poisoned() {
            return reply.error(libc::EIO);
        }
        let r = match req.opcode {
            op::LOOKUP => self.lookup(req, reply),
            op::GETATTR => match self.tree.get(req.nodeid) {
                Some(n) => {
                    reply.out(abi::attr_out(&n.attr(req.nodeid), self.ttl));
                    Ok(())
                }
                None => {
                    reply.error(libc::ENOENT);
                    Ok(())
                }
            },
            op::READLINK => {
                match self.tree.get(req.nodeid).and_then(|n| n.link.as_ref()) {
                    Some(l) => reply.data(l.as_bytes()),
                    None => reply.error(libc::EINVAL),
                }
                Ok(())
            }
            op::READDIR => self.readdir(req, reply, false),
            op::READDIRPLUS => self.readdir(req, reply, true),
            op::GETXATTR => self.getxattr(req, reply),
            _ => self.listxattr(req, reply),
        };
        // Malformed arguments: the reply was dropped, answering EIO.
        if let Err(e) = r {
            warn!(layer = %self.layer.digest, opcode = req.opcode, error = %e, "bad request");
        }
    }
}

impl LayerFs {
    fn lookup(&self, req: &Request<'_>, reply: Reply) -> Result<(), abi::Malformed> {
        let name = OsStr::from_bytes(req.name_at(0)?);
        match self
            .tree
            .lookup(req.nodeid, name)
            .and_then(|ino| Some((ino, self.tree.get(ino)?)))
        {
            Some((ino, n)) => {
                let mut o = abi::Out::with_capacity(128);
                abi::entry_out(&mut o, &n.attr(ino), self.ttl);
                reply.out(o);
            }
            // The parent exists and the name is not in it: a negative entry the kernel keeps
            // (the layer never changes). Overlayfs looks a name up in every layer above the
            // one holding it, and again for each container's new overlay mount.
            None if self.tree.get(req.nodeid).is_some() => {
                let mut o = abi::Out::with_capacity(128);
                abi::negative_entry_out(&mut o, self.ttl);
                reply.out(o);
            }
            None => reply.error(libc::ENOENT),
        }
        Ok(())
    }

    fn read(&self, req: &Request<'_>, reply: Reply) {
        let (Ok(offset), Ok(size)) = (req.arg_u64(8), req.arg_u32(16)) else {
            return reply.error(libc::EINVAL);
        };
        let Some(node) = self.tree.get(req.nodeid) else {
            return reply.error(libc::ENOENT);
        };
        let Some(entry) = node.entry else {
            return reply.data(&[]);
        };
        if offset >= node.size {
            return reply.data(&[]);
        }
        // Data held in memory is answered here, on the FUSE worker: no hop to the runtime
        // and back. What must be read from the disk cache (and re-verified) or fetched goes
        // to the runtime, whose blocking pool reads many chunks at once.
        let held = self
            .fetcher
            .read_file_held(&self.layer, entry, offset, size as u64);
        // The start of a file: perhaps one of a directory read in order. The push begins
        // once the data of this read is there (it follows it in the layer).
        let push = if offset == 0 {
            self.push_after(req.nodeid, reply.session())
        } else {
            None
        };
        if let Some(r) = held {
            let (fetcher, layer) = (Arc::clone(&self.fetcher), Arc::clone(&self.layer));
            let answer = move || answer_read(&fetcher, &layer, entry, offset, r, reply);
            return match push {
                Some(p) => p(Box::new(answer)),
                None => answer(),
            };
        }
        let (fetcher, layer) = (Arc::clone(&self.fetcher), Arc::clone(&self.layer));
        self.rt.spawn(async move {
            let r = fetcher.read_file(&layer, entry, offset, size as u64).await;
            let answer = move || answer_read(&fetcher, &layer, entry, offset, r, reply);
            match push {
                Some(p) => p(Box::new(answer)),
                None => answer(),
            }
        });
    }

    /// What pushes the files after `ino` into the page cache ([`crate::push`]) and then answers
    /// the read of its start (`answer`), if the reader is going through its directory in order.
    ///
    /// The answer waits for the push, so the reader does not overtake it. The kernel fills
    /// each pushed page under its lock and waits, uninterruptibly, for a read in flight on
    /// it: a daemon killed during such a wait can neither exit nor answer the read until
    /// the connection is aborted (`umount -f`, or `abort` under `/sys/fs/fuse/connections`).
    /// A planned stop first lets pushes end ([`Session::stop`]); arbord, whose successor
    /// must adopt the connections after a crash, does not push.
    fn push_after(&self, ino: u64, session: &Arc<Session>) -> Option<impl FnOnce(Answer) + use<>> {
        if self.push_ahead == 0 || self.layer.recorder().is_some_and(|r| r.is_recording()) {
            return None;
        }
        let p = self.push.file_started(&self.tree, ino)?;
        let (tree, fetcher, layer) = (
            Arc::clone(&self.tree),
            Arc::clone(&self.fetcher),
            Arc::clone(&self.layer),
        );
        let (pusher, session, budget) =
            (Arc::clone(&self.push), Arc::clone(session), self.push_ahead);
        Some(move |answer: Answer| {
            let job = Box::new(move || {
                let upto = push_files(&tree, &fetcher, &layer, &session, p, budget);
                pusher.done(p, upto);
                answer();
            });
            // Busy: answered at once, without a push (the reader asks for what it needs).
            if let Err(job) = crate::push::submit(job) {
                job();
            }
        })
    }

    fn readdir(&self, req: &Request<'_>, reply: Reply, plus: bool) -> Result<(), abi::Malformed> {
        let (offset, size) = (req.arg_u64(8)?, req.arg_u32(16)? as usize);
        let ino = req.nodeid;
        let Some(n) = self.tree.get(ino) else {
            reply.error(libc::ENOENT);
            return Ok(());
        };
        let dots = [(OsStr::new("."), ino), (OsStr::new(".."), n.parent)];
        let all = dots
            .into_iter()
            .chain(n.children.iter().map(|(name, i)| (name.as_os_str(), *i)));
        let mut o = abi::Out::with_capacity(size.min(64 << 10));
        for (i, (name, child)) in all.enumerate().skip(offset as usize) {
            let Some(c) = self.tree.get(child) else {
                continue;
            };
            let next = (i + 1) as u64;
            let fits = if plus {
                abi::direntplus(
                    &mut o,
                    size,
                    &c.attr(child),
                    self.ttl,
                    next,
                    name.as_bytes(),
                )
            } else {
                abi::dirent(&mut o, size, child, next, c.kind, name.as_bytes())
            };
            if !fits {
                break;
            }
        }
        reply.out(o);
        Ok(())
    }

    fn getxattr(&self, req: &Request<'_>, reply: Reply) -> Result<(), abi::Malformed> {
        let size = req.arg_u32(0)?;
        let name = OsStr::from_bytes(req.name_at(8)?);
        let Some(n) = self.tree.get(req.nodeid) else {
            reply.error(libc::ENOENT);
            return Ok(());
        };
        match n.xattrs.iter().find(|(k, _)| k == name) {
            Some((_, v)) => xattr_reply(reply, v, size),
            None => reply.error(libc::ENODATA),
        }
        Ok(())
    }

    fn listxattr(&self, req: &Request<'_>, reply: Reply) -> Result<(), abi::Malformed> {
        let size = req.arg_u32(0)?;
        let Some(n) = self.tree.get(req.nodeid) else {
            reply.error(libc::ENOENT);
            return Ok(());
        };
        let mut list = Vec::new();
        for (k, _) in &n.xattrs {
            list.extend_from_slice(k.as_bytes());
            list.push(0);
        }
        xattr_reply(reply, &list, size);
        Ok(())
    }
}
