//! Function definitions: what `PUT /v1/functions/NAME` takes, how it is checked, and where
//! it is kept (one JSON file per function under arbord's root, written atomically, so a
//! restarted arbord knows every function it had).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The port a function listens on unless it says otherwise (the custom-container convention).
pub const DEFAULT_PORT: u16 = 9000;
/// Most instances one function may have on a node.
pub const MAX_INSTANCES: u32 = 256;

/// A function as its owner defines it. Unknown fields are an error, so a typo is not silently
/// a default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionSpec {
    /// Image reference (converted by `arbor convert`, or any OCI image).
    pub image: String,
    /// TCP port the function serves `POST /invoke` on.
    #[serde(default = "default_port")]
    pub port: u16,
    /// Replaces the image's Entrypoint (and drops its Cmd), when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    /// Replaces the image's Cmd, when not empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// `KEY=VALUE` over the image's environment.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    /// Memory limit per instance, MiB (none: unlimited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    /// CPU limit per instance, in CPUs (none: unlimited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    /// Requests one instance serves at once.
    #[serde(default = "one")]
    pub concurrency: u32,
    /// Instances kept warm even when idle (reserved); replaced when they die.
    #[serde(default)]
    pub min_instances: u32,
    /// Most instances at once.
    #[serde(default = "default_max")]
    pub max_instances: u32,
    /// An instance idle this long is stopped (scale to zero), above `min_instances`.
    #[serde(default = "default_idle")]
    pub idle_timeout_secs: u64,
    /// Requests waiting for an instance beyond this are refused with 429.
    #[serde(default = "default_queue")]
    pub queue_limit: u32,
    /// Longest wait in the queue before 503.
    #[serde(default = "default_queue_timeout")]
    pub queue_timeout_secs: u64,
    /// Longest a cold start may take until the port opens.
    #[serde(default = "default_start_timeout")]
    pub start_timeout_secs: u64,
    /// Longest one invocation may take before 504.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
}

fn default_port() -> u16 {
    DEFAULT_PORT
}
fn one() -> u32 {
    1
}
fn default_max() -> u32 {
    4
}
fn default_idle() -> u64 {
    300
}
fn default_queue() -> u32 {
    64
}
fn default_queue_timeout() -> u64 {
    60
}
fn default_start_timeout() -> u64 {
    60
}
fn default_timeout() -> u64 {
    60
}

impl FunctionSpec {
    /// A spec with every default, for `image`.
    pub fn new(image: impl Into<String>) -> FunctionSpec {
        FunctionSpec {
            image: image.into(),
            port: DEFAULT_PORT,
            entrypoint: None,
            command: Vec::new(),
            env: Vec::new(),
            memory_mib: None,
            cpus: None,
            concurrency: 1,
            min_instances: 0,
            max_instances: default_max(),
            idle_timeout_secs: default_idle(),
            queue_limit: default_queue(),
            queue_timeout_secs: default_queue_timeout(),
            start_timeout_secs: default_start_timeout(),
            timeout_secs: default_timeout(),
        }
    }

    /// Every rule a definition must meet; the first broken one is the error.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Invalid(m));
        if let Err(e) = arbor_oci::Reference::parse(&self.image) {
            return bad(format!("image {:?}: {e}", self.image));
        }
        if self.port == 0 {
            return bad("port must be 1-65535".into());
        }
        if self.concurrency == 0 || self.concurrency > 1000 {
            return bad(format!("concurrency {} must be 1-1000", self.concurrency));
        }
        if self.max_instances == 0 || self.max_instances > MAX_INSTANCES {
            return bad(format!(
                "max_instances {} must be 1-{MAX_INSTANCES}",
                self.max_instances
            ));
        }
        if self.min_instances > self.max_instances {
            return bad(format!(
                "min_instances {} is above max_instances {}",
                self.min_instances, self.max_instances
            ));
        }
        if let Some(m) = self.memory_mib
            && !(6..=1 << 20).contains(&m)
        {
            return bad(format!("memory_mib {m} must be 6-1048576"));
        }
        if let Some(c) = self.cpus
            && !(c.is_finite() && (0.01..=1024.0).contains(&c))
        {
            return bad(format!("cpus {c} must be 0.01-1024"));
        }
        if self.idle_timeout_secs == 0 {
            return bad("idle_timeout_secs must be at least 1".into());
        }
        for (what, v) in [
            ("queue_timeout_secs", self.queue_timeout_secs),
            ("start_timeout_secs", self.start_timeout_secs),
            ("timeout_secs", self.timeout_secs),
        ] {
            if v == 0 || v > 3600 {
                return bad(format!("{what} {v} must be 1-3600"));
            }
        }
        if self.queue_limit > 100_000 {
            return bad(format!(
                "queue_limit {} must be at most 100000",
                self.queue_limit
            ));
        }
        for e in &self.env {
            let key = e.split_once('=').map_or(e.as_str(), |(k, _)| k);
            if key.is_empty() || key.contains('\0') || e.contains('\0') {
                return bad(format!("env entry {e:?} is not KEY=VALUE"));
            }
        }
        if self
            .command
            .iter()
            .chain(self.entrypoint.iter().flatten())
            .any(|a| a.contains('\0'))
        {
            return bad("command and entrypoint may not contain NUL".into());
        }
        Ok(())
    }
}

/// Checks a function's name: 1-48 of `a-z 0-9 -`, starting with a letter or digit (it
/// becomes part of container ids, file names and metric labels).
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 48
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "function name {name:?} must be 1-48 characters of a-z, 0-9 and '-', not starting with '-'"
        )))
    }
}

/// A stored function: its spec and its version (raised whenever the spec changes, so
/// instances of an older version are drained).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionRecord {
    pub name: String,
    pub version: u64,
    pub spec: FunctionSpec,
    /// RFC 3339.
    pub updated: String,
}

/// The directory of function records.
#[derive(Debug, Clone)]
pub struct DefStore {
    dir: PathBuf,
}

impl DefStore {
    /// Opens (creating) `dir`.
    pub fn open(dir: &Path) -> Result<DefStore> {
        std::fs::create_dir_all(dir).map_err(Error::io(format!("creating {}", dir.display())))?;
        Ok(DefStore {
            dir: dir.to_path_buf(),
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.json"))
    }

    /// Every record; a file that does not parse is reported and skipped (renamed
    /// `*.json.broken`), never a reason not to start.
    pub fn load(&self) -> Result<Vec<FunctionRecord>> {
        let mut out = Vec::new();
        let rd = std::fs::read_dir(&self.dir)
            .map_err(Error::io(format!("reading {}", self.dir.display())))?;
        for e in rd.flatten() {
            let p = e.path();
            if p.extension().and_then(|x| x.to_str()) != Some("json") {
                continue;
            }
            let parsed = std::fs::read(&p)
                .map_err(|e| e.to_string())
                .and_then(|b| {
                    serde_json::from_slice::<FunctionRecord>(&b).map_err(|e| e.to_string())
                })
                .and_then(|r| {
                    validate_name(&r.name).map_err(|e| e.to_string())?;
                    r.spec.validate().map_err(|e| e.to_string())?;
                    if p.file_stem().and_then(|s| s.to_str()) != Some(r.name.as_str()) {
                        return Err(format!("names function {:?}", r.name));
                    }
                    Ok(r)
                });
            match parsed {
                Ok(r) => out.push(r),
                Err(why) => {
                    tracing::warn!(file = %p.display(), %why, "unusable function record; moved aside");
                    let _ = std::fs::rename(&p, p.with_extension("json.broken"));
                }
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Writes `r` (temporary file, fsync, rename).
    pub fn save(&self, r: &FunctionRecord) -> Result<()> {
        use std::io::Write as _;
        let p = self.path(&r.name);
        let tmp = self.dir.join(format!(".{}.json.tmp", r.name));
        let bytes = serde_json::to_vec_pretty(r).map_err(|e| Error::Internal(e.to_string()))?;
        let mut f = std::fs::File::create(&tmp)
            .map_err(Error::io(format!("creating {}", tmp.display())))?;
        f.write_all(&bytes)
            .and_then(|_| f.sync_all())
            .map_err(Error::io(format!("writing {}", tmp.display())))?;
        std::fs::rename(&tmp, &p).map_err(Error::io(format!("renaming to {}", p.display())))
    }

    /// Removes `name`'s record (absent is fine).
    pub fn remove(&self, name: &str) -> Result<()> {
        match std::fs::remove_file(self.path(name)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(Error::io(format!("removing the record of {name}"))(e))
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_unknown_fields() {
        let s: FunctionSpec = serde_json::from_str(r#"{"image":"r.io/a/b:1"}"#).unwrap();
        assert_eq!(s, FunctionSpec::new("r.io/a/b:1"));
        s.validate().unwrap();
        let e = serde_json::from_str::<FunctionSpec>(r#"{"image":"x","max_instance":3}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_instance"), "{e}");
    }

    #[test]
    fn invalid_specs_say_why() {
        type Edit = Box<dyn Fn(&mut FunctionSpec)>;
        let cases: Vec<(Edit, &str)> = vec![
            (Box::new(|s| s.image = "UPPER CASE!".into()), "image"),
            (Box::new(|s| s.port = 0), "port"),
            (Box::new(|s| s.concurrency = 0), "concurrency"),
            (Box::new(|s| s.max_instances = 0), "max_instances"),
            (Box::new(|s| s.min_instances = 9), "min_instances"),
            (Box::new(|s| s.memory_mib = Some(1)), "memory_mib"),
            (Box::new(|s| s.cpus = Some(f64::NAN)), "cpus"),
            (Box::new(|s| s.idle_timeout_secs = 0), "idle_timeout_secs"),
            (Box::new(|s| s.timeout_secs = 0), "timeout_secs"),
            (Box::new(|s| s.env = vec!["=x".into()]), "env"),
        ];
        for (edit, what) in cases {
            let mut s = FunctionSpec::new("r.io/a/b:1");
            edit(&mut s);
            let e = s.validate().unwrap_err().to_string();
            assert!(e.contains(what), "{what}: {e}");
        }
    }

    #[test]
    fn names() {
        for ok in ["a", "hello-world", "fn2", &"a".repeat(48)] {
            validate_name(ok).unwrap();
        }
        for bad in ["", "-a", "A", "a/b", "a.b", "../x", &"a".repeat(49), "a b"] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn records_survive_and_broken_ones_are_set_aside() {
        let d = tempfile::tempdir().unwrap();
        let st = DefStore::open(d.path()).unwrap();
        let r = FunctionRecord {
            name: "hello".into(),
            version: 3,
            spec: FunctionSpec::new("r.io/a/b:1"),
            updated: "2026-11-29T00:00:00Z".into(),
        };
        st.save(&r).unwrap();
        std::fs::write(d.path().join("junk.json"), b"{not json").unwrap();
        let back = DefStore::open(d.path()).unwrap().load().unwrap();
        assert_eq!(back, vec![r]);
        assert!(d.path().join("junk.json.broken").exists());
        st.remove("hello").unwrap();
        st.remove("hello").unwrap();
        assert!(st.load().unwrap().is_empty());
    }
}
