//! `bench-cold-start`: time from nothing on the node to a Python function's first HTTP answer,
//! through stock containerd (overlayfs) and through Arbor's snapshotter, against the floor.
//!
//! Two function images (`--image`, both by default, each measured on its own and reported in
//! its own JSON), built as `pyimage.rs` describes:
//!
//! * **debian**: everything from Debian packages (with bench-lazy-start's layers): `base`,
//!   `python`, `scientific` (numpy, scipy, pandas, OpenBLAS), `sklearn` (scikit-learn, joblib,
//!   threadpoolctl, libgomp) and `app`: `/app/server.py`, an `http.server` service that imports
//!   numpy, pandas and sklearn at start;
//! * **pypi**: the way a Python function image is usually built: the same Debian `base` and
//!   `python` layers (CPython 3.11), one `pypi` layer with numpy, scipy, scikit-learn, pandas
//!   and Flask and their dependencies installed by pip from pinned manylinux wheels
//!   ([`pyimage::SCIENTIFIC_WHEELS`]; OpenBLAS, gfortran and libgomp come bundled in the wheels' `*.libs`),
//!   byte-compiled by the image's interpreter, and `app`: `/app/server.py`, a Flask app served
//!   by werkzeug that imports numpy, pandas, scipy and sklearn at start.
//!
//! Both servers listen on `$PORT` (default 8080) and answer `GET /` with a JSON document
//! computed with the libraries (a linear regression fitted on a pandas frame; the pypi one
//! also with scipy.stats), which the bench checks. The image's `Cmd` runs it. Its start-up file
//! set (the prefetch list) is traced for real: the server module is imported chrooted into the
//! image under an audit hook and answers one request (see `pyimage.rs`).
//!
//! Each run starts a `docker-registry` in a private network namespace behind a veth pair
//! shaped with `tbf` to `--rate` in both directions (default 1 Gbit/s), pushes the image with
//! skopeo and converts it twice with `arbor convert` (plain, and with `--prefetch-list`). Then,
//! per repetition, each mode once (rotating the order), each with a fresh containerd (own
//! root), a fresh `arbord` (own root and chunk cache) and page caches dropped just before the
//! clock starts:
//!
//! * **overlayfs**: stock containerd: `ctr image pull` (download and unpack into the
//!   overlayfs snapshotter), then `ctr run -d --net-host`;
//! * **arbor**: `arbord` running (its start is not timed) and containerd configured with it as
//!   proxy snapshotter `arbor`: `arbor pull` of the plain converted image, then
//!   `ctr run -d --snapshotter arbor --net-host`; chunks are fetched when read;
//! * **arbor+prefetch**: the same with the prefetch-list image (its start-up chunks are
//!   fetched first, in the background, from the moment the layers are mounted).
//! * **arbor+learned**: the plain converted image again, on a fresh node, with the start-up
//!   set arbord learned from one start on *another* node: before the repetitions, a teaching
//!   node (its own arbord and containerd) runs the function once with `arbor run -d --net-host
//!   --wait-ready` (which reports the start to arbord), sends it one request, and `arbor trace
//!   push` attaches the learned set to the image in the registry; the timed `arbor pull`
//!   finds it there and arbord fetches it first. No hand-written list. The **arbor** mode
//!   pulls with `--no-startup-set`, so it stays on demand.
//!
//! A run's time is split into **pull** (start to the pull command's exit), **create** (the
//! `ctr run -d` that creates and starts the container) and **ready** (from there to the first
//! HTTP 200 on `GET /`, polled every 5 ms on 127.0.0.1:PORT). The **floor** is what no lazy
//! scheme can beat on this link: right after each overlayfs run, the same containerd starts the
//! function again from the pulled image with the page cache warm (create + ready), plus the
//! time the start-up set's bytes take on the link (bytes / rate), shown as its "pull"; of two
//! such warm starts the faster counts.
//!
//! Bytes: what each mode asked the registry for (the blob, manifest and config sizes for the
//! pull; `arbor_fetch_bytes_total{source="registry"}` from arbord's metrics endpoint for Arbor)
//! and what crossed the link (host veth counters, namespace → host), up to the first answer.
//!
//! Wrong answers, failing tools and arbord problems (a bad exit, mounts left behind) make the
//! exit status non-zero (1; 2 when the bench itself could not go on); slow results never do.

use arbor_benches::{chart, common, harness, pyimage};
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use arbor_testkit::Containerd;
use arbor_testkit::netns::LinkBytes;
use clap::{Parser, ValueEnum};
use serde_json::{Value, json};

use common::{MB, Spread, describe, machine_info, preflight, print_machine};
use common::{first_line, tail, target_dir};
use harness::{
    LinkArgs, Remote, Startup, TAG_ARBOR, TAG_INFERRED, TAG_PREFETCH, TAG_SOURCE, WorkDir,
    check_interrupted, drop_caches, fetch_image_manifest, http_get_all, layer_sizes, loadavg,
    run_checked, unmount_below, write_json,
};
use pyimage::{AppFile, CacheArgs, Image, LayerDef, PATH_ENV, PYTHON, Recipe, prepare_image};

/// Bump when the way an image or its start-up set is built changes.
const RECIPE_VERSION: u32 = 1;
const PYPI_RECIPE_VERSION: u32 = 1;
/// Arbor's snapshotter name in containerd's config.
const SNAPSHOTTER: &str = "arbor";
/// What the function's answer says when the libraries worked.
const ANSWER_OK: &str = "arbor-cold-start-ok";
/// Targets printed next to the results: overlayfs time / Arbor time to the first answer, and
/// Arbor time / floor.
const TARGET_SPEEDUP: f64 = 4.0;
const TARGET_FLOOR: f64 = 1.3;
/// Longest wait for arbord's socket, and for arbord to exit after SIGTERM.
const ARBORD_START_TIMEOUT: Duration = Duration::from_secs(60);
const ARBORD_EXIT_TIMEOUT: Duration = Duration::from_secs(30);
/// Warm starts per floor measurement; the fastest counts.
const WARM_STARTS: usize = 2;
/// How often the function is asked for its answer while it starts.
const POLL_INTERVAL: Duration = Duration::from_millis(5);

/// scikit-learn as Debian packages it (what `apt-get install python3-sklearn` adds to the
/// scientific layers, less procps, which joblib only runs to count CPUs on some systems).
const SKLEARN_LAYER: LayerDef = LayerDef {
    name: "sklearn",
    packages: &[
        "python3-sklearn",
        "python3-sklearn-lib",
        "python3-joblib",
        "python3-threadpoolctl",
        "libgomp1",
    ],
};

/// The function of the PyPI image: `/app/server.py`, with Flask.
const FLASK_SERVER_PY: &str = r#""""Arbor cold-start bench function (PyPI image): a Flask app that imports numpy, pandas,
scipy and scikit-learn at start and answers GET / with a small JSON document computed with them."""
import os
import sys

import numpy as np
import pandas as pd
import scipy
import scipy.stats
import sklearn
from flask import Flask, jsonify
from sklearn.linear_model import LinearRegression
from werkzeug.serving import make_server as werkzeug_server

app = Flask(__name__)


@app.get("/")
def index():
    frame = pd.DataFrame({"x": np.arange(12, dtype=float)})
    frame["y"] = 3.0 * frame["x"] + 2.0
    model = LinearRegression().fit(frame[["x"]].to_numpy(), frame["y"].to_numpy())
    fit = scipy.stats.linregress(frame["x"].to_numpy(), frame["y"].to_numpy())
    return jsonify(
        {
            "ok": "arbor-cold-start-ok",
            "slope": round(float(model.coef_[0]), 6),
            "intercept": round(float(model.intercept_), 6),
            "scipy_slope": round(float(fit.slope), 6),
            "y_sum": float(frame["y"].sum()),
            "versions": {
                "python": sys.version.split()[0],
                "numpy": np.__version__,
                "pandas": pd.__version__,
                "scipy": scipy.__version__,
                "sklearn": sklearn.__version__,
            },
        }
    )


def make_server(port):
    # What app.run() serves with, without its development banner: werkzeug's threaded server.
    return werkzeug_server("0.0.0.0", port, app, threaded=True)


if __name__ == "__main__":
    server = make_server(int(os.environ.get("PORT", "8080")))
    print("listening on port", server.server_address[1], flush=True)
    server.serve_forever()
"#;

/// The function of the Debian image: `/app/server.py`.
const SERVER_PY: &str = r#""""Arbor cold-start bench function: an HTTP service that imports numpy, pandas and
scikit-learn at start and answers GET / with a small JSON document computed with them."""
import json
import os
import socketserver
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pandas as pd
import sklearn
from sklearn.linear_model import LinearRegression


def answer():
    frame = pd.DataFrame({"x": np.arange(12, dtype=float)})
    frame["y"] = 3.0 * frame["x"] + 2.0
    model = LinearRegression().fit(frame[["x"]].to_numpy(), frame["y"].to_numpy())
    return {
        "ok": "arbor-cold-start-ok",
        "slope": round(float(model.coef_[0]), 6),
        "intercept": round(float(model.intercept_), 6),
        "y_sum": float(frame["y"].sum()),
        "versions": {
            "python": sys.version.split()[0],
            "numpy": np.__version__,
            "pandas": pd.__version__,
            "sklearn": sklearn.__version__,
        },
    }


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path != "/":
            self.send_error(404)
            return
        body = json.dumps(answer(), sort_keys=True).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class Server(HTTPServer):
    def server_bind(self):
        # HTTPServer.server_bind looks up the host's name (getfqdn): DNS a function may lack.
        socketserver.TCPServer.server_bind(self)
        self.server_name = "localhost"
        self.server_port = self.server_address[1]


def make_server(port):
    return Server(("0.0.0.0", port), Handler)


if __name__ == "__main__":
    server = make_server(int(os.environ.get("PORT", "8080")))
    print("listening on port", server.server_address[1], flush=True)
    server.serve_forever()
"#;

/// What the tracer runs to find the start-up set: the server's imports and one answer.
const TRACE_CODE: &str = r#"
import socket, sys, threading
sys.path.insert(0, "/app")
import server
srv = server.make_server(0)
t = threading.Thread(target=srv.handle_request)
t.start()
c = socket.create_connection(("127.0.0.1", srv.server_address[1]))
c.sendall(b"GET / HTTP/1.0\r\n\r\n")
resp = b""
while True:
    b = c.recv(65536)
    if not b:
        break
    resp += b
t.join()
srv.server_close()
if b" 200 " not in resp.split(b"\r\n", 1)[0] or b"arbor-cold-start-ok" not in resp:
    raise SystemExit("the server answered %r" % resp)
"#;

const AFTER_HELP: &str = "\
What is measured, per mode, from a node that has nothing (fresh containerd and arbord roots,
page caches dropped) to the function's first HTTP answer:
  pull    overlayfs: `ctr image pull` (download + unpack); arbor: `arbor pull` (through
          containerd, with Arbor's remote-snapshot labels: layers mounted lazily)
  create  `ctr run -d --net-host` (snapshot, container, task create and start)
  ready   from there to the first HTTP 200 on GET / (imports numpy, pandas, sklearn, and for
          pypi scipy and flask; serves)
  floor   the same function started again from the pulled image with the page cache warm
          (create + ready; the faster of two), plus the start-up set's bytes at the link
          rate (shown as pull)

Times are wall seconds, medians over --reps (min-max in brackets); phases in the chart are
those of the median run. MB are 10^6 bytes: \"registry MB\" is what the mode asked the
registry for, \"link MB\" what crossed the shaped link (namespace to host) until the answer.
\"vs overlayfs\" is overlayfs' median time over the row's (target: arbor >= 4x); \"vs floor\"
is the row's median time over the floor's (target: arbor <= 1.3x). Missing targets never
make the exit status non-zero; wrong answers and failing tools do. Each arbor run also
starts the function a second time on the same node (chunks fetched, pages cached), to tell
the lazy file system's own cost from fetching. The logs of every run (arbord, containerd, the
function's output, arbor pull's report) are copied next to the JSON, into <name>.logs/.

Images (--image, both by default, one after the other, each with its own registry, table,
JSON and chart):
  debian  built from Debian packages only: base, python, scientific (numpy, scipy, pandas,
          OpenBLAS), sklearn, app (an http.server function)
  pypi    built as Python function images usually are: the Debian base and python layers
          (CPython 3.11), one layer of pinned PyPI manylinux wheels (numpy, scipy,
          scikit-learn, pandas, flask and their dependencies) installed with pip and
          byte-compiled, app (a Flask function). The wheels are downloaded once with the
          host's `python3 -m pip download` into <cache>/wheels (PyPI access needed then, not
          after) and installed with `python3 -m pip install --no-index --target`.
Results go to <target dir>/bench-results/cold_start.json (debian) and cold_start_pypi.json
(pypi), each with its .png and .logs/; --json/--png name the file of a single image, or the
debian one when both run (pypi's gets a _pypi suffix).

Needs root (network namespaces, drop_caches, mounts, chroot, dpkg-deb keeping owners),
iproute2 (ip, tc with tbf), docker-registry, skopeo, containerd, ctr, runc, dpkg-deb,
apt-get, ldconfig, chroot, mount, cp, python3 with pip (pypi image), and release builds of
arbor, arbord and this bench (benches/run-cold-start.sh builds them).

Examples:
  benches/run-cold-start.sh                            (both images, 3 reps)
  benches/run-cold-start.sh --image pypi --reps 2
  benches/run-cold-start.sh --quick --rate 100mbit
  benches/run-cold-start.sh --modes overlayfs          (baseline and floor only)
  target/release/bench-cold-start --image debian --reps 5 --png /tmp/cold.png";

#[derive(Parser)]
#[command(
    name = "bench-cold-start",
    about = "Cold start to a function's first HTTP answer: containerd + overlayfs vs Arbor",
    long_about = "Starts a Python HTTP function (numpy, pandas, scikit-learn; an image of \
                  several hundred MB built from Debian packages, or from PyPI wheels) from a registry behind a shaped link, through \
                  stock containerd with overlayfs and through Arbor's snapshotter (on demand, \
                  and with a prefetch list), and compares the time to its first answer, split \
                  into pull, create and ready, with the floor: a warm start plus the start-up \
                  bytes at link speed. Prints a table, writes JSON and a PNG chart.",
    after_help = AFTER_HELP
)]
struct Args {
    /// One repetition (same as --reps 1).
    #[arg(long)]
    quick: bool,
    /// Repetitions; each runs every mode once, rotating the order.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    reps: u32,
    #[command(flatten)]
    link: LinkArgs,
    /// The modes to run, comma-separated (the floor comes with overlayfs).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "overlayfs,arbor,arbor+inferred,arbor+prefetch,arbor+learned"
    )]
    modes: Vec<Mode>,
    /// The function images to measure, comma-separated, one after the other (see below).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "debian,pypi")]
    image: Vec<ImageKind>,
    /// Where to write the JSON results [default: <target dir>/bench-results/cold_start.json,
    /// cold_start_pypi.json for the pypi image].
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
    /// Where to write the bar chart [default: <target dir>/bench-results/cold_start.png,
    /// cold_start_pypi.png for the pypi image].
    #[arg(long, value_name = "PATH")]
    png: Option<PathBuf>,
    #[command(flatten)]
    cache: CacheArgs,
    /// The arbor binary [default: <target dir>/release/arbor].
    #[arg(long, value_name = "PATH")]
    arbor: Option<PathBuf>,
    /// The arbord binary [default: <target dir>/release/arbord].
    #[arg(long, value_name = "PATH")]
    arbord: Option<PathBuf>,
    /// arbord's config file (TOML, see `arbord --print-default-config`) [default: none, so
    /// arbord's defaults: background prefetch of the prefetch section, then of the rest].
    #[arg(long, value_name = "FILE")]
    arbord_config: Option<PathBuf>,
    /// Extra argument for arbord (repeatable), e.g. --arbord-arg=--log-level=debug.
    #[arg(long = "arbord-arg", value_name = "ARG", allow_hyphen_values = true)]
    arbord_args: Vec<String>,
    /// Where runs put arbord's root and logs [default: $TMPDIR].
    #[arg(long, value_name = "DIR")]
    work_dir: Option<PathBuf>,
    /// Time limit of one tool run (push, convert, pull), in seconds.
    #[arg(long, default_value_t = 900)]
    timeout: u64,
    /// Longest wait for the function's first answer after `ctr run`, in seconds.
    #[arg(long, default_value_t = 300)]
    ready_timeout: u64,
}

/// The function images (see the module docs).
#[derive(Clone, Copy, PartialEq, Eq, Debug, ValueEnum)]
enum ImageKind {
    /// Everything from Debian packages.
    Debian,
    /// Debian base and CPython, PyPI wheels (numpy, scipy, scikit-learn, pandas, flask).
    Pypi,
}

impl ImageKind {
    fn key(self) -> &'static str {
        match self {
            ImageKind::Debian => "debian",
            ImageKind::Pypi => "pypi",
        }
    }

    /// The registry repository it is pushed to.
    fn repo(self) -> &'static str {
        match self {
            ImageKind::Debian => "bench/cold-start",
            ImageKind::Pypi => "bench/cold-start-pypi",
        }
    }

    fn server_py(self) -> &'static str {
        match self {
            ImageKind::Debian => SERVER_PY,
            ImageKind::Pypi => FLASK_SERVER_PY,
        }
    }

    /// The function and image, in words.
    fn describe(self) -> &'static str {
        match self {
            ImageKind::Debian => "http.server function (numpy, pandas, sklearn), Debian packages",
            ImageKind::Pypi => {
                "Flask function (numpy, pandas, scipy, sklearn), PyPI wheels on Debian python3.11"
            }
        }
    }

    /// The answer's numbers and their expected values (y = 3x + 2 over x = 0..11).
    fn expected(self) -> &'static [(&'static str, f64)] {
        match self {
            ImageKind::Debian => &[("slope", 3.0), ("intercept", 2.0), ("y_sum", 222.0)],
            ImageKind::Pypi => &[
                ("slope", 3.0),
                ("intercept", 2.0),
                ("scipy_slope", 3.0),
                ("y_sum", 222.0),
            ],
        }
    }

    fn recipe(self) -> Recipe<'static> {
        let (name, version, layers, wheels): (_, _, Vec<&'static LayerDef>, _) = match self {
            ImageKind::Debian => (
                "cold-start",
                RECIPE_VERSION,
                pyimage::SCIENTIFIC_LAYERS
                    .iter()
                    .chain([&SKLEARN_LAYER])
                    .collect(),
                None,
            ),
            ImageKind::Pypi => (
                "cold-start-pypi",
                PYPI_RECIPE_VERSION,
                pyimage::SCIENTIFIC_LAYERS
                    .iter()
                    .filter(|l| l.name == "base" || l.name == "python")
                    .collect(),
                Some(&pyimage::SCIENTIFIC_WHEELS),
            ),
        };
        Recipe {
            name,
            version,
            layers,
            wheels,
            app: vec![AppFile {
                path: "/app/server.py",
                mode: 0o644,
                data: self.server_py().as_bytes().to_vec(),
            }],
            startup_code: TRACE_CODE.into(),
            startup_label: "the server's start-up and first answer".into(),
            entrypoint: Vec::new(),
            cmd: vec![PYTHON.into(), "/app/server.py".into()],
            env: vec![PATH_ENV.into(), "PORT=8080".into()],
        }
    }

    /// Where its results go: `given` (or the default) for a single image or the debian one;
    /// with a `_pypi` suffix for the pypi one otherwise.
    fn output(self, given: &Option<PathBuf>, default: PathBuf, several: bool) -> PathBuf {
        match (self, given) {
            (ImageKind::Debian, Some(p)) => p.clone(),
            (ImageKind::Pypi, Some(p)) if !several => p.clone(),
            (ImageKind::Debian, None) => default,
            (ImageKind::Pypi, p) => {
                let base = p.clone().unwrap_or(default);
                let stem = base
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let name = match base.extension() {
                    Some(e) => format!("{stem}_pypi.{}", e.to_string_lossy()),
                    None => format!("{stem}_pypi"),
                };
                base.with_file_name(name)
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, ValueEnum)]
enum Mode {
    Overlayfs,
    Arbor,
    /// What `arbor convert` does by default: the start-up set inferred from the entrypoint
    /// (ELF dependencies, Python imports) as the prefetch list.
    #[value(name = "arbor+inferred")]
    ArborInferred,
    #[value(name = "arbor+prefetch")]
    ArborPrefetch,
    /// The plain conversion with the start-up set arbord learned from one earlier start on
    /// another node, found in the registry.
    #[value(name = "arbor+learned")]
    ArborLearned,
    /// Not a mode to run: the floor's rows.
    #[value(skip)]
    Floor,
}

impl Mode {
    fn key(self) -> &'static str {
        match self {
            Mode::Overlayfs => "overlayfs",
            Mode::Arbor => "arbor",
            Mode::ArborInferred => "arbor+inferred",
            Mode::ArborPrefetch => "arbor+prefetch",
            Mode::ArborLearned => "arbor+learned",
            Mode::Floor => "floor",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Mode::Overlayfs => "containerd overlayfs",
            Mode::Arbor => "arbor, on demand",
            Mode::ArborInferred => "arbor, inferred set",
            Mode::ArborPrefetch => "arbor, prefetch list",
            Mode::ArborLearned => "arbor, learned set",
            Mode::Floor => "floor",
        }
    }

    fn is_arbor(self) -> bool {
        matches!(
            self,
            Mode::Arbor | Mode::ArborInferred | Mode::ArborPrefetch | Mode::ArborLearned
        )
    }
}

fn main() {
    harness::main_with(run);
}

/// Ok(false): everything ran but a check failed.
fn run() -> Result<bool> {
    let args = Args::parse();
    let reps = if args.quick { 1 } else { args.reps };
    let mut modes: Vec<Mode> = Vec::new();
    for m in &args.modes {
        if !modes.contains(m) {
            modes.push(*m);
        }
    }
    let target = target_dir();
    let or_target = |p: &Option<PathBuf>, rel: &str| p.clone().unwrap_or_else(|| target.join(rel));
    let mut images: Vec<ImageKind> = Vec::new();
    for k in &args.image {
        if !images.contains(k) {
            images.push(*k);
        }
    }
    let cache_dir = or_target(&args.cache.dir, "bench-cache");
    let arbor = or_target(&args.arbor, "release/arbor");
    let arbord = or_target(&args.arbord, "release/arbord");

    let tools: Vec<&str> = harness::TOOLS
        .iter()
        .copied()
        .chain(["containerd", "ctr", "runc", "cp"])
        .collect();
    preflight(
        &arbor,
        &tools,
        "network namespaces, containerd, mounts, drop_caches, chroot",
    )?;
    if images.contains(&ImageKind::Pypi) {
        pyimage::host_pip()?;
    }
    if modes.iter().any(|m| m.is_arbor()) {
        ensure!(
            arbord.is_file(),
            "arbord binary {} not found (cargo build --release -p arbord, or --arbord PATH; \
             --modes overlayfs runs without it)",
            arbord.display()
        );
        let (st, _, err) = common::run_timed(
            Command::new(&arbor).args(["pull", "--help"]),
            Duration::from_secs(30),
        )?;
        ensure!(
            st.success(),
            "{} has no `pull` command ({}); build arbor-cli again, or run --modes overlayfs",
            arbor.display(),
            tail(&err, 3)
        );
    }

    let mut machine = machine_info(&arbor);
    machine["loadavg_at_start"] = json!(loadavg());
    machine["containerd_version"] = json!(first_line(Command::new("containerd").arg("--version")));
    machine["arbord"] = json!(arbord);
    print_machine(&machine);
    println!(
        "containerd: {}",
        machine["containerd_version"].as_str().unwrap_or("?")
    );

    let several = images.len() > 1;
    let mut done: Vec<(ImageKind, Image, Value, Vec<Mode>)> = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    for &kind in &images {
        check_interrupted()?;
        println!("\n== image {}: {}", kind.key(), kind.describe());
        let out = Outputs {
            json: kind.output(
                &args.json,
                target.join("bench-results/cold_start.json"),
                several,
            ),
            png: kind.output(
                &args.png,
                target.join("bench-results/cold_start.png"),
                several,
            ),
        };
        let b = Bench {
            args: &args,
            reps,
            modes: &modes,
            cache_dir: &cache_dir,
            arbor: &arbor,
            arbord: &arbord,
        };
        let (image, summary, rows, fails) = bench_image(&b, kind, machine.clone(), &out)?;
        failures.extend(fails.into_iter().map(|f| format!("{}: {f}", kind.key())));
        done.push((kind, image, summary, rows));
    }
    if several {
        println!("\n== all images");
        for (kind, image, summary, rows) in &done {
            println!();
            print_summary(summary, rows, *kind, image, args.link.rate, reps);
        }
    }
    if !failures.is_empty() {
        eprintln!("error: {} failures:", failures.len());
        for f in &failures {
            eprintln!("  {f}");
        }
        return Ok(false);
    }
    Ok(true)
}

/// What every image's measurement shares.
struct Bench<'a> {
    args: &'a Args,
    reps: u32,
    modes: &'a [Mode],
    cache_dir: &'a Path,
    arbor: &'a Path,
    arbord: &'a Path,
}

/// Where one image's results go.
struct Outputs {
    json: PathBuf,
    png: PathBuf,
}

/// Builds (or reuses) the image of `kind`, measures every mode on it, prints its table and
/// writes its JSON, logs and chart; returns the image, the summary, its rows and the failures.
fn bench_image(
    b: &Bench,
    kind: ImageKind,
    mut machine: Value,
    out: &Outputs,
) -> Result<(Image, Value, Vec<Mode>, Vec<String>)> {
    let (args, reps, modes) = (b.args, b.reps, b.modes);
    let timeout = Duration::from_secs(args.timeout);
    let recipe = kind.recipe();
    let repo = kind.repo();
    let image = prepare_image(b.cache_dir, &recipe, args.cache.rebuild)?;
    image.print();
    check_interrupted()?;

    let work_base = args.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    let work = WorkDir::create(&work_base, "arbor-cold-start-")?;
    let remote = Remote::start(args.link.rate, args.link.tbf_latency_ms)?;
    let push_s = remote.push(&image.layout, &image.tag, repo, TAG_SOURCE)?;
    let mut converts = Vec::new();
    if modes.contains(&Mode::Arbor) || modes.contains(&Mode::ArborLearned) {
        converts.push(remote.convert(
            b.arbor,
            repo,
            TAG_SOURCE,
            TAG_ARBOR,
            Startup::None,
            timeout,
        )?);
    }
    if modes.contains(&Mode::ArborInferred) {
        converts.push(remote.convert(
            b.arbor,
            repo,
            TAG_SOURCE,
            TAG_INFERRED,
            Startup::Inferred,
            timeout,
        )?);
    }
    if modes.contains(&Mode::ArborPrefetch) {
        let list = Startup::List(image.prefetch_list.as_path(), image.startup.len());
        converts.push(remote.convert(b.arbor, repo, TAG_SOURCE, TAG_PREFETCH, list, timeout)?);
    }
    let (source_manifest, manifest_bytes) = fetch_image_manifest(&remote.addr(), repo, TAG_SOURCE)?;
    let source_sizes = layer_sizes(&source_manifest)?;
    let pull_bytes = manifest_bytes
        + source_manifest["config"]["size"].as_u64().unwrap_or(0)
        + source_sizes.iter().sum::<u64>();

    let caches_dropped = drop_caches();
    if !caches_dropped {
        println!("warning: cannot write /proc/sys/vm/drop_caches; runs start with warm caches");
    }
    let transfer_s = image.startup_bytes() as f64 * 8.0 / args.link.rate as f64;
    let ctx = Ctx {
        arbor: b.arbor,
        arbord: b.arbord,
        kind,
        arbord_args: &args.arbord_args,
        arbord_config: args.arbord_config.as_deref(),
        remote: &remote,
        pull_bytes,
        transfer_s,
        timeout,
        ready_timeout: Duration::from_secs(args.ready_timeout),
    };

    if modes.contains(&Mode::ArborLearned) {
        teach(&ctx, &work.path().join("teach"))?;
    }
    let mut runs: Vec<RunResult> = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    println!();
    for rep in 1..=reps {
        let mut order = modes.to_vec();
        order.rotate_left((rep as usize - 1) % modes.len());
        for &mode in &order {
            check_interrupted()?;
            let dir = work.path().join(format!("r{rep}-{}", mode.key()));
            fs::create_dir_all(&dir)?;
            let result = match mode {
                Mode::Overlayfs => run_overlayfs(&ctx, &dir),
                _ => run_arbor(&ctx, mode, &dir).map(|r| vec![r]),
            };
            match result {
                Ok(rs) => {
                    for mut r in rs {
                        r.rep = rep;
                        r.print(reps);
                        failures.extend(
                            r.problems
                                .iter()
                                .map(|p| format!("rep {rep} {}: {p}", r.mode.key())),
                        );
                        runs.push(r);
                    }
                }
                Err(e) => {
                    check_interrupted()?;
                    println!("rep {rep}/{reps} {:<15} FAILED: {e:#}", mode.key());
                    failures.push(format!("rep {rep} {}: {e:#}", mode.key()));
                }
            }
        }
    }

    drop(remote);
    let logs = out.json.with_extension("logs");
    copy_logs(work.path(), &logs)?;
    drop(work);

    harness::print_load(&mut machine);
    let mut rows = modes.to_vec();
    if modes.contains(&Mode::Overlayfs) {
        rows.push(Mode::Floor);
    }
    let summary = summarize(&runs, &rows);
    println!();
    print_summary(&summary, &rows, kind, &image, args.link.rate, reps);

    let mut image_json = image.to_json(&source_sizes);
    image_json["recipe"] = json!(kind.key());
    image_json["name"] = json!(recipe.name);
    image_json["description"] = json!(kind.describe());
    let fields = json!({
        "image_recipe": kind.key(),
        "link": args.link.to_json(),
        "image": image_json,
        "function": {
            "command": recipe.cmd,
            "request": "GET /",
            "server_py": kind.server_py(),
        },
        "push_seconds": push_s,
        "converts": converts,
        "pull_registry_bytes": pull_bytes,
        "floor_transfer_seconds": transfer_s,
        "reps": reps,
        "modes": modes.iter().map(|m| m.key()).collect::<Vec<_>>(),
        "caches_dropped": caches_dropped,
        "arbord_args": args.arbord_args,
        "arbord_config": args.arbord_config.as_ref().map(|p| fs::read_to_string(p).unwrap_or_default()),
        "runs": runs.iter().map(RunResult::to_json).collect::<Vec<_>>(),
        "summary": summary,
        "failures": failures,
    });
    let report = harness::report("cold_start", machine, fields);
    write_json(&out.json, &report)?;
    println!("\nJSON results: {}", out.json.display());
    if !runs.is_empty() {
        let png = chart(&summary, &rows, kind, &image, args.link.rate, reps)
            .render()
            .png()?;
        if let Some(dir) = out.png.parent() {
            fs::create_dir_all(dir)?;
        }
        fs::write(&out.png, png).with_context(|| format!("writing {}", out.png.display()))?;
        println!("chart: {}", out.png.display());
    }
    Ok((image, summary, rows, failures))
}

/// Copies the files of each run directory below `work` (logs, outputs) to `logs/<run>/`,
/// replacing what was there.
fn copy_logs(work: &Path, logs: &Path) -> Result<()> {
    if logs.exists() {
        fs::remove_dir_all(logs).with_context(|| format!("removing {}", logs.display()))?;
    }
    for run in fs::read_dir(work)? {
        let run = run?;
        if !run.file_type()?.is_dir() {
            continue;
        }
        let dst = logs.join(run.file_name());
        fs::create_dir_all(&dst)?;
        for f in fs::read_dir(run.path())? {
            let f = f?;
            if f.file_type()?.is_file() {
                fs::copy(f.path(), dst.join(f.file_name()))?;
            }
        }
    }
    println!("logs: {}", logs.display());
    Ok(())
}

fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

// ---------------------------------------------------------------------------------------------
// Runs

struct Ctx<'a> {
    arbor: &'a Path,
    arbord: &'a Path,
    kind: ImageKind,
    arbord_args: &'a [String],
    arbord_config: Option<&'a Path>,
    remote: &'a Remote,
    /// Bytes a full pull asks the registry for (manifest, config, layers).
    pull_bytes: u64,
    /// The start-up set at the link rate, seconds.
    transfer_s: f64,
    timeout: Duration,
    ready_timeout: Duration,
}

struct RunResult {
    rep: u32,
    mode: Mode,
    pull_s: f64,
    create_s: f64,
    ready_s: f64,
    registry_bytes: Option<u64>,
    link: Option<LinkBytes>,
    /// (user, system) CPU seconds arbord used from the pull to the answer.
    arbord_cpu_s: Option<(f64, f64)>,
    metrics: Option<BTreeMap<String, f64>>,
    /// Arbor: (create, ready) seconds of a second start of the function right after the first
    /// (chunks fetched, page cache warm): what the lazy file system costs without fetching.
    restart_s: Option<(f64, f64)>,
    answer: Value,
    problems: Vec<String>,
}

impl RunResult {
    fn total_s(&self) -> f64 {
        self.pull_s + self.create_s + self.ready_s
    }

    fn print(&self, reps: u32) {
        let mb = |b: Option<u64>| b.map_or("-".into(), |b| format!("{:.1}", b as f64 / MB));
        println!(
            "rep {}/{reps} {:<15} {:>7.2} s (pull {:>6.2} s, create {:>5.2} s, ready {:>6.2} s)  \
             registry {:>6} MB  link {:>6} MB{}{}{}",
            self.rep,
            self.mode.key(),
            self.total_s(),
            self.pull_s,
            self.create_s,
            self.ready_s,
            mb(self.registry_bytes),
            mb(self.link.map(|l| l.to_host)),
            self.arbord_cpu_s
                .map(|(u, s)| format!("  arbord cpu {u:.2} s user {s:.2} s sys"))
                .unwrap_or_default(),
            self.restart_s
                .map(|(c, r)| format!("  restart: create {c:.2} s, ready {r:.2} s"))
                .unwrap_or_default(),
            if self.problems.is_empty() {
                String::new()
            } else {
                format!("  {} PROBLEMS", self.problems.len())
            }
        );
        for p in &self.problems {
            println!("    {p}");
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "rep": self.rep,
            "mode": self.mode.key(),
            "total_seconds": self.total_s(),
            "pull_seconds": self.pull_s,
            "create_seconds": self.create_s,
            "ready_seconds": self.ready_s,
            "registry_bytes": self.registry_bytes,
            "link_bytes_to_host": self.link.map(|l| l.to_host),
            "link_bytes_to_ns": self.link.map(|l| l.to_ns),
            "arbord_cpu_seconds": self.arbord_cpu_s.map(|(u, s)| json!({"user": u, "system": s})),
            "arbord_metrics": self.metrics.as_ref().map(|m| m.iter()
                .filter(|(k, _)| !k.contains("_bucket"))
                .map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>()),
            "restart_seconds": self.restart_s.map(|(c, r)| json!({"create": c, "ready": r})),
            "answer": self.answer,
            "problems": self.problems,
        })
    }
}

/// A started function: how long `ctr run -d` took, then until its first answer.
struct Started {
    create_s: f64,
    ready_s: f64,
    answer: Value,
    problems: Vec<String>,
}

impl Started {
    fn total_s(&self) -> f64 {
        self.create_s + self.ready_s
    }
}

/// `ctr run -d` of `reference` as container `id` with `$PORT` free, then polls `GET /` until
/// the first answer, which is checked.
fn start_function(
    ctx: &Ctx,
    ctd: &Containerd,
    snapshotter: &str,
    reference: &str,
    id: &str,
    dir: &Path,
) -> Result<Started> {
    let port = free_port()?;
    let log = dir.join(format!("{id}.log"));
    let t = Instant::now();
    ctd.ctr(&[
        "run",
        "-d",
        "--snapshotter",
        snapshotter,
        "--net-host",
        "--env",
        &format!("PORT={port}"),
        "--log-uri",
        &format!("file://{}", log.display()),
        reference,
        id,
    ])
    .with_context(|| format!("ctr run of {reference}"))?;
    let create_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let (status, body) = wait_answer(ctx, ctd, id, port, &log)?;
    let ready_s = t.elapsed().as_secs_f64();
    let (answer, problems) = check_answer(status, &body, ctx.kind.expected());
    Ok(Started {
        create_s,
        ready_s,
        answer,
        problems,
    })
}

/// Polls `http://127.0.0.1:PORT/` until something answers; checks every second that the task
/// still runs.
fn wait_answer(
    ctx: &Ctx,
    ctd: &Containerd,
    id: &str,
    port: u16,
    log: &Path,
) -> Result<(u16, Vec<u8>)> {
    let addr = format!("127.0.0.1:{port}");
    let start = Instant::now();
    let mut next_check = start + Duration::from_secs(1);
    loop {
        check_interrupted()?;
        if let Ok(answer) = http_get_all(&addr, "/", "application/json") {
            return Ok(answer);
        }
        let now = Instant::now();
        if now >= next_check {
            next_check = now + Duration::from_secs(1);
            let tasks = ctd.ctr(&["task", "ls"]).unwrap_or_default();
            let status = tasks
                .lines()
                .map(|l| l.split_whitespace().collect::<Vec<_>>())
                .find(|f| f.first() == Some(&id))
                .and_then(|f| f.get(2).map(|s| s.to_string()));
            if status.as_deref() != Some("RUNNING") {
                bail!(
                    "the function's task is {} before answering; its output:\n{}",
                    status.as_deref().unwrap_or("gone"),
                    arbor_testkit::log_tail(log, 30)
                );
            }
        }
        if now - start > ctx.ready_timeout {
            bail!(
                "no answer on {addr} within {:?}; the function's output:\n{}",
                ctx.ready_timeout,
                arbor_testkit::log_tail(log, 30)
            );
        }
        thread::sleep(POLL_INTERVAL);
    }
}

/// The answer as JSON, and what is wrong with it.
fn check_answer(status: u16, body: &[u8], expected: &[(&str, f64)]) -> (Value, Vec<String>) {
    let text = String::from_utf8_lossy(body);
    if status != 200 {
        return (
            json!(text),
            vec![format!("GET / answered HTTP {status}: {}", tail(&text, 5))],
        );
    }
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return (
            json!(text),
            vec![format!("GET / answered {text:?}, not JSON")],
        );
    };
    let mut problems = Vec::new();
    if v["ok"] != json!(ANSWER_OK) {
        problems.push(format!("answer without \"ok\": {ANSWER_OK:?}: {v}"));
    }
    for &(key, want) in expected {
        match v[key].as_f64() {
            Some(got) if (got - want).abs() < 1e-6 => {}
            got => problems.push(format!("answer's {key} is {got:?}, expected {want}")),
        }
    }
    (v, problems)
}

/// Kills and deletes the task of container `id`, then the container.
fn remove_container(ctd: &Containerd, id: &str) -> Result<()> {
    let _ = ctd.ctr(&["task", "kill", "-s", "SIGKILL", id]);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match ctd.ctr(&["task", "delete", id]) {
            Ok(_) => break,
            Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(100)),
            Err(e) => return Err(e.context(format!("deleting task {id}"))),
        }
    }
    ctd.ctr(&["container", "rm", id])
        .with_context(|| format!("removing container {id}"))?;
    Ok(())
}

/// Stock containerd, then the floor: the function again from the pulled image, caches warm.
fn run_overlayfs(ctx: &Ctx, dir: &Path) -> Result<Vec<RunResult>> {
    let ctd = Containerd::start().context("starting containerd")?;
    let reference = ctx.remote.reference(ctx.kind.repo(), TAG_SOURCE);
    drop_caches();
    let link0 = ctx.remote.ns.link_bytes()?;
    let t = Instant::now();
    ctd.pull(&reference, &["--plain-http"])
        .context("ctr image pull")?;
    let pull_s = t.elapsed().as_secs_f64();
    let cold = start_function(ctx, &ctd, "overlayfs", &reference, "fn-cold", dir)?;
    let link = ctx.remote.ns.link_bytes()? - link0;
    remove_container(&ctd, "fn-cold")?;
    fs::copy(ctd.log_path(), dir.join("containerd.log"))?;

    // The faster of two warm starts (other work on the machine only ever adds time).
    let mut warm: Option<Started> = None;
    for i in 0..WARM_STARTS {
        let id = format!("fn-warm-{i}");
        let w = start_function(ctx, &ctd, "overlayfs", &reference, &id, dir)?;
        remove_container(&ctd, &id)?;
        if warm.as_ref().is_none_or(|b| w.total_s() < b.total_s()) {
            warm = Some(w);
        }
    }
    let warm = warm.context("no warm start")?;
    drop(ctd);
    Ok(vec![
        RunResult {
            rep: 0,
            mode: Mode::Overlayfs,
            pull_s,
            create_s: cold.create_s,
            ready_s: cold.ready_s,
            registry_bytes: Some(ctx.pull_bytes),
            link: Some(link),
            arbord_cpu_s: None,
            metrics: None,
            restart_s: None,
            answer: cold.answer,
            problems: cold.problems,
        },
        RunResult {
            rep: 0,
            mode: Mode::Floor,
            pull_s: ctx.transfer_s,
            create_s: warm.create_s,
            ready_s: warm.ready_s,
            registry_bytes: None,
            link: None,
            arbord_cpu_s: None,
            metrics: None,
            restart_s: None,
            answer: warm.answer,
            problems: warm.problems,
        },
    ])
}

/// arbord as containerd's snapshotter: `arbor pull`, then `ctr run --snapshotter arbor`.
fn run_arbor(ctx: &Ctx, mode: Mode, dir: &Path) -> Result<RunResult> {
    let tag = match mode {
        Mode::ArborPrefetch => TAG_PREFETCH,
        Mode::ArborInferred => TAG_INFERRED,
        _ => TAG_ARBOR,
    };
    let reference = ctx.remote.reference(ctx.kind.repo(), tag);
    let arbord = Arbord::start(ctx, dir)?;
    let ctd = Containerd::start_with_config(&arbord.containerd_config())
        .context("starting containerd with arbord as proxy snapshotter")?;
    drop_caches();
    let link0 = ctx.remote.ns.link_bytes()?;
    let cpu0 = arbord.cpu_seconds();
    let t = Instant::now();
    let mut pull = Command::new(ctx.arbor);
    pull.arg("pull")
        .arg("--address")
        .arg(ctd.socket())
        .args(["--namespace", ctd.namespace()])
        .args(["--snapshotter", SNAPSHOTTER, "--plain-http", &reference]);
    if mode != Mode::ArborLearned {
        // On demand and with a prefetch list: not the set learned for arbor+learned.
        pull.arg("--no-startup-set");
    }
    let pulled = run_checked(&mut pull, ctx.timeout)
        .with_context(|| format!("arbord log:\n{}", arbord.log_tail(20)));
    let pulled = pulled.context("arbor pull")?;
    let pull_s = t.elapsed().as_secs_f64();
    let started = start_function(ctx, &ctd, SNAPSHOTTER, &reference, "fn-arbor", dir)
        .with_context(|| format!("arbord log:\n{}", arbord.log_tail(20)))?;
    let link = ctx.remote.ns.link_bytes()? - link0;
    let cpu = match (cpu0, arbord.cpu_seconds()) {
        (Some((u0, s0)), Some((u1, s1))) => Some((u1 - u0, s1 - s0)),
        _ => None,
    };
    let metrics = match harness::metrics(&arbord.metrics_addr) {
        Ok(m) => Some(m),
        Err(e) => {
            println!("  warning: no metrics from arbord: {e:#}");
            None
        }
    };
    let registry_bytes = metrics.as_ref().and_then(|m| {
        m.get("arbor_fetch_bytes_total{source=\"registry\"}")
            .map(|v| *v as u64)
    });
    remove_container(&ctd, "fn-arbor")?;
    // Diagnostic: the function again on the same node, its chunks fetched and pages cached.
    let again = start_function(ctx, &ctd, SNAPSHOTTER, &reference, "fn-arbor-again", dir)?;
    remove_container(&ctd, "fn-arbor-again")?;
    fs::copy(ctd.log_path(), dir.join("containerd.log"))?;
    drop(ctd);
    let mut problems = started.problems;
    problems.extend(again.problems.iter().map(|p| format!("restart: {p}")));
    problems.extend(arbord.stop());
    fs::write(dir.join("arbor-pull.out"), pulled)?;
    Ok(RunResult {
        rep: 0,
        mode,
        pull_s,
        create_s: started.create_s,
        ready_s: started.ready_s,
        registry_bytes,
        link: Some(link),
        arbord_cpu_s: cpu,
        metrics,
        restart_s: Some((again.create_s, again.ready_s)),
        answer: started.answer,
        problems,
    })
}

/// Puts the plain conversion's learned start-up set in the registry, as the first cold start
/// on some node would (not timed): a fresh arbord and containerd, `arbor run -d --net-host
/// --wait-ready` (which reports the start to arbord), one request (the first invocation,
/// within arbord's grace period), then `arbor trace push`. No hand-written list anywhere.
fn teach(ctx: &Ctx, dir: &Path) -> Result<()> {
    fs::create_dir_all(dir)?;
    let reference = ctx.remote.reference(ctx.kind.repo(), TAG_ARBOR);
    let arbord = Arbord::start(ctx, dir)?;
    let ctd = Containerd::start_with_config(&arbord.containerd_config())
        .context("starting containerd with arbord as proxy snapshotter")?;
    let arbor = |sub: &[&str]| {
        let mut c = Command::new(ctx.arbor);
        c.args(sub)
            .arg("--address")
            .arg(ctd.socket())
            .args(["--namespace", ctd.namespace()])
            .args(["--snapshotter", SNAPSHOTTER, "--plain-http"]);
        c
    };
    let port = free_port()?.to_string();
    let t = Instant::now();
    let mut run = arbor(&["run"]);
    run.args(["-d", "--net-host", "--wait-ready", "--port", &port])
        .args(["--env", &format!("PORT={port}"), "--name", "fn-teach"])
        .args(["--annotation", "arbor.io/function=bench", &reference]);
    let started = run_checked(&mut run, ctx.timeout)
        .with_context(|| format!("arbord log:\n{}", arbord.log_tail(20)))?;
    let ready_s = t.elapsed().as_secs_f64();
    let (status, body) = http_get_all(&format!("127.0.0.1:{port}"), "/", "application/json")
        .context("the first request to the teaching start")?;
    let (_, problems) = check_answer(status, &body, ctx.kind.expected());
    ensure!(
        problems.is_empty(),
        "teaching start: {}",
        problems.join("; ")
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let shown = loop {
        check_interrupted()?;
        let mut show = arbor(&["trace", "show"]);
        show.arg(&reference);
        if let Ok(out) = run_checked(&mut show, ctx.timeout)
            && out.contains("from arbord")
        {
            break out;
        }
        ensure!(
            Instant::now() < deadline,
            "arbord learned no start-up set within 30 s of the start ({started}); log:\n{}",
            arbord.log_tail(20)
        );
        thread::sleep(Duration::from_millis(200));
    };
    let mut push = arbor(&["trace", "push"]);
    push.arg(&reference);
    run_checked(&mut push, ctx.timeout).context("arbor trace push")?;
    println!(
        "learned from one start on another node (ready in {ready_s:.2} s) and pushed: {}",
        shown.lines().next().unwrap_or_default()
    );
    fs::write(dir.join("trace-show.out"), &shown)?;
    remove_container(&ctd, "fn-teach")?;
    drop(ctd);
    let problems = arbord.stop();
    ensure!(
        problems.is_empty(),
        "teaching node: {}",
        problems.join("; ")
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// arbord

/// A running arbord with its own root; stopped (SIGTERM) on drop if [`Arbord::stop`] was not
/// called.
struct Arbord {
    child: Option<Child>,
    root: PathBuf,
    socket: PathBuf,
    metrics_addr: String,
    log: PathBuf,
}

impl Arbord {
    /// `arbord --root DIR/root --address DIR/arbord.sock --metrics-addr 127.0.0.1:PORT
    /// --plain-http-host REGISTRY [--config FILE] ARGS...`; waits until its socket accepts
    /// connections.
    fn start(ctx: &Ctx, dir: &Path) -> Result<Arbord> {
        let root = dir.join("root");
        fs::create_dir_all(&root)?;
        let socket = dir.join("arbord.sock");
        let metrics_addr = format!("127.0.0.1:{}", free_port()?);
        let log = dir.join("arbord.log");
        let mut c = Command::new(ctx.arbord);
        c.arg("--root")
            .arg(&root)
            .arg("--address")
            .arg(&socket)
            .args(["--metrics-addr", &metrics_addr])
            .args(["--plain-http-host", &ctx.remote.addr()]);
        if let Some(cfg) = ctx.arbord_config {
            c.arg("--config").arg(cfg);
        }
        c.args(ctx.arbord_args).env("NO_COLOR", "1");
        let logf = File::create(&log)?;
        c.stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf);
        let desc = describe(&c);
        let child = c.spawn().with_context(|| format!("spawning {desc}"))?;
        let mut a = Arbord {
            child: Some(child),
            root,
            socket,
            metrics_addr,
            log,
        };
        let deadline = Instant::now() + ARBORD_START_TIMEOUT;
        loop {
            check_interrupted()?;
            if let Some(st) = a.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                a.child = None;
                bail!("`{desc}` exited at start ({st}):\n{}", a.log_tail(30));
            }
            if UnixStream::connect(&a.socket).is_ok() {
                return Ok(a);
            }
            ensure!(
                Instant::now() < deadline,
                "arbord's socket {} did not appear within {ARBORD_START_TIMEOUT:?}:\n{}",
                a.socket.display(),
                a.log_tail(30)
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// The `[proxy_plugins.arbor]` table for containerd's config.
    fn containerd_config(&self) -> String {
        format!(
            "[proxy_plugins.{SNAPSHOTTER}]\n  type = \"snapshot\"\n  address = \"{}\"\n  \
             [proxy_plugins.{SNAPSHOTTER}.exports]\n    root = \"{}\"\n",
            self.socket.display(),
            self.root.display()
        )
    }

    fn log_tail(&self, n: usize) -> String {
        arbor_testkit::log_tail(&self.log, n)
    }

    /// (user, system) CPU seconds used so far.
    fn cpu_seconds(&self) -> Option<(f64, f64)> {
        harness::cpu_seconds(self.child.as_ref()?.id())
    }

    /// SIGTERM, then checks that arbord exits cleanly and leaves no mounts; returns what was
    /// wrong.
    fn stop(mut self) -> Vec<String> {
        let mut problems = Vec::new();
        let Some(mut child) = self.child.take() else {
            return vec!["arbord was not running at the end of the run".into()];
        };
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + ARBORD_EXIT_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(st)) if st.success() => break,
                Ok(Some(st)) => {
                    problems.push(format!(
                        "arbord exited with {st} after SIGTERM:\n{}",
                        self.log_tail(20)
                    ));
                    break;
                }
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                _ => {
                    problems.push(format!(
                        "arbord did not exit within {ARBORD_EXIT_TIMEOUT:?} of SIGTERM:\n{}",
                        self.log_tail(20)
                    ));
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
            }
        }
        // Its lazy layers stay mounted for a successor (`fuse.handover`), their connections
        // kept by the fd holder; none comes: the holder goes, and the layers with it. Anything
        // else left mounted is arbord's fault.
        arbor_testkit::kill_fd_holders(&self.root);
        let left: Vec<PathBuf> = arbor_testkit::mounts_below(&self.root)
            .into_iter()
            .filter(|m| !m.ends_with("fs") || !m.starts_with(self.root.join("snapshots")))
            .collect();
        unmount_below(&self.root);
        if !left.is_empty() {
            problems.push(format!(
                "arbord left {} mounts below its root after SIGTERM: {}",
                left.len(),
                left.iter()
                    .take(5)
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        problems
    }
}

impl Drop for Arbord {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            harness::terminate(&mut c, Duration::from_secs(10));
        }
        arbor_testkit::kill_fd_holders(&self.root);
        unmount_below(&self.root);
    }
}

// ---------------------------------------------------------------------------------------------
// Summary, table and chart

fn summarize(runs: &[RunResult], rows: &[Mode]) -> Value {
    let mut per = serde_json::Map::new();
    for &m in rows {
        let sel: Vec<&RunResult> = runs.iter().filter(|r| r.mode == m).collect();
        if sel.is_empty() {
            continue;
        }
        let spread = |f: &dyn Fn(&RunResult) -> f64| {
            Spread::of(&sel.iter().map(|r| f(r)).collect::<Vec<_>>()).to_json()
        };
        let opt_spread = |f: &dyn Fn(&RunResult) -> Option<f64>| {
            let v: Vec<f64> = sel.iter().filter_map(|r| f(r)).collect();
            (!v.is_empty()).then(|| Spread::of(&v).to_json())
        };
        // The run whose total is the median (the lower middle one for even counts).
        let mut by_total = sel.clone();
        by_total.sort_by(|a, b| a.total_s().total_cmp(&b.total_s()));
        let mid = by_total[(by_total.len() - 1) / 2];
        per.insert(
            m.key().into(),
            json!({
                "runs": sel.len(),
                "total_seconds": spread(&|r| r.total_s()),
                "pull_seconds": spread(&|r| r.pull_s),
                "create_seconds": spread(&|r| r.create_s),
                "ready_seconds": spread(&|r| r.ready_s),
                "registry_bytes": opt_spread(&|r| r.registry_bytes.map(|b| b as f64)),
                "link_bytes": opt_spread(&|r| r.link.map(|l| l.to_host as f64)),
                "restart_create_seconds": opt_spread(&|r| r.restart_s.map(|(c, _)| c)),
                "restart_ready_seconds": opt_spread(&|r| r.restart_s.map(|(_, r)| r)),
                "median_run": {
                    "rep": mid.rep,
                    "total_seconds": mid.total_s(),
                    "pull_seconds": mid.pull_s,
                    "create_seconds": mid.create_s,
                    "ready_seconds": mid.ready_s,
                },
            }),
        );
    }
    let median = |m: Mode| {
        per.get(m.key())
            .and_then(|v| v.pointer("/total_seconds/median"))
            .and_then(Value::as_f64)
    };
    let mut ratios = serde_json::Map::new();
    let mut targets = Vec::new();
    for m in [
        Mode::Arbor,
        Mode::ArborInferred,
        Mode::ArborPrefetch,
        Mode::ArborLearned,
    ] {
        let Some(t) = median(m) else { continue };
        let k = m.key();
        // (ratio name, what it says, ratio, target, whether the ratio must be at least it)
        let checks = [
            median(Mode::Overlayfs).map(|o| {
                let what = format!("{k} faster than overlayfs to the first answer");
                (
                    format!("overlayfs_over_{k}"),
                    what,
                    o / t,
                    TARGET_SPEEDUP,
                    true,
                )
            }),
            median(Mode::Floor).map(|f| {
                let what = format!("{k} time over the floor");
                (format!("{k}_over_floor"), what, t / f, TARGET_FLOOR, false)
            }),
        ];
        for (name, what, r, target, at_least) in checks.into_iter().flatten() {
            let met = if at_least { r >= target } else { r <= target };
            let target = format!("{} {target}x", if at_least { ">=" } else { "<=" });
            ratios.insert(name, json!(r));
            targets.push(json!({"what": what, "ratio": r, "target": target, "met": met}));
        }
    }
    if let (Some(o), Some(f)) = (median(Mode::Overlayfs), median(Mode::Floor)) {
        ratios.insert("overlayfs_over_floor".into(), json!(o / f));
    }
    json!({"modes": per, "ratios": ratios, "targets": targets})
}

fn summary_f64(summary: &Value, m: Mode, pointer: &str) -> f64 {
    summary["modes"][m.key()]
        .pointer(pointer)
        .and_then(Value::as_f64)
        .unwrap_or(f64::NAN)
}

fn print_summary(
    summary: &Value,
    rows: &[Mode],
    kind: ImageKind,
    image: &Image,
    rate: u64,
    reps: u32,
) {
    println!(
        "image {}: cold start to the first HTTP answer of /app/server.py ({}); image {:.1} MB \
         uncompressed in {} layers; start-up set {} files, {:.1} MB; link {} Mbit/s; {reps} reps",
        kind.key(),
        kind.describe(),
        image.uncompressed_bytes as f64 / MB,
        image.layers.len(),
        image.startup.len(),
        image.startup_bytes() as f64 / MB,
        rate as f64 / 1e6,
    );
    println!(
        "{:<22} {:>8} {:>15} {:>7} {:>8} {:>7} {:>12} {:>8} {:>13} {:>9}",
        "mode",
        "total s",
        "(min-max)",
        "pull s",
        "create s",
        "ready s",
        "registry MB",
        "link MB",
        "vs overlayfs",
        "vs floor"
    );
    let overlay = summary_f64(summary, Mode::Overlayfs, "/total_seconds/median");
    let floor = summary_f64(summary, Mode::Floor, "/total_seconds/median");
    for &m in rows {
        if summary["modes"].get(m.key()).is_none() {
            println!("{:<22} (no successful run)", m.label());
            continue;
        }
        let f = |p: &str| summary_f64(summary, m, p);
        let mb = |p: &str| {
            let v = f(p);
            if v.is_nan() {
                "-".to_string()
            } else {
                format!("{:.1}", v / MB)
            }
        };
        let ratio = |v: f64| {
            if v.is_nan() {
                "-".to_string()
            } else {
                format!("{v:.2}x")
            }
        };
        let total = f("/total_seconds/median");
        println!(
            "{:<22} {:>8.2} {:>15} {:>7.2} {:>8.2} {:>7.2} {:>12} {:>8} {:>13} {:>9}",
            m.label(),
            total,
            format!(
                "({:.2}-{:.2})",
                f("/total_seconds/min"),
                f("/total_seconds/max")
            ),
            f("/pull_seconds/median"),
            f("/create_seconds/median"),
            f("/ready_seconds/median"),
            mb("/registry_bytes/median"),
            mb("/link_bytes/median"),
            ratio(overlay / total),
            ratio(total / floor),
        );
    }
    println!(
        "floor = warm start from the pulled image (create + ready) + the start-up set at the \
         link rate (pull column)"
    );
    for m in [
        Mode::Arbor,
        Mode::ArborInferred,
        Mode::ArborPrefetch,
        Mode::ArborLearned,
    ] {
        let c = summary_f64(summary, m, "/restart_create_seconds/median");
        if c.is_finite() {
            let floor_create = summary_f64(summary, Mode::Floor, "/create_seconds/median");
            println!(
                "{} started again on the same node (chunks fetched, page cache warm): create \
                 {c:.2} s, ready {:.2} s{}",
                m.key(),
                summary_f64(summary, m, "/restart_ready_seconds/median"),
                if floor_create.is_finite() {
                    format!(
                        " (floor's warm start: {floor_create:.2} s, {:.2} s)",
                        summary_f64(summary, Mode::Floor, "/ready_seconds/median")
                    )
                } else {
                    String::new()
                }
            );
        }
    }
    if let Some(ts) = summary["targets"].as_array() {
        for t in ts {
            println!(
                "target: {:<50} {:>6.2}x (target {}): {}",
                t["what"].as_str().unwrap_or("?"),
                t["ratio"].as_f64().unwrap_or(f64::NAN),
                t["target"].as_str().unwrap_or("?"),
                if t["met"].as_bool() == Some(true) {
                    "met"
                } else {
                    "NOT met"
                }
            );
        }
    }
}

fn chart(
    summary: &Value,
    rows: &[Mode],
    kind: ImageKind,
    image: &Image,
    rate: u64,
    reps: u32,
) -> chart::BarChart {
    let overlay = summary_f64(summary, Mode::Overlayfs, "/total_seconds/median");
    let floor = summary_f64(summary, Mode::Floor, "/total_seconds/median");
    let bars = rows
        .iter()
        .filter(|m| summary["modes"].get(m.key()).is_some())
        .map(|&m| {
            let f = |p: &str| summary_f64(summary, m, &format!("/median_run/{p}"));
            let total = f("total_seconds");
            let mut note = format!("{total:.2} s");
            if m.is_arbor() && overlay.is_finite() {
                note += &format!("  {:.1}x faster", overlay / total);
            }
            if m != Mode::Floor && floor.is_finite() {
                note += &format!("  {:.2}x floor", total / floor);
            }
            chart::Bar {
                label: m.key().into(),
                values: vec![f("pull_seconds"), f("create_seconds"), f("ready_seconds")],
                note,
            }
        })
        .collect();
    chart::BarChart {
        title: format!("Cold start to the first HTTP answer ({} image)", kind.key()),
        subtitle: vec![
            format!(
                "{}; image {:.0} MB, start-up set {:.0} MB",
                kind.describe(),
                image.uncompressed_bytes as f64 / MB,
                image.startup_bytes() as f64 / MB
            ),
            format!(
                "registry behind a {} Mbit/s link; median run of {reps}; floor = warm start + start-up bytes at link rate",
                rate as f64 / 1e6
            ),
            format!(
                "targets: arbor >= {TARGET_SPEEDUP}x faster than overlayfs, <= {TARGET_FLOOR}x the floor"
            ),
        ],
        segments: vec![
            ("pull".into(), [70, 110, 190]),
            ("create".into(), [240, 170, 60]),
            ("ready (start to first answer)".into(), [90, 170, 100]),
        ],
        groups: vec![chart::Group {
            heading: String::new(),
            bars,
        }],
        axis_label: "seconds".into(),
    }
}
