//! The HTTP/JSON API (axum):
//!
//! | method and path | what |
//! |---|---|
//! | `PUT /v1/functions/NAME` | create (201) or update (200) a function from a JSON [`FunctionSpec`] |
//! | `GET /v1/functions` | every function, with its instances |
//! | `GET /v1/functions/NAME` | one function: instances, their state and cold-start phases |
//! | `DELETE /v1/functions/NAME` | remove it, draining its instances (`?wait_secs=`, default 30) |
//! | `POST /v1/functions/NAME/invoke` | proxy body and headers to an instance's `POST /invoke` |
//! | `GET /v1/functions/NAME/logs` | instance logs (`?instance=ID&tail=BYTES`) |
//! | `GET /healthz` | `ok` |
//!
//! Errors are JSON `{"error": "...", "kind": "..."}` with the status of [`Error::status`].
//! With a token configured every request but `/healthz` needs `Authorization: Bearer TOKEN`.
//! Invocations carry `x-arbor-request-id` (the caller's `x-request-id`, else a new one) to
//! the instance and back, with `x-arbor-instance`, `x-arbor-start` (`cold`/`warm`) and
//! `x-arbor-queue-ms`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;
use tracing::{Instrument as _, info_span};

use crate::def::FunctionSpec;
use crate::error::Error;
use crate::pool::{Deployed, Gateway};

#[derive(Clone)]
struct App {
    gw: Gateway,
    token: Option<Arc<str>>,
    seq: Arc<AtomicU64>,
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = json!({"error": self.to_string(), "kind": self.kind()});
        (status, axum::Json(body)).into_response()
    }
}

/// The router over `gw`; `token` (if any) is required as a bearer token.
pub fn router(gw: Gateway, token: Option<String>) -> Router {
    let max_body = gw.max_body();
    let app = App {
        gw,
        token: token.filter(|t| !t.is_empty()).map(Arc::from),
        seq: Arc::new(AtomicU64::new(0)),
    };
    Router::new()
        .route("/v1/functions", get(list))
        .route(
            "/v1/functions/{name}",
            get(get_one).put(deploy).delete(remove),
        )
        .route("/v1/functions/{name}/invoke", post(invoke))
        .route("/v1/functions/{name}/logs", get(logs))
        .layer(axum::middleware::from_fn_with_state(app.clone(), auth))
        .route("/healthz", get(|| async { "ok" }))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(app)
}

/// Serves `router` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn auth(State(app): State<App>, req: Request, next: Next) -> Response {
    if let Some(t) = &app.token {
        let given = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        if !constant_time_eq(given.as_bytes(), t.as_bytes()) {
            return Error::Unauthorized.into_response();
        }
    }
    next.run(req).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn list(State(app): State<App>) -> Response {
    axum::Json(app.gw.list()).into_response()
}

async fn get_one(State(app): State<App>, Path(name): Path<String>) -> Result<Response, Error> {
    Ok(axum::Json(app.gw.get(&name)?).into_response())
}

async fn deploy(
    State(app): State<App>,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Error> {
    let body = body_or_error(body, app.gw.max_body())?;
    let spec: FunctionSpec =
        serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_slice(&body))
            .map_err(|e| Error::Invalid(format!("the function definition: {e}")))?;
    let (how, view) = app.gw.deploy(&name, spec)?;
    let status = if how == Deployed::Created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, axum::Json(json!({"result": how, "function": view}))).into_response())
}

#[derive(Deserialize)]
struct RemoveQuery {
    wait_secs: Option<u64>,
}

async fn remove(
    State(app): State<App>,
    Path(name): Path<String>,
    Query(q): Query<RemoveQuery>,
) -> Result<Response, Error> {
    let wait = Duration::from_secs(q.wait_secs.unwrap_or(30).min(600));
    let left = app.gw.remove(&name, wait).await?;
    Ok(axum::Json(json!({"removed": name, "instances_stopping": left})).into_response())
}

#[derive(Deserialize)]
struct LogsQuery {
    instance: Option<String>,
    tail: Option<u64>,
}

async fn logs(
    State(app): State<App>,
    Path(name): Path<String>,
    Query(q): Query<LogsQuery>,
) -> Result<Response, Error> {
    let tail = q.tail.unwrap_or(64 << 10).min(16 << 20);
    let logs = app.gw.logs(&name, q.instance.as_deref(), tail)?;
    let v: Vec<_> = logs
        .into_iter()
        .map(|(id, text)| json!({"instance": id, "log": text}))
        .collect();
    Ok(axum::Json(v).into_response())
}

fn body_or_error(body: Result<Bytes, BytesRejection>, max: usize) -> Result<Bytes, Error> {
    body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Error::TooLarge(max)
        } else {
            Error::Invalid(format!("reading the request body: {r}"))
        }
    })
}

async fn invoke(
    State(app): State<App>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Error> {
    let request_id = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .map(str::to_string)
        .unwrap_or_else(|| {
            let n = app.seq.fetch_add(1, Ordering::Relaxed);
            format!("{:x}-{n}", std::process::id())
        });
    let span = info_span!("invoke", function = %name, request_id = %request_id);
    async move {
        let body = body_or_error(body, app.gw.max_body())?;
        let fwd = headers
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), v.as_bytes().to_vec()))
            .collect();
        let r = app.gw.invoke(&name, &request_id, fwd, body).await?;
        let mut resp = Response::new(axum::body::Body::from(r.body));
        *resp.status_mut() = StatusCode::from_u16(r.status).unwrap_or(StatusCode::BAD_GATEWAY);
        let h = resp.headers_mut();
        for (k, v) in r.headers {
            if let (Ok(k), Ok(v)) = (HeaderName::try_from(k), HeaderValue::from_bytes(&v)) {
                h.append(k, v);
            }
        }
        let mut set = |k: &'static str, v: String| {
            if let Ok(v) = HeaderValue::try_from(v) {
                h.insert(k, v);
            }
        };
        set("x-arbor-request-id", request_id.clone());
        set("x-arbor-instance", r.instance);
        set("x-arbor-start", if r.cold { "cold" } else { "warm" }.into());
        set("x-arbor-queue-ms", format!("{:.3}", r.queue_seconds * 1e3));
        Ok(resp)
    }
    .instrument(span)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
    }
}
