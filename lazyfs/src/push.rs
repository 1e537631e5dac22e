//! Page-cache push: when a reader goes through a directory's files in order (a scan,
//! `find | xargs cat`, a data loader, a copy), the next files of that directory that the node
//! already holds in memory are written into the kernel's page cache ahead of it
//! (FUSE_NOTIFY_STORE). The reader then opens and reads them without a single request to the
//! daemon: one READ per stretch of files instead of one (or more) per file, and a round trip
//! through `/dev/fuse` costs two context switches, the dominant cost of serving small files
//! from memory.
//!
//! What is pushed is what a READ would have answered: verified chunks from the memory cache
//! (nothing is fetched, read from disk or decompressed for a push). A push starts only when a
//! reader asked for two files of one directory in a row (in `readdir` order: the order
//! `find`, `ls` and sorted walks use), goes at most [`push_ahead`] bytes past the file read,
//! stops at the first file not held, and is never made while the layer is recording a
//! start-up set (pushed files would not be read through the daemon, and so not learned).
//!
//! Pushes run on one thread of their own, never on a FUSE worker: the kernel locks each page
//! it fills, and a page already being read waits for that read's answer from a worker. The
//! read that started a push is answered when the push is done, so the reader does not
//! overtake it. That wait is uninterruptible: a process killed while its push waits cannot
//! exit until the read is answered or the connection aborted, so a daemon whose connections
//! a successor must adopt after a crash (arbord with `fuse.handover`) does not push.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::sync::{Mutex, OnceLock};

use tracing::warn;

use crate::tree::{Node, Tree};

/// `arbor mount`'s default of [`set_push_ahead`]: 4 MiB past the file a sequential reader
/// asked for.
pub const DEFAULT_PUSH_AHEAD: u64 = 4 << 20;

/// Off unless the front end asks: a process whose connections a successor must adopt after
/// a crash must not push (see the module's documentation).
static PUSH_AHEAD: AtomicU64 = AtomicU64::new(0);

/// Sets how far ahead of a sequential reader files are pushed into the page cache, in bytes,
/// for every layer of the process mounted or adopted afterwards (0, the default: never).
pub fn set_push_ahead(bytes: u64) {
    PUSH_AHEAD.store(bytes, Ordering::Relaxed);
}

/// See [`set_push_ahead`].
pub fn push_ahead() -> u64 {
    PUSH_AHEAD.load(Ordering::Relaxed)
}

/// A push waiting for the push thread.
pub(crate) type Job = Box<dyn FnOnce() + Send>;

/// Pushes queued at most; a trigger finding the queue full is dropped (the reader asks).
const QUEUE: usize = 64;

/// Hands `job` to the process's push thread (started on first use); gives it back if the
/// thread is busy with [`QUEUE`] others or could not be started.
pub(crate) fn submit(job: Job) -> Result<(), Job> {
    static TX: OnceLock<Option<SyncSender<Job>>> = OnceLock::new();
    let tx = TX.get_or_init(|| {
        let (tx, rx) = sync_channel::<Job>(QUEUE);
        match std::thread::Builder::new()
            .name("fuse-push".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    job();
                }
            }) {
            Ok(_) => Some(tx),
            Err(e) => {
                warn!(error = %e, "cannot start the page-cache push thread; pushes are off");
                None
            }
        }
    });
    match tx {
        Some(tx) => tx.try_send(job).map_err(|e| match e {
            TrySendError::Full(j) | TrySendError::Disconnected(j) => j,
        }),
        None => Err(job),
    }
}

/// Readers followed at once in one layer (several containers looping over a directory, a
/// scan with a few threads).
const CURSORS: usize = 4;

/// Where one reader of a layer is in a directory, as positions in its `children`.
#[derive(Debug, Default, Clone, Copy)]
struct Cursor {
    dir: u64,
    /// The file the reader last asked for.
    last: u32,
    /// The last file pushed (or passed over) ahead of it.
    horizon: u32,
    /// The reader's last file was in order.
    ordered: bool,
    /// A push for this reader is queued or running.
    busy: bool,
    /// When it last moved (0: never used).
    used: u64,
}

impl Cursor {
    /// Whether file `i` of directory `dir` is the next one for this reader: the next file of
    /// its directory after those it read or was pushed, or the first file of another
    /// directory right after the last file of the one it went through in order (a walk).
    fn continues(&self, tree: &Tree, dir: u64, d: &Node, i: u32) -> bool {
        if self.used == 0 {
            return false;
        }
        let seen = self.last.max(self.horizon);
        if self.dir == dir {
            i > self.last && (i <= seen || next_file(d, seen) == Some(i))
        } else {
            self.ordered
                && tree
                    .get(self.dir)
                    .is_some_and(|prev| next_file(prev, seen).is_none())
                && d.files.first() == Some(&i)
        }
    }
}

/// The page-cache push state of one layer: the readers it follows, and a clock.
#[derive(Debug, Default)]
pub(crate) struct Pusher {
    cursors: Mutex<([Cursor; CURSORS], u64)>,
}

/// A push to make: files of directory `dir` from position `from` on, for reader `cursor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Push {
    pub dir: u64,
    pub from: u32,
    cursor: usize,
}

/// Whether `n` has content a push can carry (a TOC entry: a regular file, not empty).
pub(crate) fn pushable(n: &Node) -> bool {
    n.entry.is_some()
}

/// The first position after `pos` in `dir` holding a file with content.
fn next_file(dir: &Node, pos: u32) -> Option<u32> {
    let at = dir.files.partition_point(|&f| f <= pos);
    dir.files.get(at).copied()
}

impl Pusher {
    fn lock(&self) -> std::sync::MutexGuard<'_, ([Cursor; CURSORS], u64)> {
        self.cursors.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A reader asked for the start of file `ino`: the push to make, if the read continues a
    /// reader going through a directory in order ([`Cursor::continues`]) and no push for
    /// that reader is under way. A read that continues none starts following a new reader
    /// in place of the least recently moved one.
    pub(crate) fn file_started(&self, tree: &Tree, ino: u64) -> Option<Push> {
        let n = tree.get(ino)?;
        let (dir, i) = (n.parent, n.pos);
        let d = tree.get(dir)?;
        let mut g = self.lock();
        let (cursors, clock) = &mut *g;
        *clock += 1;
        let now = *clock;
        // One in this directory first, then one walking into it.
        let k = (0..CURSORS)
            .find(|&k| cursors[k].dir == dir && cursors[k].continues(tree, dir, d, i))
            .or_else(|| (0..CURSORS).find(|&k| cursors[k].continues(tree, dir, d, i)));
        let Some(k) = k else {
            let k = (0..CURSORS)
                .min_by_key(|&k| (cursors[k].busy, cursors[k].used))
                .unwrap_or(0);
            let busy = cursors[k].busy;
            cursors[k] = Cursor {
                dir,
                last: i,
                horizon: i,
                ordered: false,
                busy,
                used: now,
            };
            return None;
        };
        let c = &mut cursors[k];
        if c.dir != dir {
            c.horizon = i;
        }
        c.dir = dir;
        c.last = i;
        c.ordered = true;
        c.used = now;
        if c.busy {
            return None;
        }
        c.busy = true;
        Some(Push {
            dir,
            from: i.max(c.horizon) + 1,
            cursor: k,
        })
    }

    /// The push `p` ended, having covered positions up to `upto` (if any).
    pub(crate) fn done(&self, p: Push, upto: Option<u32>) {
        let mut g = self.lock();
        let Some(c) = g.0.get_mut(p.cursor) else {
            return;
        };
        c.busy = false;
        if let Some(u) = upto
            && c.dir == p.dir
        {
            c.horizon = c.horizon.max(u);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arbor_format::index::{IndexEntry, LayerIndex};
    use arbor_format::tarstream::EntryKind;

    /// A tree of `d/` with files a..e (c empty) and a subdirectory `d/s`.
    fn tree() -> Tree {
        let mut entries = vec![IndexEntry::bare(EntryKind::Dir, "d", "")];
        for (name, size) in [("a", 10), ("b", 10), ("c", 0), ("e", 10), ("f", 10)] {
            let mut e = IndexEntry::bare(EntryKind::Regular, &format!("d/{name}"), "");
            e.size = size;
            entries.push(e);
        }
        entries.push(IndexEntry::bare(EntryKind::Dir, "d/s", ""));
        Tree::build(&LayerIndex {
            entries,
            data_end: 0,
            arbor: None,
        })
    }

    fn ino(t: &Tree, path: &str) -> u64 {
        let mut ino = crate::tree::ROOT;
        for part in path.split('/') {
            ino = t.lookup(ino, std::ffi::OsStr::new(part)).unwrap();
        }
        ino
    }

    #[test]
    fn a_push_starts_on_the_second_file_in_order_and_goes_on_past_its_horizon() {
        let t = tree();
        let p = Pusher::default();
        let pos = |name: &str| t.get(ino(&t, name)).unwrap().pos;
        // One file is not a pattern.
        assert_eq!(p.file_started(&t, ino(&t, "d/a")), None);
        // The next file with content: push what follows it.
        let push = p.file_started(&t, ino(&t, "d/b")).unwrap();
        assert_eq!(push.from, pos("d/b") + 1);
        // While it runs, no second push.
        assert_eq!(p.file_started(&t, ino(&t, "d/e")), None);
        p.done(push, Some(pos("d/e")));
        // The reader read e from the page cache and asks for f: the next file past the
        // horizon, so in order.
        let push = p.file_started(&t, ino(&t, "d/f")).unwrap();
        assert_eq!(push.from, pos("d/f") + 1);
        p.done(push, None);
    }

    #[test]
    fn no_push_for_reads_out_of_order() {
        let t = tree();
        let p = Pusher::default();
        // Backwards.
        for name in ["d/f", "d/e", "d/b", "d/a"] {
            assert_eq!(p.file_started(&t, ino(&t, name)), None, "{name}");
        }
        // Skipping a file with content: after a comes b, not e.
        let p = Pusher::default();
        assert_eq!(p.file_started(&t, ino(&t, "d/a")), None);
        assert_eq!(p.file_started(&t, ino(&t, "d/e")), None);
        // Skipping only an empty file (c) is in order: b then e.
        let p = Pusher::default();
        assert_eq!(p.file_started(&t, ino(&t, "d/b")), None);
        assert!(p.file_started(&t, ino(&t, "d/e")).is_some());
    }

    #[test]
    fn interleaved_readers_each_get_their_push() {
        let t = tree();
        let p = Pusher::default();
        let pos = |name: &str| t.get(ino(&t, name)).unwrap().pos;
        // Two readers of d, one at a, the other at e, their reads interleaved.
        assert_eq!(p.file_started(&t, ino(&t, "d/a")), None);
        assert_eq!(p.file_started(&t, ino(&t, "d/e")), None);
        let first = p.file_started(&t, ino(&t, "d/b")).unwrap();
        assert_eq!(first.from, pos("d/b") + 1);
        let second = p.file_started(&t, ino(&t, "d/f")).unwrap();
        assert_eq!(second.from, pos("d/f") + 1);
        assert_ne!(first.cursor, second.cursor);
        p.done(first, None);
        p.done(second, None);
    }

    #[test]
    fn a_walk_goes_on_in_order_into_the_next_directory() {
        let mut entries = Vec::new();
        for d in ["x", "y"] {
            entries.push(IndexEntry::bare(EntryKind::Dir, d, ""));
            for f in ["1", "2", "3"] {
                let mut e = IndexEntry::bare(EntryKind::Regular, &format!("{d}/{f}"), "");
                e.size = 10;
                entries.push(e);
            }
        }
        let t = Tree::build(&LayerIndex {
            entries,
            data_end: 0,
            arbor: None,
        });
        let p = Pusher::default();
        // x/1 alone is no pattern; x/2 starts one, its push covers x/3.
        assert_eq!(p.file_started(&t, ino(&t, "x/1")), None);
        let push = p.file_started(&t, ino(&t, "x/2")).unwrap();
        p.done(push, Some(t.get(ino(&t, "x/3")).unwrap().pos));
        // x was gone through to its end: the first file of y goes on in order.
        assert!(p.file_started(&t, ino(&t, "y/1")).is_some());
        let p = Pusher::default();
        // Not so when x was left half read...
        assert_eq!(p.file_started(&t, ino(&t, "x/1")), None);
        let push = p.file_started(&t, ino(&t, "x/2")).unwrap();
        p.done(push, None);
        assert_eq!(p.file_started(&t, ino(&t, "y/1")), None);
        // ... or when y is entered past its first file.
        let p = Pusher::default();
        assert_eq!(p.file_started(&t, ino(&t, "x/1")), None);
        let push = p.file_started(&t, ino(&t, "x/2")).unwrap();
        p.done(push, Some(t.get(ino(&t, "x/3")).unwrap().pos));
        assert_eq!(p.file_started(&t, ino(&t, "y/2")), None);
    }

    #[test]
    fn empty_files_and_directories_are_not_pushed() {
        let t = tree();
        assert!(pushable(t.get(ino(&t, "d/a")).unwrap()));
        assert!(!pushable(t.get(ino(&t, "d/c")).unwrap()));
        assert!(!pushable(t.get(ino(&t, "d/s")).unwrap()));
    }
}
