//! The Peer data path over real TCP on 127.0.0.1: a [`PeerService`] over in-memory blobs
//! served with tonic, read through [`PeerSource`]; hand-written Peer servers that lie or stall
//! check the client's length checks and stall deadline.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arbor_fetch::source::{BlobSource, ReadFuture, SourceError, SourceErrorKind};
use arbor_peer::server::{PeerService, PeerServiceOptions, Provider};
use arbor_peer::source::{DEFAULT_STALL, PeerSource};
use arbor_proto::arbor::peer_client::PeerClient;
use arbor_proto::arbor::peer_server::{Peer, PeerServer};
use arbor_proto::arbor::{RangePiece, ReadRangeRequest};
use bytes::Bytes;
use tokio::net::TcpListener;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Code, Request, Response, Status};

const MIB: u64 = 1 << 20;
const FUNCTION: &str = "fn-hello";
const DIGEST: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

/// Deterministic pseudo-random bytes (xorshift64).
fn random_bytes(len: usize, seed: u64) -> Bytes {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    Bytes::from(v)
}

/// How a test source behaves.
#[derive(Clone, Copy)]
enum Behavior {
    /// Answers at once.
    Normal,
    /// Never answers.
    Never,
    /// Answers after a delay.
    Delay(Duration),
    /// Reads that start at or past this offset fail with this kind.
    FailFrom(u64, SourceErrorKind),
    /// Answers one byte short.
    Short,
}

struct MemSource {
    blob: Bytes,
    behavior: Behavior,
    reads: AtomicU64,
}

impl MemSource {
    fn new(blob: Bytes, behavior: Behavior) -> Arc<MemSource> {
        Arc::new(MemSource {
            blob,
            behavior,
            reads: AtomicU64::new(0),
        })
    }
}

impl BlobSource for MemSource {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn read_range<'a>(&'a self, _digest: &'a str, offset: u64, len: u64) -> ReadFuture<'a> {
        Box::pin(async move {
            self.reads.fetch_add(1, Ordering::Relaxed);
            match self.behavior {
                Behavior::Normal | Behavior::Short => {}
                Behavior::Never => std::future::pending::<()>().await,
                Behavior::Delay(d) => tokio::time::sleep(d).await,
                Behavior::FailFrom(at, kind) if offset >= at => {
                    return Err(SourceError::new(kind, "memory", "failing on purpose"));
                }
                Behavior::FailFrom(..) => {}
            }
            let end = (offset + len) as usize;
            let end = match self.behavior {
                Behavior::Short => end - 1,
                _ => end,
            };
            Ok(self.blob.slice(offset as usize..end))
        })
    }
}

/// Serves blobs keyed by (function, digest).
#[derive(Default)]
struct MemProvider {
    blobs: HashMap<(String, String), Arc<MemSource>>,
}

impl MemProvider {
    fn with(function: &str, digest: &str, src: Arc<MemSource>) -> Arc<MemProvider> {
        let mut p = MemProvider::default();
        p.blobs
            .insert((function.to_string(), digest.to_string()), src);
        Arc::new(p)
    }
}

impl Provider for MemProvider {
    fn source(&self, function: &str, digest: &str) -> Option<(Arc<dyn BlobSource>, u64)> {
        let s = self
            .blobs
            .get(&(function.to_string(), digest.to_string()))?;
        let size = s.blob.len() as u64;
        Some((Arc::clone(s) as Arc<dyn BlobSource>, size))
    }
}

/// Serves `server` on an ephemeral port of 127.0.0.1.
async fn serve<T: Peer>(server: PeerServer<T>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(server)
            .serve_with_incoming(TcpListenerStream::new(l)),
    );
    addr
}

async fn serve_blob(
    src: Arc<MemSource>,
    opts: PeerServiceOptions,
) -> (SocketAddr, PeerService<MemProvider>) {
    let svc = PeerService::new(MemProvider::with(FUNCTION, DIGEST, src), opts);
    let addr = serve(svc.clone().into_server()).await;
    (addr, svc)
}

fn source(addr: SocketAddr, node: &str, stall: Duration) -> PeerSource {
    PeerSource::new(&addr.to_string(), FUNCTION, node, stall).unwrap()
}

async fn raw_code(addr: SocketAddr, req: ReadRangeRequest) -> Code {
    let mut c = PeerClient::connect(format!("http://{addr}")).await.unwrap();
    match c.read_range(req).await {
        Err(s) => s.code(),
        Ok(r) => {
            let mut s = r.into_inner();
            loop {
                match s.message().await {
                    Ok(Some(_)) => continue,
                    Ok(None) => return Code::Ok,
                    Err(st) => return st.code(),
                }
            }
        }
    }
}

fn req(digest: &str, offset: u64, length: u64) -> ReadRangeRequest {
    ReadRangeRequest {
        function: FUNCTION.to_string(),
        digest: digest.to_string(),
        offset,
        length,
        node: "child".to_string(),
    }
}

#[tokio::test]
async fn ranges_come_back_byte_identical() {
    let blob = random_bytes(3 * MIB as usize + 12_345, 7);
    let size = blob.len() as u64;
    let (addr, svc) = serve_blob(
        MemSource::new(blob.clone(), Behavior::Normal),
        PeerServiceOptions::default(),
    )
    .await;
    // Unaligned steps too.
    let (addr_odd, _) = serve_blob(
        MemSource::new(blob.clone(), Behavior::Normal),
        PeerServiceOptions {
            step: 100_001,
            ..Default::default()
        },
    )
    .await;
    let ranges = [
        (0, 1),
        (size - 1, 1),
        (0, size),
        (12_345, 700_001),
        ((256 << 10) - 1, (256 << 10) + 2),
        (MIB, 512 << 10),
        (3, 4096),
        (size - 300_000, 300_000),
    ];
    for a in [addr, addr_odd] {
        let src = source(a, "child-1", DEFAULT_STALL);
        assert_eq!(src.kind(), "peer");
        assert_eq!(src.addr(), a.to_string());
        for &(off, len) in &ranges {
            let got = src.read_range(DIGEST, off, len).await.unwrap();
            assert_eq!(got.len() as u64, len, "{off}+{len}");
            assert!(
                got == blob.slice(off as usize..(off + len) as usize),
                "{off}+{len} differs"
            );
        }
    }
    // Concurrent reads over one source share its connection.
    let src = Arc::new(source(addr, "child-2", DEFAULT_STALL));
    let mut set = tokio::task::JoinSet::new();
    for i in 0..16u64 {
        let src = Arc::clone(&src);
        let blob = blob.clone();
        set.spawn(async move {
            let off = i * 190_001;
            let len = 150_000 + i * 1000;
            let got = src.read_range(DIGEST, off, len).await.unwrap();
            assert!(got == blob.slice(off as usize..(off + len) as usize));
        });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }
    let st = svc.stats();
    let want: u64 = ranges.iter().map(|r| r.1).sum::<u64>()
        + (0..16u64).map(|i| 150_000 + i * 1000).sum::<u64>();
    assert_eq!(st.bytes_sent, want);
    assert_eq!(st.completed, ranges.len() as u64 + 16);
    assert_eq!(st.failed + st.refused + st.not_found + st.busy, 0);
}

#[tokio::test]
async fn unknown_blobs_lack_and_bad_ranges_are_refused() {
    let blob = random_bytes(MIB as usize, 9);
    let size = blob.len() as u64;
    let (addr, svc) = serve_blob(
        MemSource::new(blob, Behavior::Normal),
        PeerServiceOptions::default(),
    )
    .await;
    let src = source(addr, "child", DEFAULT_STALL);
    let other = "sha256:2222222222222222222222222222222222222222222222222222222222222222";
    let e = src.read_range(other, 0, 10).await.unwrap_err();
    assert_eq!(e.kind, SourceErrorKind::Lacks, "{e}");
    assert!(e.source_name.contains(&addr.to_string()), "{e}");
    // Another function's tree is another namespace.
    let foreign = PeerSource::new(&addr.to_string(), "fn-other", "child", DEFAULT_STALL).unwrap();
    let e = foreign.read_range(DIGEST, 0, 10).await.unwrap_err();
    assert_eq!(e.kind, SourceErrorKind::Lacks, "{e}");
    for (off, len) in [
        (size, 1),
        (size - 10, 11),
        (0, size + 1),
        (u64::MAX, 2),
        (10, u64::MAX),
        (0, 0),
        (0, 64 * MIB + 1),
    ] {
        let e = src.read_range(DIGEST, off, len).await.unwrap_err();
        assert_eq!(e.kind, SourceErrorKind::Refused, "{off}+{len}: {e}");
    }
    let e = src.read_range("", 0, 1).await.unwrap_err();
    assert_eq!(e.kind, SourceErrorKind::Refused, "{e}");
    // The wire codes, as the contract names them.
    assert_eq!(raw_code(addr, req(other, 0, 1)).await, Code::NotFound);
    assert_eq!(
        raw_code(addr, req(DIGEST, size, 1)).await,
        Code::InvalidArgument
    );
    assert_eq!(
        raw_code(addr, req(DIGEST, 0, 0)).await,
        Code::InvalidArgument
    );
    assert_eq!(
        raw_code(addr, req(DIGEST, 0, 64 * MIB + 1)).await,
        Code::InvalidArgument
    );
    assert_eq!(raw_code(addr, req("", 0, 1)).await, Code::InvalidArgument);
    assert_eq!(raw_code(addr, req(DIGEST, 0, size)).await, Code::Ok);
    let st = svc.stats();
    assert_eq!(st.not_found, 3);
    assert_eq!(st.refused, 12);
    assert_eq!(st.requests, 16);
    assert_eq!(st.bytes_sent, size);
}

#[tokio::test]
async fn a_source_that_never_answers_times_out() {
    let blob = random_bytes(MIB as usize, 11);
    // The parent gives up on its own source after `max_wait` and says so.
    let (addr, svc) = serve_blob(
        MemSource::new(blob, Behavior::Never),
        PeerServiceOptions {
            max_wait: Duration::from_millis(800),
            ..Default::default()
        },
    )
    .await;
    let src = source(addr, "child", Duration::from_secs(1));
    let t = Instant::now();
    let e = src.read_range(DIGEST, 0, 1000).await.unwrap_err();
    assert_eq!(e.kind, SourceErrorKind::Timeout, "{e}");
    assert!(e.message.contains("DeadlineExceeded"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert_eq!(svc.stats().failed, 1);
}

#[tokio::test]
async fn a_slow_source_succeeds_because_keepalives_flow() {
    let blob = random_bytes(MIB as usize, 13);
    let (addr, _svc) = serve_blob(
        MemSource::new(blob.clone(), Behavior::Delay(Duration::from_secs(2))),
        PeerServiceOptions::default(),
    )
    .await;
    let src = source(addr, "child", Duration::from_secs(1));
    let t = Instant::now();
    let got = src.read_range(DIGEST, 1000, 300_000).await.unwrap();
    assert!(got == blob.slice(1000..301_000));
    assert!(t.elapsed() >= Duration::from_secs(2), "{:?}", t.elapsed());
}

/// A Peer server that sends its response headers, maybe one piece, and then nothing, forever.
struct SilentPeer {
    first_piece: bool,
}

#[tonic::async_trait]
impl Peer for SilentPeer {
    type ReadRangeStream = ReceiverStream<Result<RangePiece, Status>>;

    async fn read_range(
        &self,
        request: Request<ReadRangeRequest>,
    ) -> Result<Response<Self::ReadRangeStream>, Status> {
        let len = request.into_inner().length;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let first = self.first_piece;
        tokio::spawn(async move {
            if first {
                let _ = tx
                    .send(Ok(RangePiece {
                        data: vec![0; (len / 2) as usize].into(),
                        waiting: false,
                    }))
                    .await;
            }
            // Hold the stream open without a byte or a keep-alive.
            tx.closed().await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

#[tokio::test]
async fn a_stalled_parent_times_out_within_the_stall() {
    let stall = Duration::from_secs(1);
    for first_piece in [false, true] {
        let addr = serve(PeerServer::new(SilentPeer { first_piece })).await;
        let src = source(addr, "child", stall);
        let t = Instant::now();
        let e = src.read_range(DIGEST, 0, 1000).await.unwrap_err();
        assert_eq!(e.kind, SourceErrorKind::Timeout, "{e}");
        let el = t.elapsed();
        assert!(el >= stall && el < Duration::from_secs(3), "{el:?}");
    }
    // A "parent" that accepts the TCP connection and never speaks HTTP/2.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let mute = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    let src = source(addr, "child", stall);
    let t = Instant::now();
    let e = src.read_range(DIGEST, 0, 1000).await.unwrap_err();
    assert!(
        matches!(
            e.kind,
            SourceErrorKind::Timeout | SourceErrorKind::Unavailable
        ),
        "{e}"
    );
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    mute.abort();
}

#[tokio::test]
async fn no_parent_listening_is_unavailable() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    let src = source(addr, "child", DEFAULT_STALL);
    let e = src.read_range(DIGEST, 0, 10).await.unwrap_err();
    assert_eq!(e.kind, SourceErrorKind::Unavailable, "{e}");
}

#[tokio::test]
async fn a_source_failing_mid_range_is_an_error() {
    let blob = random_bytes(2 * MIB as usize, 17);
    for (behavior, want) in [
        (
            Behavior::FailFrom(MIB, SourceErrorKind::Unavailable),
            SourceErrorKind::Unavailable,
        ),
        (
            Behavior::FailFrom(MIB, SourceErrorKind::Timeout),
            SourceErrorKind::Unavailable,
        ),
        (
            Behavior::FailFrom(MIB, SourceErrorKind::Lacks),
            SourceErrorKind::Lacks,
        ),
        (
            Behavior::FailFrom(MIB, SourceErrorKind::Refused),
            SourceErrorKind::Refused,
        ),
        (Behavior::Short, SourceErrorKind::Unavailable),
    ] {
        let mem = MemSource::new(blob.clone(), behavior);
        let (addr, svc) = serve_blob(Arc::clone(&mem), PeerServiceOptions::default()).await;
        let src = source(addr, "child", DEFAULT_STALL);
        // Two steps succeed (and are sent), then the source fails.
        let e = src.read_range(DIGEST, 0, 2 * MIB).await.unwrap_err();
        assert_eq!(e.kind, want, "{e}");
        let st = svc.stats();
        assert_eq!(st.failed, 1);
        if matches!(behavior, Behavior::FailFrom(..)) {
            assert_eq!(
                st.bytes_sent, MIB,
                "the first steps went out before the failure"
            );
            // No step is read after the failure.
            assert_eq!(mem.reads.load(Ordering::Relaxed), 3);
        }
    }
}

#[tokio::test]
async fn upload_limit_paces_and_stats_count() {
    let blob = random_bytes(8 * MIB as usize, 19);
    let (limited, svc) = serve_blob(
        MemSource::new(blob.clone(), Behavior::Normal),
        PeerServiceOptions {
            upload_limit: 4 * MIB,
            ..Default::default()
        },
    )
    .await;
    let (unlimited, _) = serve_blob(
        MemSource::new(blob.clone(), Behavior::Normal),
        PeerServiceOptions::default(),
    )
    .await;

    let src = source(unlimited, "child-a", DEFAULT_STALL);
    let t = Instant::now();
    let got = src.read_range(DIGEST, 0, 8 * MIB).await.unwrap();
    let fast = t.elapsed();
    assert!(got == blob);

    let src = source(limited, "child-a", DEFAULT_STALL);
    let t = Instant::now();
    let got = src.read_range(DIGEST, 0, 8 * MIB).await.unwrap();
    let slow = t.elapsed();
    assert!(got == blob);
    // 1 MiB of burst, then 7 MiB at 4 MiB/s: 1.75 s.
    assert!(slow >= Duration::from_millis(1500), "{slow:?}");
    assert!(slow < Duration::from_secs(6), "{slow:?}");
    assert!(fast < Duration::from_secs(1), "{fast:?}");
    assert!(fast * 2 < slow, "unlimited {fast:?}, limited {slow:?}");

    // A second node shares the same bucket.
    let other = source(limited, "child-b", DEFAULT_STALL);
    other.read_range(DIGEST, 0, 1000).await.unwrap();
    let st = svc.stats();
    assert_eq!(st.bytes_sent, 8 * MIB + 1000);
    assert_eq!(st.bytes_by_node.get("child-a"), Some(&(8 * MIB)));
    assert_eq!(st.bytes_by_node.get("child-b"), Some(&1000));
    assert_eq!(st.bytes_by_node.len(), 2);
    assert_eq!(st.requests, 2);
    assert_eq!(st.completed, 2);
    assert_eq!(st.inflight, 0);
}

#[tokio::test]
async fn too_many_in_flight_is_unavailable() {
    let blob = random_bytes(MIB as usize, 23);
    let (addr, svc) = serve_blob(
        MemSource::new(blob, Behavior::Never),
        PeerServiceOptions {
            max_inflight: 2,
            ..Default::default()
        },
    )
    .await;
    // Two reads that hang (keep-alives flow, so the clients wait).
    let mut holders = Vec::new();
    for i in 0..2 {
        let src = source(addr, &format!("holder-{i}"), DEFAULT_STALL);
        holders.push(tokio::spawn(
            async move { src.read_range(DIGEST, 0, 10).await },
        ));
    }
    let t = Instant::now();
    while svc.stats().inflight < 2 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "holders never started"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let src = source(addr, "third", DEFAULT_STALL);
    let e = src.read_range(DIGEST, 0, 10).await.unwrap_err();
    assert_eq!(e.kind, SourceErrorKind::Unavailable, "{e}");
    assert_eq!(
        raw_code(addr, req(DIGEST, 0, 10)).await,
        Code::ResourceExhausted
    );
    assert_eq!(svc.stats().busy, 2);
    // The holders' clients go away: the service stops reading for them and frees the slots.
    for h in &holders {
        h.abort();
    }
    let t = Instant::now();
    while svc.stats().inflight > 0 {
        assert!(t.elapsed() < Duration::from_secs(5), "slots never freed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(svc.stats().cancelled, 2);
    // A slot is free again: the request is accepted (and hangs, as the source does).
    let third = tokio::spawn(async move { src.read_range(DIGEST, 0, 10).await });
    let t = Instant::now();
    while svc.stats().inflight < 1 {
        assert!(t.elapsed() < Duration::from_secs(5), "request not accepted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    third.abort();
}

/// A Peer server that lies about lengths: it sends `length + delta` bytes.
struct LyingPeer {
    delta: i64,
    /// Keep-alives before the data.
    keepalives: usize,
}

#[tonic::async_trait]
impl Peer for LyingPeer {
    type ReadRangeStream = ReceiverStream<Result<RangePiece, Status>>;

    async fn read_range(
        &self,
        request: Request<ReadRangeRequest>,
    ) -> Result<Response<Self::ReadRangeStream>, Status> {
        let len = request.into_inner().length as i64 + self.delta;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let keepalives = self.keepalives;
        tokio::spawn(async move {
            for _ in 0..keepalives {
                let _ = tx
                    .send(Ok(RangePiece {
                        data: Default::default(),
                        waiting: true,
                    }))
                    .await;
            }
            let mut left = len.max(0) as usize;
            while left > 0 {
                let n = left.min(100_000);
                left -= n;
                if tx
                    .send(Ok(RangePiece {
                        data: vec![7; n].into(),
                        waiting: false,
                    }))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

#[tokio::test]
async fn wrong_lengths_are_short() {
    for (delta, keepalives) in [(-1, 0), (1, 0), (-250_000, 2), (100_000, 0), (-300_000, 3)] {
        let addr = serve(PeerServer::new(LyingPeer { delta, keepalives })).await;
        let src = source(addr, "child", DEFAULT_STALL);
        let e = src.read_range(DIGEST, 0, 300_000).await.unwrap_err();
        assert_eq!(e.kind, SourceErrorKind::Short, "delta {delta}: {e}");
    }
    // The honest case of the same server works (pieces of any size are concatenated).
    let addr = serve(PeerServer::new(LyingPeer {
        delta: 0,
        keepalives: 2,
    }))
    .await;
    let src = source(addr, "child", DEFAULT_STALL);
    let got = src.read_range(DIGEST, 5, 300_000).await.unwrap();
    assert_eq!(got.len(), 300_000);
    assert!(got.iter().all(|&b| b == 7));
}

/// Serves its blob only from a moment after it was made (a layer still being prepared).
struct LateProvider {
    src: Arc<MemSource>,
    from: std::time::Instant,
}

impl Provider for LateProvider {
    fn source(&self, function: &str, digest: &str) -> Option<(Arc<dyn BlobSource>, u64)> {
        (function == FUNCTION && digest == DIGEST && std::time::Instant::now() >= self.from).then(
            || {
                (
                    Arc::clone(&self.src) as Arc<dyn BlobSource>,
                    self.src.blob.len() as u64,
                )
            },
        )
    }
}

#[tokio::test]
async fn a_layer_still_being_prepared_is_waited_for_with_keepalives() {
    let blob = random_bytes(MIB as usize, 11);
    let late = |wait: Duration| {
        PeerService::new(
            Arc::new(LateProvider {
                src: MemSource::new(blob.clone(), Behavior::Normal),
                from: std::time::Instant::now() + Duration::from_millis(1500),
            }),
            PeerServiceOptions {
                layer_wait: wait,
                ..Default::default()
            },
        )
    };
    // Waited for (longer than the child's 1 s stall: keep-alives flow meanwhile).
    let addr = serve(late(Duration::from_secs(5)).into_server()).await;
    let got = source(addr, "child", Duration::from_secs(1))
        .read_range(DIGEST, 1000, 5000)
        .await
        .unwrap();
    assert_eq!(&got[..], &blob[1000..6000]);
    // Not waited for: the child hears at once that the parent lacks it.
    let addr = serve(late(Duration::ZERO).into_server()).await;
    let e = source(addr, "child", Duration::from_secs(1))
        .read_range(DIGEST, 0, 10)
        .await
        .unwrap_err();
    assert_eq!(e.kind, SourceErrorKind::Lacks);
    // Waited for in vain: lacks, after the wait; a range past the blob found late: refused.
    let addr = serve(late(Duration::from_millis(300)).into_server()).await;
    let e = source(addr, "child", Duration::from_secs(1))
        .read_range(DIGEST, 0, 10)
        .await
        .unwrap_err();
    assert_eq!(e.kind, SourceErrorKind::Lacks);
    let addr = serve(late(Duration::from_secs(5)).into_server()).await;
    let e = source(addr, "child", Duration::from_secs(1))
        .read_range(DIGEST, MIB - 5, 10)
        .await
        .unwrap_err();
    assert_eq!(e.kind, SourceErrorKind::Refused);
}
