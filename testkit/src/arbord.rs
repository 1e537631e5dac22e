//! A private `arbord` (Arbor's node daemon) for one test: own root, socket and metrics port,
//! logs in a file, stopped with SIGTERM on drop (then its fd holder is killed and what it left
//! mounted is detached).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::util;

const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How to start [`Arbord`].
#[derive(Debug, Clone, Default)]
pub struct ArbordOptions {
    /// The `arbord` binary.
    pub bin: PathBuf,
    /// Root directory; a fresh temporary one when `None`.
    pub root: Option<PathBuf>,
    /// Extra command-line arguments (e.g. `--plain-http-host 10.0.0.1`).
    pub extra_args: Vec<String>,
    /// Config file contents (TOML) written next to the socket and passed with `--config`.
    pub config: Option<String>,
    /// Run inside this network namespace (`nsenter --net=/run/netns/NAME`), with the metrics endpoint on
    /// this address of it (the host reaches it, e.g. a [`crate::cluster`] node's address).
    /// The socket and mounts stay on the host's filesystem.
    pub netns: Option<(String, std::net::Ipv4Addr)>,
}

/// A running `arbord`.
pub struct Arbord {
    child: Option<Child>,
    dir: Option<tempfile::TempDir>,
    base: PathBuf,
    root: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    metrics_addr: String,
    opts: ArbordOptions,
}

impl Arbord {
    /// Starts arbord and waits (30 s) until its socket accepts connections.
    pub fn start(opts: &ArbordOptions) -> Result<Arbord> {
        let dir = util::temp_dir("arbor-d-")?;
        let base = dir.path().canonicalize()?;
        let root = opts.root.clone().unwrap_or_else(|| base.join("root"));
        let mut a = Arbord {
            child: None,
            dir: Some(dir),
            socket: base.join("snapshotter.sock"),
            log: base.join("arbord.log"),
            metrics_addr: String::new(),
            root,
            base,
            opts: opts.clone(),
        };
        a.spawn()?;
        Ok(a)
    }

    fn spawn(&mut self) -> Result<()> {
        let ip = self
            .opts
            .netns
            .as_ref()
            .map_or(std::net::Ipv4Addr::LOCALHOST, |(_, ip)| *ip);
        self.metrics_addr = format!("{ip}:{}", util::free_port()?);
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut cmd = match &self.opts.netns {
            // Only the network namespace (`ip netns exec` would also unshare the mount
            // namespace, hiding arbord's FUSE mounts from the host and from containerd);
            // nsenter execs the program: the child is arbord itself.
            Some((ns, _)) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{ns}"))
                    .arg("--")
                    .arg(&self.opts.bin);
                c
            }
            None => Command::new(&self.opts.bin),
        };
        cmd.arg("--root")
            .arg(&self.root)
            .arg("--address")
            .arg(&self.socket)
            .arg("--metrics-addr")
            .arg(&self.metrics_addr)
            .arg("--log-level")
            .arg("debug,h2=info,tower=info,hyper=info");
        if let Some(c) = &self.opts.config {
            let p = self.base.join("config.toml");
            std::fs::write(&p, c)?;
            cmd.arg("--config").arg(p);
        }
        cmd.args(&self.opts.extra_args)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf);
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", self.opts.bin.display()))?;
        self.child = Some(child);
        let sock = self.socket.clone();
        let ok = util::wait_until(READY_TIMEOUT, || {
            if let Some(c) = self.child.as_mut()
                && let Some(st) = c.try_wait()?
            {
                bail!("arbord exited early ({st})");
            }
            Ok(std::os::unix::net::UnixStream::connect(&sock).is_ok())
        });
        match ok {
            Ok(true) => Ok(()),
            Ok(false) => bail!(
                "arbord did not come up in {READY_TIMEOUT:?}; log:\n{}",
                self.log_tail(40)
            ),
            Err(e) => bail!("{e:#}; log:\n{}", self.log_tail(40)),
        }
    }

    /// Stops arbord with SIGTERM (waiting up to 20 s) and returns its exit status.
    pub fn stop(&mut self) -> Result<std::process::ExitStatus> {
        let Some(mut c) = self.child.take() else {
            bail!("arbord is not running");
        };
        util::signal(c.id(), libc::SIGTERM);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = c.try_wait()? {
                return Ok(st);
            }
            if std::time::Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                bail!("arbord did not stop within 20 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills arbord with SIGKILL (a crash: nothing is unmounted or flushed).
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }

    /// Kills arbord and its fd holder (a node lost for good: nothing left to hand its layers
    /// to). Readers of its layers get ENOTCONN instead of waiting for a successor.
    pub fn kill_node(&mut self) -> Result<()> {
        self.kill()?;
        util::kill_fd_holders(&self.root);
        Ok(())
    }

    /// Starts arbord again on the same root and socket (after [`Arbord::stop`] or
    /// [`Arbord::kill`]).
    pub fn restart(&mut self) -> Result<()> {
        if self.child.is_some() {
            self.stop()?;
        }
        self.spawn()
    }

    /// [`Arbord::restart`] with another binary (an upgrade); later restarts use it too.
    pub fn restart_with(&mut self, bin: &Path) -> Result<()> {
        if self.child.is_some() {
            self.stop()?;
        }
        self.opts.bin = bin.to_path_buf();
        self.spawn()
    }

    /// The pids of the fd holder(s) this arbord started (`fuse.handover`).
    pub fn fd_holders(&self) -> Vec<u32> {
        util::fd_holders(&self.root)
    }

    /// The running arbord's pid.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// True while the arbord process started last is running (it has not exited or crashed).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The peak resident memory of the running arbord (`VmHWM`), in bytes.
    pub fn peak_rss(&self) -> Result<u64> {
        let pid = self.child.as_ref().context("arbord is not running")?.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("no VmHWM in /proc/PID/status")?;
        Ok(kb * 1024)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `127.0.0.1:<port>` (or the namespace's address) of the metrics endpoint.
    pub fn metrics_addr(&self) -> &str {
        &self.metrics_addr
    }

    /// The metrics text.
    pub fn metrics(&self) -> Result<String> {
        let (code, body) = util::http_get(&self.metrics_addr, "/metrics", None)?;
        if code != 200 {
            bail!("GET /metrics answered {code}");
        }
        Ok(body)
    }

    /// The value of one metric sample (`name{labels}` exactly as rendered), 0 if absent.
    pub fn metric(&self, sample: &str) -> Result<f64> {
        let text = self.metrics()?;
        Ok(text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                (k == sample).then(|| v.parse().ok()).flatten()
            })
            .unwrap_or(0.0))
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    pub fn log_tail(&self, lines: usize) -> String {
        util::log_tail(&self.log, lines)
    }

    /// The `[proxy_plugins.arbor]` table for [`crate::Containerd::start_with_config`].
    pub fn containerd_config(&self) -> String {
        format!(
            "[proxy_plugins.arbor]\n  type = \"snapshot\"\n  address = \"{}\"\n  [proxy_plugins.arbor.exports]\n    root = \"{}\"\n",
            self.socket.display(),
            self.root.display()
        )
    }
}

impl Drop for Arbord {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop();
        }
        // With `fuse.handover` the layers stay mounted for a successor, their connections
        // kept by the fd holder: none comes, so the holder goes and the mounts with it.
        util::kill_fd_holders(&self.root);
        util::unmount_below(&self.base);
        if let Some(root) = &self.opts.root {
            util::unmount_below(root);
        }
        if let Some(d) = self.dir.take() {
            util::dispose_dir(d, "arbord");
        }
    }
}
