//! The OCI runtime spec of a container, built the way `ctr run` builds it: containerd's
//! default Unix spec (`oci.populateDefaultUnixSpec` + `oci.WithDefaultUnixDevices`), then the
//! image config (`oci.WithImageConfigArgs`: env, working directory, user, entrypoint and
//! cmd), then the caller's options (`--env`, `--cwd`, `--user`, `--mount`, `--net-host`,
//! limits, `--read-only`, `--tty`, annotations).
//!
//! Pure: everything it needs is passed in ([`ImageConfig`], [`SpecOptions`], [`SpecContext`]);
//! the only file it reads is the rootfs's `/etc/passwd` and `/etc/group` (resolved inside the
//! rootfs, see [`resolve_user`]) when a user name must be looked up.

use std::collections::BTreeMap;
use std::path::Path;

use oci_spec::runtime::{
    Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxCpuBuilder, LinuxDeviceBuilder,
    LinuxDeviceCgroupBuilder, LinuxDeviceType, LinuxMemoryBuilder, LinuxNamespaceBuilder,
    LinuxNamespaceType, LinuxResourcesBuilder, Mount, MountBuilder, PosixRlimitBuilder,
    PosixRlimitType, ProcessBuilder, RootBuilder, Spec, SpecBuilder, UserBuilder,
};
use serde::Deserialize;

use crate::error::{Context as _, Error, Result};

/// containerd's `PATH` for images whose config sets none.
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// The spec version containerd 1.6 writes.
pub const SPEC_VERSION: &str = "1.0.2-dev";
/// CFS period `--cpus` is expressed in (as `ctr run --cpus`).
pub const CPU_PERIOD: u64 = 100_000;

/// The part of an image's config (`config` in the OCI image config) a container starts from.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct ImageConfig {
    #[serde(rename = "User", default)]
    pub user: Option<String>,
    #[serde(rename = "Env", default)]
    pub env: Option<Vec<String>>,
    #[serde(rename = "Entrypoint", default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default)]
    pub cmd: Option<Vec<String>>,
    #[serde(rename = "WorkingDir", default)]
    pub working_dir: Option<String>,
}

/// A `--mount`: `type=bind,src=/host,dst=/ctr,options=rbind:ro` (ctr's syntax; `source`,
/// `destination`/`target` are accepted too; type defaults to `bind`, whose options default to
/// `rbind`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    pub typ: String,
    pub source: String,
    pub destination: String,
    pub options: Vec<String>,
}

impl std::str::FromStr for MountSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<MountSpec> {
        let bad = |why: &str| Error::Invalid(format!("--mount {s:?}: {why}"));
        let (mut typ, mut source, mut destination, mut options) = (None, None, None, Vec::new());
        for field in s.split(',') {
            let (k, v) = field
                .split_once('=')
                .ok_or_else(|| bad(&format!("{field:?} is not KEY=VALUE")))?;
            match k {
                "type" => typ = Some(v.to_string()),
                "source" | "src" => source = Some(v.to_string()),
                "destination" | "dst" | "target" => destination = Some(v.to_string()),
                "options" => {
                    options = v
                        .split(':')
                        .filter(|o| !o.is_empty())
                        .map(str::to_string)
                        .collect()
                }
                other => return Err(bad(&format!("unknown key {other:?}"))),
            }
        }
        let typ = typ.unwrap_or_else(|| "bind".into());
        let destination = destination.ok_or_else(|| bad("no dst="))?;
        if !destination.starts_with('/') {
            return Err(bad("dst must be an absolute path"));
        }
        let source = match source {
            Some(s) => s,
            None if typ == "bind" => return Err(bad("a bind mount needs src=")),
            None => typ.clone(),
        };
        if typ == "bind" && !options.iter().any(|o| o == "bind" || o == "rbind") {
            options.insert(0, "rbind".into());
        }
        Ok(MountSpec {
            typ,
            source,
            destination,
            options,
        })
    }
}

/// What the caller asks of the container on top of the image config.
#[derive(Debug, Clone, Default)]
pub struct SpecOptions {
    /// Replaces the image's Cmd (the Entrypoint stays, as with `ctr run IMAGE ID ARGS`).
    pub args: Vec<String>,
    /// Replaces the image's Entrypoint; the image's Cmd is then dropped (`docker run
    /// --entrypoint`). `Some(vec![])` clears it.
    pub entrypoint: Option<Vec<String>>,
    /// `KEY=VALUE` set or replaced over the image's env; a bare `KEY` removes it.
    pub env: Vec<String>,
    /// Working directory (absolute), instead of the image's WorkingDir.
    pub cwd: Option<String>,
    /// `uid`, `uid:gid`, `name`, `name:group` (names from the rootfs), instead of the image's User.
    pub user: Option<String>,
    pub mounts: Vec<MountSpec>,
    /// cgroup memory limit, bytes.
    pub memory_limit: Option<i64>,
    /// CPU limit in CPUs (CFS quota over a 100 ms period).
    pub cpus: Option<f64>,
    /// Mount the rootfs read-only.
    pub read_only: bool,
    /// Give the process a terminal (`TERM=xterm` unless set).
    pub tty: bool,
    /// Share the host's network namespace, `/etc/hosts` and `/etc/resolv.conf`.
    pub net_host: bool,
    /// Join this network namespace (a bind-mounted namespace file, as CNI prepares)
    /// instead of getting an empty one of its own. Ignored with `net_host`.
    pub netns: Option<std::path::PathBuf>,
    /// The container's hostname (its own UTS namespace; ignored with `net_host`). None:
    /// unset, as containerd leaves it (the node's name shows through).
    pub hostname: Option<String>,
    /// The spec's annotations (read by the runtime shim).
    pub annotations: BTreeMap<String, String>,
    /// cgroup parent: the container's cgroup is `PARENT/ID` (default `/NAMESPACE/ID`).
    pub cgroup_parent: Option<String>,
}

/// Where the container is: its containerd namespace and id, its rootfs when mounted (for user
/// names), the host's name (the `HOSTNAME` of `--net-host`) and whether cgroups are v2.
#[derive(Debug, Clone)]
pub struct SpecContext<'a> {
    pub namespace: &'a str,
    pub id: &'a str,
    pub rootfs: Option<&'a Path>,
    pub hostname: Option<String>,
    pub cgroup_v2: bool,
}

impl SpecContext<'_> {
    /// This host's name and cgroup version.
    pub fn host<'a>(namespace: &'a str, id: &'a str, rootfs: Option<&'a Path>) -> SpecContext<'a> {
        SpecContext {
            namespace,
            id,
            rootfs,
            hostname: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty()),
            cgroup_v2: Path::new("/sys/fs/cgroup/cgroup.controllers").exists(),
        }
    }
}

/// Sets `KEY=VALUE` entries of `over` in `base` (replacing the same key, else appending); a
/// bare `KEY` in `over` removes it (containerd's `replaceOrAppendEnvValues`).
pub fn merge_env(base: &mut Vec<String>, over: &[String]) {
    for o in over {
        let key = o.split_once('=').map_or(o.as_str(), |(k, _)| k);
        let pos = base
            .iter()
            .position(|b| b.split_once('=').map_or(b.as_str(), |(k, _)| k) == key);
        match (o.contains('='), pos) {
            (true, Some(i)) => base[i] = o.clone(),
            (true, None) => base.push(o.clone()),
            (false, Some(i)) => {
                base.remove(i);
            }
            (false, None) => {}
        }
    }
}

/// The process's arguments: the entrypoint (the image's, or the override) followed by the
/// caller's args, else the image's Cmd (dropped when the entrypoint is overridden).
pub fn process_args(cfg: &ImageConfig, o: &SpecOptions) -> Result<Vec<String>> {
    let args = match &o.entrypoint {
        Some(ep) => ep.iter().chain(&o.args).cloned().collect::<Vec<_>>(),
        None => {
            let ep = cfg.entrypoint.clone().unwrap_or_default();
            let cmd = if o.args.is_empty() {
                cfg.cmd.clone().unwrap_or_default()
            } else {
                o.args.clone()
            };
            ep.into_iter().chain(cmd).collect()
        }
    };
    if args.is_empty() {
        return Err(Error::Invalid(
            "no command: the image has no Entrypoint or Cmd and none was given".into(),
        ));
    }
    Ok(args)
}

/// A user and its groups, as the container's process gets them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedUser {
    pub uid: u32,
    pub gid: u32,
    /// The primary gid first, then the groups `/etc/group` lists the user in.
    pub additional_gids: Vec<u32>,
}

struct Passwd {
    name: String,
    uid: u32,
    gid: u32,
}

struct Group {
    name: String,
    gid: u32,
    members: Vec<String>,
}

fn parse_passwd(text: &str) -> Vec<Passwd> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            Some(Passwd {
                name: f.first()?.to_string(),
                uid: f.get(2)?.parse().ok()?,
                gid: f.get(3)?.parse().ok()?,
            })
        })
        .collect()
}

fn parse_group(text: &str) -> Vec<Group> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            Some(Group {
                name: f.first()?.to_string(),
                gid: f.get(2)?.parse().ok()?,
                members: f
                    .get(3)
                    .map(|m| {
                        m.split(',')
                            .filter(|s| !s.is_empty())
                            .map(str::to_string)
                            .collect()
                    })
                    .unwrap_or_default(),
            })
        })
        .collect()
}

/// Largest `/etc/passwd` or `/etc/group` read from an image.
const MAX_ID_FILE: u64 = 4 << 20;

/// Reads `rel` (relative to `root`) with every symlink resolved inside `root`
/// (`openat2(RESOLVE_IN_ROOT)`), as containerd resolves `/etc/passwd` in a rootfs: an image's
/// `/etc/passwd -> /etc/shadow` names the image's file, never the host's. Only regular files,
/// opened without blocking, at most 4 MiB; `None` if it does not exist.
pub fn read_in_root(root: &Path, rel: &str) -> Result<Option<String>> {
    use std::ffi::CString;
    use std::io::Read as _;
    use std::os::fd::FromRawFd as _;
    use std::os::unix::ffi::OsStrExt as _;

    let what = || format!("reading {rel} in {}", root.display());
    let root_c = CString::new(root.as_os_str().as_bytes()).ctx(what())?;
    let rel_c = CString::new(rel.trim_start_matches('/')).ctx(what())?;
    // SAFETY: plain syscalls on NUL-terminated paths; every fd is owned by a File below.
    let dirfd = unsafe {
        libc::open(
            root_c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if dirfd < 0 {
        return Err(std::io::Error::last_os_error()).ctx(what());
    }
    let dir = unsafe { std::fs::File::from_raw_fd(dirfd) };
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NONBLOCK | libc::O_NOCTTY) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            std::os::fd::AsRawFd::as_raw_fd(&dir),
            rel_c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::NotFound {
            return Ok(None);
        }
        return Err(e).ctx(what());
    }
    let f = unsafe { std::fs::File::from_raw_fd(fd as i32) };
    if !f.metadata().ctx(what())?.is_file() {
        return Err(Error::Invalid(format!(
            "{rel} in the image is not a regular file"
        )));
    }
    let mut text = String::new();
    f.take(MAX_ID_FILE).read_to_string(&mut text).ctx(what())?;
    Ok(Some(text))
}

/// Resolves a user as containerd's `oci.WithUser` + `oci.WithAdditionalGIDs` do: `uid`
/// (gid from the rootfs's `/etc/passwd`, else 0), `name` (both from `/etc/passwd`),
/// `user:group` (each numeric or a name from `/etc/passwd` / `/etc/group`); empty is root.
/// The supplementary groups are the primary gid and every group of `/etc/group` listing the
/// user's name. `rootfs` is needed for names (an error without it) and for groups.
pub fn resolve_user(user: &str, rootfs: Option<&Path>) -> Result<ResolvedUser> {
    let bad = |why: String| Error::Invalid(format!("user {user:?}: {why}"));
    let passwd = || -> Result<Vec<Passwd>> {
        let root = rootfs.ok_or_else(|| bad("names need the image's /etc/passwd".into()))?;
        Ok(read_in_root(root, "etc/passwd")?
            .map(|t| parse_passwd(&t))
            .unwrap_or_default())
    };
    let groups = || -> Result<Vec<Group>> {
        let Some(root) = rootfs else {
            return Ok(Vec::new());
        };
        Ok(read_in_root(root, "etc/group")?
            .map(|t| parse_group(&t))
            .unwrap_or_default())
    };
    let user = if user.is_empty() { "0" } else { user };
    let parts: Vec<&str> = user.split(':').collect();
    let (uid, gid, name) = match parts.as_slice() {
        [u] => match u.parse::<u32>() {
            Ok(uid) => {
                let entries = if rootfs.is_some() {
                    passwd()?
                } else {
                    Vec::new()
                };
                match entries.into_iter().find(|p| p.uid == uid) {
                    Some(p) => (uid, p.gid, Some(p.name)),
                    None => (uid, 0, None),
                }
            }
            Err(_) => {
                let p = passwd()?
                    .into_iter()
                    .find(|p| p.name == *u)
                    .ok_or_else(|| bad("no such user in the image's /etc/passwd".into()))?;
                (p.uid, p.gid, Some(p.name))
            }
        },
        [u, g] => {
            let (uid, name) = match u.parse::<u32>() {
                Ok(uid) => {
                    let entries = if rootfs.is_some() {
                        passwd()?
                    } else {
                        Vec::new()
                    };
                    (
                        uid,
                        entries.into_iter().find(|p| p.uid == uid).map(|p| p.name),
                    )
                }
                Err(_) => {
                    let p = passwd()?
                        .into_iter()
                        .find(|p| p.name == *u)
                        .ok_or_else(|| bad("no such user in the image's /etc/passwd".into()))?;
                    (p.uid, Some(p.name))
                }
            };
            let gid = match g.parse::<u32>() {
                Ok(gid) => gid,
                Err(_) => {
                    if rootfs.is_none() {
                        return Err(bad("names need the image's /etc/group".into()));
                    }
                    groups()?
                        .into_iter()
                        .find(|x| x.name == *g)
                        .ok_or_else(|| bad("no such group in the image's /etc/group".into()))?
                        .gid
                }
            };
            (uid, gid, name)
        }
        _ => return Err(bad("expected UID, NAME, UID:GID or NAME:GROUP".into())),
    };
    let mut additional_gids = vec![gid];
    if let Some(name) = name {
        for g in groups()? {
            if g.name != name && g.members.contains(&name) && !additional_gids.contains(&g.gid) {
                additional_gids.push(g.gid);
            }
        }
    }
    Ok(ResolvedUser {
        uid,
        gid,
        additional_gids,
    })
}

fn mount(dst: &str, typ: &str, src: &str, options: &[&str]) -> Result<Mount> {
    MountBuilder::default()
        .destination(dst)
        .typ(typ)
        .source(src)
        .options(options.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .build()
        .ctx(format!("the {dst} mount"))
}

/// containerd's default mounts (`oci.defaultMounts`) and the cgroup filesystem (read-only,
/// the container's own cgroup).
fn default_mounts() -> Result<Vec<Mount>> {
    Ok(vec![
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"])?,
        mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        )?,
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        )?,
        mount(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        )?,
        mount(
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        )?,
        mount(
            "/sys",
            "sysfs",
            "sysfs",
            &["nosuid", "noexec", "nodev", "ro"],
        )?,
        mount(
            "/sys/fs/cgroup",
            "cgroup",
            "cgroup",
            &["nosuid", "noexec", "nodev", "relatime", "ro"],
        )?,
        mount(
            "/run",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        )?,
    ])
}

/// containerd's default capabilities (`oci.defaultUnixCaps`).
const DEFAULT_CAPS: &[Capability] = &[
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fsetid,
    Capability::Fowner,
    Capability::Mknod,
    Capability::NetRaw,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setfcap,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::SysChroot,
    Capability::Kill,
    Capability::AuditWrite,
];

const MASKED_PATHS: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/sys/firmware",
    "/proc/scsi",
];

const READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// `oci.WithDefaultUnixDevices`: the device nodes and the device cgroup rules.
const DEVICES: &[(&str, i64, i64)] = &[
    ("/dev/null", 1, 3),
    ("/dev/random", 1, 8),
    ("/dev/full", 1, 7),
    ("/dev/tty", 5, 0),
    ("/dev/zero", 1, 5),
    ("/dev/urandom", 1, 9),
];
/// Allowed besides [`DEVICES`]: console 5:1, pts 136:*, ptmx 5:2, tun 10:200.
const MORE_ALLOWED: &[(i64, Option<i64>)] =
    &[(5, Some(1)), (136, None), (5, Some(2)), (10, Some(200))];

/// Builds the container's runtime spec (see the module's documentation).
pub fn build_spec(cfg: &ImageConfig, o: &SpecOptions, cx: &SpecContext) -> Result<Spec> {
    // Process: env, args, cwd, user.
    let mut env = cfg.env.clone().unwrap_or_default();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.insert(0, DEFAULT_PATH.to_string());
    }
    if o.net_host
        && let Some(h) = &cx.hostname
    {
        merge_env(&mut env, &[format!("HOSTNAME={h}")]);
    }
    merge_env(&mut env, &o.env);
    if o.tty && !env.iter().any(|e| e.starts_with("TERM=")) {
        env.push("TERM=xterm".into());
    }
    let args = process_args(cfg, o)?;
    let cwd = o
        .cwd
        .clone()
        .or_else(|| cfg.working_dir.clone().filter(|w| !w.is_empty()))
        .unwrap_or_else(|| "/".into());
    if !cwd.starts_with('/') {
        return Err(Error::Invalid(format!(
            "working directory {cwd:?} is not absolute"
        )));
    }
    let user_str = o
        .user
        .clone()
        .or_else(|| cfg.user.clone())
        .unwrap_or_default();
    let user = resolve_user(&user_str, cx.rootfs)?;
    let caps: oci_spec::runtime::Capabilities = DEFAULT_CAPS.iter().copied().collect();
    // The builder starts from oci-spec's defaults (inheritable and ambient sets): containerd
    // sets neither.
    let mut capabilities = LinuxCapabilitiesBuilder::default()
        .bounding(caps.clone())
        .permitted(caps.clone())
        .effective(caps)
        .build()
        .ctx("capabilities")?;
    capabilities.set_inheritable(None);
    capabilities.set_ambient(None);
    let process = ProcessBuilder::default()
        .terminal(o.tty)
        .user(
            UserBuilder::default()
                .uid(user.uid)
                .gid(user.gid)
                .additional_gids(user.additional_gids.clone())
                .build()
                .ctx("the process's user")?,
        )
        .args(args)
        .env(env)
        .cwd(cwd)
        .capabilities(capabilities)
        .rlimits(vec![
            PosixRlimitBuilder::default()
                .typ(PosixRlimitType::RlimitNofile)
                .hard(1024u64)
                .soft(1024u64)
                .build()
                .ctx("rlimits")?,
        ])
        .no_new_privileges(true)
        .build()
        .ctx("the process")?;

    // Mounts.
    let mut mounts = default_mounts()?;
    if o.net_host {
        mounts.push(mount("/etc/hosts", "bind", "/etc/hosts", &["rbind", "ro"])?);
        mounts.push(mount(
            "/etc/resolv.conf",
            "bind",
            "/etc/resolv.conf",
            &["rbind", "ro"],
        )?);
    }
    for m in &o.mounts {
        let opts: Vec<&str> = m.options.iter().map(String::as_str).collect();
        mounts.push(mount(&m.destination, &m.typ, &m.source, &opts)?);
    }

    // Linux: namespaces, devices, resources, cgroup.
    let mut ns_types = vec![
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Mount,
    ];
    if !o.net_host {
        ns_types.push(LinuxNamespaceType::Network);
    }
    if cx.cgroup_v2 {
        ns_types.push(LinuxNamespaceType::Cgroup);
    }
    let netns = o.netns.as_ref().filter(|_| !o.net_host);
    let namespaces = ns_types
        .into_iter()
        .map(|t| match netns {
            Some(p) if t == LinuxNamespaceType::Network => LinuxNamespaceBuilder::default()
                .typ(t)
                .path(p.clone())
                .build(),
            _ => LinuxNamespaceBuilder::default().typ(t).build(),
        })
        .collect::<Result<Vec<_>, _>>()
        .ctx("namespaces")?;
    let mut devices = Vec::new();
    let mut rules = vec![
        LinuxDeviceCgroupBuilder::default()
            .allow(false)
            .access("rwm")
            .build()
            .ctx("device rules")?,
    ];
    for (path, major, minor) in DEVICES {
        devices.push(
            LinuxDeviceBuilder::default()
                .path(*path)
                .typ(LinuxDeviceType::C)
                .major(*major)
                .minor(*minor)
                .file_mode(0o666u32)
                .uid(0u32)
                .gid(0u32)
                .build()
                .ctx("devices")?,
        );
        rules.push(
            LinuxDeviceCgroupBuilder::default()
                .allow(true)
                .typ(LinuxDeviceType::C)
                .major(*major)
                .minor(*minor)
                .access("rwm")
                .build()
                .ctx("device rules")?,
        );
    }
    for (major, minor) in MORE_ALLOWED {
        let mut b = LinuxDeviceCgroupBuilder::default()
            .allow(true)
            .typ(LinuxDeviceType::C)
            .major(*major)
            .access("rwm");
        if let Some(m) = minor {
            b = b.minor(*m);
        }
        rules.push(b.build().ctx("device rules")?);
    }
    let mut resources = LinuxResourcesBuilder::default().devices(rules);
    if let Some(limit) = o.memory_limit {
        if limit <= 0 {
            return Err(Error::Invalid(format!(
                "memory limit {limit} is not positive"
            )));
        }
        resources = resources.memory(
            LinuxMemoryBuilder::default()
                .limit(limit)
                .build()
                .ctx("memory limit")?,
        );
    }
    if let Some(cpus) = o.cpus {
        if !(cpus.is_finite() && cpus > 0.0) {
            return Err(Error::Invalid(format!(
                "--cpus {cpus} is not a positive number"
            )));
        }
        let quota = (cpus * CPU_PERIOD as f64).round() as i64;
        resources = resources.cpu(
            LinuxCpuBuilder::default()
                .quota(quota.max(1000))
                .period(CPU_PERIOD)
                .build()
                .ctx("cpu limit")?,
        );
    }
    let cgroups_path = match &o.cgroup_parent {
        Some(p) => format!("{}/{}", p.trim_end_matches('/'), cx.id),
        None => format!("/{}/{}", cx.namespace, cx.id),
    };
    let linux = LinuxBuilder::default()
        .masked_paths(
            MASKED_PATHS
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>(),
        )
        .readonly_paths(
            READONLY_PATHS
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>(),
        )
        .cgroups_path(cgroups_path)
        .resources(resources.build().ctx("resources")?)
        .namespaces(namespaces)
        .devices(devices)
        .build()
        .ctx("the linux section")?;

    let root = RootBuilder::default().path("rootfs").readonly(o.read_only);
    let mut spec = SpecBuilder::default()
        .version(SPEC_VERSION)
        .root(root.build().ctx("the root")?)
        .process(process)
        .mounts(mounts)
        .linux(linux)
        .build()
        .ctx("the spec")?;
    // oci-spec's default hostname ("youki"); containerd leaves it unset.
    spec.set_hostname(o.hostname.clone().filter(|_| !o.net_host));
    if !o.annotations.is_empty() {
        spec.set_annotations(Some(
            o.annotations
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        ));
    }
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn cx() -> SpecContext<'static> {
        SpecContext {
            namespace: "ns1",
            id: "c1",
            rootfs: None,
            hostname: Some("node7".into()),
            cgroup_v2: true,
        }
    }

    fn json_of(cfg: &ImageConfig, o: &SpecOptions, cx: &SpecContext) -> Value {
        serde_json::to_value(build_spec(cfg, o, cx).expect("spec")).expect("json")
    }

    fn image(v: Value) -> ImageConfig {
        serde_json::from_value(v).expect("image config")
    }

    fn strings(v: &Value) -> Vec<String> {
        v.as_array()
            .unwrap_or_else(|| panic!("not an array: {v}"))
            .iter()
            .map(|s| s.as_str().expect("string").to_string())
            .collect()
    }

    fn mount_of<'a>(spec: &'a Value, dst: &str) -> Option<&'a Value> {
        spec["mounts"]
            .as_array()
            .expect("mounts")
            .iter()
            .find(|m| m["destination"] == dst)
    }

    fn ns_types(spec: &Value) -> Vec<String> {
        spec["linux"]["namespaces"]
            .as_array()
            .expect("namespaces")
            .iter()
            .map(|n| n["type"].as_str().expect("type").to_string())
            .collect()
    }

    #[test]
    fn defaults_follow_containerd() {
        let s = json_of(
            &image(json!({"Cmd": ["/bin/true"]})),
            &SpecOptions::default(),
            &cx(),
        );
        assert_eq!(s["ociVersion"], SPEC_VERSION);
        assert_eq!(s["root"]["path"], "rootfs");
        assert!(s["root"].get("readonly").is_none_or(|r| r == false));
        let p = &s["process"];
        assert_eq!(strings(&p["args"]), ["/bin/true"]);
        assert_eq!(p["cwd"], "/");
        assert_eq!(p["noNewPrivileges"], true);
        assert_eq!(p["terminal"], false);
        assert_eq!(p["user"]["uid"], 0);
        assert_eq!(p["user"]["gid"], 0);
        assert_eq!(strings(&p["env"]), [DEFAULT_PATH]);
        let mut caps = strings(&p["capabilities"]["bounding"]);
        caps.sort();
        assert_eq!(caps.len(), 14);
        assert!(caps.contains(&"CAP_NET_BIND_SERVICE".to_string()));
        assert!(!caps.contains(&"CAP_SYS_ADMIN".to_string()));
        assert!(p["capabilities"].get("inheritable").is_none());
        assert!(p["capabilities"].get("ambient").is_none());
        assert!(s.get("hostname").is_none(), "{}", s["hostname"]);
        assert_eq!(
            p["rlimits"],
            json!([{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}])
        );
        for d in [
            "/proc",
            "/dev",
            "/dev/pts",
            "/dev/shm",
            "/dev/mqueue",
            "/sys",
            "/sys/fs/cgroup",
        ] {
            assert!(mount_of(&s, d).is_some(), "no {d} mount");
        }
        assert_eq!(mount_of(&s, "/proc").unwrap()["type"], "proc");
        assert!(mount_of(&s, "/etc/hosts").is_none());
        assert_eq!(
            ns_types(&s),
            ["pid", "ipc", "uts", "mount", "network", "cgroup"]
        );
        let l = &s["linux"];
        assert_eq!(l["cgroupsPath"], "/ns1/c1");
        assert!(strings(&l["maskedPaths"]).contains(&"/proc/kcore".to_string()));
        assert!(strings(&l["readonlyPaths"]).contains(&"/proc/sys".to_string()));
        let rules = l["resources"]["devices"].as_array().unwrap();
        assert_eq!(rules[0], json!({"allow": false, "access": "rwm"}));
        assert!(
            rules
                .iter()
                .any(|r| r["major"] == 136 && r.get("minor").is_none())
        );
        assert!(l["resources"].get("memory").is_none());
        assert!(
            l["devices"]
                .as_array()
                .unwrap()
                .iter()
                .any(|d| d["path"] == "/dev/null" && d["major"] == 1 && d["minor"] == 3)
        );
        assert!(
            s.get("annotations")
                .is_none_or(|a| a.as_object().is_none_or(|m| m.is_empty()))
        );
        // cgroup v1 hosts get no cgroup namespace (as containerd 1.6).
        let v1 = SpecContext {
            cgroup_v2: false,
            ..cx()
        };
        let s = json_of(&image(json!({"Cmd": ["x"]})), &SpecOptions::default(), &v1);
        assert!(!ns_types(&s).contains(&"cgroup".to_string()));
    }

    #[test]
    fn env_merges_over_the_image_and_path_defaults() {
        let img = image(json!({"Env": ["PATH=/opt/bin", "A=1", "B=2"], "Cmd": ["x"]}));
        let o = SpecOptions {
            env: vec!["B=3".into(), "C=4".into(), "A".into()],
            ..Default::default()
        };
        let s = json_of(&img, &o, &cx());
        assert_eq!(
            strings(&s["process"]["env"]),
            ["PATH=/opt/bin", "B=3", "C=4"]
        );
        // No PATH in the image: the default one comes first.
        let img = image(json!({"Env": ["A=1"], "Cmd": ["x"]}));
        let s = json_of(&img, &SpecOptions::default(), &cx());
        assert_eq!(strings(&s["process"]["env"]), [DEFAULT_PATH, "A=1"]);
        // Env null in the config is no env.
        let img = image(json!({"Env": null, "Cmd": ["x"]}));
        let s = json_of(&img, &SpecOptions::default(), &cx());
        assert_eq!(strings(&s["process"]["env"]), [DEFAULT_PATH]);
        // --env can replace PATH.
        let o = SpecOptions {
            env: vec!["PATH=/x".into()],
            ..Default::default()
        };
        let s = json_of(&img, &o, &cx());
        assert_eq!(strings(&s["process"]["env"]), ["PATH=/x"]);
    }

    #[test]
    fn entrypoint_cmd_and_overrides() {
        let img = image(json!({"Entrypoint": ["/ep", "-v"], "Cmd": ["serve", "--port=1"]}));
        let args = |o: SpecOptions| process_args(&img, &o).unwrap();
        assert_eq!(
            args(SpecOptions::default()),
            ["/ep", "-v", "serve", "--port=1"]
        );
        // Args replace Cmd, not Entrypoint (ctr run IMAGE ID ARGS).
        let o = SpecOptions {
            args: vec!["check".into()],
            ..Default::default()
        };
        assert_eq!(args(o), ["/ep", "-v", "check"]);
        // An entrypoint override drops the image's Cmd.
        let o = SpecOptions {
            entrypoint: Some(vec!["/bin/sh".into()]),
            ..Default::default()
        };
        assert_eq!(args(o), ["/bin/sh"]);
        let o = SpecOptions {
            entrypoint: Some(vec!["/bin/sh".into()]),
            args: vec!["-c".into(), "true".into()],
            ..Default::default()
        };
        assert_eq!(args(o), ["/bin/sh", "-c", "true"]);
        // A cleared entrypoint with args.
        let o = SpecOptions {
            entrypoint: Some(vec![]),
            args: vec!["/bin/true".into()],
            ..Default::default()
        };
        assert_eq!(args(o), ["/bin/true"]);
        // Cmd only.
        let img2 = image(json!({"Cmd": ["/bin/sh", "-c", "echo hi"]}));
        assert_eq!(
            process_args(&img2, &SpecOptions::default()).unwrap(),
            ["/bin/sh", "-c", "echo hi"]
        );
        // Nothing at all is an error, not an empty args list.
        let none = image(json!({}));
        assert!(matches!(
            process_args(&none, &SpecOptions::default()),
            Err(Error::Invalid(_))
        ));
        assert!(build_spec(&none, &SpecOptions::default(), &cx()).is_err());
    }

    #[test]
    fn working_dir_from_image_and_override() {
        let img = image(json!({"WorkingDir": "/srv/app", "Cmd": ["x"]}));
        assert_eq!(
            json_of(&img, &SpecOptions::default(), &cx())["process"]["cwd"],
            "/srv/app"
        );
        let o = SpecOptions {
            cwd: Some("/tmp".into()),
            ..Default::default()
        };
        assert_eq!(json_of(&img, &o, &cx())["process"]["cwd"], "/tmp");
        let o = SpecOptions {
            cwd: Some("relative".into()),
            ..Default::default()
        };
        assert!(build_spec(&img, &o, &cx()).is_err());
        let empty = image(json!({"WorkingDir": "", "Cmd": ["x"]}));
        assert_eq!(
            json_of(&empty, &SpecOptions::default(), &cx())["process"]["cwd"],
            "/"
        );
    }

    fn rootfs() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("etc")).unwrap();
        std::fs::write(
            d.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\n\
             # a comment\n\
             app:x:1000:1001:App:/home/app:/bin/sh\n\
             web:x:33:33::/var/www:/bin/false\n\
             broken line\n",
        )
        .unwrap();
        std::fs::write(
            d.path().join("etc/group"),
            "root:x:0:\napps:x:1001:\nweb:x:33:app\naudio:x:29:app,web\nstaff:x:50:\n",
        )
        .unwrap();
        d
    }

    #[test]
    fn users_numeric_and_by_name() {
        let r = rootfs();
        let root = Some(r.path());
        let u = |s: &str| resolve_user(s, root).unwrap();
        assert_eq!(
            u(""),
            ResolvedUser {
                uid: 0,
                gid: 0,
                additional_gids: vec![0]
            }
        );
        // A name: uid and gid from /etc/passwd, groups listing it from /etc/group.
        assert_eq!(
            u("app"),
            ResolvedUser {
                uid: 1000,
                gid: 1001,
                additional_gids: vec![1001, 33, 29]
            }
        );
        // A known uid gets its passwd gid; an unknown one gid 0.
        assert_eq!(u("33").gid, 33);
        assert_eq!(u("33").additional_gids, vec![33, 29]);
        assert_eq!(
            u("4242"),
            ResolvedUser {
                uid: 4242,
                gid: 0,
                additional_gids: vec![0]
            }
        );
        // uid:gid, names on either side.
        assert_eq!((u("1000:50").uid, u("1000:50").gid), (1000, 50));
        assert_eq!((u("app:staff").uid, u("app:staff").gid), (1000, 50));
        assert_eq!((u("5:audio").uid, u("5:audio").gid), (5, 29));
        // Unknown names and malformed users are errors.
        assert!(resolve_user("nobody", root).is_err());
        assert!(resolve_user("app:nogroup", root).is_err());
        assert!(resolve_user("1:2:3", root).is_err());
        // Numeric uid:gid needs no rootfs; names do.
        assert_eq!(
            resolve_user("7:8", None).unwrap(),
            ResolvedUser {
                uid: 7,
                gid: 8,
                additional_gids: vec![8]
            }
        );
        assert!(resolve_user("app", None).is_err());
        // In the spec.
        let cx = SpecContext {
            rootfs: root,
            ..cx()
        };
        let img = image(json!({"User": "app", "Cmd": ["x"]}));
        let s = json_of(&img, &SpecOptions::default(), &cx);
        assert_eq!(
            s["process"]["user"],
            json!({"uid": 1000, "gid": 1001, "additionalGids": [1001, 33, 29]})
        );
        let o = SpecOptions {
            user: Some("web".into()),
            ..Default::default()
        };
        assert_eq!(json_of(&img, &o, &cx)["process"]["user"]["uid"], 33);
    }

    #[test]
    fn passwd_is_resolved_inside_the_rootfs() {
        // An image's /etc/passwd that is an absolute symlink names the image's file, not the
        // host's.
        let r = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(r.path().join("etc")).unwrap();
        std::fs::create_dir_all(r.path().join("lib")).unwrap();
        std::fs::write(r.path().join("lib/passwd"), "svc:x:77:78::/:/bin/sh\n").unwrap();
        std::os::unix::fs::symlink("/lib/passwd", r.path().join("etc/passwd")).unwrap();
        std::os::unix::fs::symlink("../../../../../../etc/hostname", r.path().join("etc/group"))
            .unwrap();
        let u = resolve_user("svc", Some(r.path())).unwrap();
        assert_eq!((u.uid, u.gid), (77, 78));
        // The escaping group link resolves to <root>/etc/hostname, which does not exist.
        assert_eq!(read_in_root(r.path(), "etc/group").unwrap(), None);
        // Not a regular file: refused, not read (a FIFO would block).
        std::fs::create_dir(r.path().join("etc/dir")).unwrap();
        assert!(read_in_root(r.path(), "etc/dir").is_err());
    }

    #[test]
    fn a_hostname_is_set_unless_the_host_network_is_shared() {
        let img = image(json!({"Cmd": ["x"]}));
        let mut o = SpecOptions {
            hostname: Some("fn-hello-1".into()),
            ..Default::default()
        };
        assert_eq!(json_of(&img, &o, &cx())["hostname"], "fn-hello-1");
        o.net_host = true;
        assert!(json_of(&img, &o, &cx()).get("hostname").is_none());
    }

    #[test]
    fn a_netns_path_is_joined() {
        let o = SpecOptions {
            netns: Some("/run/netns/fn-1".into()),
            ..Default::default()
        };
        let s = json_of(&image(json!({"Cmd": ["x"]})), &o, &cx());
        let ns = s["linux"]["namespaces"].as_array().unwrap();
        let net = ns.iter().find(|n| n["type"] == "network").unwrap();
        assert_eq!(net["path"], "/run/netns/fn-1");
        assert!(
            ns.iter()
                .filter(|n| n["type"] != "network")
                .all(|n| n.get("path").is_none())
        );
    }

    #[test]
    fn net_host_shares_the_network() {
        let img = image(json!({"Cmd": ["x"]}));
        let o = SpecOptions {
            net_host: true,
            ..Default::default()
        };
        let s = json_of(&img, &o, &cx());
        assert!(!ns_types(&s).contains(&"network".to_string()));
        for f in ["/etc/hosts", "/etc/resolv.conf"] {
            let m = mount_of(&s, f).expect(f);
            assert_eq!(m["source"], f);
            assert_eq!(m["type"], "bind");
            assert_eq!(strings(&m["options"]), ["rbind", "ro"]);
        }
        assert!(strings(&s["process"]["env"]).contains(&"HOSTNAME=node7".to_string()));
        // Without: own network namespace, no host files.
        let s = json_of(&img, &SpecOptions::default(), &cx());
        assert!(ns_types(&s).contains(&"network".to_string()));
        assert!(mount_of(&s, "/etc/resolv.conf").is_none());
    }

    #[test]
    fn mounts_parse_like_ctr() {
        let m: MountSpec = "type=bind,src=/data,dst=/mnt/data,options=rbind:ro"
            .parse()
            .unwrap();
        assert_eq!(
            m,
            MountSpec {
                typ: "bind".into(),
                source: "/data".into(),
                destination: "/mnt/data".into(),
                options: vec!["rbind".into(), "ro".into()],
            }
        );
        // Defaults: type bind, option rbind.
        let m: MountSpec = "source=/a,target=/b".parse().unwrap();
        assert_eq!(
            (m.typ.as_str(), m.options.clone()),
            ("bind", vec!["rbind".to_string()])
        );
        let m: MountSpec = "src=/a,dst=/b,options=ro".parse().unwrap();
        assert_eq!(m.options, ["rbind", "ro"]);
        // A tmpfs needs no source.
        let m: MountSpec = "type=tmpfs,dst=/scratch,options=size=1m".parse().unwrap();
        assert_eq!(
            (m.source.as_str(), m.options.clone()),
            ("tmpfs", vec!["size=1m".to_string()])
        );
        for bad in [
            "src=/a",
            "src=/a,dst=rel",
            "dst=/b",
            "src=/a,dst=/b,colour=red",
            "junk",
        ] {
            assert!(bad.parse::<MountSpec>().is_err(), "{bad} parsed");
        }
        // In the spec, after the defaults.
        let img = image(json!({"Cmd": ["x"]}));
        let o = SpecOptions {
            mounts: vec![
                "type=bind,src=/data,dst=/mnt/data,options=rbind:ro"
                    .parse()
                    .unwrap(),
            ],
            ..Default::default()
        };
        let s = json_of(&img, &o, &cx());
        let mounts = s["mounts"].as_array().unwrap();
        assert_eq!(
            mounts.last().unwrap(),
            &json!({"destination": "/mnt/data", "type": "bind", "source": "/data", "options": ["rbind", "ro"]})
        );
    }

    #[test]
    fn memory_and_cpu_limits() {
        let img = image(json!({"Cmd": ["x"]}));
        let o = SpecOptions {
            memory_limit: Some(64 << 20),
            cpus: Some(1.5),
            ..Default::default()
        };
        let s = json_of(&img, &o, &cx());
        let r = &s["linux"]["resources"];
        assert_eq!(r["memory"]["limit"], 64 << 20);
        assert_eq!(r["cpu"]["quota"], 150_000);
        assert_eq!(r["cpu"]["period"], 100_000);
        for bad in [
            SpecOptions {
                memory_limit: Some(0),
                ..Default::default()
            },
            SpecOptions {
                cpus: Some(-1.0),
                ..Default::default()
            },
            SpecOptions {
                cpus: Some(f64::NAN),
                ..Default::default()
            },
        ] {
            assert!(build_spec(&img, &bad, &cx()).is_err());
        }
    }

    #[test]
    fn tty_read_only_annotations_and_cgroup_parent() {
        let img = image(json!({"Cmd": ["x"], "Env": ["TERM=dumb"]}));
        let o = SpecOptions {
            tty: true,
            read_only: true,
            annotations: [("io.arbor/fn".to_string(), "hello".to_string())].into(),
            cgroup_parent: Some("/arbor/".into()),
            ..Default::default()
        };
        let s = json_of(&img, &o, &cx());
        assert_eq!(s["process"]["terminal"], true);
        // The image's TERM is kept; otherwise xterm.
        assert_eq!(strings(&s["process"]["env"]), [DEFAULT_PATH, "TERM=dumb"]);
        assert_eq!(s["root"]["readonly"], true);
        assert_eq!(s["annotations"], json!({"io.arbor/fn": "hello"}));
        assert_eq!(s["linux"]["cgroupsPath"], "/arbor/c1");
        let img = image(json!({"Cmd": ["x"]}));
        let o = SpecOptions {
            tty: true,
            ..Default::default()
        };
        assert!(
            strings(&json_of(&img, &o, &cx())["process"]["env"]).contains(&"TERM=xterm".into())
        );
    }
}
