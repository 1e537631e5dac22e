//! A detached container's life after [`super::run`]: waiting for its exit, stopping and
//! removing it (task, container record, snapshot), and finding the containers that carry a
//! label. What a long-lived owner of containers (the function gateway) needs besides `run`.

use std::collections::HashMap;
use std::time::Duration;

use arbor_proto::containerd::services::containers::v1::ListContainersRequest;
use arbor_proto::containerd::services::containers::v1::containers_client::ContainersClient;
use arbor_proto::containerd::services::tasks::v1::tasks_client::TasksClient;
use arbor_proto::containerd::services::tasks::v1::{GetRequest, WaitRequest};

use super::{kill, remove_container_id, req};
use crate::error::{Result, Rpc as _};
use crate::pull::{self, Target};

/// Waits until the task of container `id` exits; its exit status. An error when there is no
/// such task (or containerd cannot be reached).
pub async fn wait_exit(t: &Target, id: &str) -> Result<u32> {
    let ch = pull::connect(t).await?;
    let mut tc = TasksClient::new(ch);
    let r = tc
        .wait(req(
            t,
            None,
            WaitRequest {
                container_id: id.into(),
                exec_id: String::new(),
            },
        )?)
        .await
        .rpc(format!("waiting for task {id}"))?;
    Ok(r.into_inner().exit_status)
}

/// The pid of container `id`'s task if it is running; `None` if it has none or it is not
/// running (created, stopped, paused).
pub async fn running_pid(t: &Target, id: &str) -> Result<Option<u32>> {
    let ch = pull::connect(t).await?;
    let mut tc = TasksClient::new(ch);
    let r = tc
        .get(req(
            t,
            None,
            GetRequest {
                container_id: id.into(),
                exec_id: String::new(),
            },
        )?)
        .await;
    match r {
        Ok(r) => Ok(r
            .into_inner()
            .process
            .filter(|p| p.status == arbor_proto::containerd::v1::types::Status::Running as i32)
            .map(|p| p.pid)),
        Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
        Err(s) => Err(s).rpc(format!("asking for task {id}")),
    }
}

/// Stops container `id` (SIGTERM, then SIGKILL after `grace`) and deletes its task, its
/// record and its snapshot. Whatever is already gone is skipped; nothing here fails the
/// caller except containerd being unreachable.
pub async fn stop_and_remove(t: &Target, id: &str, grace: Duration) -> Result<()> {
    let ch = pull::connect(t).await?;
    let mut tc = TasksClient::new(ch.clone());
    let exited = {
        let (t, id) = (t.clone(), id.to_string());
        tokio::spawn(async move { wait_exit(&t, &id).await })
    };
    kill(&mut tc, t, id, libc::SIGTERM, true).await;
    let mut exited = exited;
    if tokio::time::timeout(grace, &mut exited).await.is_err() {
        kill(&mut tc, t, id, libc::SIGKILL, true).await;
        if tokio::time::timeout(Duration::from_secs(10), &mut exited)
            .await
            .is_err()
        {
            tracing::warn!(id, "the task did not exit 10 s after SIGKILL");
            exited.abort();
        }
    }
    remove_container_id(&ch, t, id).await;
    Ok(())
}

/// The containers (id, labels) that have label `key`.
pub async fn list_labelled(
    t: &Target,
    key: &str,
) -> Result<Vec<(String, HashMap<String, String>)>> {
    let ch = pull::connect(t).await?;
    let mut cc = ContainersClient::new(ch);
    let filter = format!("labels.{key:?}");
    let r = cc
        .list(req(
            t,
            None,
            ListContainersRequest {
                filters: vec![filter],
            },
        )?)
        .await
        .rpc("listing containers")?;
    Ok(r.into_inner()
        .containers
        .into_iter()
        .map(|c| (c.id, c.labels))
        .collect())
}
