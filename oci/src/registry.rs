//! An OCI distribution client: manifests, blobs (whole, streamed with resume, or by byte
//! range), uploads, with token auth and retries.
//!
//! Authentication follows the registry's `WWW-Authenticate` challenge: `Basic` sends the stored
//! credentials; `Bearer` fetches a token from the realm (with the credentials, if any), caches
//! it per scope until it expires, and fetches a new one when the registry rejects it. Transient
//! failures (connection errors, timeouts, 429 and 5xx) are retried with exponential backoff.
//! Everything a registry sends is checked: manifest digests, blob digests on whole reads, and
//! `Content-Range` plus length on ranged reads.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use reqwest::header::{
    ACCEPT, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, HeaderMap, LOCATION, RANGE,
    WWW_AUTHENTICATE,
};
use reqwest::{Method, RequestBuilder, Response, StatusCode, Url};
use sha2::{Digest as _, Sha256};
use tracing::{debug, instrument, warn};

use crate::auth::{Challenge, CredentialStore, Credentials, parse_challenge};
use crate::error::{Error, Result};
use crate::manifest::ACCEPT_MANIFESTS;
use crate::reference::Reference;

/// Largest manifest accepted (the distribution spec suggests 4 MiB).
pub const MAX_MANIFEST: usize = 4 << 20;

/// Client settings.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Talk plain HTTP instead of HTTPS (for local test registries).
    pub plain_http: bool,
    /// Retries after the first attempt for transient failures.
    pub retries: u32,
    /// First backoff delay; doubles on each retry.
    pub backoff: Duration,
    pub connect_timeout: Duration,
    /// Longest wait for the next bytes of a response.
    pub read_timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            plain_http: false,
            retries: 4,
            backoff: Duration::from_millis(200),
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(60),
        }
    }
}

#[derive(Clone)]
enum CachedAuth {
    Bearer { token: String, expires: Instant },
    Basic(Credentials),
}

struct Inner {
    http: reqwest::Client,
    opts: ClientOptions,
    creds: CredentialStore,
    auth: Mutex<HashMap<String, CachedAuth>>,
}

/// A registry client shared by all requests of a process (cheap to clone).
#[derive(Clone)]
pub struct RegistryClient {
    inner: Arc<Inner>,
}

/// What access a request needs (the token scope's actions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Pull,
    Push,
}

impl RegistryClient {
    pub fn new(opts: ClientOptions, creds: CredentialStore) -> Result<RegistryClient> {
        crate::init_tls();
        let http = reqwest::Client::builder()
            .connect_timeout(opts.connect_timeout)
            .read_timeout(opts.read_timeout)
            .user_agent(concat!("arbor/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::Http {
                url: "client".into(),
                source: e,
            })?;
        Ok(RegistryClient {
            inner: Arc::new(Inner {
                http,
                opts,
                creds,
                auth: Mutex::new(HashMap::new()),
            }),
        })
    }

    fn base(&self, r: &Reference) -> String {
        let scheme = if self.inner.opts.plain_http {
            "http"
        } else {
            "https"
        };
        format!("{scheme}://{}/v2/{}", r.endpoint(), r.repository)
    }

    fn scope(r: &Reference, access: Access) -> String {
        match access {
            Access::Pull => format!("repository:{}:pull", r.repository),
            Access::Push => format!("repository:{}:pull,push", r.repository),
        }
    }

    fn cache_key(r: &Reference, access: Access) -> String {
        format!("{}|{}", r.endpoint(), Self::scope(r, access))
    }

    fn cached(&self, key: &str) -> Option<CachedAuth> {
        let map = self.inner.auth.lock().ok()?;
        match map.get(key)? {
            CachedAuth::Bearer { expires, .. } if *expires <= Instant::now() => None,
            a => Some(a.clone()),
        }
    }

    fn store_auth(&self, key: String, a: CachedAuth) {
        if let Ok(mut m) = self.inner.auth.lock() {
            m.insert(key, a);
        }
    }

    fn forget_auth(&self, key: &str) {
        if let Ok(mut m) = self.inner.auth.lock() {
            m.remove(key);
        }
    }

    /// Sends the request `build` makes, handling auth challenges and transient failures.
    /// Returns the first response that is neither 401 nor transient; the caller checks it.
    async fn send(
        &self,
        r: &Reference,
        access: Access,
        url: &str,
        build: impl Fn(&reqwest::Client) -> RequestBuilder,
    ) -> Result<Response> {
        let key = Self::cache_key(r, access);
        let mut auth_tries = 0;
        let mut attempt = 0u32;
        loop {
            let mut req = build(&self.inner.http);
            match self.cached(&key) {
                Some(CachedAuth::Bearer { token, .. }) => req = req.bearer_auth(token),
                Some(CachedAuth::Basic(c)) => req = req.basic_auth(c.username, Some(c.password)),
                None => {}
            }
            let result = req.send().await.map_err(|e| Error::Http {
                url: url.to_string(),
                source: e,
            });
            let retry = match result {
                Ok(resp) if resp.status() == StatusCode::UNAUTHORIZED => {
                    auth_tries += 1;
                    if auth_tries > 2 {
                        return Err(Error::Auth {
                            url: url.to_string(),
                            reason: "credentials rejected".into(),
                        });
                    }
                    self.forget_auth(&key);
                    self.authenticate(r, access, &key, url, resp.headers())
                        .await?;
                    continue;
                }
                Ok(resp) if is_transient_status(resp.status()) => {
                    let status = resp.status().as_u16();
                    let body = resp.text().await.unwrap_or_default();
                    Error::Status {
                        url: url.to_string(),
                        status,
                        body: truncate(&body),
                    }
                }
                Ok(resp) => return Ok(resp),
                Err(e) if e.is_transient() => e,
                Err(e) => return Err(e),
            };
            if attempt >= self.inner.opts.retries {
                return Err(retry);
            }
            let delay = self.inner.opts.backoff * 2u32.saturating_pow(attempt);
            warn!(%url, attempt, error = %retry, "transient registry failure, retrying in {delay:?}");
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }

    async fn authenticate(
        &self,
        r: &Reference,
        access: Access,
        key: &str,
        url: &str,
        headers: &HeaderMap,
    ) -> Result<()> {
        let challenge = headers
            .get(WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_challenge)
            .ok_or_else(|| Error::Auth {
                url: url.to_string(),
                reason: "401 without a WWW-Authenticate challenge".into(),
            })?;
        let creds = self.inner.creds.lookup(&r.registry).await?;
        match challenge.scheme.as_str() {
            "basic" => {
                let c = creds.ok_or_else(|| Error::Auth {
                    url: url.to_string(),
                    reason: format!(
                        "{} requires credentials; add them to ~/.docker/config.json or pass --creds",
                        r.registry
                    ),
                })?;
                self.store_auth(key.to_string(), CachedAuth::Basic(c));
                Ok(())
            }
            "bearer" => {
                let (token, ttl) = self
                    .fetch_token(&challenge, &Self::scope(r, access), creds, url)
                    .await?;
                // Renew a little before the registry would reject the token.
                let ttl = ttl.mul_f32(0.9).max(Duration::from_secs(5));
                self.store_auth(
                    key.to_string(),
                    CachedAuth::Bearer {
                        token,
                        expires: Instant::now() + ttl,
                    },
                );
                Ok(())
            }
            other => Err(Error::Auth {
                url: url.to_string(),
                reason: format!("unsupported auth scheme {other:?}"),
            }),
        }
    }

    #[instrument(skip_all, fields(realm))]
    async fn fetch_token(
        &self,
        ch: &Challenge,
        scope: &str,
        creds: Option<Credentials>,
        url: &str,
    ) -> Result<(String, Duration)> {
        let realm = ch.params.get("realm").ok_or_else(|| Error::Auth {
            url: url.to_string(),
            reason: "bearer challenge without realm".into(),
        })?;
        tracing::Span::current().record("realm", realm.as_str());
        let mut token_url = Url::parse(realm).map_err(|_| Error::Auth {
            url: url.to_string(),
            reason: format!("bad token realm {realm:?}"),
        })?;
        {
            let mut q = token_url.query_pairs_mut();
            if let Some(s) = ch.params.get("service") {
                q.append_pair("service", s);
            }
            q.append_pair(
                "scope",
                ch.params.get("scope").map_or(scope, String::as_str),
            );
        }
        let mut req = self.inner.http.get(token_url.clone());
        if let Some(c) = &creds {
            req = req.basic_auth(&c.username, Some(&c.password));
        }
        let resp = req.send().await.map_err(|e| Error::Http {
            url: realm.clone(),
            source: e,
        })?;
        if !resp.status().is_success() {
            return Err(Error::Auth {
                url: realm.clone(),
                reason: format!("token endpoint answered {}", resp.status()),
            });
        }
        #[derive(serde::Deserialize)]
        struct TokenResponse {
            #[serde(default)]
            token: Option<String>,
            #[serde(default)]
            access_token: Option<String>,
            #[serde(default)]
            expires_in: Option<u64>,
        }
        let body = read_limited(resp, 1 << 20, realm).await?;
        let t: TokenResponse = serde_json::from_slice(&body).map_err(|e| Error::Auth {
            url: realm.clone(),
            reason: format!("bad token response: {e}"),
        })?;
        let token = t.token.or(t.access_token).ok_or_else(|| Error::Auth {
            url: realm.clone(),
            reason: "token response without a token".into(),
        })?;
        debug!("obtained registry token");
        Ok((
            token,
            Duration::from_secs(t.expires_in.unwrap_or(60).max(60)),
        ))
    }

    /// Fetches a manifest by tag or digest; returns bytes, media type and verified digest.
    #[instrument(skip(self), fields(reference = %r))]
    pub async fn get_manifest(&self, r: &Reference) -> Result<(Bytes, String, String)> {
        let url = format!("{}/manifests/{}", self.base(r), r.manifest_ref());
        let accept = ACCEPT_MANIFESTS.join(", ");
        let resp = self
            .send(r, Access::Pull, &url, |c| {
                c.get(&url).header(ACCEPT, &accept)
            })
            .await?;
        let resp = check_status(resp, &url, &[StatusCode::OK]).await?;
        let media_type = header_str(resp.headers(), CONTENT_TYPE)
            .unwrap_or_default()
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_string();
        let header_digest = header_str(resp.headers(), "docker-content-digest");
        let body = read_limited(resp, MAX_MANIFEST, &url).await?;
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&body)));
        for expected in [r.digest.clone(), header_digest].into_iter().flatten() {
            if expected.starts_with("sha256:") && expected != digest {
                return Err(Error::DigestMismatch {
                    what: format!("manifest {r}"),
                    expected,
                    actual: digest,
                });
            }
        }
        Ok((body, media_type, digest))
    }

    /// The size of a blob, or `None` if the repository does not have it.
    pub async fn blob_size(
        &self,
        r: &Reference,
        digest: &str,
        access: Access,
    ) -> Result<Option<u64>> {
        let url = format!("{}/blobs/{digest}", self.base(r));
        let resp = self.send(r, access, &url, |c| c.head(&url)).await?;
        match resp.status() {
            StatusCode::OK => Ok(Some(
                header_str(resp.headers(), CONTENT_LENGTH)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
            )),
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(status_error(resp, &url).await),
        }
    }

    /// Opens a blob for streaming from `offset` (a `Range` request when `offset > 0`).
    pub async fn open_blob(&self, r: &Reference, digest: &str, offset: u64) -> Result<Response> {
        let url = format!("{}/blobs/{digest}", self.base(r));
        let resp = self
            .send(r, Access::Pull, &url, |c| {
                let req = c.get(&url);
                if offset > 0 {
                    req.header(RANGE, format!("bytes={offset}-"))
                } else {
                    req
                }
            })
            .await?;
        let want = if offset > 0 {
            StatusCode::PARTIAL_CONTENT
        } else {
            StatusCode::OK
        };
        let resp = check_status(resp, &url, &[want]).await?;
        if offset > 0 {
            let (start, _, _) = parse_content_range(resp.headers(), &url)?;
            if start != offset {
                return Err(Error::BadResponse {
                    what: url,
                    reason: format!("asked for bytes from {offset}, got from {start}"),
                });
            }
        }
        Ok(resp)
    }

    /// Reads `len` bytes of a blob from `offset` with one Range request, retrying transient
    /// failures and wrong answers. The bytes are exactly those asked for or an error; their
    /// content is not authenticated here (callers verify chunk digests).
    #[instrument(skip(self), fields(reference = %r))]
    pub async fn get_blob_range(
        &self,
        r: &Reference,
        digest: &str,
        offset: u64,
        len: u64,
    ) -> Result<Bytes> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        let url = format!("{}/blobs/{digest}", self.base(r));
        let mut attempt = 0;
        loop {
            let result = self.range_once(r, &url, offset, len).await;
            match result {
                Err(e) if e.is_transient() && attempt < self.inner.opts.retries => {
                    warn!(%url, offset, len, error = %e, "ranged read failed, retrying");
                    tokio::time::sleep(self.inner.opts.backoff * 2u32.saturating_pow(attempt))
                        .await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn range_once(&self, r: &Reference, url: &str, offset: u64, len: u64) -> Result<Bytes> {
        let end = offset + len - 1;
        let resp = self
            .send(r, Access::Pull, url, |c| {
                c.get(url).header(RANGE, format!("bytes={offset}-{end}"))
            })
            .await?;
        let resp = check_status(resp, url, &[StatusCode::PARTIAL_CONTENT]).await?;
        let (start, last, _) = parse_content_range(resp.headers(), url)?;
        if start != offset || last != end {
            return Err(Error::BadResponse {
                what: url.to_string(),
                reason: format!(
                    "asked for bytes {offset}-{end}, Content-Range says {start}-{last}"
                ),
            });
        }
        let body = read_limited(resp, len as usize, url).await?;
        if body.len() as u64 != len {
            return Err(Error::BadResponse {
                what: url.to_string(),
                reason: format!("asked for {len} bytes, got {}", body.len()),
            });
        }
        Ok(body)
    }

    /// Asks the registry to link a blob from another repository (no upload). True if done.
    pub async fn mount_blob(
        &self,
        target: &Reference,
        from: &Reference,
        digest: &str,
    ) -> Result<bool> {
        if target.registry != from.registry {
            return Ok(false);
        }
        let url = format!(
            "{}/blobs/uploads/?mount={digest}&from={}",
            self.base(target),
            from.repository
        );
        let resp = self
            .send(target, Access::Push, &url, |c| c.post(&url))
            .await?;
        Ok(resp.status() == StatusCode::CREATED)
    }

    /// Uploads a blob from a file unless the repository has it already (monolithic upload).
    #[instrument(skip(self, path), fields(reference = %r))]
    pub async fn push_blob_file(
        &self,
        r: &Reference,
        digest: &str,
        size: u64,
        path: &Path,
    ) -> Result<()> {
        if self.blob_size(r, digest, Access::Push).await?.is_some() {
            debug!(digest, "blob already present");
            return Ok(());
        }
        let mut attempt = 0;
        loop {
            match self.upload_once(r, digest, size, path).await {
                Err(e) if e.is_transient() && attempt < self.inner.opts.retries => {
                    warn!(digest, error = %e, "upload failed, retrying");
                    tokio::time::sleep(self.inner.opts.backoff * 2u32.saturating_pow(attempt))
                        .await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn upload_once(&self, r: &Reference, digest: &str, size: u64, path: &Path) -> Result<()> {
        let start_url = format!("{}/blobs/uploads/", self.base(r));
        let resp = self
            .send(r, Access::Push, &start_url, |c| {
                c.post(&start_url).header(CONTENT_LENGTH, "0")
            })
            .await?;
        let resp = check_status(resp, &start_url, &[StatusCode::ACCEPTED]).await?;
        let location = header_str(resp.headers(), LOCATION).ok_or_else(|| Error::BadResponse {
            what: start_url.clone(),
            reason: "upload started without a Location".into(),
        })?;
        let base = Url::parse(&start_url).map_err(|e| Error::Malformed {
            what: "url".into(),
            reason: e.to_string(),
        })?;
        let mut put_url = base.join(&location).map_err(|e| Error::BadResponse {
            what: start_url.clone(),
            reason: format!("bad Location {location:?}: {e}"),
        })?;
        put_url.query_pairs_mut().append_pair("digest", digest);
        let put = put_url.to_string();
        let file = std::fs::File::open(path).map_err(|e| Error::io(path.display(), e))?;
        let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::with_capacity(
            tokio::fs::File::from_std(file),
            1 << 20,
        ));
        let body = std::sync::Mutex::new(Some(body));
        let resp = self
            .send(r, Access::Push, &put, |c| {
                let req = c
                    .request(Method::PUT, &put)
                    .header(CONTENT_TYPE, "application/octet-stream")
                    .header(CONTENT_LENGTH, size);
                match body.lock().ok().and_then(|mut b| b.take()) {
                    Some(b) => req.body(b),
                    None => req,
                }
            })
            .await?;
        check_status(resp, &put, &[StatusCode::CREATED]).await?;
        Ok(())
    }

    /// Uploads a small blob held in memory.
    pub async fn push_blob_bytes(&self, r: &Reference, digest: &str, data: Bytes) -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let path = dir.path().join("blob");
        tokio::fs::write(&path, &data)
            .await
            .map_err(|e| Error::io(path.display(), e))?;
        self.push_blob_file(r, digest, data.len() as u64, &path)
            .await
    }

    /// The referrers index of manifest `digest` from the OCI referrers API, filtered by
    /// `artifact_type`; `None` when the registry has no referrers API (docker-registry 2.8
    /// answers 404), so the caller falls back to the tag schema.
    #[instrument(skip(self), fields(repo = %r.repository))]
    pub async fn get_referrers(
        &self,
        r: &Reference,
        digest: &str,
        artifact_type: &str,
    ) -> Result<Option<Bytes>> {
        // Media types are [a-z0-9.+-/]: nothing to escape but '+'.
        let url = format!(
            "{}/referrers/{digest}?artifactType={}",
            self.base(r),
            artifact_type.replace('+', "%2B")
        );
        let resp = self
            .send(r, Access::Pull, &url, |c| {
                c.get(&url).header(ACCEPT, crate::manifest::OCI_INDEX)
            })
            .await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let is_index = header_str(resp.headers(), CONTENT_TYPE)
            .is_some_and(|t| t.starts_with(crate::manifest::OCI_INDEX));
        let resp = check_status(resp, &url, &[StatusCode::OK]).await?;
        if !is_index {
            // Some registries answer unknown routes with 200 and a page: not the API.
            return Ok(None);
        }
        Ok(Some(read_limited(resp, MAX_MANIFEST, &url).await?))
    }

    /// Uploads a manifest under `reference` (a tag or its digest).
    #[instrument(skip(self, body), fields(repo = %r.repository))]
    pub async fn push_manifest(
        &self,
        r: &Reference,
        reference: &str,
        body: Bytes,
        media_type: &str,
    ) -> Result<()> {
        let url = format!("{}/manifests/{reference}", self.base(r));
        let resp = self
            .send(r, Access::Push, &url, |c| {
                c.put(&url)
                    .header(CONTENT_TYPE, media_type)
                    .body(body.clone())
            })
            .await?;
        check_status(resp, &url, &[StatusCode::CREATED, StatusCode::OK]).await?;
        Ok(())
    }
}

fn is_transient_status(s: StatusCode) -> bool {
    s == StatusCode::TOO_MANY_REQUESTS || s.is_server_error()
}

fn truncate(s: &str) -> String {
    s.chars().take(300).collect()
}

fn header_str(h: &HeaderMap, name: impl reqwest::header::AsHeaderName) -> Option<String> {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

async fn status_error(resp: Response, url: &str) -> Error {
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    if status == StatusCode::NOT_FOUND {
        return Error::NotFound(format!("{url}: {}", truncate(&body)));
    }
    Error::Status {
        url: url.to_string(),
        status: status.as_u16(),
        body: truncate(&body),
    }
}

async fn check_status(resp: Response, url: &str, ok: &[StatusCode]) -> Result<Response> {
    if ok.contains(&resp.status()) {
        Ok(resp)
    } else {
        Err(status_error(resp, url).await)
    }
}

/// Parses `Content-Range: bytes START-END/TOTAL` (TOTAL may be `*`).
fn parse_content_range(h: &HeaderMap, url: &str) -> Result<(u64, u64, Option<u64>)> {
    let bad = |reason: String| Error::BadResponse {
        what: url.to_string(),
        reason,
    };
    let v = header_str(h, CONTENT_RANGE).ok_or_else(|| bad("206 without Content-Range".into()))?;
    let rest = v
        .strip_prefix("bytes ")
        .ok_or_else(|| bad(format!("bad Content-Range {v:?}")))?;
    let (range, total) = rest
        .split_once('/')
        .ok_or_else(|| bad(format!("bad Content-Range {v:?}")))?;
    let (a, b) = range
        .split_once('-')
        .ok_or_else(|| bad(format!("bad Content-Range {v:?}")))?;
    let start = a
        .parse()
        .map_err(|_| bad(format!("bad Content-Range {v:?}")))?;
    let end = b
        .parse()
        .map_err(|_| bad(format!("bad Content-Range {v:?}")))?;
    if end < start {
        return Err(bad(format!("bad Content-Range {v:?}")));
    }
    Ok((start, end, total.parse().ok()))
}

async fn read_limited(resp: Response, limit: usize, url: &str) -> Result<Bytes> {
    let mut out = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| Error::Http {
            url: url.to_string(),
            source: e,
        })?;
        if out.len() + chunk.len() > limit {
            return Err(Error::BadResponse {
                what: url.to_string(),
                reason: format!("response larger than {limit} bytes"),
            });
        }
        out.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(out))
}
