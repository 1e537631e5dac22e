//! `arbor fn`: the client of arbord's function API (`[functions]` in arbord's config).

use std::io::Read as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

#[derive(Args)]
pub struct FnArgs {
    /// arbord's function API.
    #[arg(
        long,
        env = "ARBOR_FN_API",
        default_value = "http://127.0.0.1:8480",
        global = true
    )]
    pub api: String,
    /// A file holding the API's bearer token (arbord's functions.token_file).
    #[arg(long, env = "ARBOR_FN_TOKEN_FILE", value_name = "FILE", global = true)]
    pub token_file: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: FnCommand,
}

#[derive(Subcommand)]
pub enum FnCommand {
    /// Create or update function NAME running IMAGE (a changed definition drains the
    /// instances of the old one).
    Deploy {
        name: String,
        image: String,
        /// Port the function serves `POST /invoke` on.
        #[arg(long, default_value_t = 9000)]
        port: u16,
        /// KEY=VALUE over the image's environment (repeatable).
        #[arg(short, long)]
        env: Vec<String>,
        /// Replace the image's entrypoint.
        #[arg(long, value_name = "PROGRAM")]
        entrypoint: Option<String>,
        /// Memory limit per instance, MiB.
        #[arg(long)]
        memory_mib: Option<u64>,
        /// CPU limit per instance (CPUs).
        #[arg(long)]
        cpus: Option<f64>,
        /// Requests one instance serves at once.
        #[arg(long, default_value_t = 1)]
        concurrency: u32,
        /// Instances kept warm (reserved).
        #[arg(long, default_value_t = 0)]
        min: u32,
        /// Most instances.
        #[arg(long, default_value_t = 4)]
        max: u32,
        /// Seconds idle before an instance stops (scale to zero).
        #[arg(long, default_value_t = 300)]
        idle_timeout: u64,
        /// Requests that may wait for an instance (more get 429).
        #[arg(long, default_value_t = 64)]
        queue_limit: u32,
        /// Longest a start may take until the port opens, seconds.
        #[arg(long, default_value_t = 60)]
        start_timeout: u64,
        /// Longest one invocation may take, seconds.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        /// The function's command (replaces the image's Cmd).
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Invoke NAME with DATA (or stdin with `-`, or nothing), print its answer.
    Invoke {
        name: String,
        data: Option<String>,
        /// Print the status, instance and cold/warm start on stderr.
        #[arg(short, long)]
        verbose: bool,
    },
    /// List functions, or show NAME with its instances and their cold-start phases.
    Ls { name: Option<String> },
    /// Print the logs of NAME's instances (newest last).
    Logs {
        name: String,
        /// Only this instance.
        #[arg(long)]
        instance: Option<String>,
        /// Bytes from the end of each log.
        #[arg(long, default_value_t = 65536)]
        tail: u64,
    },
    /// Remove NAME, draining its instances.
    Rm { name: String },
}

pub const AFTER_HELP: &str = "\
Examples:
  arbor fn deploy hello 127.0.0.1:5000/fn/hello:v1-arbor --max 4 --idle-timeout 60
  arbor fn invoke hello 'some input'          # the instance's POST /invoke answer
  echo '{\"x\":1}' | arbor fn invoke hello -
  arbor fn ls                                 # functions and instances
  arbor fn ls hello --json                    # with cold-start phases
  arbor fn logs hello
  arbor fn rm hello

arbord serves the API when its config has [functions] enabled = true.";

struct Api {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Api {
    fn new(a: &FnArgs) -> Result<Api> {
        let token = match &a.token_file {
            Some(p) => Some(
                std::fs::read_to_string(p)
                    .with_context(|| format!("reading {}", p.display()))?
                    .trim()
                    .to_string(),
            ),
            None => None,
        };
        arbor_oci::init_tls();
        Ok(Api {
            base: a.api.trim_end_matches('/').to_string(),
            token,
            http: reqwest::Client::builder().no_proxy().build()?,
        })
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<reqwest::Response> {
        let mut r = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            r = r.bearer_auth(t);
        }
        if let Some(b) = body {
            r = r.body(b);
        }
        r.send()
            .await
            .with_context(|| format!("reaching arbord's function API at {}", self.base))
    }

    /// A JSON call; a non-2xx status is an error carrying the API's message.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value> {
        let resp = self
            .send(method, path, body.map(|b| b.to_string().into_bytes()))
            .await?;
        let status = resp.status();
        let bytes = resp.bytes().await.unwrap_or_default();
        let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if !status.is_success() {
            bail!(
                "{} ({status})",
                v["error"].as_str().unwrap_or("the function API refused")
            );
        }
        Ok(v)
    }
}

pub async fn run(a: FnArgs) -> Result<ExitCode> {
    let api = Api::new(&a)?;
    match a.command {
        FnCommand::Deploy {
            name,
            image,
            port,
            env,
            entrypoint,
            memory_mib,
            cpus,
            concurrency,
            min,
            max,
            idle_timeout,
            queue_limit,
            start_timeout,
            timeout,
            command,
        } => {
            let mut spec = json!({
                "image": image, "port": port, "env": env, "command": command,
                "concurrency": concurrency, "min_instances": min, "max_instances": max,
                "idle_timeout_secs": idle_timeout, "queue_limit": queue_limit,
                "start_timeout_secs": start_timeout, "timeout_secs": timeout,
            });
            if let Some(e) = entrypoint {
                spec["entrypoint"] = json!([e]);
            }
            if let Some(m) = memory_mib {
                spec["memory_mib"] = json!(m);
            }
            if let Some(c) = cpus {
                spec["cpus"] = json!(c);
            }
            let v = api
                .call(
                    reqwest::Method::PUT,
                    &format!("/v1/functions/{name}"),
                    Some(spec),
                )
                .await?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "{name}: {} (version {})",
                    v["result"].as_str().unwrap_or("?"),
                    v["function"]["version"]
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        FnCommand::Invoke {
            name,
            data,
            verbose,
        } => {
            let body = match data.as_deref() {
                Some("-") => {
                    let mut b = Vec::new();
                    std::io::stdin().read_to_end(&mut b)?;
                    b
                }
                Some(d) => d.as_bytes().to_vec(),
                None => Vec::new(),
            };
            let t0 = std::time::Instant::now();
            let resp = api
                .send(
                    reqwest::Method::POST,
                    &format!("/v1/functions/{name}/invoke"),
                    Some(body),
                )
                .await?;
            let status = resp.status();
            let h = |k: &str| {
                resp.headers()
                    .get(k)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string()
            };
            let (instance, start, rid) = (
                h("x-arbor-instance"),
                h("x-arbor-start"),
                h("x-arbor-request-id"),
            );
            let bytes = resp.bytes().await?;
            let secs = t0.elapsed().as_secs_f64();
            if a.json {
                let body = match serde_json::from_slice::<Value>(&bytes) {
                    Ok(v) => v,
                    Err(_) => json!(String::from_utf8_lossy(&bytes)),
                };
                println!(
                    "{}",
                    json!({"status": status.as_u16(), "instance": instance, "start": start,
                           "request_id": rid, "seconds": secs, "body": body})
                );
            } else {
                use std::io::Write as _;
                std::io::stdout().write_all(&bytes)?;
                if verbose || !status.is_success() {
                    eprintln!(
                        "\n{status} in {:.3} s, {start} start, instance {instance}, request {rid}",
                        secs
                    );
                }
            }
            Ok(if status.is_success() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        FnCommand::Ls { name } => {
            let path = match &name {
                Some(n) => format!("/v1/functions/{n}"),
                None => "/v1/functions".into(),
            };
            let v = api.call(reqwest::Method::GET, &path, None).await?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(ExitCode::SUCCESS);
            }
            let fns = match v {
                Value::Array(a) => a,
                one => vec![one],
            };
            println!(
                "{:<20} {:>4} {:<40} {:>5} {:>9} {:>7}",
                "FUNCTION", "VER", "IMAGE", "INST", "MIN/MAX", "WAITING"
            );
            for f in &fns {
                let inst = f["instances"].as_array().map_or(0, Vec::len);
                println!(
                    "{:<20} {:>4} {:<40} {:>5} {:>9} {:>7}",
                    f["name"].as_str().unwrap_or(""),
                    f["version"].to_string(),
                    f["spec"]["image"].as_str().unwrap_or(""),
                    inst,
                    format!(
                        "{}/{}",
                        f["spec"]["min_instances"], f["spec"]["max_instances"]
                    ),
                    f["waiting"].to_string()
                );
            }
            if name.is_some() {
                for f in &fns {
                    for i in f["instances"].as_array().into_iter().flatten() {
                        let phases: Vec<String> = i["cold_start"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(|p| {
                                format!(
                                    "{} {:.3}s",
                                    p[0].as_str().unwrap_or(""),
                                    p[1].as_f64().unwrap_or(0.0)
                                )
                            })
                            .collect();
                        println!(
                            "  {} {} {} served {} idle {:.0}s  cold start: {}",
                            i["id"].as_str().unwrap_or(""),
                            i["state"].as_str().unwrap_or(""),
                            i["address"].as_str().unwrap_or("-"),
                            i["served"],
                            i["idle_seconds"].as_f64().unwrap_or(0.0),
                            phases.join(", ")
                        );
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        FnCommand::Logs {
            name,
            instance,
            tail,
        } => {
            let mut path = format!("/v1/functions/{name}/logs?tail={tail}");
            if let Some(i) = &instance {
                path.push_str(&format!("&instance={i}"));
            }
            let v = api.call(reqwest::Method::GET, &path, None).await?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for l in v.as_array().into_iter().flatten() {
                    println!("==> {} <==", l["instance"].as_str().unwrap_or(""));
                    print!("{}", l["log"].as_str().unwrap_or(""));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        FnCommand::Rm { name } => {
            let v = api
                .call(
                    reqwest::Method::DELETE,
                    &format!("/v1/functions/{name}"),
                    None,
                )
                .await?;
            if a.json {
                println!("{v}");
            } else {
                println!("{name}: removed");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
