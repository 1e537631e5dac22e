//! The container's stdio: FIFOs in a private directory that the runtime shim opens at task
//! Create (as `ctr run` does), copied to and from the caller's stdin, stdout and stderr; or
//! nothing, or a log file, for detached containers. With a terminal the caller's terminal is
//! put in raw mode and there is no stderr FIFO (the shim copies the pty to stdout).
//!
//! Each FIFO is held open read-write ("keeper") from its creation until the shim has opened
//! its end at Create, so neither side's open blocks nor sees an early end of file; after
//! Create our real end is opened and the keeper closed, so our reader sees EOF when the shim
//! closes its writer (the process and its children are gone), and the shim's stdin reader
//! sees EOF when we close ours (the caller's stdin ended; followed by `CloseIO`).

use std::ffi::CString;
use std::fs::File;
use std::io::{Read as _, Write as _};
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};

use tokio::io::AsyncWriteExt as _;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::error::{Context as _, Result};

/// Where a container's stdio goes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Stdio {
    /// The caller's stdin, stdout and stderr, through FIFOs (foreground runs).
    #[default]
    Inherit,
    /// Nothing: stdin empty, output dropped.
    Null,
    /// stdout and stderr appended to this file by the shim (`file://` URI); stdin empty.
    LogFile(PathBuf),
}

/// The URIs/paths a CreateTaskRequest names, and what to attach once the task exists.
pub(crate) enum Prepared {
    /// Nothing to copy.
    Plain {
        stdin: String,
        stdout: String,
        stderr: String,
    },
    Fifos(Fifos),
}

impl Prepared {
    pub(crate) fn new(stdio: &Stdio, tty: bool) -> Result<Prepared> {
        Ok(match stdio {
            Stdio::Null => Prepared::Plain {
                stdin: String::new(),
                stdout: String::new(),
                stderr: String::new(),
            },
            Stdio::LogFile(p) => {
                let abs = std::path::absolute(p).ctx(format!("log file {}", p.display()))?;
                let uri = format!("file://{}", abs.display());
                Prepared::Plain {
                    stdin: String::new(),
                    stdout: uri.clone(),
                    stderr: if tty { String::new() } else { uri },
                }
            }
            Stdio::Inherit => Prepared::Fifos(Fifos::create(tty)?),
        })
    }

    /// (stdin, stdout, stderr) for the CreateTaskRequest.
    pub(crate) fn uris(&self) -> (String, String, String) {
        match self {
            Prepared::Plain {
                stdin,
                stdout,
                stderr,
            } => (stdin.clone(), stdout.clone(), stderr.clone()),
            Prepared::Fifos(f) => (
                path_str(&f.stdin),
                path_str(&f.stdout),
                f.stderr.as_deref().map(path_str).unwrap_or_default(),
            ),
        }
    }
}

fn path_str(p: &Path) -> String {
    p.display().to_string()
}

/// FIFOs in a private (0700) temporary directory, removed when this (or what it becomes,
/// [`Attached`]) is dropped.
pub(crate) struct Fifos {
    dir: tempfile::TempDir,
    stdin: PathBuf,
    stdout: PathBuf,
    stderr: Option<PathBuf>,
    keepers: Vec<File>,
}

fn mkfifo(p: &Path) -> Result<()> {
    let c = CString::new(p.as_os_str().as_bytes()).ctx("fifo path")?;
    // SAFETY: mkfifo of a NUL-terminated path.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
        return Err(std::io::Error::last_os_error()).ctx(format!("mkfifo {}", p.display()));
    }
    Ok(())
}

/// Opens a FIFO read-write without blocking (Linux allows it whether or not the other side
/// is open).
fn keeper(p: &Path) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(p)
        .ctx(format!("opening {}", p.display()))
}

impl Fifos {
    fn create(tty: bool) -> Result<Fifos> {
        let dir = tempfile::Builder::new()
            .prefix("arbor-run-")
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .tempdir()
            .ctx("creating the fifo directory")?;
        let stdin = dir.path().join("stdin");
        let stdout = dir.path().join("stdout");
        let stderr = (!tty).then(|| dir.path().join("stderr"));
        let mut keepers = Vec::new();
        for p in [Some(&stdin), Some(&stdout), stderr.as_ref()]
            .into_iter()
            .flatten()
        {
            mkfifo(p)?;
            keepers.push(keeper(p)?);
        }
        Ok(Fifos {
            dir,
            stdin,
            stdout,
            stderr,
            keepers,
        })
    }

    /// After the shim opened its ends (task Create): starts copying stdin (on a thread of its
    /// own: the caller's stdin may never end), stdout and stderr.
    pub(crate) fn attach(self) -> Result<Attached> {
        let out = open_reader(&self.stdout)?;
        let err = self.stderr.as_deref().map(open_reader).transpose()?;
        let (tx, stdin_done) = oneshot::channel();
        let stdin_path = self.stdin.clone();
        // The stdin keeper goes to the thread, which drops it once its writer is open.
        let mut keepers = self.keepers.into_iter();
        let stdin_keeper = keepers.next();
        drop(keepers.collect::<Vec<_>>());
        std::thread::Builder::new()
            .name("arbor-run-stdin".into())
            .spawn(move || {
                let result = copy_stdin(&stdin_path, stdin_keeper);
                if let Err(e) = &result {
                    tracing::debug!(error = %e, "copying stdin to the container");
                }
                let _ = tx.send(());
            })
            .ctx("starting the stdin thread")?;
        let out = tokio::spawn(copy_out(out, Box::new(tokio::io::stdout()), "stdout"));
        let err = err.map(|e| tokio::spawn(copy_out(e, Box::new(tokio::io::stderr()), "stderr")));
        Ok(Attached {
            _dir: self.dir,
            out: Some(out),
            err,
            stdin_done: Some(stdin_done),
        })
    }
}

fn open_reader(p: &Path) -> Result<tokio::net::unix::pipe::Receiver> {
    tokio::net::unix::pipe::OpenOptions::new()
        .open_receiver(p)
        .ctx(format!("opening {}", p.display()))
}

fn copy_stdin(path: &Path, keeper: Option<File>) -> std::io::Result<()> {
    // Does not block: the shim (and our keeper) hold read ends.
    let mut w = std::fs::OpenOptions::new().write(true).open(path)?;
    drop(keeper);
    let mut stdin = std::io::stdin().lock();
    let mut buf = [0u8; 32 << 10];
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        w.write_all(&buf[..n])?;
    }
}

async fn copy_out(
    mut from: tokio::net::unix::pipe::Receiver,
    mut to: Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
    what: &'static str,
) {
    if let Err(e) = tokio::io::copy(&mut from, &mut to).await {
        tracing::debug!(error = %e, "copying the container's {what}");
    }
    let _ = to.flush().await;
}

/// The copies in flight; the FIFO directory goes when this is dropped.
pub(crate) struct Attached {
    _dir: tempfile::TempDir,
    out: Option<JoinHandle<()>>,
    err: Option<JoinHandle<()>>,
    stdin_done: Option<oneshot::Receiver<()>>,
}

impl Attached {
    /// Resolves when the caller's stdin has ended and the FIFO's write end is closed (once).
    pub(crate) async fn stdin_closed(&mut self) {
        match self.stdin_done.as_mut() {
            Some(rx) => {
                let _ = rx.await;
                self.stdin_done = None;
            }
            None => std::future::pending().await,
        }
    }

    /// Waits (at most `limit`) for the shim to close stdout and stderr and for everything to
    /// be written out.
    pub(crate) async fn drain(&mut self, limit: std::time::Duration) {
        let all = async {
            if let Some(h) = self.out.take() {
                let _ = h.await;
            }
            if let Some(h) = self.err.take() {
                let _ = h.await;
            }
        };
        if tokio::time::timeout(limit, all).await.is_err() {
            tracing::warn!("the container's output did not end within {limit:?} of its exit");
        }
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        for h in [self.out.take(), self.err.take()].into_iter().flatten() {
            h.abort();
        }
    }
}

/// The caller's terminal in raw mode while this lives (none if stdin is not a terminal).
pub(crate) struct RawTerminal {
    saved: Option<libc::termios>,
}

impl RawTerminal {
    pub(crate) fn enter() -> RawTerminal {
        // SAFETY: termios calls on fd 0 with a zeroed, then filled, struct.
        unsafe {
            if libc::isatty(0) != 1 {
                return RawTerminal { saved: None };
            }
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) != 0 {
                return RawTerminal { saved: None };
            }
            let saved = t;
            libc::cfmakeraw(&mut t);
            // Output post-processing stays on, as in docker/ctr raw mode.
            t.c_oflag |= libc::OPOST;
            if libc::tcsetattr(0, libc::TCSANOW, &t) != 0 {
                return RawTerminal { saved: None };
            }
            RawTerminal { saved: Some(saved) }
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(t) = self.saved.take() {
            // SAFETY: restores the attributes read in `enter`.
            unsafe { libc::tcsetattr(0, libc::TCSANOW, &t) };
        }
    }
}

/// The caller's terminal size (columns, rows), from stdout, else stdin.
pub(crate) fn terminal_size() -> Option<(u32, u32)> {
    for fd in [1, 0] {
        // SAFETY: TIOCGWINSZ fills a winsize.
        let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
        if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } == 0 && ws.ws_col > 0 {
            return Some((ws.ws_col.into(), ws.ws_row.into()));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileTypeExt as _;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn fifos_are_private_and_go_away() {
        let f = Fifos::create(false).unwrap();
        let dir = f.dir.path().to_path_buf();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        for name in ["stdin", "stdout", "stderr"] {
            let md = std::fs::metadata(dir.join(name)).unwrap();
            assert!(md.file_type().is_fifo(), "{name}");
        }
        let p = Prepared::Fifos(f);
        let (i, o, e) = p.uris();
        assert!(i.ends_with("/stdin") && o.ends_with("/stdout") && e.ends_with("/stderr"));
        drop(p);
        assert!(!dir.exists());
        // A terminal has no stderr FIFO.
        let f = Fifos::create(true).unwrap();
        assert!(f.stderr.is_none());
        assert_eq!(Prepared::Fifos(f).uris().2, "");
    }

    #[test]
    fn null_and_log_file() {
        let p = Prepared::new(&Stdio::Null, false).unwrap();
        assert_eq!(p.uris(), (String::new(), String::new(), String::new()));
        let p = Prepared::new(&Stdio::LogFile("/var/log/x.log".into()), false).unwrap();
        let (i, o, e) = p.uris();
        assert_eq!(
            (i.as_str(), o.as_str(), e.as_str()),
            ("", "file:///var/log/x.log", "file:///var/log/x.log")
        );
    }
}
