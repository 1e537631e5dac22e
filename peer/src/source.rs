//! [`PeerSource`]: a [`BlobSource`] that reads blob ranges from a parent's `arbor.v1.Peer`
//! service over TCP.
//!
//! One `PeerSource` talks to one parent (`host:port`) on behalf of one function's tree. A read
//! sends one `ReadRange` request and concatenates the streamed pieces into one buffer. The
//! parent may itself still be fetching the range from its own parent or the registry; while it
//! waits it sends `waiting` keep-alives, so a parent that works slowly is told apart from one
//! that stalled: if no piece (data or keep-alive) arrives within the stall deadline — including
//! the wait for the response headers — the read fails with [`SourceErrorKind::Timeout`], and
//! the router above moves on to its next route. The total time of a read is not bounded here
//! (the router bounds it).
//!
//! Errors are classified for the router: the parent not serving the blob is
//! [`SourceErrorKind::Lacks`], a refused request is [`SourceErrorKind::Refused`], connection
//! failures and the parent's own upstream failures are [`SourceErrorKind::Unavailable`], and
//! a stream with more or fewer bytes than asked for is [`SourceErrorKind::Short`]. Content is
//! never verified here: the fetcher checks every block above all sources.

use std::time::Duration;

use arbor_fetch::source::{BlobSource, ReadFuture, SourceError, SourceErrorKind};
use arbor_proto::arbor::ReadRangeRequest;
use arbor_proto::arbor::peer_client::PeerClient;
use bytes::{Bytes, BytesMut};
use tokio::time::{Instant, timeout};
use tonic::Code;
use tonic::transport::{Channel, Endpoint};
use tracing::{Instrument, debug, debug_span};

/// Default stall deadline: how long a read waits for the next piece (data or keep-alive).
pub const DEFAULT_STALL: Duration = Duration::from_secs(1);

/// How long establishing the TCP connection to the parent may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// The most a read preallocates, whatever length is asked for (the Peer service serves at
/// most 64 MiB per request).
const MAX_PREALLOC: u64 = 64 << 20;

/// Reads blob ranges from one parent's Peer service; see the module docs.
///
/// Cheap to share: reads run concurrently over one lazily connected HTTP/2 channel, which is
/// re-established when it breaks.
#[derive(Clone)]
pub struct PeerSource {
    addr: String,
    function: String,
    node_id: String,
    stall: Duration,
    /// `peer <addr>`: the `source_name` of every error.
    name: String,
    client: PeerClient<Channel>,
}

impl std::fmt::Debug for PeerSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerSource")
            .field("addr", &self.addr)
            .field("function", &self.function)
            .field("node_id", &self.node_id)
            .field("stall", &self.stall)
            .finish_non_exhaustive()
    }
}

impl PeerSource {
    /// A source reading from the Peer service at `addr` (`host:port`, e.g. `10.0.0.3:7071` or
    /// `[fd00::3]:7071`) for `function`'s tree, asking as node `node_id`; a read fails with
    /// [`SourceErrorKind::Timeout`] when nothing arrives for `stall` (see [`DEFAULT_STALL`]).
    ///
    /// No connection is made here: it is made on the first read (and re-made when it breaks).
    /// Must be called within a tokio runtime (the channel's worker task is spawned on it);
    /// outside one, or with an address that is not `host:port`, it fails with
    /// [`SourceErrorKind::Refused`].
    pub fn new(
        addr: &str,
        function: &str,
        node_id: &str,
        stall: Duration,
    ) -> Result<PeerSource, SourceError> {
        let name = format!("peer {addr}");
        let refused = |m: String| SourceError::new(SourceErrorKind::Refused, name.clone(), m);
        if addr.is_empty()
            || addr
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '/' | '?' | '#' | '@'))
        {
            return Err(refused(format!("address {addr:?} is not host:port")));
        }
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| refused(format!("address {addr:?} is not host:port: {e}")))?;
        if endpoint.uri().port_u16().is_none() || endpoint.uri().host().is_none_or(str::is_empty) {
            return Err(refused(format!("address {addr:?} is not host:port")));
        }
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(refused(
                "a peer source must be created within a tokio runtime".to_string(),
            ));
        }
        let channel = endpoint
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            // Large windows: a parent streams whole ranges to its children.
            .initial_stream_window_size(Some(4 << 20))
            .initial_connection_window_size(Some(16 << 20))
            .connect_lazy();
        Ok(PeerSource {
            addr: addr.to_string(),
            function: function.to_string(),
            node_id: node_id.to_string(),
            stall,
            name,
            client: PeerClient::new(channel)
                // The server bounds each request to 64 MiB but cuts it into small pieces.
                .max_decoding_message_size(8 << 20),
        })
    }

    /// The parent's `host:port`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The function whose tree this source reads in.
    pub fn function(&self) -> &str {
        &self.function
    }

    /// The stall deadline.
    pub fn stall(&self) -> Duration {
        self.stall
    }

    fn error(&self, kind: SourceErrorKind, message: impl Into<String>) -> SourceError {
        SourceError::new(kind, self.name.clone(), message)
    }

    async fn read(&self, digest: &str, offset: u64, len: u64) -> Result<Bytes, SourceError> {
        let started = Instant::now();
        let mut client = self.client.clone();
        let request = ReadRangeRequest {
            function: self.function.clone(),
            digest: digest.to_string(),
            offset,
            length: len,
            node: self.node_id.clone(),
        };
        let response = match timeout(self.stall, client.read_range(request)).await {
            Err(_) => {
                return Err(self.error(
                    SourceErrorKind::Timeout,
                    format!("no response within {:?}", self.stall),
                ));
            }
            Ok(Err(status)) => return Err(self.status_error(&status, 0, len)),
            Ok(Ok(r)) => r,
        };
        let mut stream = response.into_inner();
        // The first piece is kept as it came (a slice of tonic's buffer): an answer in one
        // piece is used without a copy. From the second on, the pieces are copied into `buf`
        // (bounded by `len`), so that a peer sending many small pieces cannot make this hold
        // each piece's whole receive buffer.
        let mut first: Option<Bytes> = None;
        let mut buf = BytesMut::new();
        let mut have = 0u64;
        let mut pieces = 0u64;
        let mut keepalives = 0u64;
        loop {
            let piece = match timeout(self.stall, stream.message()).await {
                Err(_) => {
                    return Err(self.error(
                        SourceErrorKind::Timeout,
                        format!(
                            "stalled: nothing for {:?} after {} of {len} bytes",
                            self.stall, have
                        ),
                    ));
                }
                Ok(Err(status)) => return Err(self.status_error(&status, have, len)),
                Ok(Ok(None)) => break,
                Ok(Ok(Some(p))) => p,
            };
            if piece.data.is_empty() {
                keepalives += u64::from(piece.waiting);
                continue;
            }
            pieces += 1;
            if (piece.data.len() as u64) > len.saturating_sub(have) {
                // Dropping the stream cancels the request.
                return Err(self.error(
                    SourceErrorKind::Short,
                    format!(
                        "asked for {len} bytes at {offset}, got more ({} after {have})",
                        piece.data.len()
                    ),
                ));
            }
            have += piece.data.len() as u64;
            match first.take() {
                None if buf.is_empty() => first = Some(piece.data),
                earlier => {
                    if let Some(f) = earlier {
                        // Bounded: `len` comes from the caller and may be anything.
                        buf.reserve(len.min(MAX_PREALLOC) as usize);
                        buf.extend_from_slice(&f);
                    }
                    buf.extend_from_slice(&piece.data);
                }
            }
        }
        if have != len {
            return Err(self.error(
                SourceErrorKind::Short,
                format!("asked for {len} bytes at {offset}, got {have}"),
            ));
        }
        debug!(
            pieces,
            keepalives,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "read from peer"
        );
        Ok(match first {
            Some(only) => only,
            None => buf.freeze(),
        })
    }

    fn status_error(&self, status: &tonic::Status, got: u64, len: u64) -> SourceError {
        let kind = classify(status.code());
        let mut message = format!("{:?}: {}", status.code(), status.message());
        if got > 0 {
            message.push_str(&format!(" (after {got} of {len} bytes)"));
        }
        self.error(kind, message)
    }
}

/// What a gRPC status from a parent means for the router.
fn classify(code: Code) -> SourceErrorKind {
    match code {
        Code::NotFound => SourceErrorKind::Lacks,
        Code::DeadlineExceeded => SourceErrorKind::Timeout,
        Code::PermissionDenied
        | Code::Unauthenticated
        | Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::OutOfRange
        | Code::Unimplemented => SourceErrorKind::Refused,
        // Unavailable (including connect errors), ResourceExhausted, Aborted, Internal,
        // Unknown, and anything else: transient, or at least not this parent's final answer.
        _ => SourceErrorKind::Unavailable,
    }
}

impl BlobSource for PeerSource {
    fn kind(&self) -> &'static str {
        "peer"
    }

    fn read_range<'a>(&'a self, digest: &'a str, offset: u64, len: u64) -> ReadFuture<'a> {
        let span = debug_span!(
            "peer_read_range",
            peer = %self.addr,
            function = %self.function,
            digest,
            offset,
            len
        );
        Box::pin(
            async move {
                let r = self.read(digest, offset, len).await;
                if let Err(e) = &r {
                    debug!(kind = %e.kind, error = %e, "peer read failed");
                }
                r
            }
            .instrument(span),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map_to_kinds() {
        assert_eq!(classify(Code::NotFound), SourceErrorKind::Lacks);
        assert_eq!(classify(Code::DeadlineExceeded), SourceErrorKind::Timeout);
        for c in [
            Code::Unavailable,
            Code::ResourceExhausted,
            Code::Aborted,
            Code::Internal,
            Code::Unknown,
            Code::Cancelled,
        ] {
            assert_eq!(classify(c), SourceErrorKind::Unavailable, "{c:?}");
        }
        for c in [
            Code::PermissionDenied,
            Code::Unauthenticated,
            Code::InvalidArgument,
            Code::FailedPrecondition,
        ] {
            assert_eq!(classify(c), SourceErrorKind::Refused, "{c:?}");
        }
    }

    #[test]
    fn outside_a_runtime_is_an_error() {
        let e = PeerSource::new("127.0.0.1:1", "f", "n", DEFAULT_STALL).unwrap_err();
        assert_eq!(e.kind, SourceErrorKind::Refused);
    }

    #[tokio::test]
    async fn bad_addresses_are_refused() {
        for a in [
            "",
            "no-port",
            "http://x:1",
            "a b:1",
            "x:1/path",
            "u@x:1",
            ":1",
            "x:notaport",
            "x:99999",
        ] {
            let e = PeerSource::new(a, "f", "n", DEFAULT_STALL).unwrap_err();
            assert_eq!(e.kind, SourceErrorKind::Refused, "{a:?}");
        }
        let s = PeerSource::new("[::1]:7071", "f", "n", DEFAULT_STALL).unwrap();
        assert_eq!(s.addr(), "[::1]:7071");
        assert_eq!(s.kind(), "peer");
        PeerSource::new("node-3.example:7071", "f", "n", DEFAULT_STALL).unwrap();
    }
}
