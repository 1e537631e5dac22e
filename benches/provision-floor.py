#!/usr/bin/env python3
"""The CPU floor of benches/provision on this machine: N copies of the work every node of a
function tree must do for the start-up set, whatever the code, run at once.

Each simulated node:
  0. receives the set's chunks, as zstd frames, over a TCP connection (loopback) from a
     sender (a tree node's parent),
  1. hashes every frame (the block digests it checks before using or forwarding a byte),
  2. decompresses them (`zstd -d`, one process, the frames piped in),
  3. hashes every decompressed chunk (the chunk digests),
  4. writes the content into a new file (the page cache its readers are served from),
  5. reads it back and hashes it (bench-provision's readers hash what they read).
No shaped links or bridge, no FUSE, no disk, no Arbor code: what is left when all of those
cost nothing. The pipe
from `zstd` adds one copy a real node does not make; everything else is less than a node does.

Prints the wall time of one node alone and of N at once; compare N's with the targets of
#11 (T(N) <= 1.3 x T(1) of the bench, whose T(1) includes the registry transfer).

Usage: benches/provision-floor.py [--nodes 1,8,16,32] [--cache DIR] [--json FILE]
(DIR: bench-provision's cache, target/bench-cache/provision by default, which the bench
fills; the start-up set is its startup-files.txt read from its layer tars.)
"""

import argparse
import concurrent.futures
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time

CHUNK = 1 << 20


def startup_bytes(cache):
    """The start-up set's file contents, in list order, from the image's layer tars."""
    want = [line.strip().lstrip("/") for line in open(os.path.join(cache, "startup-files.txt"))]
    wanted = set(want)
    found = {}
    links = {}
    tars = sorted(
        (f for f in os.listdir(cache) if f.startswith("layer-") and f.endswith(".tar")),
        key=lambda f: int(f[6:-4]),
    )
    for name in tars:
        with tarfile.open(os.path.join(cache, name)) as tar:
            for m in tar:
                path = m.name.lstrip("./")
                if m.issym():
                    links[path] = os.path.normpath(os.path.join(os.path.dirname(path), m.linkname))
                elif m.isfile():
                    found[path] = (name, m.name)
    out = []
    for path in want:
        for _ in range(8):
            if path in found or path not in links:
                break
            path = links[path].lstrip("/")
        if path in found:
            name, member = found[path]
            with tarfile.open(os.path.join(cache, name)) as tar:
                out.append(tar.extractfile(member).read())
    missing = len(wanted) - len(out)
    return out, missing


def frames(files, work):
    """Every file cut into chunks of at most 1 MiB, each compressed as its own zstd frame."""
    raw = os.path.join(work, "chunks")
    os.makedirs(raw)
    n = 0
    for data in files:
        for at in range(0, max(len(data), 1), CHUNK):
            with open(os.path.join(raw, f"{n:06d}"), "wb") as f:
                f.write(data[at : at + CHUNK])
            n += 1
    subprocess.run(["zstd", "-q", "-3", "--rm", "-r", raw], check=True)
    out = []
    for name in sorted(os.listdir(raw)):
        with open(os.path.join(raw, name), "rb") as f:
            out.append(f.read())
    shutil.rmtree(raw)
    return out


def node(args):
    """One node's floor work; returns its wall seconds. Fails unless the bytes it read back
    are the start-up set's (`expect`: their sha256), so a floor that skipped work is an error."""
    sent, sizes, out_path, expect = args
    start = time.monotonic()
    # Received over TCP (loopback: no bridge, no shaping), as from a parent.
    listener = socket.create_server(("127.0.0.1", 0))
    sender = threading.Thread(
        target=lambda: socket.create_connection(listener.getsockname()).sendall(sent)
    )
    sender.start()
    conn, _ = listener.accept()
    blob = bytearray(len(sent))
    view = memoryview(blob)
    got = 0
    while got < len(blob):
        n = conn.recv_into(view[got:])
        if n == 0:
            raise RuntimeError("short read from the sender")
        got += n
    sender.join()
    conn.close()
    listener.close()
    at = 0
    for s in sizes:
        hashlib.sha256(view[at : at + s]).digest()
        at += s
    z = subprocess.Popen(["zstd", "-q", "-d", "-c"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    feeder = threading.Thread(target=lambda: (z.stdin.write(blob), z.stdin.close()))
    feeder.start()
    with open(out_path, "wb") as out:
        while True:
            piece = z.stdout.read(CHUNK)
            if not piece:
                break
            hashlib.sha256(piece).digest()
            out.write(piece)
    feeder.join()
    if z.wait() != 0:
        raise RuntimeError(f"zstd -d failed with status {z.returncode}")
    with open(out_path, "rb") as f:
        h = hashlib.sha256()
        while True:
            piece = f.read(CHUNK)
            if not piece:
                break
            h.update(piece)
    if h.hexdigest() != expect:
        raise RuntimeError("the bytes read back are not the start-up set's")
    return time.monotonic() - start


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(root, "target"))
    p.add_argument("--nodes", default="1,8,16,32")
    p.add_argument("--cache", default=os.path.join(target, "bench-cache", "provision"))
    p.add_argument("--json")
    a = p.parse_args()
    if not os.path.exists(os.path.join(a.cache, "startup-files.txt")):
        sys.exit(f"{a.cache} has no start-up set: run benches/run-provision.sh (or bench-provision) once first")
    work = tempfile.mkdtemp(prefix="arbor-floor-")
    try:
        files, missing = startup_bytes(a.cache)
        fr = frames(files, work)
        blob = b"".join(fr)
        sizes = [len(f) for f in fr]
        raw = sum(len(f) for f in files)
        expect = hashlib.sha256(b"".join(files)).hexdigest()
        print(
            f"start-up set: {len(files)} files ({missing} not found), {raw / 1e6:.1f} MB in "
            f"{len(fr)} chunks, {len(blob) / 1e6:.1f} MB as zstd frames; {os.cpu_count()} CPUs"
        )
        rows = []
        print(f"{'N':>4} {'wall s':>8} {'slowest node s':>15}")
        for n in [int(x) for x in a.nodes.split(",")]:
            subprocess.run(["sync"], check=True)
            jobs = [(blob, sizes, os.path.join(work, f"out-{i}"), expect) for i in range(n)]
            t0 = time.monotonic()
            with concurrent.futures.ThreadPoolExecutor(max_workers=n) as ex:
                times = list(ex.map(node, jobs))
            wall = time.monotonic() - t0
            print(f"{n:>4} {wall:>8.2f} {max(times):>15.2f}")
            rows.append({"nodes": n, "wall_s": wall, "slowest_s": max(times)})
            for j in jobs:
                os.unlink(j[2])
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"startup_bytes": raw, "frame_bytes": len(blob), "rows": rows}, f, indent=1)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
