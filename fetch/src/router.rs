//! A blob source that tries other blob sources in order, each within its own deadline.
//!
//! In a function tree a node's chunks can come from several places: a local cache, the
//! current parent, the grandparent, and finally the registry. [`Router`] holds that ordered
//! list of [`Route`]s and is itself a [`BlobSource`], so it can stand where a single source
//! stands today (a [`crate::fetcher::LayerHandle`]'s source list) without changing the
//! fetcher. A read tries each route in turn; any error, or no answer within the route's
//! deadline, moves on to the next route at once, so a stalled parent hands over to the next
//! source within its deadline (e.g. 1 s for a peer, 60 s for the registry). When the tree
//! changes (a node is re-parented), [`Router::set_routes`] swaps the list: reads already in
//! flight finish against the routes they started with, new reads use the new list.
//!
//! The router never verifies content; it only checks lengths. The fetcher verifies every
//! chunk above all sources; when it finds that bytes from a route did not verify it calls
//! [`Router::report_bad`], and the router skips that route for [`Router::bad_penalty`].
//! A route that missed (timed out, was unavailable, refused or lacked the bytes) is skipped
//! for [`Router::miss_penalty`] (3 s by default), so a stalled parent costs one deadline, not
//! one per read, until it answers again or the tree moves the node.
//! A route may hedge ([`Route::with_hedge`]): when it has not answered within its hedge delay
//! the next route is asked too, and the first good answer wins (the other is dropped).
//! Per-route counters ([`Router::stats`]) survive a swap for routes that keep their name.
//!
//! Not wired yet: the intended wiring is to build one `Router` per layer (or per tree
//! position) with routes `parent`, `grandparent`, `registry` (the last a
//! [`crate::source::StoreSource`]), pass it as the layer's source, call `set_routes` from the
//! tree membership code, and call `report_bad` from the fetcher's verification failure path.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tracing::debug;

use crate::source::{BlobSource, ReadFuture, SourceError, SourceErrorKind};

/// Default time a route is skipped after [`Router::report_bad`].
pub const DEFAULT_BAD_PENALTY: Duration = Duration::from_secs(30);

/// Default time a route is skipped after it missed (see the module docs).
pub const DEFAULT_MISS_PENALTY: Duration = Duration::from_secs(3);

/// One place to read from, with how long to wait for it.
#[derive(Clone)]
pub struct Route {
    pub source: Arc<dyn BlobSource>,
    /// Unique within a router (`parent`, `grandparent`, `registry`); keys stats and
    /// [`Router::report_bad`].
    pub name: String,
    /// Bound on one read from this route; past it the next route is tried.
    pub deadline: Duration,
    /// Hedging: when this route has not answered within this time, the next route is asked
    /// too and the first good answer wins (`None`: wait for this route's answer or deadline).
    pub hedge: Option<Duration>,
}

impl Route {
    pub fn new(name: impl Into<String>, source: Arc<dyn BlobSource>, deadline: Duration) -> Route {
        Route {
            source,
            name: name.into(),
            deadline,
            hedge: None,
        }
    }

    /// Asks the next route too when this one has not answered within `after`.
    pub fn with_hedge(mut self, after: Duration) -> Route {
        self.hedge = Some(after);
        self
    }
}

/// Counters of one route (they only grow).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteStats {
    pub name: String,
    /// Reads attempted on this route.
    pub requests: u64,
    /// Bytes this route served successfully.
    pub bytes: u64,
    pub lacks: u64,
    pub timeouts: u64,
    pub unavailable: u64,
    pub refused: u64,
    pub short: u64,
    /// Times the layer above reported this route's bytes as bad.
    pub bad: u64,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    bytes: AtomicU64,
    lacks: AtomicU64,
    timeouts: AtomicU64,
    unavailable: AtomicU64,
    refused: AtomicU64,
    short: AtomicU64,
    bad: AtomicU64,
    /// Skip the route until then.
    bad_until: Mutex<Option<Instant>>,
}

impl Counters {
    fn count_error(&self, kind: SourceErrorKind) {
        let c = match kind {
            SourceErrorKind::Lacks => &self.lacks,
            SourceErrorKind::Timeout => &self.timeouts,
            SourceErrorKind::Unavailable => &self.unavailable,
            SourceErrorKind::Refused => &self.refused,
            SourceErrorKind::Short => &self.short,
            SourceErrorKind::Corrupt => &self.bad,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    fn penalized(&self, now: Instant) -> bool {
        let until = self.bad_until.lock().unwrap_or_else(|e| e.into_inner());
        matches!(*until, Some(t) if now < t)
    }

    fn snapshot(&self, name: &str) -> RouteStats {
        RouteStats {
            name: name.to_string(),
            requests: self.requests.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            lacks: self.lacks.load(Ordering::Relaxed),
            timeouts: self.timeouts.load(Ordering::Relaxed),
            unavailable: self.unavailable.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            short: self.short.load(Ordering::Relaxed),
            bad: self.bad.load(Ordering::Relaxed),
        }
    }
}

struct ActiveRoute {
    route: Route,
    counters: Arc<Counters>,
}

/// Tries an ordered list of [`Route`]s; see the module docs.
pub struct Router {
    /// The current list; each read takes a snapshot (an `Arc` clone) and keeps it.
    routes: Mutex<Arc<Vec<ActiveRoute>>>,
    bad_penalty: Duration,
    miss_penalty: Duration,
}

impl Router {
    /// A router over `routes`, tried in order, with the default bad penalty (30 s).
    pub fn new(routes: Vec<Route>) -> Router {
        Router {
            routes: Mutex::new(Arc::new(Self::activate(routes, &[]))),
            bad_penalty: DEFAULT_BAD_PENALTY,
            miss_penalty: DEFAULT_MISS_PENALTY,
        }
    }

    /// Sets how long a route reported bad is skipped.
    pub fn with_bad_penalty(mut self, penalty: Duration) -> Router {
        self.bad_penalty = penalty;
        self
    }

    /// How long a route reported bad is skipped.
    pub fn bad_penalty(&self) -> Duration {
        self.bad_penalty
    }

    /// Sets how long a route that missed is skipped (zero: never).
    pub fn with_miss_penalty(mut self, penalty: Duration) -> Router {
        self.miss_penalty = penalty;
        self
    }

    /// How long a route that missed is skipped.
    pub fn miss_penalty(&self) -> Duration {
        self.miss_penalty
    }

    /// Replaces the list of routes. Reads in flight finish against the old list; routes that
    /// keep their name keep their counters and any bad penalty.
    pub fn set_routes(&self, routes: Vec<Route>) {
        let mut cur = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        let next = Self::activate(routes, &cur);
        *cur = Arc::new(next);
    }

    /// Lifts every route's penalty (after [`Router::set_routes`] put another node behind a
    /// route's name, its predecessor's misses say nothing about it).
    pub fn forgive(&self) {
        for a in self.snapshot().iter() {
            *a.counters
                .bad_until
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = None;
        }
    }

    /// The names of the current routes, in order.
    pub fn route_names(&self) -> Vec<String> {
        self.snapshot()
            .iter()
            .map(|a| a.route.name.clone())
            .collect()
    }

    /// The layer above found that bytes from route `name` did not verify: skip that route for
    /// [`Router::bad_penalty`]. Returns false if no current route has that name.
    pub fn report_bad(&self, name: &str) -> bool {
        let routes = self.snapshot();
        let Some(a) = routes.iter().find(|a| a.route.name == name) else {
            return false;
        };
        a.counters.bad.fetch_add(1, Ordering::Relaxed);
        let mut until = a
            .counters
            .bad_until
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        *until = Some(Instant::now() + self.bad_penalty);
        debug!(route = %name, penalty = ?self.bad_penalty, "route reported bad, skipping it");
        true
    }

    /// Counters of the current routes, in route order.
    pub fn stats(&self) -> Vec<RouteStats> {
        self.snapshot()
            .iter()
            .map(|a| a.counters.snapshot(&a.route.name))
            .collect()
    }

    fn snapshot(&self) -> Arc<Vec<ActiveRoute>> {
        Arc::clone(&self.routes.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn activate(routes: Vec<Route>, old: &[ActiveRoute]) -> Vec<ActiveRoute> {
        let mut seen: HashMap<String, Arc<Counters>> = HashMap::new();
        routes
            .into_iter()
            .map(|route| {
                let counters = seen
                    .entry(route.name.clone())
                    .or_insert_with(|| {
                        old.iter()
                            .find(|a| a.route.name == route.name)
                            .map(|a| Arc::clone(&a.counters))
                            .unwrap_or_default()
                    })
                    .clone();
                ActiveRoute { route, counters }
            })
            .collect()
    }

    /// One read from route `a`, tagged with the route (all attempts have this one type).
    async fn attempt<'a>(
        a: &'a ActiveRoute,
        digest: &'a str,
        offset: u64,
        len: u64,
    ) -> (&'a ActiveRoute, Result<bytes::Bytes, SourceError>) {
        (a, Self::try_route(a, digest, offset, len).await)
    }

    async fn try_route(
        a: &ActiveRoute,
        digest: &str,
        offset: u64,
        len: u64,
    ) -> Result<bytes::Bytes, SourceError> {
        let r = &a.route;
        a.counters.requests.fetch_add(1, Ordering::Relaxed);
        match tokio::time::timeout(r.deadline, r.source.read_range(digest, offset, len)).await {
            Err(_) => Err(SourceError::new(
                SourceErrorKind::Timeout,
                r.source.kind(),
                format!("no answer within {:?}", r.deadline),
            )),
            Ok(Err(e)) => Err(e),
            Ok(Ok(data)) if data.len() as u64 != len => Err(SourceError::new(
                SourceErrorKind::Short,
                r.source.kind(),
                format!("asked for {len} bytes at {offset}, got {}", data.len()),
            )),
            Ok(Ok(data)) => Ok(data),
        }
    }
}

impl Router {
    /// Reads `len` bytes at `offset` of blob `digest` from the first route that serves them,
    /// and names that route (for [`Router::report_bad`] when the bytes fail verification).
    pub async fn read_routed(
        &self,
        digest: &str,
        offset: u64,
        len: u64,
    ) -> Result<(bytes::Bytes, String), SourceError> {
        use futures_util::StreamExt as _;
        let routes = self.snapshot();
        let now = Instant::now();
        // Skip routes reported bad, unless every route is: then try them all rather than
        // fail without asking anyone.
        let all_penalized = routes.iter().all(|a| a.counters.penalized(now));
        let mut failures: Vec<String> = Vec::new();
        let mut eligible: Vec<&ActiveRoute> = Vec::new();
        for a in routes.iter() {
            if !all_penalized && a.counters.penalized(now) {
                failures.push(format!("{}: skipped (penalized)", a.route.name));
            } else {
                eligible.push(a);
            }
        }
        let mut last_kind = None;
        let mut next = 0;
        // The attempt started last, and when: its hedge delay runs from then.
        let mut last_started: Option<(&ActiveRoute, Instant)> = None;
        let mut inflight = futures_util::stream::FuturesUnordered::new();
        loop {
            if inflight.is_empty() {
                let Some(&a) = eligible.get(next) else { break };
                next += 1;
                last_started = Some((a, Instant::now()));
                inflight.push(Self::attempt(a, digest, offset, len));
            }
            let hedge_at = match last_started {
                Some((a, t)) if next < eligible.len() => a.route.hedge.map(|h| t + h),
                _ => None,
            };
            let done = match hedge_at {
                Some(at) => tokio::select! {
                    r = inflight.next() => r,
                    _ = tokio::time::sleep_until(at) => {
                        let a = eligible[next];
                        next += 1;
                        debug!(route = %a.route.name, digest, offset, len, "hedging: asking the next route too");
                        last_started = Some((a, Instant::now()));
                        inflight.push(Self::attempt(a, digest, offset, len));
                        continue;
                    }
                },
                None => inflight.next().await,
            };
            let Some((a, result)) = done else { continue };
            let name = &a.route.name;
            match result {
                Ok(data) => {
                    a.counters
                        .bytes
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                    return Ok((data, name.clone()));
                }
                Err(e) => {
                    a.counters.count_error(e.kind);
                    if e.kind != SourceErrorKind::Short
                        && e.kind != SourceErrorKind::Corrupt
                        && !self.miss_penalty.is_zero()
                    {
                        let mut until = a
                            .counters
                            .bad_until
                            .lock()
                            .unwrap_or_else(|e| e.into_inner());
                        let t = Instant::now() + self.miss_penalty;
                        if until.is_none_or(|u| u < t) {
                            *until = Some(t);
                        }
                    }
                    debug!(route = %name, kind = %e.kind, error = %e, digest, offset, len,
                        "blob source route missed, trying the next");
                    failures.push(format!("{name}: {}: {e}", e.kind));
                    last_kind = Some(e.kind);
                }
            }
        }
        if failures.is_empty() {
            failures.push("no routes".to_string());
        }
        Err(SourceError::new(
            last_kind.unwrap_or(SourceErrorKind::Unavailable),
            "router",
            format!(
                "{len} bytes at {offset} of {digest}: {}",
                failures.join("; ")
            ),
        ))
    }
}

impl BlobSource for Router {
    fn kind(&self) -> &'static str {
        "router"
    }

    fn read_range<'a>(&'a self, digest: &'a str, offset: u64, len: u64) -> ReadFuture<'a> {
        Box::pin(async move { Ok(self.read_routed(digest, offset, len).await?.0) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::sync::atomic::AtomicUsize;
    use tokio::sync::Notify;

    #[derive(Clone, Copy)]
    enum Mode {
        Serve,
        /// Serves after a delay.
        Slow(Duration),
        Fail(SourceErrorKind),
        Stall,
        Wrong,
    }

    struct TestSource {
        blob: Vec<u8>,
        mode: Mode,
        calls: AtomicUsize,
        /// If set, signals `entered` then waits for `gate` before answering.
        gate: Option<(Arc<Notify>, Arc<Notify>)>,
    }

    impl TestSource {
        fn new(blob: &[u8], mode: Mode) -> Arc<TestSource> {
            Arc::new(TestSource {
                blob: blob.to_vec(),
                mode,
                calls: AtomicUsize::new(0),
                gate: None,
            })
        }
    }

    impl BlobSource for TestSource {
        fn kind(&self) -> &'static str {
            "test"
        }

        fn read_range<'a>(&'a self, _digest: &'a str, offset: u64, len: u64) -> ReadFuture<'a> {
            Box::pin(async move {
                self.calls.fetch_add(1, Ordering::SeqCst);
                if let Some((entered, gate)) = &self.gate {
                    entered.notify_one();
                    gate.notified().await;
                }
                if let Mode::Slow(d) = self.mode {
                    tokio::time::sleep(d).await;
                }
                match self.mode {
                    Mode::Serve | Mode::Slow(_) => {
                        let s = offset as usize;
                        let e = s + len as usize;
                        match self.blob.get(s..e) {
                            Some(b) => Ok(Bytes::copy_from_slice(b)),
                            None => Err(SourceError::new(
                                SourceErrorKind::Lacks,
                                "test",
                                "out of range",
                            )),
                        }
                    }
                    Mode::Fail(kind) => Err(SourceError::new(
                        kind,
                        "test",
                        format!("failing with {kind}"),
                    )),
                    Mode::Stall => std::future::pending().await,
                    Mode::Wrong => Ok(Bytes::copy_from_slice(&self.blob[..1])),
                }
            })
        }
    }

    fn route(name: &str, s: &Arc<TestSource>, deadline: Duration) -> Route {
        Route::new(name, Arc::clone(s) as Arc<dyn BlobSource>, deadline)
    }

    const SEC: Duration = Duration::from_secs(1);

    #[tokio::test]
    async fn first_route_serves() {
        let a = TestSource::new(b"aaaa", Mode::Serve);
        let b = TestSource::new(b"bbbb", Mode::Serve);
        let r = Router::new(vec![route("a", &a, SEC), route("b", &b, SEC)]);
        assert_eq!(&r.read_range("d", 1, 2).await.unwrap()[..], b"aa");
        assert_eq!(b.calls.load(Ordering::SeqCst), 0);
        assert_eq!(r.kind(), "router");
    }

    #[tokio::test]
    async fn lacking_route_falls_through() {
        let a = TestSource::new(b"", Mode::Fail(SourceErrorKind::Lacks));
        let b = TestSource::new(b"bbbb", Mode::Serve);
        let r = Router::new(vec![route("a", &a, SEC), route("b", &b, SEC)]);
        assert_eq!(&r.read_range("d", 0, 4).await.unwrap()[..], b"bbbb");
        assert_eq!(a.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn all_failing_names_each_route() {
        let a = TestSource::new(b"", Mode::Fail(SourceErrorKind::Lacks));
        let b = TestSource::new(b"bbbb", Mode::Wrong);
        let c = TestSource::new(b"", Mode::Fail(SourceErrorKind::Refused));
        let r = Router::new(vec![
            route("parent", &a, SEC),
            route("grandparent", &b, SEC),
            route("registry", &c, SEC),
        ]);
        let e = r.read_range("d", 0, 4).await.unwrap_err();
        assert_eq!(e.kind, SourceErrorKind::Refused);
        assert_eq!(e.source_name, "router");
        let m = e.to_string();
        assert!(m.contains("parent: lacks"), "{m}");
        assert!(m.contains("grandparent: short"), "{m}");
        assert!(m.contains("registry: refused"), "{m}");

        let empty = Router::new(vec![]);
        let e = empty.read_range("d", 0, 4).await.unwrap_err();
        assert_eq!(e.kind, SourceErrorKind::Unavailable);
        assert!(e.to_string().contains("no routes"));
    }

    #[tokio::test]
    async fn stalled_route_hands_over_after_deadline() {
        let deadline = Duration::from_millis(50);
        let a = TestSource::new(b"", Mode::Stall);
        let b = TestSource::new(b"bbbb", Mode::Serve);
        let r = Router::new(vec![
            route("parent", &a, deadline),
            route("registry", &b, SEC),
        ]);
        let t = std::time::Instant::now();
        assert_eq!(&r.read_range("d", 0, 4).await.unwrap()[..], b"bbbb");
        let elapsed = t.elapsed();
        assert!(elapsed >= deadline, "{elapsed:?}");
        assert!(
            elapsed < deadline + Duration::from_millis(200),
            "{elapsed:?}"
        );
        let s = r.stats();
        assert_eq!(s[0].timeouts, 1);
        assert_eq!(s[1].bytes, 4);
    }

    #[tokio::test]
    async fn set_routes_while_read_in_flight() {
        let entered = Arc::new(Notify::new());
        let gate = Arc::new(Notify::new());
        let old = Arc::new(TestSource {
            blob: b"old!".to_vec(),
            mode: Mode::Serve,
            calls: AtomicUsize::new(0),
            gate: Some((Arc::clone(&entered), Arc::clone(&gate))),
        });
        let new = TestSource::new(b"new!", Mode::Serve);
        let r = Arc::new(Router::new(vec![route("parent", &old, SEC)]));
        let r2 = Arc::clone(&r);
        let inflight = tokio::spawn(async move { r2.read_range("d", 0, 4).await });
        entered.notified().await;
        r.set_routes(vec![route("parent2", &new, SEC)]);
        gate.notify_one();
        assert_eq!(&inflight.await.unwrap().unwrap()[..], b"old!");
        assert_eq!(&r.read_range("d", 0, 4).await.unwrap()[..], b"new!");
        assert_eq!(old.calls.load(Ordering::SeqCst), 1);
        assert_eq!(r.route_names(), vec!["parent2".to_string()]);
    }

    #[tokio::test]
    async fn report_bad_skips_for_penalty() {
        let penalty = Duration::from_millis(60);
        let a = TestSource::new(b"aaaa", Mode::Serve);
        let b = TestSource::new(b"bbbb", Mode::Serve);
        let r =
            Router::new(vec![route("a", &a, SEC), route("b", &b, SEC)]).with_bad_penalty(penalty);
        assert_eq!(r.bad_penalty(), penalty);
        assert!(r.report_bad("a"));
        assert!(!r.report_bad("nope"));
        assert_eq!(&r.read_range("d", 0, 4).await.unwrap()[..], b"bbbb");
        assert_eq!(a.calls.load(Ordering::SeqCst), 0);
        tokio::time::sleep(penalty + Duration::from_millis(20)).await;
        assert_eq!(&r.read_range("d", 0, 4).await.unwrap()[..], b"aaaa");
        assert_eq!(r.stats()[0].bad, 1);
    }

    #[tokio::test]
    async fn all_routes_bad_still_tries_them() {
        let a = TestSource::new(b"aaaa", Mode::Serve);
        let r = Router::new(vec![route("a", &a, SEC)]);
        r.report_bad("a");
        assert_eq!(&r.read_range("d", 0, 4).await.unwrap()[..], b"aaaa");
    }

    #[tokio::test]
    async fn a_hedged_route_lets_the_next_one_answer_first() {
        let slow = TestSource::new(b"ssssssss", Mode::Slow(Duration::from_millis(400)));
        let fast = TestSource::new(b"ffffffff", Mode::Serve);
        let hedged = Router::new(vec![
            route("parent", &slow, SEC).with_hedge(Duration::from_millis(30)),
            route("registry", &fast, SEC),
        ]);
        let t = Instant::now();
        let (data, from) = hedged.read_routed("d", 0, 4).await.unwrap();
        assert_eq!((&data[..], from.as_str()), (&b"ffff"[..], "registry"));
        assert!(
            t.elapsed() < Duration::from_millis(300),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(slow.calls.load(Ordering::SeqCst), 1);
        assert_eq!(fast.calls.load(Ordering::SeqCst), 1);

        // Without a hedge the slow route is waited for, and the next is never asked.
        let (slow, fast) = (
            TestSource::new(b"ssssssss", Mode::Slow(Duration::from_millis(150))),
            TestSource::new(b"ffffffff", Mode::Serve),
        );
        let plain = Router::new(vec![
            route("parent", &slow, SEC),
            route("registry", &fast, SEC),
        ]);
        let (data, from) = plain.read_routed("d", 0, 4).await.unwrap();
        assert_eq!((&data[..], from.as_str()), (&b"ssss"[..], "parent"));
        assert_eq!(fast.calls.load(Ordering::SeqCst), 0);

        // A hedged route that answers within its delay: the next is never asked.
        let (quick, fast) = (
            TestSource::new(b"qqqqqqqq", Mode::Slow(Duration::from_millis(5))),
            TestSource::new(b"ffffffff", Mode::Serve),
        );
        let r = Router::new(vec![
            route("parent", &quick, SEC).with_hedge(Duration::from_millis(200)),
            route("registry", &fast, SEC),
        ]);
        let (_, from) = r.read_routed("d", 0, 4).await.unwrap();
        assert_eq!(from, "parent");
        assert_eq!(fast.calls.load(Ordering::SeqCst), 0);

        // The hedge fails but the hedged route still answers: its answer is used.
        let (slowish, failing) = (
            TestSource::new(b"ssssssss", Mode::Slow(Duration::from_millis(100))),
            TestSource::new(b"", Mode::Fail(SourceErrorKind::Unavailable)),
        );
        let r = Router::new(vec![
            route("parent", &slowish, SEC).with_hedge(Duration::from_millis(10)),
            route("registry", &failing, SEC),
        ]);
        let (data, from) = r.read_routed("d", 0, 4).await.unwrap();
        assert_eq!((&data[..], from.as_str()), (&b"ssss"[..], "parent"));
    }

    #[tokio::test]
    async fn a_route_that_missed_is_skipped_for_the_miss_penalty() {
        let stall = TestSource::new(b"", Mode::Stall);
        let good = TestSource::new(b"gggggggg", Mode::Serve);
        let r = Router::new(vec![
            route("parent", &stall, Duration::from_millis(50)),
            route("registry", &good, SEC),
        ])
        .with_miss_penalty(Duration::from_millis(300));
        assert_eq!(r.miss_penalty(), Duration::from_millis(300));
        // The first read waits out the parent's deadline; the next ones skip it at once.
        let t = Instant::now();
        r.read_range("d", 0, 4).await.unwrap();
        assert!(t.elapsed() >= Duration::from_millis(50));
        let t = Instant::now();
        for _ in 0..5 {
            r.read_range("d", 0, 4).await.unwrap();
        }
        assert!(t.elapsed() < Duration::from_millis(50), "{:?}", t.elapsed());
        assert_eq!(r.stats()[0].requests, 1);
        // After the penalty the parent is asked again.
        tokio::time::sleep(Duration::from_millis(350)).await;
        r.read_range("d", 0, 4).await.unwrap();
        assert_eq!(r.stats()[0].requests, 2);
        assert_eq!(r.stats()[0].timeouts, 2);
    }

    #[tokio::test]
    async fn stats_count_and_survive_swap() {
        let short = Duration::from_millis(20);
        let lacks = TestSource::new(b"", Mode::Fail(SourceErrorKind::Lacks));
        let unav = TestSource::new(b"", Mode::Fail(SourceErrorKind::Unavailable));
        let refused = TestSource::new(b"", Mode::Fail(SourceErrorKind::Refused));
        let wrong = TestSource::new(b"xxxx", Mode::Wrong);
        let stall = TestSource::new(b"", Mode::Stall);
        let good = TestSource::new(b"gggggggg", Mode::Serve);
        let r = Router::new(vec![
            route("lacks", &lacks, SEC),
            route("unav", &unav, SEC),
            route("refused", &refused, SEC),
            route("wrong", &wrong, SEC),
            route("stall", &stall, short),
            route("good", &good, SEC),
        ])
        .with_miss_penalty(Duration::ZERO);
        r.read_range("d", 0, 4).await.unwrap();
        r.read_range("d", 2, 6).await.unwrap();
        r.report_bad("good");
        let s = r.stats();
        let names: Vec<&str> = s.iter().map(|x| x.name.as_str()).collect();
        assert_eq!(
            names,
            ["lacks", "unav", "refused", "wrong", "stall", "good"]
        );
        assert!(s.iter().all(|x| x.requests == 2));
        assert_eq!(s[0].lacks, 2);
        assert_eq!(s[1].unavailable, 2);
        assert_eq!(s[2].refused, 2);
        assert_eq!(s[3].short, 2);
        assert_eq!(s[4].timeouts, 2);
        assert_eq!(s[5].bytes, 10);
        assert_eq!(s[5].bad, 1);
        assert_eq!(s[0].bytes + s[5].lacks + s[5].timeouts, 0);

        // Keep "good" (new source, same name), drop the others.
        let good2 = TestSource::new(b"GGGG", Mode::Serve);
        r.set_routes(vec![
            route("good", &good2, SEC),
            route("lacks2", &lacks, SEC),
        ]);
        let s = r.stats();
        assert_eq!(s.len(), 2);
        assert_eq!((s[0].requests, s[0].bytes, s[0].bad), (2, 10, 1));
        assert_eq!(
            s[1],
            RouteStats {
                name: "lacks2".into(),
                ..Default::default()
            }
        );
        // The bad penalty survived too: "good" is skipped.
        let e = r.read_range("d", 0, 4).await.unwrap_err();
        assert!(e.to_string().contains("good: skipped"), "{e}");
        assert_eq!(r.stats()[1].lacks, 1);
    }

    #[test]
    fn source_error_display_unchanged() {
        let e = SourceError::new(
            SourceErrorKind::Short,
            "registry",
            "asked for 4 bytes at 0, got 2",
        );
        assert_eq!(e.to_string(), "registry: asked for 4 bytes at 0, got 2");
        let e = SourceError::new(SourceErrorKind::Unavailable, "layout", "semaphore closed");
        assert_eq!(e.to_string(), "layout: semaphore closed");
    }
}
