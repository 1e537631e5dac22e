//! `/etc/arbor/config.toml`: every key, its meaning and its default (see
//! `packaging/config.toml`, which [`DEFAULT_CONFIG_TOML`] is, and the test that keeps the two
//! equal to [`Config::default`]).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Deserializer};

/// Where the daemon looks for its config when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/arbor/config.toml";

/// The documented default config file.
pub const DEFAULT_CONFIG_TOML: &str = include_str!("../../packaging/config.toml");

/// A byte size: an integer or a string with a unit ("256MiB").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Size, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(Size(n)),
            Raw::S(s) => arbor_fetch::parse_size(&s)
                .map(Size)
                .map_err(serde::de::Error::custom),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Everything the daemon stores: snapshots, metadata, chunk cache, kept TOCs.
    pub root: PathBuf,
    /// The snapshots gRPC socket containerd connects to (created with mode 0600).
    pub address: PathBuf,
    /// Log filter (tracing `EnvFilter` syntax; `RUST_LOG` overrides it).
    pub log_level: String,
    pub metrics: Metrics,
    pub cache: Cache,
    pub fetch: Fetch,
    pub prefetch: Prefetch,
    pub fuse: Fuse,
    pub registry: Registry,
    pub learn: Learn,
    pub p2p: P2p,
    pub functions: Functions,
}

/// The function gateway (`arbor fn ...`): an HTTP/JSON API to deploy and invoke functions,
/// whose instances run through containerd with this snapshotter and the `arbor` runtime.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Functions {
    /// Serve the gateway.
    pub enabled: bool,
    /// Address of the API (loopback by default: put a real front door before exposing it).
    pub listen: String,
    /// A file holding the bearer token every request (but `/healthz`) must carry; empty:
    /// no token.
    pub token_file: String,
    /// containerd's socket.
    pub containerd: PathBuf,
    /// containerd namespace of the instances.
    pub namespace: String,
    /// Snapshotter the instances' images are unpacked with (`arbor`: lazily, by this arbord).
    pub snapshotter: String,
    /// Runtime of the instances (`io.containerd.arbor.v1` reports starts, so start-up sets
    /// are learned; `io.containerd.runc.v2` also works).
    pub runtime: String,
    /// Directories holding the CNI plugins (`bridge`, `host-local`, `loopback`).
    pub cni_bin_dirs: Vec<PathBuf>,
    /// The host bridge instances attach to.
    pub bridge: String,
    /// IPv4 subnet of the instances.
    pub subnet: String,
    /// Masquerade the instances' outbound traffic (needs iptables).
    pub masquerade: bool,
    /// Largest invocation request body.
    pub max_body: Size,
    /// Largest response body taken from an instance.
    pub max_response: Size,
    /// SIGTERM to SIGKILL when an instance is stopped.
    pub stop_grace_secs: u64,
    /// cgroup parent of the instances; empty: containerd's `/NAMESPACE/ID`.
    pub cgroup_parent: String,
}

impl Default for Functions {
    fn default() -> Self {
        Functions {
            enabled: false,
            listen: "127.0.0.1:8480".into(),
            token_file: String::new(),
            containerd: "/run/containerd/containerd.sock".into(),
            namespace: "arbor-fn".into(),
            snapshotter: "arbor".into(),
            runtime: "io.containerd.arbor.v1".into(),
            cni_bin_dirs: vec!["/usr/lib/cni".into(), "/opt/cni/bin".into()],
            bridge: "arbor0".into(),
            subnet: "10.89.0.0/16".into(),
            masquerade: false,
            max_body: Size(6 << 20),
            max_response: Size(64 << 20),
            stop_grace_secs: 5,
            cgroup_parent: String::new(),
        }
    }
}

/// One `host:port` or a list of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Addrs(pub Vec<String>);

impl<'de> Deserialize<'de> for Addrs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Addrs, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            One(String),
            Many(Vec<String>),
        }
        Ok(match Raw::deserialize(d)? {
            Raw::One(s) => Addrs(vec![s]),
            Raw::Many(v) => Addrs(v),
        })
    }
}

impl std::fmt::Display for Addrs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join(","))
    }
}

/// Function trees (docs/architecture.md, "Function trees").
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct P2p {
    /// Take part in function trees.
    pub enabled: bool,
    /// This node's id in the trees; empty: the host name.
    pub node_id: String,
    /// Where this node's Peer service listens (TCP `host:port`).
    pub listen: String,
    /// `host:port` the other nodes reach the Peer service at; empty: `listen` (which then
    /// must not be a wildcard address).
    pub advertise: String,
    /// `host:port` of the tree manager; several (a list) when standby managers share their
    /// state in etcd: members follow whichever leads.
    pub manager: Addrs,
    /// Run a tree manager in this arbord (`--tree-manager`), listening on `manager_listen`.
    pub run_manager: bool,
    /// Where this arbord's tree manager listens (one of `manager`); empty: the first of them.
    pub manager_listen: String,
    /// etcd client endpoints (`host:port`): the managers keep the trees there and elect one
    /// leader, the others stand by and take over. Empty: one manager, state in memory.
    pub etcd: Vec<String>,
    /// Key prefix in etcd (managers of one cluster share it).
    pub etcd_prefix: String,
    pub heartbeat_secs: u64,
    /// The manager fails a node out of its trees after this long without a heartbeat.
    pub heartbeat_timeout_secs: u64,
    /// A parent that sends nothing (not even a keep-alive) for this long is given up.
    pub peer_stall_ms: u64,
    /// Bound on one read from a peer.
    pub peer_timeout_secs: u64,
    /// Bytes per second this node sends its children, all trees together (0: no limit).
    pub upload_limit: Size,
    /// Stay in a function's tree (serving children) this long after its last layer is unmounted.
    pub idle_leave_secs: u64,
    /// A new layer's first reads wait this long at most for the node's place in the tree.
    pub join_wait_ms: u64,
    /// A child asking for a layer this node is still preparing waits this long at most.
    pub layer_wait_ms: u64,
}
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Learn {
    /// Record what freshly mounted layers are first asked for, and learn each image's
    /// start-up set from the starts reported ready (by the runtime shim or `arbor run
    /// --wait-ready`).
    pub enabled: bool,
    /// Reads this long after a start was ready still count (its first invocation).
    pub grace_secs: u64,
    /// A mount stops recording this long after it was mounted.
    pub max_age_secs: u64,
    /// A mount records at most this many chunks.
    pub max_chunks: usize,
}

impl Default for Learn {
    fn default() -> Self {
        Learn {
            enabled: true,
            grace_secs: 2,
            max_age_secs: 600,
            max_chunks: 1 << 16,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Metrics {
    /// Prometheus endpoint (`GET /metrics`); empty disables it.
    pub address: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Cache {
    /// Verified chunks kept in memory (also the write-back buffer).
    pub memory_size: Size,
    /// Byte budget of the on-disk chunk cache under `<root>/cache`.
    pub disk_size: Size,
    /// Seconds between write-backs of fetched chunks to disk.
    pub writeback_interval_secs: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Fetch {
    /// Windows of the blob fetched per request are aligned to this size.
    pub unit: Size,
    /// Longest one registry request may take before the read fails.
    pub timeout_secs: u64,
    /// Requests in flight per registry host.
    pub registry_concurrency: usize,
    /// Retries of a failed registry request.
    pub retries: u32,
    /// Windows after a missed one fetched along with it.
    pub read_ahead: usize,
    /// Bytes fetched along with the first miss in a directory (the rest of the file, then the
    /// directory's other files); 0 disables it.
    pub group_read_ahead: Size,
    /// Windows of group read-ahead in flight at once over all layers: each one in flight
    /// delays the next demand miss by its transfer time on the link.
    pub group_concurrency: usize,
    /// Windows fetched ahead, at most, of a reader moving forward through a layer (three
    /// misses in a row, each right after fetched windows): 4 at first, doubling; 0 disables it.
    pub sequential_read_ahead: usize,
    /// Bytes of a blob one read-ahead or prefetch request covers at most: consecutive windows
    /// go in one range request up to this size (a registry spends CPU per request).
    pub max_request: Size,
    /// Longest a lazy Prepare may spend reading a TOC before it falls back.
    pub toc_timeout_secs: u64,
    /// Read every lazily mounted layer through in the background to prove its digest, diff ID
    /// and TOC; a layer that lies is taken out of service.
    pub verify_layers: bool,
    /// Longest a Prepare waits for the proof of another image's unproved lazy layer that holds
    /// its chain ID before it fails with `Unavailable` (containerd's pull fails; retried later).
    pub proof_wait_secs: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Prefetch {
    /// Fetch a layer's prefetch section in the background once it is mounted.
    pub enabled: bool,
    /// Then fetch the rest of the layer too.
    pub rest: bool,
    /// Bytes per second for the rest (0: unlimited).
    pub rest_rate: Size,
    /// Fetch the rest while containers are reading (paced, one window at a time) instead of
    /// waiting until reads pause.
    pub rest_while_active: bool,
    /// Seconds after a layer is mounted before its rest is fetched.
    pub rest_delay_secs: u64,
    /// Fetch the rest at once, `concurrency` windows at a time, as urgently as reads.
    pub rest_eager: bool,
    /// Windows fetched at the same time per layer.
    pub concurrency: usize,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Fuse {
    /// FUSE worker threads of arbord, shared by every mounted layer.
    pub threads: usize,
    /// Keep every layer's FUSE connection in an fd holder process, so that mounted layers
    /// (and the containers reading them) survive a restart, an upgrade or a crash of arbord;
    /// on SIGTERM arbord then leaves its layers mounted for its successor.
    pub handover: bool,
    /// On SIGTERM with `handover`: how long arbord waits for the reads it has taken to be
    /// answered before it exits (later ones wait in the kernel for the successor).
    pub release_timeout_ms: u64,
    /// When a program reads a directory's files in order, the next files held in memory are
    /// written into the kernel's page cache ahead of it, up to this far past the file it
    /// asked for (0: never, the default; see `arbor_lazyfs::push`). Only with `handover`
    /// off.
    pub push_ahead: Size,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Registry {
    /// Hosts (`host` or `host:port`) spoken to over plain HTTP instead of HTTPS.
    pub plain_http: Vec<String>,
    /// Docker config file with credentials; empty: `$DOCKER_CONFIG/config.json`, else
    /// `~/.docker/config.json`.
    pub docker_config: String,
    /// Registries (`host`, `host:port`) or repository prefixes (`host/path`) lazy layers may
    /// be fetched from; empty: any.
    pub allow: Vec<String>,
    /// Trust containerd's CRI labels to name a lazy layer's source.
    pub trust_cri_labels: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            root: "/var/lib/arbor".into(),
            address: "/run/arbor/snapshotter.sock".into(),
            log_level: "info".into(),
            metrics: Metrics {
                address: "127.0.0.1:9310".into(),
            },
            cache: Cache::default(),
            fetch: Fetch::default(),
            prefetch: Prefetch::default(),
            fuse: Fuse::default(),
            registry: Registry::default(),
            learn: Learn::default(),
            p2p: P2p::default(),
            functions: Functions::default(),
        }
    }
}

impl Default for P2p {
    fn default() -> Self {
        P2p {
            enabled: false,
            node_id: String::new(),
            listen: "0.0.0.0:7071".into(),
            advertise: String::new(),
            manager: Addrs(vec!["127.0.0.1:7070".into()]),
            run_manager: false,
            manager_listen: String::new(),
            etcd: Vec::new(),
            etcd_prefix: "/arbor/p2p".into(),
            heartbeat_secs: 2,
            heartbeat_timeout_secs: 6,
            peer_stall_ms: 1000,
            peer_timeout_secs: 30,
            upload_limit: Size(0),
            idle_leave_secs: 300,
            join_wait_ms: 2000,
            layer_wait_ms: 5000,
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Config::default().metrics
    }
}

impl Default for Cache {
    fn default() -> Self {
        Cache {
            memory_size: Size(256 << 20),
            disk_size: Size(10 << 30),
            writeback_interval_secs: 5,
        }
    }
}

impl Default for Fetch {
    fn default() -> Self {
        Fetch {
            unit: Size(1 << 20),
            timeout_secs: 60,
            registry_concurrency: 8,
            retries: 4,
            read_ahead: 0,
            group_read_ahead: Size(arbor_fetch::fetcher::DEFAULT_GROUP_READ_AHEAD),
            group_concurrency: arbor_fetch::fetcher::DEFAULT_GROUP_CONCURRENCY,
            sequential_read_ahead: arbor_fetch::fetcher::DEFAULT_SEQUENTIAL_READ_AHEAD,
            max_request: Size(arbor_fetch::fetcher::DEFAULT_MAX_REQUEST),
            toc_timeout_secs: 30,
            verify_layers: true,
            proof_wait_secs: 300,
        }
    }
}

impl Default for Prefetch {
    fn default() -> Self {
        Prefetch {
            enabled: true,
            rest: true,
            rest_rate: Size(0),
            rest_while_active: false,
            rest_delay_secs: 3,
            rest_eager: false,
            concurrency: 4,
        }
    }
}

impl Default for Fuse {
    fn default() -> Self {
        Fuse {
            threads: 2,
            handover: true,
            release_timeout_ms: 5000,
            push_ahead: Size(0),
        }
    }
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            plain_http: vec!["localhost".into(), "127.0.0.1".into(), "::1".into()],
            docker_config: String::new(),
            allow: Vec::new(),
            trust_cri_labels: true,
        }
    }
}

impl Config {
    /// Reads `path`; a missing file at the default path means the defaults.
    pub fn load(path: Option<&Path>) -> Result<Config> {
        let (path, explicit) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                return Ok(Config::default());
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Config::parse(&text).with_context(|| format!("in {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Config> {
        let c: Config = toml::from_str(text)?;
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<()> {
        anyhow::ensure!(self.root.is_absolute(), "root must be an absolute path");
        anyhow::ensure!(
            self.address.is_absolute(),
            "address must be an absolute path"
        );
        anyhow::ensure!(
            self.fetch.unit.0 >= 4096 && self.fetch.unit.0 <= 64 << 20,
            "fetch.unit must be between 4KiB and 64MiB"
        );
        anyhow::ensure!(self.fuse.threads >= 1, "fuse.threads must be at least 1");
        anyhow::ensure!(
            self.fuse.push_ahead.0 == 0 || !self.fuse.handover,
            "fuse.push_ahead needs fuse.handover = false: a push waits, uninterruptibly, for \
             the pages being read that it fills, and an arbord killed during one could not exit \
             for its successor to answer those reads"
        );
        anyhow::ensure!(
            self.fetch.max_request.0 <= 64 << 20,
            "fetch.max_request must be at most 64MiB"
        );
        anyhow::ensure!(
            self.fetch.sequential_read_ahead <= 1024,
            "fetch.sequential_read_ahead must be at most 1024"
        );
        anyhow::ensure!(
            self.fetch.group_read_ahead.0 <= 256 << 20,
            "fetch.group_read_ahead must be at most 256MiB"
        );
        anyhow::ensure!(
            (1..=64).contains(&self.fetch.group_concurrency),
            "fetch.group_concurrency must be 1 to 64"
        );
        anyhow::ensure!(
            self.learn.grace_secs <= 3600,
            "learn.grace_secs must be at most 3600"
        );
        anyhow::ensure!(
            self.learn.max_chunks <= 1 << 22,
            "learn.max_chunks must be at most 4194304 (a set holds no more)"
        );
        anyhow::ensure!(
            self.fetch.toc_timeout_secs >= 1,
            "fetch.toc_timeout_secs must be at least 1"
        );
        anyhow::ensure!(
            self.fetch.proof_wait_secs >= 1,
            "fetch.proof_wait_secs must be at least 1"
        );
        if self.functions.enabled {
            let f = &self.functions;
            anyhow::ensure!(
                f.listen.parse::<std::net::SocketAddr>().is_ok(),
                "functions.listen must be an IP address and port, not {:?}",
                f.listen
            );
            anyhow::ensure!(
                f.containerd.is_absolute(),
                "functions.containerd must be an absolute path"
            );
            anyhow::ensure!(
                !f.namespace.is_empty() && !f.snapshotter.is_empty() && !f.runtime.is_empty(),
                "functions.namespace, snapshotter and runtime must not be empty"
            );
            anyhow::ensure!(
                f.max_body.0 >= 1024 && f.max_body.0 <= 1 << 30,
                "functions.max_body must be between 1KiB and 1GiB"
            );
            anyhow::ensure!(
                !f.bridge.is_empty() && f.bridge.len() <= 15,
                "functions.bridge must be a network interface name (1-15 characters)"
            );
            anyhow::ensure!(
                f.subnet.contains('/'),
                "functions.subnet must be CIDR, like 10.89.0.0/16"
            );
        }
        if self.p2p.enabled || self.p2p.run_manager {
            let p = &self.p2p;
            anyhow::ensure!(!p.manager.0.is_empty(), "p2p.manager names no manager");
            for m in &p.manager.0 {
                anyhow::ensure!(
                    m.parse::<std::net::SocketAddr>().is_ok(),
                    "p2p.manager entries must be IP addresses and ports, not {m:?}"
                );
            }
            if p.run_manager && !p.manager_listen.is_empty() {
                anyhow::ensure!(
                    p.manager.0.contains(&p.manager_listen),
                    "p2p.manager_listen {:?} must be one of p2p.manager (the members dial those)",
                    p.manager_listen
                );
            }
            anyhow::ensure!(
                p.etcd.is_empty() || !p.etcd_prefix.is_empty(),
                "p2p.etcd_prefix must not be empty"
            );
        }
        if self.p2p.enabled {
            let p = &self.p2p;
            anyhow::ensure!(
                p.listen.parse::<std::net::SocketAddr>().is_ok(),
                "p2p.listen must be an IP address and port, not {:?}",
                p.listen
            );
            let advertise = if p.advertise.is_empty() {
                &p.listen
            } else {
                &p.advertise
            };
            anyhow::ensure!(
                advertise
                    .parse::<std::net::SocketAddr>()
                    .is_ok_and(|a| !a.ip().is_unspecified()),
                "p2p.advertise must be the IP address and port other nodes reach this one at \
                 (set it when p2p.listen is a wildcard address), not {advertise:?}"
            );
            anyhow::ensure!(
                p.heartbeat_secs >= 1 && p.heartbeat_timeout_secs > p.heartbeat_secs,
                "p2p.heartbeat_timeout_secs must be longer than p2p.heartbeat_secs (at least 1)"
            );
            anyhow::ensure!(
                (50..=60_000).contains(&p.peer_stall_ms),
                "p2p.peer_stall_ms must be 50 to 60000"
            );
            anyhow::ensure!(
                p.peer_timeout_secs >= 1,
                "p2p.peer_timeout_secs must be at least 1"
            );
            anyhow::ensure!(
                p.join_wait_ms <= 60_000,
                "p2p.join_wait_ms must be at most 60000"
            );
            anyhow::ensure!(
                p.layer_wait_ms <= 60_000,
                "p2p.layer_wait_ms must be at most 60000"
            );
        }
        for a in &self.registry.allow {
            anyhow::ensure!(
                !a.is_empty() && !a.contains("://"),
                "registry.allow entries are \"host\", \"host:port\" or \"host/path\", not {a:?}"
            );
        }
        anyhow::ensure!(
            self.fetch.registry_concurrency >= 1,
            "fetch.registry_concurrency must be at least 1"
        );
        anyhow::ensure!(
            self.prefetch.concurrency >= 1,
            "prefetch.concurrency must be at least 1"
        );
        anyhow::ensure!(
            self.cache.writeback_interval_secs >= 1,
            "cache.writeback_interval_secs must be at least 1"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_config_is_the_default() {
        assert_eq!(
            Config::parse(DEFAULT_CONFIG_TOML).unwrap(),
            Config::default()
        );
        assert_eq!(Config::parse("").unwrap(), Config::default());
    }

    #[test]
    fn sizes_and_errors() {
        let c = Config::parse("[cache]\nmemory_size = \"64MiB\"\ndisk_size = 1048576\n").unwrap();
        assert_eq!(c.cache.memory_size, Size(64 << 20));
        assert_eq!(c.cache.disk_size, Size(1 << 20));
        let e = Config::parse("[cache]\nmemroy_size = 1\n").unwrap_err();
        assert!(format!("{e:#}").contains("memroy_size"), "{e:#}");
        assert!(Config::parse("root = \"relative\"\n").is_err());
        assert!(Config::parse("[fetch]\nunit = \"1q\"\n").is_err());
        // Page-cache pushes only where no successor must adopt the connections.
        let e = Config::parse("[fuse]\npush_ahead = \"4MiB\"\n").unwrap_err();
        assert!(format!("{e:#}").contains("handover = false"), "{e:#}");
        let c = Config::parse("[fuse]\npush_ahead = \"4MiB\"\nhandover = false\n").unwrap();
        assert_eq!(c.fuse.push_ahead, Size(4 << 20));
    }

    #[test]
    fn p2p_addresses() {
        let c = Config::parse(
            "[p2p]\nenabled = true\nlisten = \"10.0.0.5:7071\"\nmanager = \"10.0.0.1:7070\"\n",
        )
        .unwrap();
        assert_eq!(c.p2p.manager, Addrs(vec!["10.0.0.1:7070".into()]));
        let c = Config::parse(
            "[p2p]\nenabled = true\nlisten = \"10.0.0.5:7071\"\n\
             manager = [\"10.0.0.1:7070\", \"10.0.0.2:7070\"]\netcd = [\"10.0.0.9:2379\"]\n",
        )
        .unwrap();
        assert_eq!(c.p2p.manager.0.len(), 2);
        // A wildcard listen address needs an advertised one.
        let e = Config::parse("[p2p]\nenabled = true\n").unwrap_err();
        assert!(format!("{e:#}").contains("p2p.advertise"), "{e:#}");
        let e = Config::parse(
            "[p2p]\nrun_manager = true\nmanager = [\"10.0.0.1:7070\"]\nmanager_listen = \"10.0.0.3:7070\"\n",
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("manager_listen"), "{e:#}");
        assert!(Config::parse("[p2p]\nrun_manager = true\nmanager = \"somewhere\"\n").is_err());
    }
}
