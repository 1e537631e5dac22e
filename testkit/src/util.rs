//! Process, HTTP and filesystem helpers shared by the harness.

use std::ffi::CString;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Base directory for temporary directories (`ARBOR_TESTKIT_TMPDIR` or the system temp dir).
pub(crate) fn temp_base() -> PathBuf {
    match std::env::var_os("ARBOR_TESTKIT_TMPDIR") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => std::env::temp_dir(),
    }
}

/// True when `ARBOR_TESTKIT_KEEP=1`: temporary directories are kept for debugging.
pub(crate) fn keep_dirs() -> bool {
    std::env::var("ARBOR_TESTKIT_KEEP").is_ok_and(|v| v == "1")
}

/// Creates a temporary directory below [`temp_base`].
pub(crate) fn temp_dir(prefix: &str) -> Result<tempfile::TempDir> {
    let base = temp_base();
    std::fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(&base)
        .with_context(|| format!("creating a temp dir in {}", base.display()))
}

/// Removes a temp dir, or keeps it (and says where) when `ARBOR_TESTKIT_KEEP=1`.
pub(crate) fn dispose_dir(dir: tempfile::TempDir, what: &str) {
    if keep_dirs() {
        let p = dir.keep();
        eprintln!("arbor-testkit: kept {what} dir {}", p.display());
        return;
    }
    let p = dir.path().to_path_buf();
    if let Err(e) = dir.close() {
        eprintln!(
            "arbor-testkit: warning: removing {what} dir {}: {e}",
            p.display()
        );
    }
}

/// The last `lines` lines of a (log) file, or a note that it could not be read.
pub fn log_tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(data) => {
            let text = String::from_utf8_lossy(&data);
            let all: Vec<&str> = text.lines().collect();
            let start = all.len().saturating_sub(lines);
            all[start..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// Finds a program: absolute/relative paths are checked as is, bare names are looked up in `PATH`
/// (plus the sbin directories, which non-root `PATH`s often lack).
pub fn find_in_path(program: &str) -> Option<PathBuf> {
    let is_exec = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| {
                use std::os::unix::fs::PermissionsExt;
                m.is_file() && m.permissions().mode() & 0o111 != 0
            })
            .unwrap_or(false)
    };
    if program.contains('/') {
        let p = PathBuf::from(program);
        return is_exec(&p).then_some(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(program))
        .find(|p| is_exec(p))
}

/// Like [`find_in_path`] but an error naming the package to install.
pub(crate) fn require_tool(program: &str, package: &str) -> Result<PathBuf> {
    find_in_path(program).with_context(|| {
        format!("`{program}` not found (Debian package {package}; run scripts/setup.sh)")
    })
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Runs `cmd` (stdin null, stdout/stderr captured), killing it after `timeout`.
pub(crate) fn output_with_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {desc}"))?;
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let out_t = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_t = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = err_t.join().unwrap_or_default();
            bail!(
                "{desc} timed out after {timeout:?}; stderr: {}",
                String::from_utf8_lossy(&stderr).trim()
            );
        }
        thread::sleep(Duration::from_millis(10));
    };
    Ok(Output {
        status,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
    })
}

/// Runs `cmd` with a timeout and returns stdout; an error with stderr on non-zero exit.
pub(crate) fn run_checked(cmd: &mut Command, timeout: Duration) -> Result<String> {
    let desc = format!("{cmd:?}");
    let out = output_with_timeout(cmd, timeout)?;
    if !out.status.success() {
        bail!(
            "{desc} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            if out.stdout.is_empty() {
                String::new()
            } else {
                format!("\nstdout: {}", String::from_utf8_lossy(&out.stdout).trim())
            }
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("{desc}: stdout is not UTF-8"))
}

/// Sends `sig` to `pid` (errors ignored).
pub(crate) fn signal(pid: u32, sig: i32) {
    if let Ok(pid) = i32::try_from(pid)
        && pid > 0
    {
        // SAFETY: kill(2) with a positive pid of a process we started; no memory involved.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// Stops a child: SIGTERM, wait up to `grace`, then SIGKILL; always reaps it.
pub(crate) fn terminate(child: &mut Child, grace: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    signal(child.id(), libc::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// True if a process with this pid exists (and is not a zombie).
pub(crate) fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            // state is the first field after the parenthesised command name
            let state = s
                .rsplit_once(')')
                .map(|(_, r)| r.trim_start())
                .unwrap_or("");
            !state.starts_with('Z') && !state.starts_with('X')
        }
        Err(_) => false,
    }
}

/// Pids of processes whose command line contains `needle` as one argument.
pub(crate) fn pids_with_arg(needle: &str) -> Vec<u32> {
    let me = std::process::id();
    let mut pids = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        if let Ok(cmdline) = std::fs::read(e.path().join("cmdline"))
            && cmdline.split(|b| *b == 0).any(|a| a == needle.as_bytes())
        {
            pids.push(pid);
        }
    }
    pids
}

/// Pids of live (non-zombie) processes in a cgroup whose path contains `/<component>/` (any
/// hierarchy).
pub(crate) fn pids_in_cgroup(component: &str) -> Vec<u32> {
    let needle = format!("/{component}/");
    let me = std::process::id();
    let mut pids = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me || !pid_alive(pid) {
            continue;
        }
        if let Ok(cg) = std::fs::read_to_string(e.path().join("cgroup"))
            && cg
                .lines()
                .filter_map(|l| l.splitn(3, ':').nth(2))
                .any(|path| format!("{path}/").contains(&needle))
        {
            pids.push(pid);
        }
    }
    pids
}

/// Removes the (empty) cgroup directories `<hierarchy>/<name>` and their sub-cgroups in every
/// mounted hierarchy below /sys/fs/cgroup (v1 controllers and the v2 unified tree).
pub(crate) fn remove_cgroups(name: &str) {
    fn rmdir_tree(d: &Path) {
        if let Ok(rd) = std::fs::read_dir(d) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    rmdir_tree(&e.path());
                }
            }
        }
        // cgroupfs: rmdir of an empty cgroup succeeds although it lists control files.
        let _ = std::fs::remove_dir(d);
    }
    for d in cgroup_dirs(name) {
        rmdir_tree(&d);
    }
}

/// The existing cgroup directories `<hierarchy>/<name>` below /sys/fs/cgroup.
pub(crate) fn cgroup_dirs(name: &str) -> Vec<PathBuf> {
    let base = Path::new("/sys/fs/cgroup");
    let mut hierarchies = vec![base.to_path_buf()];
    if let Ok(rd) = std::fs::read_dir(base) {
        hierarchies.extend(
            rd.flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path()),
        );
    }
    hierarchies
        .into_iter()
        .map(|h| h.join(name))
        .filter(|d| d.is_dir())
        .collect()
}

/// Mount points at or below `dir`, deepest first (from /proc/self/mountinfo).
/// Mount points at or below `dir` (from /proc/self/mountinfo), deepest first.
pub fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(unescape_mountinfo(m)))
        .filter(|p| p.starts_with(dir))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v.dedup();
    v
}

/// Whether `p` is a mount point.
pub fn is_mounted(p: &Path) -> bool {
    mounts_below(p).iter().any(|m| m == p)
}

/// Pids of the fd holders arbord started for `root` (`arbord --fd-holder ROOT/fdholder.sock`,
/// which writes `ROOT/fdholder.pid`). Not found by command line: reading another process's
/// command line blocks while that process waits on a stuck FUSE mount.
pub fn fd_holders(root: &Path) -> Vec<u32> {
    let Some(pid) = std::fs::read_to_string(root.join("fdholder.pid"))
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
    else {
        return Vec::new();
    };
    // Still that holder (an arbord binary), not a recycled pid.
    let name = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .map(|l| l.trim_start_matches("Name:").trim().to_string())
        });
    match name {
        Some(n) if n.starts_with("arbord") => vec![pid],
        _ => Vec::new(),
    }
}

/// Kills the fd holders of `root` (their connections end) and waits (2 s) until they are gone.
pub fn kill_fd_holders(root: &Path) {
    let pids = fd_holders(root);
    for &p in &pids {
        signal(p, libc::SIGKILL);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while pids
        .iter()
        .any(|p| Path::new(&format!("/proc/{p}")).exists())
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Lazily unmounts everything at or below `dir`, deepest first (repeats for stacked mounts).
pub(crate) fn unmount_below(dir: &Path) {
    for _ in 0..8 {
        let mounts = mounts_below(dir);
        if mounts.is_empty() {
            return;
        }
        for m in mounts {
            if let Ok(c) = CString::new(m.as_os_str().as_bytes()) {
                // SAFETY: c is a valid NUL-terminated path.
                let rc = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
                if rc != 0 {
                    eprintln!(
                        "arbor-testkit: warning: umount {}: {}",
                        m.display(),
                        std::io::Error::last_os_error()
                    );
                }
            }
        }
    }
}

fn unescape_mountinfo(s: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo octal.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A minimal HTTP/1.0 GET against `addr` ("host:port"), optionally with basic auth.
/// Returns (status code, body). Meant for health checks and small API calls in tests.
pub fn http_get(addr: &str, path: &str, basic_auth: Option<(&str, &str)>) -> Result<(u16, String)> {
    let mut headers = vec![("Accept".to_string(), "*/*".to_string())];
    if let Some((u, p)) = basic_auth {
        headers.push((
            "Authorization".into(),
            format!("Basic {}", base64(format!("{u}:{p}").as_bytes())),
        ));
    }
    let (status, body) = http_request(addr, "GET", path, &headers, &[])?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// A minimal HTTP/1.0 request: `method path` with `headers` and `body` (Content-Length is
/// added). Returns (status code, body bytes).
pub fn http_request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut req = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method != "GET" {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    s.write_all(body)?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)
        .with_context(|| format!("reading response from {addr}"))?;
    let head_end = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(resp.len(), |p| p + 4);
    let head = String::from_utf8_lossy(&resp[..head_end]);
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .with_context(|| format!("malformed HTTP response from {addr}: {:.200}", head))?;
    Ok((status, resp[head_end..].to_vec()))
}

/// Standard base64 with padding.
pub(crate) fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        out.push(T[(n >> 18) as usize & 63] as char);
        out.push(T[(n >> 12) as usize & 63] as char);
        out.push(if c.len() > 1 {
            T[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if c.len() > 2 {
            T[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

/// Polls `f` every 100 ms until it returns Ok(true) or `timeout` passes.
pub(crate) fn wait_until(timeout: Duration, mut f: impl FnMut() -> Result<bool>) -> Result<bool> {
    let deadline = Instant::now() + timeout;
    loop {
        if f()? {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Removes the variables starting with `prefix` from `cmd`'s environment: a service that reads
/// settings from them (`REGISTRY_*`, `ETCD_*`) must not see the caller's.
pub(crate) fn scrub_env(cmd: &mut Command, prefix: &str) {
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with(prefix) {
            cmd.env_remove(k);
        }
    }
}

/// Waits (up to `timeout`) until `GET http://{addr}{path}` answers as `ready(status, body)`
/// accepts, failing at once if `child` exits.
pub(crate) fn wait_http_ready(
    child: &mut Child,
    what: &str,
    addr: &str,
    path: &str,
    timeout: Duration,
    ready: impl Fn(u16, &str) -> bool,
) -> Result<()> {
    let mut last = String::from("no answer");
    let ok = wait_until(timeout, || {
        if let Some(st) = child.try_wait()? {
            bail!("{what} exited early ({st})");
        }
        match http_get(addr, path, None) {
            Ok((code, body)) if ready(code, &body) => Ok(true),
            Ok((code, body)) => {
                last = format!("HTTP {code}: {body:.200}");
                Ok(false)
            }
            Err(e) => {
                last = format!("{e:#}");
                Ok(false)
            }
        }
    })?;
    if !ok {
        bail!("GET http://{addr}{path} not ready after {timeout:?} (last: {last})");
    }
    Ok(())
}

/// Starts a local service on free ports and waits until it answers: `command(attempt)` builds
/// the command (choosing its ports) and names the address to probe; its output goes to `log`.
/// A free port may be taken by someone else before the service binds it, so an attempt whose
/// log says "address already in use" is retried (5 attempts).
pub(crate) fn start_on_free_port(
    what: &str,
    log: &Path,
    timeout: Duration,
    path: &str,
    ready: impl Fn(u16, &str) -> bool,
    mut command: impl FnMut(usize) -> Result<(Command, String)>,
) -> Result<(Child, String)> {
    let mut last_err = None;
    for attempt in 0..5 {
        let (mut cmd, addr) = command(attempt)?;
        let logf = std::fs::File::create(log)?;
        cmd.stdin(std::process::Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf);
        let mut child = cmd.spawn().with_context(|| format!("spawning {what}"))?;
        match wait_http_ready(&mut child, what, &addr, path, timeout, &ready) {
            Ok(()) => return Ok((child, addr)),
            Err(e) => {
                terminate(&mut child, Duration::from_secs(2));
                let tail = log_tail(log, 30);
                if tail.contains("address already in use") {
                    last_err = Some(e);
                    continue;
                }
                bail!(
                    "{what} did not come up on {addr}: {e:#}; log tail ({}):\n{tail}",
                    log.display()
                );
            }
        }
    }
    Err(last_err
        .unwrap_or_else(|| anyhow::anyhow!("no attempt made"))
        .context(format!("{what}: could not bind free ports in 5 attempts")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o);
        }
    }

    #[test]
    fn mountinfo_unescape() {
        assert_eq!(unescape_mountinfo(r"/a\040b\134c"), "/a b\\c");
        assert_eq!(unescape_mountinfo(r"/plain"), "/plain");
        assert_eq!(unescape_mountinfo(r"/end\04"), r"/end\04");
    }
}
