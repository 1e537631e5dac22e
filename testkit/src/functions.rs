//! A node serving functions: an `arbord` with its function gateway (`[functions]`) and a
//! private containerd, its instances on the `arbor` snapshotter and runtime
//! ([`FnSnapshotter::Arbor`]) or, as a stock node would run them, on overlayfs and runc
//! ([`FnSnapshotter::Overlayfs`], the same gateway). Shared by the end-to-end tests, the
//! demo and `bench-invoke`; plus a small HTTP/1.1 client for the API.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{Arbord, ArbordOptions, Containerd, ContainerdOptions};

/// Where a node's instances get their root filesystems.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FnSnapshotter {
    /// arbord's lazy snapshotter and `containerd-shim-arbor-v1`.
    Arbor,
    /// containerd's overlayfs snapshotter (images pulled whole) and runc's shim.
    Overlayfs,
}

impl FnSnapshotter {
    pub fn name(self) -> &'static str {
        match self {
            FnSnapshotter::Arbor => "arbor",
            FnSnapshotter::Overlayfs => "overlayfs",
        }
    }
}

/// How to start a [`FnNode`].
#[derive(Debug, Clone)]
pub struct FnNodeOptions {
    /// The `arbord` binary.
    pub arbord: PathBuf,
    pub snapshotter: FnSnapshotter,
    /// Registries spoken to over plain HTTP (`[registry] plain_http`).
    pub plain_http: Vec<String>,
    /// The instances' bridge and subnet (distinct per node running at once).
    pub bridge: String,
    pub subnet: String,
    /// containerd namespace of the instances.
    pub namespace: String,
    /// More lines for arbord's `[functions]` table.
    pub functions_extra: String,
    /// More TOML for arbord's config (other tables).
    pub config_extra: String,
}

impl FnNodeOptions {
    pub fn new(arbord: impl Into<PathBuf>, snapshotter: FnSnapshotter) -> FnNodeOptions {
        FnNodeOptions {
            arbord: arbord.into(),
            snapshotter,
            plain_http: vec!["127.0.0.1".into()],
            bridge: "arbfn0".into(),
            subnet: "10.201.0.0/24".into(),
            namespace: "fn-test".into(),
            functions_extra: String::new(),
            config_extra: String::new(),
        }
    }
}

/// A running node; dropping it stops arbord (which stops the instances), containerd, and
/// removes the bridge.
pub struct FnNode {
    // Dropped in this order (arbord first: it stops the instances through containerd).
    pub arbord: Arbord,
    pub ctd: Containerd,
    /// The function API, `127.0.0.1:PORT`.
    pub api: String,
    pub opts: FnNodeOptions,
    _dir: tempfile::TempDir,
}

impl FnNode {
    pub fn start(o: &FnNodeOptions) -> Result<FnNode> {
        let dir = crate::util::temp_dir("arbor-fn-")?;
        let sock = dir.path().join("containerd.sock");
        let api = format!("127.0.0.1:{}", crate::free_port()?);
        let (runtime, snapshotter) = match o.snapshotter {
            FnSnapshotter::Arbor => ("io.containerd.arbor.v1", "arbor"),
            FnSnapshotter::Overlayfs => ("io.containerd.runc.v2", "overlayfs"),
        };
        let plain: Vec<String> = o.plain_http.iter().map(|h| format!("{h:?}")).collect();
        let config = format!(
            "{}\n[registry]\nplain_http = [{}]\n[functions]\nenabled = true\nlisten = \"{api}\"\n\
             containerd = \"{}\"\nnamespace = \"{}\"\nsnapshotter = \"{snapshotter}\"\n\
             runtime = \"{runtime}\"\nbridge = \"{}\"\nsubnet = \"{}\"\nstop_grace_secs = 1\n{}\n",
            o.config_extra,
            plain.join(", "),
            sock.display(),
            o.namespace,
            o.bridge,
            o.subnet,
            o.functions_extra
        );
        let arbord = Arbord::start(&ArbordOptions {
            bin: o.arbord.clone(),
            config: Some(config),
            ..Default::default()
        })?;
        let extra = match o.snapshotter {
            FnSnapshotter::Arbor => arbord.containerd_config(),
            FnSnapshotter::Overlayfs => String::new(),
        };
        let ctd = Containerd::start_with(&ContainerdOptions {
            extra_config: extra,
            cri: false,
        })?;
        // arbord reaches containerd through this link (it started first: containerd's config
        // names arbord's socket).
        std::os::unix::fs::symlink(ctd.socket(), &sock)?;
        Ok(FnNode {
            arbord,
            ctd,
            api,
            opts: o.clone(),
            _dir: dir,
        })
    }

    /// An exchange with the API.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: &[u8],
        timeout: Duration,
    ) -> Result<HttpResponse> {
        http_exchange(&self.api, method, path, &[], body, timeout)
    }

    /// `PUT /v1/functions/NAME`; an error unless 200 or 201.
    pub fn deploy(&self, name: &str, spec: &Value) -> Result<Value> {
        let r = self.call(
            "PUT",
            &format!("/v1/functions/{name}"),
            spec.to_string().as_bytes(),
            Duration::from_secs(30),
        )?;
        if r.status != 200 && r.status != 201 {
            bail!("deploying {name}: {} {}", r.status, r.text());
        }
        Ok(r.json())
    }

    /// `POST /v1/functions/NAME/invoke` with `body`.
    pub fn invoke(&self, name: &str, body: &[u8]) -> Result<HttpResponse> {
        self.call(
            "POST",
            &format!("/v1/functions/{name}/invoke"),
            body,
            Duration::from_secs(300),
        )
    }

    /// `GET /v1/functions/NAME`.
    pub fn function(&self, name: &str) -> Result<Value> {
        Ok(self
            .call(
                "GET",
                &format!("/v1/functions/{name}"),
                b"",
                Duration::from_secs(30),
            )?
            .json())
    }

    /// The instance containers in containerd.
    pub fn containers(&self) -> Vec<String> {
        self.ctd
            .ctr_in(&self.opts.namespace, &["containers", "ls", "-q"])
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .filter(|l| !l.is_empty())
            .collect()
    }

    /// arbord's root.
    pub fn root(&self) -> &Path {
        self.arbord.root()
    }
}

impl Drop for FnNode {
    fn drop(&mut self) {
        // Remove every function, so the gateway stops its instances (arbord would leave
        // them running for a successor), then stop arbord.
        if self.arbord.is_running()
            && let Ok(r) = self.call("GET", "/v1/functions", b"", Duration::from_secs(10))
        {
            for f in r.json().as_array().into_iter().flatten() {
                if let Some(name) = f["name"].as_str() {
                    let _ = self.call(
                        "DELETE",
                        &format!("/v1/functions/{name}?wait_secs=20"),
                        b"",
                        Duration::from_secs(30),
                    );
                }
            }
        }
        let _ = self.arbord.stop();
        // Whatever instance is left (a failed run): its processes, then its cgroups.
        let ns = &self.opts.namespace;
        let left = crate::util::pids_in_cgroup(ns);
        for &pid in &left {
            crate::util::signal(pid, libc::SIGKILL);
        }
        let _ = crate::util::wait_until(Duration::from_secs(5), || {
            Ok(left.iter().all(|&p| !crate::util::pid_alive(p)))
        });
        let _ = crate::util::wait_until(Duration::from_secs(5), || {
            crate::util::remove_cgroups(ns);
            Ok(crate::util::cgroup_dirs(ns).is_empty())
        });
        // The bridge the CNI plugin made (plugins never delete one).
        let _ = Command::new("ip")
            .args(["link", "del", &self.opts.bridge])
            .output();
    }
}

/// An HTTP answer.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    /// Lower-case names.
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
    pub fn header(&self, k: &str) -> &str {
        self.headers.get(k).map_or("", String::as_str)
    }
}

/// One HTTP/1.1 exchange on a new connection (`Connection: close`), waiting up to `timeout`
/// for the answer.
pub fn http_exchange(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> Result<HttpResponse> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_nodelay(true)?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    // A server may answer (413) before taking the whole body.
    let _ = s.write_all(body);
    // Read until the body is complete by its Content-Length (as a client does; a server may
    // close the connection later), else to the end.
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 << 10];
    loop {
        let n = s
            .read(&mut buf)
            .with_context(|| format!("{method} {path}: reading the answer"))?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n")
            && let Ok(r) = parse_response(&raw)
            && let Some(len) = r
                .headers
                .get("content-length")
                .and_then(|l| l.parse::<usize>().ok())
            && raw.len() >= end + 4 + len
        {
            raw.truncate(end + 4 + len);
            break;
        }
    }
    parse_response(&raw).with_context(|| format!("{method} {path}"))
}

/// Parses a whole HTTP/1.x response (head and body to the end).
pub fn parse_response(raw: &[u8]) -> Result<HttpResponse> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .with_context(|| format!("no HTTP head in {:?}", String::from_utf8_lossy(raw)))?;
    let head = String::from_utf8_lossy(&raw[..end]).to_string();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(HttpResponse {
        status,
        headers,
        body: raw[end + 4..].to_vec(),
    })
}
