//! Running containers survive arbord going away: a container started with
//! `ctr run --snapshotter arbor` checksums the files of a lazily mounted layer in a loop (and
//! a reader on the host times reads of the same FUSE mount), page cache dropped all the while
//! so that every read reaches FUSE, while arbord is
//! (a) restarted with SIGTERM, (b) upgraded to a second binary, (c) killed with SIGKILL and
//! started again. The fd holder keeps every connection; the successor adopts them (and, after
//! the crash, asks the kernel to resend what the dead arbord had taken).
//!
//! Checked: no wrong byte ever; no failed read in (a) and (b); reads go on after each step;
//! the FUSE connections' `waiting` drains to 0. Printed: the longest read stall per step.
//! Needs root, containerd, runc, skopeo and docker-registry (`scripts/setup.sh`).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arbor_testkit::{
    Arbord, ArbordOptions, Containerd, ContainerdOptions, Entry, Registry, busybox_image,
    mounts_below, pseudo_random_bytes, skip_unless_root, skip_unless_tools, skopeo_push,
    write_oci_layout,
};
use sha2::{Digest, Sha256};

const TOOLS: &[&str] = &["docker-registry", "skopeo", "containerd", "ctr", "runc"];
const FILES: usize = 24;
const FILE_SIZE: usize = 192 << 10;

fn uptime() -> f64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

fn drop_caches() {
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

/// The loop the container runs: per file, uptime before and after, then `sha256sum`'s line
/// (or ERR).
const LOOP: &str = r#"while true; do for f in /data/*; do read a x < /proc/uptime; s=$(sha256sum $f 2>&1) || s="ERR $s"; read b x < /proc/uptime; echo "$a $b $s"; done; done"#;

struct Line {
    start: f64,
    end: f64,
    text: String,
}

/// One step's window on the uptime clock.
struct Step {
    name: &'static str,
    from: f64,
    to: f64,
}

/// Connections' `waiting` counters (`/sys/fs/fuse/connections/N/waiting`) of the FUSE mounts
/// below `root`.
fn waiting(root: &Path) -> Vec<(PathBuf, u64)> {
    mounts_below(root)
        .into_iter()
        .filter_map(|m| {
            let dev = std::fs::metadata(&m).ok()?.dev();
            let minor = libc::minor(dev);
            let w = std::fs::read_to_string(format!("/sys/fs/fuse/connections/{minor}/waiting"))
                .ok()?;
            Some((m, w.trim().parse().ok()?))
        })
        .collect()
}

#[test]
fn containers_keep_reading_through_restart_upgrade_and_crash() {
    let test = "containers_keep_reading_through_restart_upgrade_and_crash";
    if skip_unless_root(test) || skip_unless_tools(test, TOOLS) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start().unwrap();
    // The FUSE control filesystem, for the connections' `waiting` counters.
    let fusectl = Path::new("/sys/fs/fuse/connections");
    if !arbor_testkit::is_mounted(fusectl) {
        let st = Command::new("mount")
            .args(["-t", "fusectl", "fusectl"])
            .arg(fusectl)
            .status()
            .unwrap();
        assert!(st.success(), "mounting fusectl at {}", fusectl.display());
    }

    // A data layer of random files above busybox.
    let mut want = BTreeMap::new();
    let mut app = vec![Entry::dir("data")];
    for i in 0..FILES {
        let data = pseudo_random_bytes(1000 + i as u64, FILE_SIZE);
        let path = format!("data/f{i:02}");
        want.insert(format!("/{path}"), hex::encode(Sha256::digest(&data)));
        app.push(Entry::file(path, data));
    }
    let spec = busybox_image(app, &["sh"]);
    let layout = tmp.path().join("layout");
    write_oci_layout(&layout, "v1", &spec).unwrap();
    let src = reg.reference("handover/app:v1");
    skopeo_push(&layout, "v1", &src, None).unwrap();
    let dst = reg.reference("handover/app:v1-arbor");
    let arbor = Path::new(env!("CARGO_BIN_EXE_arbord")).with_file_name("arbor");
    arbor_testkit::ok(
        Command::new(&arbor)
            .args(["convert", "--plain-http", &src, &dst])
            .output()
            .unwrap(),
        "arbor convert",
    );

    let mut arbord = Arbord::start(&ArbordOptions {
        bin: PathBuf::from(env!("CARGO_BIN_EXE_arbord")),
        ..Default::default()
    })
    .unwrap();
    let ctd = Containerd::start_with(&ContainerdOptions {
        extra_config: arbord.containerd_config(),
        cri: false,
    })
    .unwrap();
    arbor_testkit::ok(
        Command::new(&arbor)
            .args(["pull", "--plain-http", "--address"])
            .arg(ctd.socket())
            .args(["--namespace", ctd.namespace(), &dst])
            .env("ARBORD_ROOT", arbord.root())
            .output()
            .unwrap(),
        "arbor pull",
    );
    let layers = mounts_below(arbord.root());
    assert_eq!(layers.len(), 2, "two lazily mounted layers: {layers:?}");
    let data_dir = layers
        .iter()
        .find(|m| m.join("data").is_dir())
        .expect("the data layer's mount")
        .join("data");

    // The container: checksums forever, its lines collected with the host's clock.
    let mut ctr = ctd
        .arbor_run_command(&dst, "reader", &["sh", "-c", LOOP])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = Arc::new(Mutex::new(Vec::<Line>::new()));
    let out = ctr.stdout.take().unwrap();
    let collector = {
        let lines = Arc::clone(&lines);
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let mut it = l.splitn(3, ' ');
                let (Some(a), Some(b), Some(rest)) = (it.next(), it.next(), it.next()) else {
                    continue;
                };
                if let (Ok(start), Ok(end)) = (a.parse(), b.parse()) {
                    lines.lock().unwrap().push(Line {
                        start,
                        end,
                        text: rest.to_string(),
                    });
                }
            }
        })
    };
    // The host reader (same FUSE connection, precise clock) and the cache dropper.
    let stop = Arc::new(AtomicBool::new(false));
    let host_reads = Arc::new(Mutex::new(Vec::<(f64, f64, Result<String, String>)>::new()));
    let reader = {
        let (stop, host_reads, data_dir) =
            (Arc::clone(&stop), Arc::clone(&host_reads), data_dir.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                for i in 0..FILES {
                    let p = data_dir.join(format!("f{i:02}"));
                    let t0 = uptime();
                    let started = Instant::now();
                    let r = std::fs::File::open(&p).and_then(|mut f| {
                        let mut v = Vec::new();
                        f.read_to_end(&mut v)?;
                        Ok(v)
                    });
                    let t1 = t0 + started.elapsed().as_secs_f64();
                    host_reads.lock().unwrap().push((
                        t0,
                        t1,
                        r.map(|v| hex::encode(Sha256::digest(&v)))
                            .map_err(|e| e.to_string()),
                    ));
                }
            }
        })
    };
    let dropper = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                drop_caches();
                std::thread::sleep(Duration::from_millis(150));
            }
        })
    };
    let wait_progress = |after: f64, what: &str| {
        let t = Instant::now();
        loop {
            let n = lines
                .lock()
                .unwrap()
                .iter()
                .filter(|l| l.start > after)
                .count();
            if n >= FILES {
                return;
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "the container stopped reading after {what}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };

    let mut steps = Vec::new();
    wait_progress(0.0, "start");
    std::thread::sleep(Duration::from_secs(2));
    // (a) SIGTERM, start again.
    let from = uptime();
    arbord.restart().expect("restart after SIGTERM");
    wait_progress(uptime(), "the restart");
    std::thread::sleep(Duration::from_secs(2));
    steps.push(Step {
        name: "(a) SIGTERM + restart",
        from,
        to: uptime(),
    });
    // (b) a second binary takes over.
    let v2 = tmp.path().join("arbord-v2");
    std::fs::copy(env!("CARGO_BIN_EXE_arbord"), &v2).unwrap();
    let from = uptime();
    arbord
        .restart_with(&v2)
        .expect("upgrade to a second binary");
    wait_progress(uptime(), "the upgrade");
    std::thread::sleep(Duration::from_secs(2));
    steps.push(Step {
        name: "(b) upgrade to a second binary",
        from,
        to: uptime(),
    });
    // (c) SIGKILL, started again as systemd would (Restart=always).
    let from = uptime();
    arbord.kill().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    arbord.restart().expect("restart after SIGKILL");
    wait_progress(uptime(), "the crash");
    std::thread::sleep(Duration::from_secs(2));
    steps.push(Step {
        name: "(c) SIGKILL + restart",
        from,
        to: uptime(),
    });

    stop.store(true, Ordering::Relaxed);
    reader.join().unwrap();
    dropper.join().unwrap();
    let _ = ctd.ctr(&["task", "kill", "-s", "KILL", "reader"]);
    let _ = ctr.wait();
    collector.join().unwrap();
    let mut err = String::new();
    if let Some(mut e) = ctr.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }

    // Every connection drained.
    let t = Instant::now();
    loop {
        let w = waiting(arbord.root());
        assert!(
            !w.is_empty(),
            "no FUSE connection found below arbord's root"
        );
        if w.iter().all(|(_, n)| *n == 0) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "requests still waiting on FUSE connections: {w:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(arbord.fd_holders().len(), 1, "one fd holder throughout");
    // It holds the layers' connections, its stdio, listener and arbord's connection: no fd
    // inherited from arbord (or from this test, which started arbord).
    let holder = arbord.fd_holders()[0];
    let fds: Vec<String> = std::fs::read_dir(format!("/proc/{holder}/fd"))
        .unwrap()
        .flatten()
        .map(|e| {
            std::fs::read_link(e.path())
                .map(|t| t.display().to_string())
                .unwrap_or_default()
        })
        .collect();
    let others: Vec<&String> = fds.iter().filter(|t| *t != "/dev/fuse").collect();
    assert!(
        others.len() <= 5,
        "the fd holder keeps more than its own: {others:?}"
    );

    let lines = lines.lock().unwrap();
    let host_reads = host_reads.lock().unwrap();
    assert!(
        lines.len() > FILES * 4,
        "too few reads: {}; stderr: {err}",
        lines.len()
    );
    let mut wrong = Vec::new();
    for l in lines.iter() {
        if l.text.starts_with("ERR") {
            continue;
        }
        let mut it = l.text.split_whitespace();
        let (Some(sum), Some(path)) = (it.next(), it.next()) else {
            wrong.push(l.text.clone());
            continue;
        };
        if want.get(path).map(String::as_str) != Some(sum) {
            wrong.push(l.text.clone());
        }
    }
    for (_, _, r) in host_reads.iter() {
        if let Ok(sum) = r
            && !want.values().any(|w| w == sum)
        {
            wrong.push(format!("host read {sum}"));
        }
    }
    assert!(wrong.is_empty(), "wrong bytes read: {wrong:?}");

    println!(
        "step                            | container reads | failed | longest stall (container) | longest read (host)"
    );
    for s in &steps {
        let mine: Vec<&Line> = lines
            .iter()
            .filter(|l| l.start >= s.from && l.start < s.to)
            .collect();
        let failed = mine.iter().filter(|l| l.text.starts_with("ERR")).count();
        // The longest gap between two reads finishing (covers lookups between them) or one
        // read's own time.
        let mut stall: f64 = 0.0;
        let all: Vec<&Line> = lines.iter().collect();
        for w in all.windows(2) {
            if w[1].end >= s.from && w[1].end < s.to {
                stall = stall.max(w[1].end - w[0].end);
            }
        }
        let host: Vec<_> = host_reads
            .iter()
            .filter(|r| r.0 >= s.from && r.0 < s.to)
            .collect();
        let host_failed = host.iter().filter(|r| r.2.is_err()).count();
        let host_longest = host.iter().map(|r| r.1 - r.0).fold(0.0, f64::max);
        println!(
            "{:<31} | {:>15} | {:>6} | {:>23.2} s | {:>17.3} s",
            s.name,
            mine.len(),
            failed + host_failed,
            stall,
            host_longest
        );
        if !s.name.starts_with("(c)") {
            let errs: Vec<_> = mine
                .iter()
                .filter(|l| l.text.starts_with("ERR"))
                .map(|l| &l.text)
                .collect();
            assert!(errs.is_empty(), "{}: failed reads {errs:?}", s.name);
            let herrs: Vec<_> = host.iter().filter_map(|r| r.2.as_ref().err()).collect();
            assert!(herrs.is_empty(), "{}: failed host reads {herrs:?}", s.name);
        }
        assert!(!mine.is_empty(), "{}: the container read nothing", s.name);
    }
    println!("arbord log tail:\n{}", arbord.log_tail(15));
}
