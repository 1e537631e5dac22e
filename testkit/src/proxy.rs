//! A fault-injecting HTTP proxy for registry tests: sits in front of a [`crate::Registry`] and,
//! per request, passes the response through or breaks it in one of the ways real networks and
//! registries do (errors, resets, stalls, truncated or corrupted bodies, wrong
//! `Content-Range`). One request per connection; responses carry `Connection: close`.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::XorShift64;

/// What the proxy does to a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Pass,
    /// 500 Internal Server Error instead of the response.
    Error500,
    /// Half the response, then the connection is reset.
    Reset,
    /// Nothing for `stall` seconds, then the response.
    Stall,
    /// Headers with the full Content-Length, half the body, then close.
    Truncate,
    /// The full response with some body bytes flipped.
    Corrupt,
    /// A 206 whose Content-Range names other bytes than those asked for.
    WrongRange,
}

const ALL: [Fault; 7] = [
    Fault::Pass,
    Fault::Error500,
    Fault::Reset,
    Fault::Stall,
    Fault::Truncate,
    Fault::Corrupt,
    Fault::WrongRange,
];

/// Mode: 0 = pass everything, 1 = chaos (random fault per blob request).
struct State {
    chaos: AtomicBool,
    /// Percentage of chaos-mode blob requests that pass untouched.
    pass_percent: AtomicU64,
    rng: Mutex<XorShift64>,
    counts: [AtomicUsize; 7],
    stall: Duration,
    stop: AtomicBool,
}

/// See the module docs. Stops when dropped.
pub struct FaultProxy {
    addr: String,
    state: Arc<State>,
}

impl FaultProxy {
    /// Starts a proxy on 127.0.0.1:<free port> forwarding to `upstream` ("127.0.0.1:PORT").
    /// Stalled responses wait `stall`.
    pub fn start(upstream: &str, stall: Duration) -> Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding the proxy")?;
        let addr = listener.local_addr()?.to_string();
        let state = Arc::new(State {
            chaos: AtomicBool::new(false),
            pass_percent: AtomicU64::new(40),
            rng: Mutex::new(XorShift64::new(0x5eed)),
            counts: Default::default(),
            stall,
            stop: AtomicBool::new(false),
        });
        let st = Arc::clone(&state);
        let upstream = upstream.to_string();
        thread::spawn(move || {
            for conn in listener.incoming() {
                if st.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (st, up) = (Arc::clone(&st), upstream.clone());
                thread::spawn(move || {
                    let _ = handle(conn, &up, &st);
                });
            }
        });
        Ok(FaultProxy { addr, state })
    }

    /// "127.0.0.1:PORT" to use instead of the registry's address.
    pub fn addr(&self) -> String {
        self.addr.clone()
    }

    /// Chaos: each blob request gets a random fault (`pass_percent`% pass untouched).
    pub fn chaos(&self, pass_percent: u64) {
        self.state
            .pass_percent
            .store(pass_percent, Ordering::SeqCst);
        self.state.chaos.store(true, Ordering::SeqCst);
    }

    /// Pass everything through.
    pub fn heal(&self) {
        self.state.chaos.store(false, Ordering::SeqCst);
    }

    /// How many responses got each fault so far.
    pub fn counts(&self) -> Vec<(Fault, usize)> {
        ALL.iter()
            .zip(&self.state.counts)
            .map(|(f, c)| (*f, c.load(Ordering::SeqCst)))
            .collect()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(&self.addr);
    }
}

fn read_head(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    let mut b = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if s.read(&mut b)? == 0 {
            break;
        }
        buf.push(b[0]);
        if buf.len() > 64 << 10 {
            break;
        }
    }
    Ok(buf)
}

fn handle(mut client: TcpStream, upstream: &str, st: &State) -> std::io::Result<()> {
    client.set_read_timeout(Some(Duration::from_secs(30)))?;
    let head = read_head(&mut client)?;
    if head.is_empty() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let is_blob = text
        .lines()
        .next()
        .is_some_and(|l| l.contains("/blobs/sha256:"));
    // Ask upstream for the same, one request per connection.
    let mut req = String::new();
    for line in text.split("\r\n").filter(|l| !l.is_empty()) {
        if line.to_ascii_lowercase().starts_with("connection:") {
            continue;
        }
        req.push_str(line);
        req.push_str("\r\n");
    }
    req.push_str("Connection: close\r\n\r\n");
    let mut up = TcpStream::connect(upstream)?;
    up.write_all(req.as_bytes())?;
    let mut resp = Vec::new();
    up.read_to_end(&mut resp)?;
    let split = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(resp.len(), |p| p + 4);
    let (resp_head, body) = resp.split_at(split);
    let mut resp_head = String::from_utf8_lossy(resp_head).into_owned();
    if !resp_head.to_ascii_lowercase().contains("connection: close") {
        resp_head = resp_head.replacen("\r\n", "\r\nConnection: close\r\n", 1);
    }
    let fault = if is_blob && st.chaos.load(Ordering::SeqCst) {
        let mut rng = st.rng.lock().unwrap_or_else(|e| e.into_inner());
        if rng.next_u64() % 100 < st.pass_percent.load(Ordering::SeqCst) {
            Fault::Pass
        } else {
            ALL[1 + (rng.next_u64() % 6) as usize]
        }
    } else {
        Fault::Pass
    };
    if let Some(i) = ALL.iter().position(|f| *f == fault) {
        st.counts[i].fetch_add(1, Ordering::SeqCst);
    }
    match fault {
        Fault::Pass => {
            client.write_all(resp_head.as_bytes())?;
            client.write_all(body)?;
        }
        Fault::Error500 => {
            client.write_all(
                b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 5\r\nConnection: close\r\n\r\noops\n",
            )?;
        }
        Fault::Reset => {
            let all = [resp_head.as_bytes(), body].concat();
            client.write_all(&all[..all.len() / 2])?;
            // SO_LINGER 0 turns the close into a reset.
            let fd = std::os::fd::AsRawFd::as_raw_fd(&client);
            let linger = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            // SAFETY: valid socket fd and a correctly sized linger struct.
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&linger as *const libc::linger).cast(),
                    std::mem::size_of::<libc::linger>() as libc::socklen_t,
                );
            }
            return Ok(());
        }
        Fault::Stall => {
            thread::sleep(st.stall);
            client.write_all(resp_head.as_bytes())?;
            client.write_all(body)?;
        }
        Fault::Truncate => {
            client.write_all(resp_head.as_bytes())?;
            client.write_all(&body[..body.len() / 2])?;
        }
        Fault::Corrupt => {
            let mut b = body.to_vec();
            let mut i = 0;
            while i < b.len() {
                b[i] ^= 0x55;
                i += 997;
            }
            client.write_all(resp_head.as_bytes())?;
            client.write_all(&b)?;
        }
        Fault::WrongRange => {
            let h = resp_head
                .lines()
                .map(|l| {
                    if l.to_ascii_lowercase().starts_with("content-range: bytes ") {
                        // Shift the claimed range by one byte.
                        let v = &l["content-range: bytes ".len()..];
                        match v.split_once('-') {
                            Some((a, rest)) => {
                                let a: u64 = a.parse().unwrap_or(0);
                                format!("Content-Range: bytes {}-{rest}", a + 1)
                            }
                            None => l.to_string(),
                        }
                    } else {
                        l.to_string()
                    }
                })
                .collect::<Vec<_>>()
                .join("\r\n")
                + "\r\n";
            client.write_all(h.as_bytes())?;
            client.write_all(body)?;
        }
    }
    let _ = client.shutdown(Shutdown::Write);
    Ok(())
}
