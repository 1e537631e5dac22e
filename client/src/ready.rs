//! When a started function is ready, and telling arbord: its TCP port probed from inside the
//! container's network namespace (a socket belongs to the namespace it is made in), and the
//! start's phases reported to the arbord behind the container's snapshotter
//! (`arbor.v1.Starts.Ready`), which learns the image's start-up set from it. Shared by
//! `arbor run --wait-ready` and the runtime shim `containerd-shim-arbor-v1`.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant, SystemTime};

use arbor_proto::arbor::starts_client::StartsClient;
use arbor_proto::arbor::{LayersRequest, LayersResponse, Phase, ReadyRequest, ReadyResponse};
use arbor_proto::containerd::services::containers::v1::GetContainerRequest;
use arbor_proto::containerd::services::containers::v1::containers_client::ContainersClient;
use tonic::transport::Channel;

use crate::error::{Error, Result, Rpc as _};
use crate::pull::{Target, req};

/// The annotation naming a container's function.
pub const ANN_FUNCTION: &str = "arbor.io/function";
/// The annotation naming the port a function listens on.
pub const ANN_PORT: &str = "arbor.io/port";
/// The port of a function that names none (the custom-container convention).
pub const DEFAULT_PORT: u16 = 9000;
/// How often the port is tried.
pub const PROBE_EVERY: Duration = Duration::from_millis(5);

/// The port a container's annotations name (`arbor.io/port`), else [`DEFAULT_PORT`].
pub fn port_of<'a>(mut annotations: impl Iterator<Item = (&'a String, &'a String)>) -> u16 {
    annotations
        .find(|(k, _)| k.as_str() == ANN_PORT)
        .and_then(|(_, v)| v.trim().parse().ok())
        .filter(|p| *p != 0)
        .unwrap_or(DEFAULT_PORT)
}

/// Waits until something accepts TCP connections on `port` (127.0.0.1, then ::1) in the
/// network namespace of process `pid`, trying every [`PROBE_EVERY`], for `timeout` at most.
/// Returns when the port opened. The probe runs on a thread of its own that joins the
/// namespace (`setns`) and ends with the probe, so no other work runs in that namespace.
pub async fn wait_port(pid: u32, port: u16, timeout: Duration) -> Result<SystemTime> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(format!("arbor-probe-{pid}"))
        .spawn(move || {
            let _ = tx.send(probe_in_netns(pid, port, timeout));
        })
        .map_err(|e| Error::Invalid(format!("starting the probe thread: {e}")))?;
    rx.await
        .map_err(|_| Error::Invalid("the probe thread died".into()))?
}

fn probe_in_netns(pid: u32, port: u16, timeout: Duration) -> Result<SystemTime> {
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/net")).map_err(|e| {
        Error::Invalid(format!(
            "opening the network namespace of process {pid}: {e}"
        ))
    })?;
    // SAFETY: setns on a descriptor we own, on this thread only (a thread of its own).
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(Error::Invalid(format!(
            "joining the network namespace of process {pid}: {}",
            std::io::Error::last_os_error()
        )));
    }
    let addrs = [
        SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        SocketAddr::from((Ipv6Addr::LOCALHOST, port)),
    ];
    let deadline = Instant::now() + timeout;
    loop {
        for a in &addrs {
            if TcpStream::connect_timeout(a, Duration::from_millis(200)).is_ok() {
                return Ok(SystemTime::now());
            }
        }
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            return Err(Error::Invalid(format!(
                "process {pid} exited before port {port} opened"
            )));
        }
        if Instant::now() >= deadline {
            return Err(Error::Invalid(format!(
                "port {port} did not open within {} s",
                timeout.as_secs()
            )));
        }
        std::thread::sleep(PROBE_EVERY);
    }
}

/// The snapshotter container `id` runs on (from containerd's record).
pub async fn container_snapshotter(t: &Target, id: &str) -> Result<String> {
    let ch = crate::pull::connect(t).await?;
    let c = ContainersClient::new(ch)
        .get(req(t, None, GetContainerRequest { id: id.to_string() })?)
        .await
        .rpc("reading the container record")?
        .into_inner()
        .container
        .unwrap_or_default();
    Ok(c.snapshotter)
}

/// Unix nanoseconds of `t`.
pub fn unix_nanos(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

/// One phase of a start, for [`report`].
pub fn phase(name: &str, start: SystemTime, end: SystemTime) -> Phase {
    Phase {
        name: name.to_string(),
        start_unix_nano: unix_nanos(start),
        end_unix_nano: unix_nanos(end),
    }
}

/// The lazy layers arbord serves under `rootfs` (top first) and when each was mounted.
pub async fn layers(arbord: &Channel, rootfs: Vec<arbor_proto::Mount>) -> Result<LayersResponse> {
    Ok(StartsClient::new(arbord.clone())
        .layers(LayersRequest { rootfs })
        .await
        .rpc("asking arbord for the container's layers")?
        .into_inner())
}

/// Reports a start ready to arbord.
pub async fn report(arbord: &Channel, r: ReadyRequest) -> Result<ReadyResponse> {
    Ok(StartsClient::new(arbord.clone())
        .ready(r)
        .await
        .rpc("reporting the start to arbord")?
        .into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_from_annotations() {
        let mut a = std::collections::HashMap::new();
        assert_eq!(port_of(a.iter()), DEFAULT_PORT);
        a.insert(ANN_PORT.to_string(), "8080".to_string());
        assert_eq!(port_of(a.iter()), 8080);
        a.insert(ANN_PORT.to_string(), "nonsense".to_string());
        assert_eq!(port_of(a.iter()), DEFAULT_PORT);
        a.insert(ANN_PORT.to_string(), "0".to_string());
        assert_eq!(port_of(a.iter()), DEFAULT_PORT);
    }

    #[tokio::test]
    async fn probes_a_port_in_our_own_namespace() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let me = std::process::id();
        // setns needs CAP_SYS_ADMIN even into one's own namespace; as a user it fails clearly.
        match wait_port(me, port, Duration::from_secs(5)).await {
            Ok(t) => assert!(t <= SystemTime::now()),
            Err(e) => assert!(e.to_string().contains("joining"), "{e}"),
        }
        drop(l);
        if is_root() {
            let err = wait_port(me, port, Duration::from_millis(50))
                .await
                .unwrap_err();
            assert!(err.to_string().contains("did not open"), "{err}");
        }
    }

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }
}
