//! Issue #9: the metrics endpoint (arbord and `arbor mount --metrics-addr`) serves exactly
//! `/metrics`, and a slow or idle client cannot hold a connection, or all of them, forever.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arbor_fetch::metrics::{ServeLimits, serve_with};

fn start(limits: ServeLimits) -> (tokio::runtime::Runtime, SocketAddr) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let addr = rt.block_on(async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(serve_with(
            l,
            Arc::new(|| "arbor_test_metric 1\n".to_string()),
            limits,
        ));
        addr
    });
    (rt, addr)
}

/// The status code and body of one request.
fn request(addr: SocketAddr, head: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (code, body)
}

fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    request(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
    )
}

#[test]
fn metrics_endpoint_rejects_other_paths() {
    let (_rt, addr) = start(ServeLimits::default());
    let (code, body) = get(addr, "/metrics");
    assert_eq!(code, 200);
    assert!(body.contains("arbor_test_metric 1"), "{body}");
    assert_eq!(get(addr, "/metrics?x=1").0, 200);
    // HTTP/1.0 clients (the test harness's, curl -0) too.
    let (code, body) = request(addr, "GET /metrics HTTP/1.0\r\n\r\n");
    assert_eq!(code, 200);
    assert!(body.contains("arbor_test_metric 1"), "{body}");
    // Prefix matches used to be served.
    for path in [
        "/metricsfoo",
        "/metrics/",
        "/metrics/../secret",
        "/",
        "/x/metrics",
        "*",
    ] {
        let (code, body) = get(addr, path);
        assert_eq!(code, 404, "{path}");
        assert!(!body.contains("arbor_test_metric"), "{path}: {body}");
    }
    let (code, _) = request(
        addr,
        "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(code, 405);
    // Not HTTP at all.
    let (code, body) = request(addr, "GET /metrics-and-garbage\x00\x01\r\n\r\n");
    assert_ne!(code, 200);
    assert!(!body.contains("arbor_test_metric"));
}

#[test]
fn slow_metrics_client_is_dropped() {
    let limits = ServeLimits {
        max_connections: 2,
        connection_deadline: Duration::from_secs(1),
    };
    let (_rt, addr) = start(limits);
    // A client that sends half a request head and then nothing is disconnected at the
    // deadline.
    let t = Instant::now();
    let mut slow = TcpStream::connect(addr).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost:").unwrap();
    let mut buf = [0u8; 256];
    let n = slow.read(&mut buf).unwrap_or(0);
    let waited = t.elapsed();
    assert!(n == 0 || String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 408"));
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "the slow client was dropped after {waited:?}"
    );
    // Idle clients holding every connection slot: the next request waits for a slot (the
    // deadline frees them), it is not refused and nothing grows without bound.
    let idle: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(addr).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(100));
    let t = Instant::now();
    let (code, _) = get(addr, "/metrics");
    assert_eq!(code, 200);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    drop(idle);
    // A well-behaved client right after is served at once.
    let t = Instant::now();
    assert_eq!(get(addr, "/metrics").0, 200);
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
}
