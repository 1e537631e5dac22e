//! The gRPC face of the [`Snapshotter`]: containerd's `containerd.services.snapshots.v1`
//! service, one tracing span per request, each request counted by method and outcome.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use arbor_proto::snapshots::snapshots_server::{Snapshots, SnapshotsServer};
use arbor_proto::snapshots::{
    CleanupRequest, CommitSnapshotRequest, Info, ListSnapshotsRequest, ListSnapshotsResponse,
    MountsRequest, MountsResponse, PrepareSnapshotRequest, PrepareSnapshotResponse,
    RemoveSnapshotRequest, StatSnapshotRequest, StatSnapshotResponse, UpdateSnapshotRequest,
    UpdateSnapshotResponse, UsageRequest, UsageResponse, ViewSnapshotRequest, ViewSnapshotResponse,
};
use tonic::{Code, Request, Response, Status};
use tracing::{Instrument, debug, info_span};

use crate::error::Result;
use crate::meta::{Kind, Record};
use crate::snapshotter::Snapshotter;

/// gRPC metadata key: a `Stat` carrying it is answered with the record as it is, without
/// waiting for a lazy layer's proof (`arbor pull` asking arbord directly what holds a chain ID;
/// containerd never sends it).
pub const RAW_STAT_HEADER: &str = "arbor-raw-stat";

/// Serves a [`Snapshotter`] over gRPC.
#[derive(Clone)]
pub struct Service {
    inner: Arc<Snapshotter>,
}

impl Service {
    pub fn new(inner: Arc<Snapshotter>) -> Service {
        Service { inner }
    }

    /// The tonic service to add to a server.
    pub fn into_server(self) -> SnapshotsServer<Service> {
        SnapshotsServer::new(self)
    }

    fn done<T>(&self, op: &'static str, r: Result<T>) -> Result<T, Status> {
        let outcome = match &r {
            Ok(_) => "ok",
            Err(e) => code_name(status_code(e)),
        };
        self.inner.counters().op(op, outcome);
        match r {
            Ok(v) => Ok(v),
            Err(e) => {
                let s = Status::from(e);
                if s.code() == Code::AlreadyExists {
                    debug!(code = ?s.code(), message = s.message(), "answer");
                } else {
                    tracing::info!(code = ?s.code(), message = s.message(), "request failed");
                }
                Err(s)
            }
        }
    }
}

fn status_code(e: &crate::error::Error) -> Code {
    use crate::error::Error::*;
    match e {
        NotFound(_) => Code::NotFound,
        AlreadyExists(_) => Code::AlreadyExists,
        FailedPrecondition(_) => Code::FailedPrecondition,
        InvalidArgument(_) => Code::InvalidArgument,
        Timeout(_) => Code::DeadlineExceeded,
        _ => Code::Internal,
    }
}

fn code_name(c: Code) -> &'static str {
    match c {
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::FailedPrecondition => "failed_precondition",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        _ => "internal",
    }
}

fn sorted(m: std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    m.into_iter().collect()
}

fn timestamp(nanos: i64) -> prost_types::Timestamp {
    let t = UNIX_EPOCH + Duration::from_nanos(nanos.max(0) as u64);
    prost_types::Timestamp::from(t)
}

/// The API's view of a record.
pub fn info(name: &str, r: &Record) -> Info {
    use arbor_proto::snapshots::Kind as K;
    Info {
        name: name.to_string(),
        parent: r.parent.clone(),
        kind: match r.kind {
            Kind::View => K::View,
            Kind::Active => K::Active,
            Kind::Committed => K::Committed,
        } as i32,
        created_at: Some(timestamp(r.created)),
        updated_at: Some(timestamp(r.updated)),
        labels: r
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}

type ListStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<ListSnapshotsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Snapshots for Service {
    async fn prepare(
        &self,
        req: Request<PrepareSnapshotRequest>,
    ) -> Result<Response<PrepareSnapshotResponse>, Status> {
        let r = req.into_inner();
        let span = info_span!("prepare", key = %r.key, parent = %r.parent);
        let res = self
            .inner
            .prepare(&r.key, &r.parent, sorted(r.labels))
            .instrument(span.clone())
            .await;
        let _e = span.enter();
        let mounts = self.done("prepare", res)?;
        Ok(Response::new(PrepareSnapshotResponse { mounts }))
    }

    async fn view(
        &self,
        req: Request<ViewSnapshotRequest>,
    ) -> Result<Response<ViewSnapshotResponse>, Status> {
        let r = req.into_inner();
        let span = info_span!("view", key = %r.key, parent = %r.parent);
        let res = self
            .inner
            .view(&r.key, &r.parent, sorted(r.labels))
            .instrument(span.clone())
            .await;
        let _e = span.enter();
        let mounts = self.done("view", res)?;
        Ok(Response::new(ViewSnapshotResponse { mounts }))
    }

    async fn mounts(
        &self,
        req: Request<MountsRequest>,
    ) -> Result<Response<MountsResponse>, Status> {
        let r = req.into_inner();
        let span = info_span!("mounts", key = %r.key);
        let res = self.inner.mounts(&r.key).instrument(span.clone()).await;
        let _e = span.enter();
        let mounts = self.done("mounts", res)?;
        Ok(Response::new(MountsResponse { mounts }))
    }

    async fn commit(&self, req: Request<CommitSnapshotRequest>) -> Result<Response<()>, Status> {
        let r = req.into_inner();
        let span = info_span!("commit", name = %r.name, key = %r.key);
        let res = self
            .inner
            .commit(&r.name, &r.key, sorted(r.labels))
            .instrument(span.clone())
            .await;
        let _e = span.enter();
        self.done("commit", res)?;
        Ok(Response::new(()))
    }

    async fn remove(&self, req: Request<RemoveSnapshotRequest>) -> Result<Response<()>, Status> {
        let r = req.into_inner();
        let span = info_span!("remove", key = %r.key);
        let res = self.inner.remove(&r.key).instrument(span.clone()).await;
        let _e = span.enter();
        self.done("remove", res)?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        req: Request<StatSnapshotRequest>,
    ) -> Result<Response<StatSnapshotResponse>, Status> {
        let raw = req.metadata().get(RAW_STAT_HEADER).is_some();
        let r = req.into_inner();
        let span = info_span!("stat", key = %r.key, raw);
        let res = if raw {
            self.inner.record_of(&r.key).instrument(span.clone()).await
        } else {
            self.inner.stat(&r.key).instrument(span.clone()).await
        };
        let _e = span.enter();
        let rec = self.done("stat", res)?;
        Ok(Response::new(StatSnapshotResponse {
            info: Some(info(&r.key, &rec)),
        }))
    }

    async fn update(
        &self,
        req: Request<UpdateSnapshotRequest>,
    ) -> Result<Response<UpdateSnapshotResponse>, Status> {
        let r = req.into_inner();
        let Some(i) = r.info else {
            return Err(Status::invalid_argument("update without snapshot info"));
        };
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let span = info_span!("update", key = %i.name);
        let res = self
            .inner
            .update(&i.name, sorted(i.labels), paths)
            .instrument(span.clone())
            .await;
        let _e = span.enter();
        let rec = self.done("update", res)?;
        Ok(Response::new(UpdateSnapshotResponse {
            info: Some(info(&i.name, &rec)),
        }))
    }

    type ListStream = ListStream;

    async fn list(
        &self,
        req: Request<ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let r = req.into_inner();
        let span = info_span!("list", filters = ?r.filters);
        let res = self.inner.list(&r.filters).instrument(span.clone()).await;
        let _e = span.enter();
        let all = self.done("list", res)?;
        // Batches of 100, as containerd's own proxy does.
        let batches: Vec<Result<ListSnapshotsResponse, Status>> = all
            .chunks(100)
            .map(|c| {
                Ok(ListSnapshotsResponse {
                    info: c.iter().map(|(k, r)| info(k, r)).collect(),
                })
            })
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(batches))))
    }

    async fn usage(&self, req: Request<UsageRequest>) -> Result<Response<UsageResponse>, Status> {
        let r = req.into_inner();
        let span = info_span!("usage", key = %r.key);
        let res = self.inner.usage(&r.key).instrument(span.clone()).await;
        let _e = span.enter();
        let u = self.done("usage", res)?;
        Ok(Response::new(UsageResponse {
            size: u.size,
            inodes: u.inodes,
        }))
    }

    async fn cleanup(&self, _req: Request<CleanupRequest>) -> Result<Response<()>, Status> {
        let span = info_span!("cleanup");
        let res = self.inner.cleanup().instrument(span.clone()).await;
        let _e = span.enter();
        let n = self.done("cleanup", res)?;
        tracing::info!(removed = n, "cleanup");
        Ok(Response::new(()))
    }
}
