//! FUSE connections that outlive the process serving them.
//!
//! A [`Session`] is one connection (one `/dev/fuse` open file description, one mount) and the
//! parameters agreed at its FUSE_INIT ([`Negotiated`]). It is served by the process-wide
//! [`Server`]: a few worker threads, each waiting on its own epoll set over every session's fd
//! (`EPOLLEXCLUSIVE`: a request wakes one idle worker, not all), so a node with hundreds of
//! layers has the same threads as one with a single layer. Workers
//! read requests without blocking and hand them to the session's [`Handler`]; a reply may be
//! sent from any thread (reads are answered from the tokio runtime).
//!
//! Hand-over: [`Session::stop`] stops reading the fd, waits until every request already read
//! is answered, and leaves the connection alone (the mount stays). A successor that holds a
//! duplicate of the fd (an fd holder, see [`crate::holder`]) serves it again with
//! [`Server::adopt`], without an INIT, and asks the kernel to queue again what a crashed
//! predecessor had read but not answered ([`Session::resend`], Linux 6.9+).

use std::collections::HashMap;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::abi::{self, InitIn, Negotiated, Out, Request, init, op};

/// The flags asked for at INIT (granted where the kernel offers them).
const WANTED: u64 = init::ASYNC_READ
    | init::BIG_WRITES
    | init::DO_READDIRPLUS
    | init::READDIRPLUS_AUTO
    | init::PARALLEL_DIROPS
    | init::CACHE_SYMLINKS
    | init::NO_OPEN_SUPPORT
    | init::NO_OPENDIR_SUPPORT
    | init::MAX_PAGES
    | init::INIT_EXT;
/// Reads of up to 1 MiB per request (256 pages), read-ahead of 1 MiB.
const MAX_PAGES: u16 = 256;
const MAX_READAHEAD: u32 = 1 << 20;
/// Nothing is ever written: the smallest the kernel allows.
const MAX_WRITE: u32 = 4096;
const MAX_BACKGROUND: u16 = 64;
/// A worker's read buffer: requests of a read-only filesystem are small (the kernel asks
/// for at least 8 KiB, and `max_write` plus headers).
const BUF: usize = 64 << 10;
/// At most this many parts in one reply's `writev` (IOV_MAX is 1024).
const MAX_PARTS: usize = 256;
/// Replies of up to this many parts (a read spans a few chunks) need no allocation.
const STACK_PARTS: usize = 15;

/// What serves one session's requests.
pub trait Handler: Send + Sync + 'static {
    /// Answers `req` through `reply` (now or later, from any thread). A reply dropped
    /// unanswered answers EIO.
    fn handle(&self, req: &Request<'_>, reply: Reply);
}

#[derive(Default)]
struct State {
    negotiated: Option<Negotiated>,
    ended: bool,
}

/// One FUSE connection.
pub struct Session {
    id: u64,
    fd: OwnedFd,
    dir: PathBuf,
    handler: Arc<dyn Handler>,
    state: Mutex<State>,
    changed: Condvar,
    /// Requests being read or answered by this process.
    busy: AtomicUsize,
    stopping: AtomicBool,
    /// Page-cache pushes being written, and whether new ones are refused (a stop is coming).
    pushing: AtomicUsize,
    no_push: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Session {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// A duplicate of the connection's fd (same open file description), for a holder.
    pub fn dup_fd(&self) -> io::Result<OwnedFd> {
        self.fd.try_clone()
    }

    pub fn negotiated(&self) -> Option<Negotiated> {
        lock(&self.state).negotiated
    }

    /// Whether the connection is gone (unmounted and released by every user, or aborted).
    pub fn is_ended(&self) -> bool {
        lock(&self.state).ended
    }

    /// Waits up to `timeout` for FUSE_INIT; its parameters, or why not.
    pub fn wait_init(&self, timeout: Duration) -> io::Result<Negotiated> {
        let deadline = Instant::now() + timeout;
        let mut st = lock(&self.state);
        loop {
            if let Some(n) = st.negotiated {
                return Ok(n);
            }
            if st.ended {
                return Err(io::Error::other("the connection ended before FUSE_INIT"));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no FUSE_INIT from the kernel",
                ));
            }
            st = self
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Waits up to `timeout` for the connection to end; whether it did.
    pub fn wait_ended(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = lock(&self.state);
        while !st.ended {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            st = self
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    fn end(&self) {
        lock(&self.state).ended = true;
        self.changed.notify_all();
    }

    /// Writes one message (a reply or, with `unique` 0, a notification) to the kernel.
    fn send(&self, unique: u64, error: i32, body: &[u8]) -> io::Result<()> {
        self.send_parts(unique, error, &[body])
    }

    /// [`Session::send`] with a body in parts, written with one `writev` (no copy; the
    /// iovecs of a reply of up to [`STACK_PARTS`] parts live on the stack; more than
    /// [`MAX_PARTS`] are joined first).
    fn send_parts<B: AsRef<[u8]>>(&self, unique: u64, error: i32, parts: &[B]) -> io::Result<()> {
        // Far more parts than a read of small chunks has: joined, under IOV_MAX.
        if parts.len() > MAX_PARTS {
            let joined: Vec<u8> = parts.iter().flat_map(|p| p.as_ref()).copied().collect();
            return self.send_parts(unique, error, &[joined]);
        }
        let len = abi::OUT_HEADER + parts.iter().map(|p| p.as_ref().len()).sum::<usize>();
        let mut head = [0u8; abi::OUT_HEADER];
        head[0..4].copy_from_slice(&(len as u32).to_ne_bytes());
        head[4..8].copy_from_slice(&error.to_ne_bytes());
        head[8..16].copy_from_slice(&unique.to_ne_bytes());
        let empty = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        let mut stack = [empty; STACK_PARTS + 1];
        let mut heap = Vec::new();
        let iov: &mut [libc::iovec] = if parts.len() <= STACK_PARTS {
            &mut stack[..parts.len() + 1]
        } else {
            heap.resize(parts.len() + 1, empty);
            &mut heap
        };
        let bufs = std::iter::once(&head[..]).chain(parts.iter().map(|p| p.as_ref()));
        for (v, b) in iov.iter_mut().zip(bufs) {
            *v = libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            };
        }
        // SAFETY: every iovec points at a live buffer of its length for the call.
        let n = unsafe { libc::writev(self.fd.as_raw_fd(), iov.as_ptr(), iov.len() as i32) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Tells the kernel to drop what it cached of inode `ino` (attributes and pages).
    pub fn inval_inode(&self, ino: u64) -> io::Result<()> {
        self.send(0, abi::notify::INVAL_INODE, &abi::inval_inode(ino).0)
    }

    /// Writes `parts` (file data from `offset`) into the page cache of inode `ino`
    /// (FUSE_NOTIFY_STORE), so reads of it find the data without asking. ENOENT when the
    /// kernel has no such inode cached. It locks the pages it fills, so it must not run on a
    /// FUSE worker: a read in flight for one of those pages waits for a worker's answer.
    pub fn notify_store<B: AsRef<[u8]>>(
        &self,
        ino: u64,
        offset: u64,
        parts: &[B],
    ) -> io::Result<()> {
        self.pushing.fetch_add(1, Ordering::SeqCst);
        let r = if self.no_push.load(Ordering::SeqCst) {
            Err(io::Error::from_raw_os_error(libc::ESHUTDOWN))
        } else {
            self.store(ino, offset, parts)
        };
        self.pushing.fetch_sub(1, Ordering::SeqCst);
        r
    }

    fn store<B: AsRef<[u8]>>(&self, ino: u64, offset: u64, parts: &[B]) -> io::Result<()> {
        let size: usize = parts.iter().map(|p| p.as_ref().len()).sum();
        let size = u32::try_from(size).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        let head = abi::store_out(ino, offset, size).0;
        let all: Vec<&[u8]> = std::iter::once(&head[..])
            .chain(parts.iter().map(|p| p.as_ref()))
            .collect();
        self.send_parts(0, abi::notify::STORE, &all)
    }

    /// Asks the kernel to queue again every request read from this connection and not
    /// answered (by a predecessor that died). Linux 6.9+; an error on older kernels.
    pub fn resend(&self) -> io::Result<()> {
        self.send(0, abi::notify::RESEND, &[])
    }

    /// Stops serving: no further request is read (they wait in the kernel for a successor),
    /// and those already read are answered within `timeout`. Returns how many were still
    /// unanswered at the deadline (a successor gets them again with [`Session::resend`]).
    pub fn stop(&self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        // First no new page-cache push, and those being written end while requests are still
        // served: a push waits (uninterruptibly) for any page being read to be answered.
        self.no_push.store(true, Ordering::SeqCst);
        while self.pushing.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        self.stopping.store(true, Ordering::SeqCst);
        server().forget(self);
        loop {
            let busy = self.busy.load(Ordering::SeqCst);
            if busy == 0 || Instant::now() > deadline {
                return busy;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// The answer to one request; EIO if dropped unanswered.
pub struct Reply {
    session: Arc<Session>,
    unique: u64,
    done: bool,
}

impl Reply {
    /// The connection this reply goes to (for notifications about it).
    pub fn session(&self) -> &Arc<Session> {
        &self.session
    }

    fn finish<B: AsRef<[u8]>>(&mut self, error: i32, parts: &[B]) {
        self.done = true;
        match self.session.send_parts(self.unique, error, parts) {
            Ok(()) => {}
            // The request was interrupted or the connection aborted: nobody waits for it.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => debug!(dir = %self.session.dir.display(), error = %e, "FUSE reply failed"),
        }
    }

    pub fn data(mut self, body: &[u8]) {
        self.finish(0, &[body]);
    }

    /// Answers data given in parts (sent in order, without joining them first).
    pub fn data_parts<B: AsRef<[u8]>>(mut self, parts: &[B]) {
        self.finish(0, parts);
    }

    pub fn out(self, body: Out) {
        self.data(&body.0);
    }

    /// Answers `errno` (positive, as in `libc::ENOENT`).
    pub fn error(mut self, errno: i32) {
        self.finish::<&[u8]>(-errno, &[]);
    }

    /// Drops the request without an answer (FORGET, INTERRUPT: the kernel expects none).
    fn none(mut self) {
        self.done = true;
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        if !self.done {
            self.finish::<&[u8]>(-libc::EIO, &[]);
        }
        self.session.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The process's FUSE workers: each has an epoll set over every session.
pub struct Server {
    /// One epoll set per worker.
    epolls: Vec<OwnedFd>,
    sessions: RwLock<HashMap<u64, Arc<Session>>>,
    next: AtomicU64,
    workers: usize,
}

static SERVER: OnceLock<Arc<Server>> = OnceLock::new();
static WORKERS: AtomicUsize = AtomicUsize::new(2);

/// Sets how many worker threads the process's [`Server`] starts (before its first use).
pub fn set_workers(n: usize) {
    WORKERS.store(n.clamp(1, 64), Ordering::Relaxed);
}

/// The process's FUSE server, started on first use.
pub fn server() -> &'static Arc<Server> {
    SERVER.get_or_init(|| {
        let s = Server::start(WORKERS.load(Ordering::Relaxed))
            .unwrap_or_else(|e| panic!("cannot create the FUSE epoll set: {e}"));
        info!(workers = s.workers, "FUSE server started");
        s
    })
}

impl Server {
    fn start(workers: usize) -> io::Result<Arc<Server>> {
        let mut epolls = Vec::with_capacity(workers);
        for _ in 0..workers {
            // SAFETY: plain syscall; the fd is owned below.
            let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
            if ep < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: `ep` is a fresh fd owned by nobody else.
            epolls.push(unsafe { OwnedFd::from_raw_fd(ep) });
        }
        let s = Arc::new(Server {
            epolls,
            sessions: RwLock::new(HashMap::new()),
            next: AtomicU64::new(1),
            workers,
        });
        for i in 0..workers {
            let me = Arc::clone(&s);
            std::thread::Builder::new()
                .name(format!("fuse-{i}"))
                .spawn(move || me.work(i))?;
        }
        Ok(s)
    }

    /// Serves a connection whose INIT is still to come (a fresh mount).
    pub fn serve(
        &self,
        fd: OwnedFd,
        dir: &Path,
        handler: Arc<dyn Handler>,
    ) -> io::Result<Arc<Session>> {
        self.add(fd, dir, handler, None)
    }

    /// Serves a connection initialized by a predecessor, with what it agreed; asks the kernel
    /// to resend what the predecessor read and did not answer (where it can).
    pub fn adopt(
        &self,
        fd: OwnedFd,
        dir: &Path,
        handler: Arc<dyn Handler>,
        negotiated: Negotiated,
    ) -> io::Result<Arc<Session>> {
        let s = self.add(fd, dir, handler, Some(negotiated))?;
        if negotiated.can_resend() {
            match s.resend() {
                Ok(()) => debug!(dir = %dir.display(), "asked the kernel to resend"),
                Err(e) => warn!(dir = %dir.display(), error = %e, "NOTIFY_RESEND refused"),
            }
        }
        Ok(s)
    }

    fn add(
        &self,
        fd: OwnedFd,
        dir: &Path,
        handler: Arc<dyn Handler>,
        negotiated: Option<Negotiated>,
    ) -> io::Result<Arc<Session>> {
        set_nonblocking(fd.as_raw_fd())?;
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let s = Arc::new(Session {
            id,
            fd,
            dir: dir.to_path_buf(),
            handler,
            state: Mutex::new(State {
                negotiated,
                ended: false,
            }),
            changed: Condvar::new(),
            busy: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
            pushing: AtomicUsize::new(0),
            no_push: AtomicBool::new(false),
        });
        self.sessions
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, Arc::clone(&s));
        for ep in &self.epolls {
            let mut ev = libc::epoll_event {
                events: (libc::EPOLLIN | libc::EPOLLEXCLUSIVE) as u32,
                u64: id,
            };
            // SAFETY: both fds are open; `ev` lives for the call.
            if unsafe { libc::epoll_ctl(ep.as_raw_fd(), libc::EPOLL_CTL_ADD, s.fd(), &mut ev) } != 0
            {
                let e = io::Error::last_os_error();
                self.forget(&s);
                return Err(e);
            }
        }
        Ok(s)
    }

    fn forget(&self, s: &Session) {
        for ep in &self.epolls {
            // SAFETY: removing an fd from a set; a null event is allowed for DEL.
            unsafe {
                libc::epoll_ctl(
                    ep.as_raw_fd(),
                    libc::EPOLL_CTL_DEL,
                    s.fd(),
                    std::ptr::null_mut(),
                )
            };
        }
        self.sessions
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&s.id);
    }

    fn work(&self, worker: usize) {
        let mut buf = vec![0u8; BUF];
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 16];
        let epoll = self.epolls[worker].as_raw_fd();
        loop {
            // SAFETY: `events` is a writable array of the length passed.
            let n =
                unsafe { libc::epoll_wait(epoll, events.as_mut_ptr(), events.len() as i32, -1) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    warn!(error = %e, "epoll_wait failed");
                    std::thread::sleep(Duration::from_millis(10));
                }
                continue;
            }
            for ev in &events[..n as usize] {
                let id = ev.u64;
                let session = self
                    .sessions
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&id)
                    .cloned();
                if let Some(s) = session {
                    self.drain(&s, &mut buf);
                }
            }
        }
    }

    /// Reads and dispatches a request waiting on `s`. One per wake-up: the set is
    /// level-triggered, so more waiting wake this worker again or another idle one, and no
    /// read is spent learning that nothing waits.
    fn drain(&self, s: &Arc<Session>, buf: &mut [u8]) {
        for _ in 0..2 {
            s.busy.fetch_add(1, Ordering::SeqCst);
            if s.stopping.load(Ordering::SeqCst) {
                s.busy.fetch_sub(1, Ordering::SeqCst);
                return;
            }
            // SAFETY: `buf` is writable for its whole length.
            let n = unsafe { libc::read(s.fd(), buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
            if n < 0 {
                s.busy.fetch_sub(1, Ordering::SeqCst);
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EAGAIN) => return,
                    // Interrupted before we read it: the next one.
                    Some(libc::ENOENT) | Some(libc::EINTR) => continue,
                    // Unmounted (and released) or aborted.
                    Some(libc::ENODEV) => {
                        info!(dir = %s.dir.display(), "FUSE connection ended");
                        self.forget(s);
                        s.end();
                        return;
                    }
                    _ => {
                        warn!(dir = %s.dir.display(), error = %e, "reading /dev/fuse failed");
                        return;
                    }
                }
            }
            // `busy` is handed to the Reply, which releases it when answered.
            self.dispatch(s, &buf[..n as usize]);
            return;
        }
    }

    fn dispatch(&self, s: &Arc<Session>, bytes: &[u8]) {
        let req = match Request::parse(bytes) {
            Ok(r) => r,
            Err(e) => {
                warn!(dir = %s.dir.display(), error = %e, "dropping a request");
                s.busy.fetch_sub(1, Ordering::SeqCst);
                return;
            }
        };
        let reply = Reply {
            session: Arc::clone(s),
            unique: req.unique,
            done: false,
        };
        match req.opcode {
            op::INIT => init_session(s, &req, reply),
            op::FORGET | op::BATCH_FORGET | op::INTERRUPT => reply.none(),
            op::DESTROY => reply.data(&[]),
            _ => s.handler.handle(&req, reply),
        }
    }
}

fn init_session(s: &Session, req: &Request<'_>, reply: Reply) {
    let offered = match InitIn::parse(req) {
        Ok(i) => i,
        Err(_) => return reply.error(libc::EINVAL),
    };
    if offered.major != abi::KERNEL_VERSION || offered.minor < abi::MIN_MINOR {
        warn!(
            major = offered.major,
            minor = offered.minor,
            "FUSE protocol too old; refusing INIT"
        );
        return reply.error(libc::EPROTO);
    }
    let n = Negotiated {
        kernel_minor: offered.minor,
        minor: offered.minor.min(abi::MAX_MINOR),
        // HAS_RESEND is the kernel's statement, kept to know it later; never "asked".
        flags: (WANTED & offered.flags) | (offered.flags & init::HAS_RESEND),
        max_readahead: MAX_READAHEAD.min(offered.max_readahead),
        max_write: MAX_WRITE,
        max_pages: MAX_PAGES,
    };
    let mut body = abi::init_out(&n, MAX_BACKGROUND);
    // The flags answered must not include the kernel's own statements.
    let answered = n.flags & !init::HAS_RESEND;
    body.0[12..16].copy_from_slice(&(answered as u32).to_ne_bytes());
    body.0[36..40].copy_from_slice(&((answered >> 32) as u32).to_ne_bytes());
    reply.out(body);
    lock(&s.state).negotiated = Some(n);
    s.changed.notify_all();
    debug!(dir = %s.dir.display(), minor = n.minor, flags = n.flags, "FUSE_INIT answered");
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on an open fd.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// How a layer is mounted (`mount(2)` flags and FUSE options).
#[derive(Debug, Clone)]
pub struct MountSpec {
    /// The mount's source, as `/proc/mounts` shows it (`arbor:sha256:…`).
    pub fsname: String,
    /// The filesystem subtype (`fuse.<subtype>`).
    pub subtype: String,
    pub allow_other: bool,
    pub suid: bool,
    pub dev: bool,
}

fn cstr(s: &[u8]) -> io::Result<CString> {
    CString::new(s).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// Opens `/dev/fuse` and mounts a new connection at `dir` (root: `mount(2)`; otherwise
/// through `fusermount3`, which passes the fd back). Returns the connection's fd.
pub fn mount(dir: &Path, spec: &MountSpec) -> io::Result<OwnedFd> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return fusermount(dir, spec);
    }
    let path = cstr(b"/dev/fuse")?;
    // SAFETY: valid NUL-terminated path.
    let raw = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh fd owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut data = format!(
        "fd={},rootmode=40000,user_id=0,group_id=0,default_permissions",
        fd.as_raw_fd()
    );
    if spec.allow_other {
        data.push_str(",allow_other");
    }
    let mut flags = libc::MS_RDONLY | libc::MS_NOATIME;
    if !spec.suid {
        flags |= libc::MS_NOSUID;
    }
    if !spec.dev {
        flags |= libc::MS_NODEV;
    }
    let (src, target) = (
        cstr(spec.fsname.as_bytes())?,
        cstr(dir.as_os_str().as_bytes())?,
    );
    let fstype = cstr(format!("fuse.{}", spec.subtype).as_bytes())?;
    let data = cstr(data.as_bytes())?;
    // SAFETY: all pointers are valid NUL-terminated strings for the call.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr() as *const libc::c_void,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Mounts through the setuid `fusermount3`, which sends the fd over a socket pair
/// (`_FUSE_COMMFD`).
fn fusermount(dir: &Path, spec: &MountSpec) -> io::Result<OwnedFd> {
    use std::os::unix::net::UnixStream;
    use std::os::unix::process::CommandExt;
    let (ours, theirs) = UnixStream::pair()?;
    let mut opts = format!(
        "ro,noatime,default_permissions,fsname={},subtype={}",
        spec.fsname, spec.subtype
    );
    opts.push_str(if spec.suid { ",suid" } else { ",nosuid" });
    opts.push_str(if spec.dev { ",dev" } else { ",nodev" });
    if spec.allow_other {
        opts.push_str(",allow_other");
    }
    let theirs_fd = theirs.as_raw_fd();
    let mut cmd = std::process::Command::new("fusermount3");
    cmd.arg("-o").arg(&opts).arg("--").arg(dir);
    cmd.env("_FUSE_COMMFD", theirs_fd.to_string());
    // SAFETY: only async-signal-safe calls between fork and exec (fcntl).
    unsafe {
        cmd.pre_exec(move || {
            // Keep the socket open across exec.
            if libc::fcntl(theirs_fd, libc::F_SETFD, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    drop(theirs);
    let got = crate::holder::recv_fds(&ours, 1);
    let status = child.wait()?;
    let (_, mut fds) = got?;
    match fds.pop() {
        Some(fd) if status.success() => Ok(fd),
        _ => Err(io::Error::other(format!(
            "fusermount3 failed ({status}) mounting {}",
            dir.display()
        ))),
    }
}

/// Unmounts `dir` (`umount2`, or `fusermount3 -u` without root).
pub fn unmount(dir: &Path, lazy: bool) -> io::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        let mut cmd = std::process::Command::new("fusermount3");
        cmd.arg(if lazy { "-uz" } else { "-u" }).arg("--").arg(dir);
        let out = cmd.output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "fusermount3 -u {}: {}",
                dir.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        return Ok(());
    }
    let path = cstr(dir.as_os_str().as_bytes())?;
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    // SAFETY: valid NUL-terminated path.
    if unsafe { libc::umount2(path.as_ptr(), flags) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
