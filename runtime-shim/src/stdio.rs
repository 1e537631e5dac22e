//! A process's stdio: the FIFOs containerd (or `ctr`) passes in the request, joined to the
//! process either by pipes the shim copies through (no terminal) or by the pseudo-terminal
//! runc hands back over a console socket (`terminal=true`).
//!
//! Pipes are copied by tokio tasks (non-blocking FIFO ends for output; stdin's FIFO is opened
//! and read on the blocking pool, because a reader opened before its writer would see EOF). A
//! terminal's master is copied by two plain threads. Output copies end when the process side
//! closes (EOF, or EIO on the terminal), and the shim then closes its FIFO ends, which is the
//! EOF `ctr` waits for before it deletes the task.

use std::fs::File;
use std::io::{IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use runc::io::{IoOption, NullIo, PipedIo};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::oneshot;
use tracing::{debug, warn};

use crate::error::{Error, Result};

/// The stdio of a process as the request names it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stdio {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

impl Stdio {
    fn is_null(&self) -> bool {
        self.stdin.is_empty() && self.stdout.is_empty() && self.stderr.is_empty()
    }
}

/// What runc gets before create/exec.
pub enum Prepared {
    /// No stdio at all.
    Null(Arc<NullIo>),
    /// Pipes the shim copies to and from the FIFOs.
    Pipes(Arc<PipedIo>),
    /// A console socket runc sends the terminal master to.
    Console(ConsoleSocket),
}

impl Prepared {
    /// Prepares the runc side of `stdio`, owned by `uid:gid` (the runtime options' IoUid/Gid).
    pub fn new(stdio: &Stdio, uid: u32, gid: u32) -> Result<Prepared> {
        if stdio.terminal {
            return Ok(Prepared::Console(ConsoleSocket::new()?));
        }
        if stdio.is_null() {
            let io = NullIo::new().map_err(Error::io("creating null io"))?;
            return Ok(Prepared::Null(Arc::new(io)));
        }
        for (p, out) in [
            (&stdio.stdin, false),
            (&stdio.stdout, true),
            (&stdio.stderr, true),
        ] {
            if let Some((scheme, rest)) = p.split_once("://")
                && scheme != "fifo"
                && !(out && scheme == "file" && rest.starts_with('/'))
            {
                return Err(Error::InvalidArgument(format!(
                    "stdio {p:?}: only FIFOs, and file:///ABSOLUTE/PATH for output, are supported (no {scheme}:// logging)"
                )));
            }
        }
        let opts = IoOption {
            open_stdin: !stdio.stdin.is_empty(),
            open_stdout: !stdio.stdout.is_empty(),
            open_stderr: !stdio.stderr.is_empty(),
        };
        let io = PipedIo::new(uid, gid, &opts).map_err(Error::io("creating stdio pipes"))?;
        Ok(Prepared::Pipes(Arc::new(io)))
    }

    /// The runc io driver (none for a terminal).
    pub fn runc_io(&self) -> Option<Arc<dyn runc::io::Io>> {
        match self {
            Prepared::Null(n) => Some(n.clone()),
            Prepared::Pipes(p) => Some(p.clone()),
            Prepared::Console(_) => None,
        }
    }

    /// The console socket path to pass to runc, for a terminal.
    pub fn console_socket(&self) -> Option<&Path> {
        match self {
            Prepared::Console(c) => Some(&c.path),
            _ => None,
        }
    }

    /// After a successful create/exec: connects the process side to the FIFOs and starts the
    /// copies.
    pub async fn connect(self, stdio: &Stdio) -> Result<ProcessIo> {
        let fifo = |p: &str| PathBuf::from(p.strip_prefix("fifo://").unwrap_or(p));
        let mut pio = ProcessIo::default();
        match self {
            Prepared::Null(_) => {}
            Prepared::Pipes(io) => {
                use runc::io::Io;
                if let (Some(r), false) = (io.stdout(), stdio.stdout.is_empty()) {
                    pio.done.push(copy_out(r, fifo(&stdio.stdout))?);
                }
                if let (Some(r), false) = (io.stderr(), stdio.stderr.is_empty()) {
                    pio.done.push(copy_out(r, fifo(&stdio.stderr))?);
                }
                if let (Some(w), false) = (io.stdin(), stdio.stdin.is_empty()) {
                    let (tx, rx) = oneshot::channel();
                    tokio::spawn(copy_in(fifo(&stdio.stdin), w, rx));
                    pio.close_stdin = Some(tx);
                }
                // Keeps the read ends of the pipes until the process is deleted.
                pio.pipes = Some(io);
            }
            Prepared::Console(sock) => {
                let master = tokio::task::spawn_blocking(move || sock.receive())
                    .await
                    .map_err(|e| Error::io("console socket")(std::io::Error::other(e)))??;
                let master = Arc::new(master);
                if !stdio.stdout.is_empty() {
                    let out = fifo(&stdio.stdout);
                    let m = master.try_clone().map_err(Error::io("dup console"))?;
                    let (tx, rx) = oneshot::channel();
                    std::thread::Builder::new()
                        .name("console-out".into())
                        .spawn(move || {
                            if let Err(e) = console_out(m, &out) {
                                debug!(error = %e, "console output copy ended");
                            }
                            let _ = tx.send(());
                        })
                        .map_err(Error::io("spawning console thread"))?;
                    pio.done.push(rx);
                }
                if !stdio.stdin.is_empty() {
                    let input = fifo(&stdio.stdin);
                    let m = master.try_clone().map_err(Error::io("dup console"))?;
                    std::thread::Builder::new()
                        .name("console-in".into())
                        .spawn(move || {
                            if let Err(e) = console_in(&input, m) {
                                debug!(error = %e, "console input copy ended");
                            }
                        })
                        .map_err(Error::io("spawning console thread"))?;
                }
                pio.console = Some(master);
            }
        }
        Ok(pio)
    }
}

/// The shim's side of a running process's stdio.
#[derive(Default)]
pub struct ProcessIo {
    pipes: Option<Arc<PipedIo>>,
    console: Option<Arc<File>>,
    close_stdin: Option<oneshot::Sender<()>>,
    /// One receiver per output copy, resolved when it ends.
    done: Vec<oneshot::Receiver<()>>,
}

impl ProcessIo {
    /// Closes the process's stdin (CloseIO).
    pub fn close_stdin(&mut self) {
        if let Some(tx) = self.close_stdin.take() {
            let _ = tx.send(());
        }
    }

    /// Resizes the terminal (ResizePty); an error without one.
    pub fn resize(&self, width: u32, height: u32) -> Result<()> {
        let Some(master) = &self.console else {
            return Err(Error::FailedPrecondition(
                "the process has no terminal".into(),
            ));
        };
        let ws = libc::winsize {
            ws_row: u16::try_from(height).unwrap_or(u16::MAX),
            ws_col: u16::try_from(width).unwrap_or(u16::MAX),
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize from a valid pointer; the fd is open.
        let rc = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        if rc < 0 {
            return Err(Error::io("resizing the terminal")(
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    /// Waits (at most `limit`) for the output copies to drain, as containerd's runc shim does
    /// before it deletes a process.
    pub async fn wait_output(&mut self, limit: Duration) {
        let all = futures_all(std::mem::take(&mut self.done));
        if tokio::time::timeout(limit, all).await.is_err() {
            warn!("stdio copies did not end within {limit:?}");
        }
    }
}

async fn futures_all(rx: Vec<oneshot::Receiver<()>>) {
    for r in rx {
        let _ = r.await;
    }
}

/// Copies a process's output pipe into a FIFO; the shim also holds a read end of the FIFO so
/// that the open never blocks and writes do not fail when the reader goes away.
fn copy_out(
    from: Box<dyn AsyncRead + Send + Sync + Unpin>,
    path: PathBuf,
) -> Result<oneshot::Receiver<()>> {
    if let Some(file) = path.to_str().and_then(|p| p.strip_prefix("file://")) {
        return copy_to_file(from, PathBuf::from(file));
    }
    copy_to_fifo(from, path)
}

/// `file://PATH` output (containerd's runc shim does the same): appended to PATH, which is
/// created (0640) if missing, as a log that outlives the process.
fn copy_to_file(
    mut from: Box<dyn AsyncRead + Send + Sync + Unpin>,
    path: PathBuf,
) -> Result<oneshot::Receiver<()>> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .open(&path)
        .map_err(Error::io(format!("opening {}", path.display())))?;
    let mut to = tokio::fs::File::from_std(f);
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        if let Err(e) = tokio::io::copy(&mut from, &mut to).await {
            debug!(error = %e, file = %path.display(), "output copy ended");
        }
        let _ = to.flush().await;
        let _ = tx.send(());
    });
    Ok(rx)
}

fn copy_to_fifo(
    mut from: Box<dyn AsyncRead + Send + Sync + Unpin>,
    path: PathBuf,
) -> Result<oneshot::Receiver<()>> {
    let keep = pipe::OpenOptions::new()
        .open_receiver(&path)
        .map_err(Error::io(format!("opening {}", path.display())))?;
    let mut to = pipe::OpenOptions::new()
        .open_sender(&path)
        .map_err(Error::io(format!("opening {}", path.display())))?;
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        if let Err(e) = tokio::io::copy(&mut from, &mut to).await {
            debug!(error = %e, fifo = %path.display(), "output copy ended");
        }
        drop(to);
        drop(keep);
        let _ = tx.send(());
    });
    Ok(rx)
}

/// Copies the stdin FIFO into the process's stdin pipe until EOF or CloseIO. The FIFO is
/// opened for reading by a plain thread, blocking until its writer opens it (a reader opened
/// earlier would read EOF at once; `ctr` passes a stdin FIFO it never opens when it has no
/// stdin, and such an open must not hold up the shim's exit).
async fn copy_in(
    path: PathBuf,
    mut to: Box<dyn AsyncWrite + Send + Sync + Unpin>,
    mut closed: oneshot::Receiver<()>,
) {
    let (opened_tx, opened) = oneshot::channel();
    let p = path.clone();
    let spawned = std::thread::Builder::new()
        .name("stdin-open".into())
        .spawn(move || {
            let _ = opened_tx.send(File::open(&p));
        });
    if let Err(e) = spawned {
        warn!(error = %e, "cannot open stdin");
        return;
    }
    let copy = async {
        let file = opened
            .await
            .map_err(|_| Error::io("opening stdin")(std::io::Error::other("opener died")))?
            .map_err(Error::io(format!("opening {}", path.display())))?;
        let mut from = pipe::Receiver::from_file(file)
            .map_err(Error::io(format!("reading {}", path.display())))?;
        tokio::io::copy(&mut from, &mut to)
            .await
            .map_err(Error::io("copying stdin"))?;
        Ok::<_, Error>(())
    };
    tokio::select! {
        r = copy => if let Err(e) = r { debug!(error = %e, "stdin copy ended") },
        _ = &mut closed => debug!("stdin closed by request"),
    }
    let _ = to.shutdown().await;
}

fn console_out(mut master: File, path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let _keep = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let mut out = std::fs::OpenOptions::new().write(true).open(path)?;
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        // EIO once the last process holding the terminal exits.
        let n = master.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        out.write_all(&buf[..n])?;
    }
}

fn console_in(path: &Path, mut master: File) -> std::io::Result<()> {
    let mut input = std::fs::File::open(path)?;
    std::io::copy(&mut input, &mut master)?;
    Ok(())
}

/// A unix socket runc connects to with `--console-socket` to send the terminal's master.
pub struct ConsoleSocket {
    dir: Option<PathBuf>,
    path: PathBuf,
    listener: UnixListener,
}

impl ConsoleSocket {
    fn new() -> Result<ConsoleSocket> {
        let dir = std::env::temp_dir().join(format!(
            "arbor-pty-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir(&dir).map_err(Error::io(format!("creating {}", dir.display())))?;
        let path = dir.join("pty.sock");
        let listener =
            UnixListener::bind(&path).map_err(Error::io(format!("binding {}", path.display())))?;
        Ok(ConsoleSocket {
            dir: Some(dir),
            path,
            listener,
        })
    }

    /// Accepts runc's connection and receives the master fd (blocking: runc sent it before
    /// `create`/`exec` returned, so it is waiting; a missing one is an error, not a hang).
    fn receive(self) -> Result<File> {
        self.listener
            .set_nonblocking(true)
            .map_err(Error::io("console socket"))?;
        let (stream, _) = self
            .listener
            .accept()
            .map_err(Error::io("runc did not connect to the console socket"))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(Error::io("console socket"))?;
        stream
            .set_nonblocking(false)
            .map_err(Error::io("console socket"))?;
        let fd = recv_fd(&stream)?;
        Ok(File::from(fd))
    }
}

static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        if let Some(d) = self.dir.take() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

fn recv_fd(stream: &std::os::unix::net::UnixStream) -> Result<OwnedFd> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    use std::os::fd::{FromRawFd, RawFd};
    let mut buf = [0u8; 4096];
    let mut iov = [IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([RawFd; 2]);
    let msg = recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(Error::nix("receiving the terminal from runc"))?;
    let mut fds: Vec<RawFd> = Vec::new();
    for c in msg.cmsgs().map_err(Error::nix("console message"))? {
        if let ControlMessageOwned::ScmRights(f) = c {
            fds.extend(f);
        }
    }
    let mut owned: Vec<OwnedFd> = fds
        .into_iter()
        // SAFETY: SCM_RIGHTS gave us these descriptors; nothing else owns them.
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    if owned.is_empty() {
        return Err(Error::FailedPrecondition(
            "runc sent no terminal over the console socket".into(),
        ));
    }
    Ok(owned.swap_remove(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn null_and_unsupported_stdio() {
        assert!(matches!(
            Prepared::new(&Stdio::default(), 0, 0).unwrap(),
            Prepared::Null(_)
        ));
        let s = Stdio {
            stdout: "binary:///usr/bin/logger".into(),
            ..Default::default()
        };
        assert!(Prepared::new(&s, 0, 0).is_err());
        // file:// is for output, with an absolute path.
        for (stdin, stdout, ok) in [
            ("", "file:///var/log/fn.log", true),
            ("file:///tmp/in", "", false),
            ("", "file://relative.log", false),
        ] {
            let s = Stdio {
                stdin: stdin.into(),
                stdout: stdout.into(),
                ..Default::default()
            };
            assert_eq!(Prepared::new(&s, 0, 0).is_ok(), ok, "{stdin:?} {stdout:?}");
        }
    }

    #[tokio::test]
    async fn file_output_is_appended() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("fn.log");
        std::fs::write(&log, b"before\n").unwrap();
        let (r, mut w) = tokio::io::duplex(64);
        let done = copy_out(
            Box::new(r),
            PathBuf::from(format!("file://{}", log.display())),
        )
        .unwrap();
        w.write_all(b"after\n").await.unwrap();
        drop(w);
        done.await.unwrap();
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "before\nafter\n");
    }

    #[test]
    fn console_socket_is_removed() {
        let c = ConsoleSocket::new().unwrap();
        let dir = c.path.parent().unwrap().to_path_buf();
        assert!(c.path.exists());
        // Nobody connected: an error, not a hang.
        assert!(c.receive().is_err());
        assert!(!dir.exists());
    }
}
