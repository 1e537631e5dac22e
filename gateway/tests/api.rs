//! The function API over HTTP without containers: the bearer token, definitions (checked,
//! persisted, versioned), the errors a client sees, the body limit. No containerd is reached
//! (no invocation gets as far as an instance); the CNI plugins are stand-in files, since only
//! their presence is checked at start. The end-to-end path (containerd, runc, CNI, a
//! registry) is `arbord/tests/functions.rs`.

use std::time::Duration;

use arbor_gateway::{Gateway, GatewayOptions, NetConfig, api};
use serde_json::{Value, json};

struct Api {
    base: String,
    http: reqwest::Client,
    _task: tokio::task::JoinHandle<()>,
}

impl Api {
    async fn req(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> (u16, Value) {
        let mut r = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        if let Some(b) = body {
            r = r.body(b);
        }
        let resp = r.send().await.unwrap();
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.unwrap();
        (
            status,
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into())),
        )
    }
}

async fn start(dir: &std::path::Path, token: Option<&str>) -> Api {
    let cni = dir.join("cni");
    std::fs::create_dir_all(&cni).unwrap();
    for p in ["bridge", "host-local", "loopback"] {
        std::fs::write(cni.join(p), b"").unwrap();
    }
    let fdir = dir.join("functions");
    let gw = Gateway::start(GatewayOptions {
        target: arbor_client::Target {
            address: dir.join("no-containerd.sock"),
            namespace: "t".into(),
            snapshotter: "arbor".into(),
        },
        runtime: "io.containerd.arbor.v1".into(),
        net: NetConfig {
            bin_dirs: vec![cni],
            bridge: "arbtest0".into(),
            subnet: "10.254.0.0/24".into(),
            masquerade: false,
            netns_dir: fdir.join("netns"),
            ipam_dir: fdir.join("ipam"),
        },
        dir: fdir,
        plain_http_hosts: vec![],
        docker_config: None,
        max_body: 1024,
        max_response: 1 << 20,
        stop_grace: Duration::from_secs(1),
        cgroup_parent: None,
        adopt: true,
    })
    .await
    .unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", l.local_addr().unwrap());
    let router = api::router(gw, token.map(str::to_string));
    let task = tokio::spawn(async move {
        let _ = api::serve(l, router, std::future::pending()).await;
    });
    arbor_oci::init_tls();
    Api {
        base,
        http: reqwest::Client::builder().no_proxy().build().unwrap(),
        _task: task,
    }
}

#[tokio::test]
async fn token_definitions_and_errors() {
    use reqwest::Method;
    let d = tempfile::tempdir().unwrap();
    let a = start(d.path(), Some("s3cret")).await;
    let tok = Some("s3cret");

    // The token: required everywhere but /healthz, compared whole.
    assert_eq!(a.req(Method::GET, "/healthz", None, None).await.0, 200);
    let (st, v) = a.req(Method::GET, "/v1/functions", None, None).await;
    assert_eq!((st, v["kind"].as_str()), (401, Some("unauthorized")));
    assert_eq!(
        a.req(Method::GET, "/v1/functions", Some("s3cre"), None)
            .await
            .0,
        401
    );
    let (st, v) = a.req(Method::GET, "/v1/functions", tok, None).await;
    assert_eq!((st, v), (200, json!([])));

    // Definitions: checked (the field named), created, unchanged, updated (new version).
    let put = |spec: Value| Some(spec.to_string().into_bytes());
    let (st, v) = a
        .req(
            Method::PUT,
            "/v1/functions/hello",
            tok,
            put(json!({"image": "r.io/a/b:1", "concurrency": "many"})),
        )
        .await;
    assert_eq!(st, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("concurrency"), "{v}");
    let (st, v) = a
        .req(
            Method::PUT,
            "/v1/functions/Hello!",
            tok,
            put(json!({"image": "r.io/a/b:1"})),
        )
        .await;
    assert_eq!(st, 400, "{v}");
    let spec = json!({"image": "r.io/a/b:1", "min_instances": 0, "max_instances": 2});
    let (st, v) = a
        .req(Method::PUT, "/v1/functions/hello", tok, put(spec.clone()))
        .await;
    assert_eq!((st, &v["result"]), (201, &json!("created")), "{v}");
    let (st, v) = a
        .req(Method::PUT, "/v1/functions/hello", tok, put(spec))
        .await;
    assert_eq!((st, &v["result"]), (200, &json!("unchanged")), "{v}");
    let (st, v) = a
        .req(
            Method::PUT,
            "/v1/functions/hello",
            tok,
            put(json!({"image": "r.io/a/b:2"})),
        )
        .await;
    assert_eq!((st, &v["function"]["version"]), (200, &json!(2)), "{v}");
    let (st, v) = a.req(Method::GET, "/v1/functions/hello", tok, None).await;
    assert_eq!(st, 200);
    assert_eq!(v["spec"]["image"], "r.io/a/b:2");
    assert_eq!(v["spec"]["port"], 9000);
    assert_eq!(v["instances"], json!([]));

    // Errors a client sees.
    let (st, v) = a
        .req(
            Method::POST,
            "/v1/functions/nope/invoke",
            tok,
            Some(b"x".to_vec()),
        )
        .await;
    assert_eq!((st, v["kind"].as_str()), (404, Some("not_found")));
    let (st, v) = a
        .req(
            Method::POST,
            "/v1/functions/hello/invoke",
            tok,
            Some(vec![b'x'; 2048]),
        )
        .await;
    assert_eq!((st, v["kind"].as_str()), (413, Some("too_large")), "{v}");
    let (st, v) = a
        .req(Method::GET, "/v1/functions/hello/logs", tok, None)
        .await;
    assert_eq!((st, v), (200, json!([])));

    // The records survive a restart of the gateway.
    drop(a);
    let b = start(d.path(), None).await;
    let (st, v) = b.req(Method::GET, "/v1/functions", None, None).await;
    assert_eq!(st, 200);
    assert_eq!(v[0]["name"], "hello");
    assert_eq!(v[0]["version"], 2);

    // Removed: 404 afterwards, and the record is gone.
    let (st, v) = b
        .req(Method::DELETE, "/v1/functions/hello", None, None)
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        b.req(Method::GET, "/v1/functions/hello", None, None)
            .await
            .0,
        404
    );
    assert!(
        !d.path().join("functions/defs/hello.json").exists(),
        "the record outlived DELETE"
    );
}
