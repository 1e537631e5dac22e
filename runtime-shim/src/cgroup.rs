//! The container's cgroup: OOM notifications and statistics.
//!
//! * OOM: on cgroup v1 an eventfd registered for `memory.oom_control` through
//!   `cgroup.event_control` (the kernel signals it on every OOM in the cgroup, and once more
//!   when the cgroup is removed); on cgroup v2 the `oom_kill` counter of `memory.events`,
//!   polled. Either runs on its own thread and ends with the cgroup.
//! * Stats: `runc events --stats` (runc reads either hierarchy), converted into containerd's
//!   `io.containerd.cgroups.v1.Metrics` or `io.containerd.cgroups.v2.Metrics`, the types
//!   `ctr task metrics` and the kubelet decode.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use containerd_shim_protos::cgroups::metrics as v1;
use containerd_shim_protos::cgroups_v2::metrics as v2;
use containerd_shim_protos::protobuf::{Message, MessageField, well_known_types::any::Any};
use serde_json::Value;
use tracing::debug;

use crate::error::{Error, Result};

const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The cgroup hierarchy of this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    V1,
    V2,
}

/// v2 when `/sys/fs/cgroup` is the unified hierarchy, else v1 (hybrid hosts count as v1:
/// runc puts memory limits in the v1 memory controller there).
pub fn mode() -> Mode {
    if Path::new(CGROUP_ROOT).join("cgroup.controllers").exists() {
        Mode::V2
    } else {
        Mode::V1
    }
}

/// The memory cgroup directory of `pid`, from `/proc/<pid>/cgroup` (blocking: a small read).
pub fn memory_cgroup(mode: Mode, pid: i32) -> Option<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    memory_cgroup_in(mode, &text)
}

fn memory_cgroup_in(mode: Mode, proc_cgroup: &str) -> Option<PathBuf> {
    for line in proc_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let rel = path.trim_start_matches('/');
        match mode {
            Mode::V1 if controllers.split(',').any(|c| c == "memory") => {
                return Some(Path::new(CGROUP_ROOT).join("memory").join(rel));
            }
            Mode::V2 if controllers.is_empty() => return Some(Path::new(CGROUP_ROOT).join(rel)),
            _ => {}
        }
    }
    None
}

/// Calls `on_oom` on a dedicated thread for every OOM kill in the memory cgroup `dir`, until
/// the cgroup is removed.
pub fn watch_oom(mode: Mode, dir: PathBuf, on_oom: impl Fn() + Send + 'static) -> Result<()> {
    match mode {
        Mode::V1 => watch_v1(dir, on_oom),
        Mode::V2 => watch_v2(dir, on_oom),
    }
}

fn watch_v1(dir: PathBuf, on_oom: impl Fn() + Send + 'static) -> Result<()> {
    let control = dir.join("memory.oom_control");
    let oc = File::open(&control).map_err(Error::io(format!("opening {}", control.display())))?;
    // SAFETY: eventfd has no memory preconditions; the result is checked.
    let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if efd < 0 {
        return Err(Error::io("eventfd")(std::io::Error::last_os_error()));
    }
    // SAFETY: efd is a fresh descriptor we own.
    let efd = unsafe { OwnedFd::from_raw_fd(efd) };
    let ec = dir.join("cgroup.event_control");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&ec)
        // One write(2): the kernel parses the whole line at once.
        .and_then(|mut f| f.write_all(format!("{} {}", efd.as_raw_fd(), oc.as_raw_fd()).as_bytes()))
        .map_err(Error::io(format!("registering with {}", ec.display())))?;
    std::thread::Builder::new()
        .name("oom-v1".into())
        .spawn(move || {
            let mut efd = File::from(efd);
            let _oc = oc;
            let mut buf = [0u8; 8];
            loop {
                if efd.read_exact(&mut buf).is_err() {
                    return;
                }
                // The eventfd also fires when the cgroup goes away.
                if !control.exists() {
                    debug!(cgroup = %dir.display(), "memory cgroup removed; OOM watch ends");
                    return;
                }
                on_oom();
            }
        })
        .map_err(Error::io("spawning the OOM watcher"))?;
    Ok(())
}

fn watch_v2(dir: PathBuf, on_oom: impl Fn() + Send + 'static) -> Result<()> {
    let events = dir.join("memory.events");
    let read = move || -> Option<u64> { oom_kills(&std::fs::read_to_string(&events).ok()?) };
    let mut last = read().ok_or_else(|| {
        Error::FailedPrecondition(format!("no memory.events in {}", dir.display()))
    })?;
    std::thread::Builder::new()
        .name("oom-v2".into())
        .spawn(move || {
            loop {
                std::thread::sleep(Duration::from_millis(200));
                let Some(n) = read() else { return };
                if n > last {
                    last = n;
                    on_oom();
                }
            }
        })
        .map_err(Error::io("spawning the OOM watcher"))?;
    Ok(())
}

fn oom_kills(memory_events: &str) -> Option<u64> {
    memory_events.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == "oom_kill").then(|| v.trim().parse().ok())?
    })
}

/// containerd's metrics for `mode`, from the `data` object of `runc events --stats`, as the
/// `Any` a Stats answer holds. (Read as JSON here: the runc crate's `Stats` type expects a
/// number where runc writes the `cpu.usage` object.)
pub fn metrics(mode: Mode, s: &Value) -> Result<Any> {
    let (type_url, value) = match mode {
        Mode::V1 => (
            "io.containerd.cgroups.v1.Metrics",
            metrics_v1(s).write_to_bytes(),
        ),
        Mode::V2 => (
            "io.containerd.cgroups.v2.Metrics",
            metrics_v2(s).write_to_bytes(),
        ),
    };
    let value = value.map_err(|source| Error::Protobuf {
        what: "metrics",
        source,
    })?;
    Ok(Any {
        type_url: type_url.into(),
        value,
        ..Default::default()
    })
}

fn num(s: &Value, pointer: &str) -> u64 {
    s.pointer(pointer).and_then(Value::as_u64).unwrap_or(0)
}

fn entry_v1(s: &Value, which: &str) -> MessageField<v1::MemoryEntry> {
    if s.pointer(&format!("/memory/{which}")).is_none() {
        return MessageField::none();
    }
    let n = |f: &str| num(s, &format!("/memory/{which}/{f}"));
    MessageField::some(v1::MemoryEntry {
        limit: n("limit"),
        usage: n("usage"),
        max: n("max"),
        failcnt: n("failcnt"),
        ..Default::default()
    })
}

/// runc's statistics as containerd's cgroup v1 metrics.
pub fn metrics_v1(s: &Value) -> v1::Metrics {
    let raw = |k: &str| num(s, &format!("/memory/raw/{k}"));
    let per_cpu = s
        .pointer("/cpu/usage/percpu")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    v1::Metrics {
        pids: MessageField::some(v1::PidsStat {
            current: num(s, "/pids/current"),
            limit: num(s, "/pids/limit"),
            ..Default::default()
        }),
        cpu: MessageField::some(v1::CPUStat {
            usage: MessageField::some(v1::CPUUsage {
                total: num(s, "/cpu/usage/total"),
                kernel: num(s, "/cpu/usage/kernel"),
                user: num(s, "/cpu/usage/user"),
                per_cpu,
                ..Default::default()
            }),
            throttling: MessageField::some(v1::Throttle {
                periods: num(s, "/cpu/throttling/periods"),
                throttled_periods: num(s, "/cpu/throttling/throttledPeriods"),
                throttled_time: num(s, "/cpu/throttling/throttledTime"),
                ..Default::default()
            }),
            ..Default::default()
        }),
        memory: MessageField::some(v1::MemoryStat {
            cache: num(s, "/memory/cache"),
            rss: raw("rss"),
            rss_huge: raw("rss_huge"),
            mapped_file: raw("mapped_file"),
            dirty: raw("dirty"),
            writeback: raw("writeback"),
            pg_fault: raw("pgfault"),
            pg_maj_fault: raw("pgmajfault"),
            inactive_anon: raw("inactive_anon"),
            active_anon: raw("active_anon"),
            inactive_file: raw("inactive_file"),
            active_file: raw("active_file"),
            unevictable: raw("unevictable"),
            hierarchical_memory_limit: raw("hierarchical_memory_limit"),
            total_cache: raw("total_cache"),
            total_rss: raw("total_rss"),
            usage: entry_v1(s, "usage"),
            swap: entry_v1(s, "swap"),
            kernel: entry_v1(s, "kernel"),
            kernel_tcp: entry_v1(s, "kernelTCP"),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// runc's statistics as containerd's cgroup v2 metrics.
pub fn metrics_v2(s: &Value) -> v2::Metrics {
    let raw = |k: &str| num(s, &format!("/memory/raw/{k}"));
    v2::Metrics {
        pids: MessageField::some(v2::PidsStat {
            current: num(s, "/pids/current"),
            limit: num(s, "/pids/limit"),
            ..Default::default()
        }),
        cpu: MessageField::some(v2::CPUStat {
            usage_usec: num(s, "/cpu/usage/total") / 1000,
            user_usec: num(s, "/cpu/usage/user") / 1000,
            system_usec: num(s, "/cpu/usage/kernel") / 1000,
            nr_periods: num(s, "/cpu/throttling/periods"),
            nr_throttled: num(s, "/cpu/throttling/throttledPeriods"),
            throttled_usec: num(s, "/cpu/throttling/throttledTime") / 1000,
            ..Default::default()
        }),
        memory: MessageField::some(v2::MemoryStat {
            anon: raw("anon"),
            file: raw("file"),
            kernel_stack: raw("kernel_stack"),
            slab: raw("slab"),
            sock: raw("sock"),
            shmem: raw("shmem"),
            file_mapped: raw("file_mapped"),
            pgfault: raw("pgfault"),
            pgmajfault: raw("pgmajfault"),
            usage: num(s, "/memory/usage/usage"),
            usage_limit: num(s, "/memory/usage/limit"),
            max_usage: num(s, "/memory/usage/max"),
            swap_usage: num(s, "/memory/swap/usage"),
            swap_limit: num(s, "/memory/swap/limit"),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_cgroup_of_a_process() {
        let v1 = "12:pids:/ns/c\n4:memory:/ns/c\n1:name=systemd:/ns/c\n0::/\n";
        assert_eq!(
            memory_cgroup_in(Mode::V1, v1),
            Some(PathBuf::from("/sys/fs/cgroup/memory/ns/c"))
        );
        let v2 = "0::/system.slice/x\n";
        assert_eq!(
            memory_cgroup_in(Mode::V2, v2),
            Some(PathBuf::from("/sys/fs/cgroup/system.slice/x"))
        );
        assert_eq!(memory_cgroup_in(Mode::V1, v2), None);
    }

    #[test]
    fn oom_kill_counter() {
        assert_eq!(
            oom_kills("low 0\nhigh 0\nmax 3\noom 2\noom_kill 1\n"),
            Some(1)
        );
        assert_eq!(oom_kills("low 0\n"), None);
    }

    #[test]
    fn metrics_carry_the_numbers() {
        let s = serde_json::json!({
            "cpu": {"usage": {"total": 5000, "percpu": [2500, 2500], "kernel": 1, "user": 2},
                    "throttling": {}},
            "memory": {"usage": {"limit": 33554432, "usage": 1024, "max": 2048, "failcnt": 3},
                       "raw": {"rss": 512}},
            "pids": {"current": 2},
            "blkio": {},
            "hugetlb": {}
        });
        let m = metrics_v1(&s);
        assert_eq!(m.memory.usage.limit, 33554432);
        assert_eq!(m.memory.usage.failcnt, 3);
        assert_eq!(m.memory.rss, 512);
        assert_eq!(m.pids.current, 2);
        assert_eq!(m.cpu.usage.per_cpu, [2500, 2500]);
        assert_eq!(m.cpu.usage.total, 5000);
        let any = metrics(Mode::V1, &s).unwrap();
        assert_eq!(any.type_url, "io.containerd.cgroups.v1.Metrics");
        let back = v1::Metrics::parse_from_bytes(&any.value).unwrap();
        assert_eq!(back, m);
        assert_eq!(metrics_v2(&s).memory.usage_limit, 33554432);
    }
}
