//! The fd holder: a minimal process that keeps a duplicate of every FUSE connection's fd so
//! that the connections (and the mounts containers use) outlive the daemon serving them,
//! through a planned restart, an upgrade to another binary, or a crash.
//!
//! The kernel aborts a FUSE connection only when the last fd of its open file description is
//! closed; while the holder keeps one, requests wait in the kernel's queue for a successor,
//! and those a crashed daemon had read stay on the connection, to be queued again with
//! `NOTIFY_RESEND` ([`crate::session::Session::resend`]).
//!
//! Protocol: a `SOCK_SEQPACKET` unix socket (one message per datagram), JSON requests, fds
//! as `SCM_RIGHTS`; only the holder's own uid may connect. Requests:
//! `{"op":"keep","name":N,"meta":{…}}` + 1 fd, `{"op":"drop","name":N}`, `{"op":"list"}`
//! (answered `{"count":K}`, then K messages `{"name":N,"meta":{…}}` + 1 fd), `{"op":"ping"}`,
//! `{"op":"quit"}`. Connections the kernel has ended (unmounted) are forgotten on their own.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tracing::{info, warn};

/// The protocol version `ping` answers.
pub const VERSION: u32 = 1;
/// `close_range(2)`'s flag: mark the fds close-on-exec instead of closing them now.
const CLOSE_RANGE_CLOEXEC: u32 = 1 << 2;
const MAX_MSG: usize = 64 << 10;

/// Sends `data` with `fds` attached (`SCM_RIGHTS`).
pub fn send_fds(sock: &impl AsRawFd, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let space = if fds.is_empty() {
        0
    } else {
        // SAFETY: CMSG_SPACE is a pure computation.
        unsafe { libc::CMSG_SPACE(std::mem::size_of_val(fds) as u32) as usize }
    };
    let mut cbuf = vec![0u8; space];
    // SAFETY: a zeroed msghdr is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer holds exactly one header with room for `fds`.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of_val(fds) as u32) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr() as *const u8,
                libc::CMSG_DATA(c),
                std::mem::size_of_val(fds),
            );
        }
    }
    // SAFETY: `msg` points at live buffers.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Receives one message and up to `max_fds` fds; an empty message is the peer gone.
pub fn recv_fds(sock: &impl AsRawFd, max_fds: usize) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut data = vec![0u8; MAX_MSG];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: pure computation.
    let space = unsafe { libc::CMSG_SPACE((max_fds.max(1) * 4) as u32) as usize };
    let mut cbuf = vec![0u8; space];
    // SAFETY: a zeroed msghdr is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = space as _;
    // SAFETY: `msg` points at live, writable buffers.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: walking the control messages the kernel wrote, within `msg_controllen`.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let bytes = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let p = libc::CMSG_DATA(c) as *const RawFd;
                for i in 0..bytes / 4 {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(p.add(i))));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::other("more fds than expected in one message"));
    }
    data.truncate(n as usize);
    Ok((data, fds))
}

fn seqpacket() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn sockaddr(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: zeroed sockaddr_un is valid.
    let mut a: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    a.sun_family = libc::AF_UNIX as _;
    let b = path.as_os_str().as_bytes();
    if b.len() >= a.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("socket path too long: {}", path.display()),
        ));
    }
    for (d, s) in a.sun_path.iter_mut().zip(b) {
        *d = *s as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + b.len() + 1;
    Ok((a, len as libc::socklen_t))
}

#[derive(Serialize, Deserialize)]
struct Msg {
    op: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    meta: Option<Value>,
}

/// A connection to the holder.
pub struct HolderClient {
    sock: OwnedFd,
}

/// One connection the holder keeps.
pub struct Kept {
    pub name: String,
    pub meta: Value,
    pub fd: OwnedFd,
}

impl HolderClient {
    pub fn connect(path: &Path) -> io::Result<HolderClient> {
        let sock = seqpacket()?;
        let (a, len) = sockaddr(path)?;
        // SAFETY: `a` is a valid sockaddr_un of `len` bytes.
        let r = unsafe {
            libc::connect(
                sock.as_raw_fd(),
                &a as *const libc::sockaddr_un as *const libc::sockaddr,
                len,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        let c = HolderClient { sock };
        let pong = c.call(
            &Msg {
                op: "ping".into(),
                name: None,
                meta: None,
            },
            &[],
        )?;
        if pong.get("version").and_then(Value::as_u64) != Some(VERSION as u64) {
            return Err(io::Error::other(format!(
                "fd holder speaks another protocol: {pong}"
            )));
        }
        Ok(c)
    }

    /// Connects to the holder at `socket`, starting `exe --fd-holder <socket>` (detached, in
    /// its own session) if none answers.
    pub fn connect_or_spawn(socket: &Path, exe: &Path, log: &Path) -> io::Result<HolderClient> {
        if let Ok(c) = HolderClient::connect(socket) {
            return Ok(c);
        }
        use std::os::unix::process::CommandExt;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let mut cmd = std::process::Command::new(exe);
        cmd.arg("--fd-holder")
            .arg(socket)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log);
        // SAFETY: setsid and close_range are async-signal-safe syscalls.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(io::Error::last_os_error());
                }
                // The holder outlives us: it must not keep what we inherited without
                // close-on-exec (a supervisor's pipe, a test harness's files). Every fd past
                // stdio is closed at exec (CLOSE_RANGE_CLOEXEC, Linux 5.11+; on older
                // kernels they stay, as before).
                libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, CLOSE_RANGE_CLOEXEC);
                Ok(())
            });
        }
        let mut child = cmd.spawn()?;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            match HolderClient::connect(socket) {
                Ok(c) => {
                    info!(pid = child.id(), socket = %socket.display(), "fd holder started");
                    // Reaped by init once we exit; wait for it in the background meanwhile.
                    std::thread::spawn(move || child.wait());
                    return Ok(c);
                }
                Err(e) if std::time::Instant::now() > deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(io::Error::other(format!(
                        "the fd holder did not start: {e}"
                    )));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    fn call(&self, m: &Msg, fds: &[RawFd]) -> io::Result<Value> {
        let data = serde_json::to_vec(m).map_err(io::Error::other)?;
        send_fds(&self.sock, &data, fds)?;
        let (answer, _) = recv_fds(&self.sock, 0)?;
        parse_answer(&answer)
    }

    /// Keeps a duplicate of `fd` under `name` (replacing an earlier one).
    pub fn keep(&self, name: &str, meta: Value, fd: &impl AsRawFd) -> io::Result<()> {
        self.call(
            &Msg {
                op: "keep".into(),
                name: Some(name.into()),
                meta: Some(meta),
            },
            &[fd.as_raw_fd()],
        )
        .map(drop)
    }

    /// Forgets `name` (its connection ends if nobody else holds it).
    pub fn forget(&self, name: &str) -> io::Result<()> {
        self.call(
            &Msg {
                op: "drop".into(),
                name: Some(name.into()),
                meta: None,
            },
            &[],
        )
        .map(drop)
    }

    /// Every connection kept, with a duplicate of its fd.
    pub fn list(&self) -> io::Result<Vec<Kept>> {
        let head = self.call(
            &Msg {
                op: "list".into(),
                name: None,
                meta: None,
            },
            &[],
        )?;
        let count = head.get("count").and_then(Value::as_u64).unwrap_or(0);
        let mut out = Vec::new();
        for _ in 0..count {
            let (data, mut fds) = recv_fds(&self.sock, 1)?;
            let v = parse_answer(&data)?;
            let (Some(name), Some(fd)) = (v.get("name").and_then(Value::as_str), fds.pop()) else {
                return Err(io::Error::other(
                    "fd holder sent an entry without name or fd",
                ));
            };
            out.push(Kept {
                name: name.to_string(),
                meta: v.get("meta").cloned().unwrap_or(Value::Null),
                fd,
            });
        }
        Ok(out)
    }

    /// Stops the holder: every connection only it kept ends.
    pub fn quit(&self) -> io::Result<()> {
        self.call(
            &Msg {
                op: "quit".into(),
                name: None,
                meta: None,
            },
            &[],
        )
        .map(drop)
    }
}

fn parse_answer(b: &[u8]) -> io::Result<Value> {
    if b.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "fd holder closed",
        ));
    }
    let v: Value = serde_json::from_slice(b).map_err(io::Error::other)?;
    if let Some(e) = v.get("error").and_then(Value::as_str) {
        return Err(io::Error::other(format!("fd holder: {e}")));
    }
    Ok(v)
}

/// The file the holder on `socket` writes its pid to: `socket` with the extension `pid`.
pub fn pid_file(socket: &Path) -> std::path::PathBuf {
    socket.with_extension("pid")
}

/// Whether the connection behind `fd` has ended (`/dev/fuse` polls as an error then).
fn ended(fd: &OwnedFd) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: 0,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let r = unsafe { libc::poll(&mut p, 1, 0) };
    r > 0 && p.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0
}

fn peer_uid(fd: &OwnedFd) -> io::Result<u32> {
    // SAFETY: zeroed ucred is valid; getsockopt writes at most `len` bytes.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut libc::ucred as *mut libc::c_void,
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// Runs the holder on `socket` until asked to quit. Blocking; single-threaded.
pub fn run_holder(socket: &Path) -> io::Result<()> {
    if HolderClient::connect(socket).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("an fd holder already answers on {}", socket.display()),
        ));
    }
    let _ = std::fs::remove_file(socket);
    let listener = seqpacket()?;
    let (a, len) = sockaddr(socket)?;
    // SAFETY: valid sockaddr of `len` bytes.
    if unsafe {
        libc::bind(
            listener.as_raw_fd(),
            &a as *const libc::sockaddr_un as *const libc::sockaddr,
            len,
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    let path = CString::new(socket.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: valid path.
    unsafe { libc::chmod(path.as_ptr(), 0o600) };
    // SAFETY: listening on a bound socket.
    if unsafe { libc::listen(listener.as_raw_fd(), 8) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // Who holds a root's connections, for supervisors and tests (reading other processes'
    // command lines can block behind a stuck FUSE mount; this file cannot).
    let pid_file = pid_file(socket);
    std::fs::write(&pid_file, format!("{}\n", std::process::id()))?;
    // SAFETY: no preconditions.
    let me = unsafe { libc::geteuid() };
    info!(socket = %socket.display(), pid = std::process::id(), "fd holder listening");
    let mut kept: BTreeMap<String, (Value, OwnedFd)> = BTreeMap::new();
    let mut clients: Vec<OwnedFd> = Vec::new();
    loop {
        let mut polls: Vec<libc::pollfd> = std::iter::once(&listener)
            .chain(clients.iter())
            .map(|fd| libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: `polls` is a valid array of its length.
        let r = unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as libc::nfds_t, 5000) };
        kept.retain(|name, (_, fd)| {
            let gone = ended(fd);
            if gone {
                info!(name, "connection ended; forgotten");
            }
            !gone
        });
        if r <= 0 {
            continue;
        }
        // Clients first (indexes shift once the listener adds one).
        let mut gone = Vec::new();
        for (i, p) in polls.iter().enumerate().skip(1) {
            if p.revents == 0 {
                continue;
            }
            match serve_one(&clients[i - 1], &mut kept) {
                Served::More => {}
                Served::Gone => gone.push(i - 1),
                Served::Quit => {
                    info!(kept = kept.len(), "asked to quit");
                    let _ = std::fs::remove_file(socket);
                    let _ = std::fs::remove_file(&pid_file);
                    return Ok(());
                }
            }
        }
        for i in gone.into_iter().rev() {
            clients.remove(i);
        }
        if polls[0].revents & libc::POLLIN == 0 {
            continue;
        }
        // SAFETY: accepting on a listening socket.
        let c = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if c < 0 {
            continue;
        }
        // SAFETY: fresh fd.
        let conn = unsafe { OwnedFd::from_raw_fd(c) };
        match peer_uid(&conn) {
            Ok(uid) if uid == me || uid == 0 => clients.push(conn),
            other => warn!(?other, "refusing a client of another uid"),
        }
    }
}

enum Served {
    More,
    Gone,
    Quit,
}

/// Answers one request of a client.
fn serve_one(conn: &OwnedFd, kept: &mut BTreeMap<String, (Value, OwnedFd)>) -> Served {
    let answer = |v: Value| {
        let _ = send_fds(conn, v.to_string().as_bytes(), &[]);
    };
    let (data, mut fds) = match recv_fds(conn, 1) {
        Ok((d, _)) if d.is_empty() => return Served::Gone,
        Ok(m) => m,
        Err(_) => return Served::Gone,
    };
    let msg: Msg = match serde_json::from_slice(&data) {
        Ok(m) => m,
        Err(e) => {
            answer(serde_json::json!({ "error": format!("bad request: {e}") }));
            return Served::More;
        }
    };
    match (msg.op.as_str(), msg.name) {
        ("ping", _) => answer(serde_json::json!({
            "version": VERSION,
            "pid": std::process::id(),
            "kept": kept.len(),
        })),
        ("keep", Some(name)) => match fds.pop() {
            Some(fd) => {
                kept.insert(name, (msg.meta.unwrap_or(Value::Null), fd));
                answer(serde_json::json!({ "ok": true }));
            }
            None => answer(serde_json::json!({ "error": "keep without an fd" })),
        },
        ("drop", Some(name)) => {
            kept.remove(&name);
            answer(serde_json::json!({ "ok": true }));
        }
        ("list", _) => {
            answer(serde_json::json!({ "count": kept.len() }));
            for (name, (meta, fd)) in kept.iter() {
                let v = serde_json::json!({ "name": name, "meta": meta });
                if send_fds(conn, v.to_string().as_bytes(), &[fd.as_raw_fd()]).is_err() {
                    return Served::Gone;
                }
            }
        }
        ("quit", _) => {
            answer(serde_json::json!({ "ok": true }));
            return Served::Quit;
        }
        (op, _) => answer(serde_json::json!({ "error": format!("unknown request {op}") })),
    }
    Served::More
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holder_keeps_lists_and_forgets_fds() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("h.sock");
        let s2 = sock.clone();
        let t = std::thread::spawn(move || run_holder(&s2));
        let c = (0..200)
            .find_map(|_| {
                std::thread::sleep(Duration::from_millis(10));
                HolderClient::connect(&sock).ok()
            })
            .expect("holder answers");
        // A pipe stands in for /dev/fuse: what is kept is the same open file.
        let (mut r, w) = std::io::pipe().unwrap();
        c.keep("a", serde_json::json!({"x": 1}), &w).unwrap();
        drop(w);
        let list = c.list().unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].name, "a");
        assert_eq!(list[0].meta["x"], 1);
        let mut w2 = std::fs::File::from(list.into_iter().next().unwrap().fd);
        use std::io::{Read, Write};
        w2.write_all(b"hi").unwrap();
        drop(w2);
        c.forget("a").unwrap();
        let mut got = String::new();
        r.read_to_string(&mut got).unwrap();
        assert_eq!(
            got, "hi",
            "the kept fd was the pipe's write end; gone once forgotten"
        );
        assert!(c.list().unwrap().is_empty());
        assert!(
            run_holder(&sock).is_err(),
            "a second holder on the same socket is refused"
        );
        c.quit().unwrap();
        t.join().unwrap().unwrap();
    }
}
