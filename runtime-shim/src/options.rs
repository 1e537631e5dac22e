//! Runtime options, decoded by the type URL of the `Any` containerd sends with Create:
//! runc's `containerd.runc.v1.Options` (what `ctr` and containerd's runc config send) and
//! CRI's `runtimeoptions.v1.Options` (what CRI sends to a runtime that is not runc, with the
//! runtime's `options` table as TOML in `ConfigBody` from containerd 1.7 on; 1.6 sends the
//! message empty unless the table sets `ConfigPath`, a TOML file the shim then reads). The result is kept in the bundle as
//! `arbor-options.json`, so that the `delete` action finds the same runc binary and root.

use std::collections::BTreeMap;
use std::path::Path;

use containerd_shim_protos::protobuf::Message;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::shim::oci::Options as RuncOptions;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// File in the bundle holding the decoded options.
pub const OPTIONS_FILE: &str = "arbor-options.json";

/// What the shim needs from the runtime options. Empty strings mean runc's defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct RuntimeOptions {
    /// The runc binary (name looked up in PATH, or a path); "" = `runc`.
    pub binary_name: String,
    /// runc's state root; "" = `/run/containerd/runc`. The namespace is appended.
    pub root: String,
    pub systemd_cgroup: bool,
    pub no_pivot_root: bool,
    pub no_new_keyring: bool,
    pub io_uid: u32,
    pub io_gid: u32,
    pub shim_cgroup: String,
    /// Keys of a CRI `ConfigBody` this shim does not interpret (kept for function awareness).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, toml::Value>,
}

const RUNC_OPTIONS: &str = "containerd.runc.v1.Options";
const CRI_OPTIONS: &str = "runtimeoptions.v1.Options";

impl RuntimeOptions {
    /// Decodes the options of a Create request (`None` or an empty `Any`: defaults).
    pub fn decode(any: Option<&Any>) -> Result<RuntimeOptions> {
        let Some(any) = any.filter(|a| !a.type_url.is_empty() || !a.value.is_empty()) else {
            return Ok(RuntimeOptions::default());
        };
        // "types.containerd.io/containerd.runc.v1.Options" or the bare message name.
        let name = any.type_url.rsplit('/').next().unwrap_or_default();
        match name {
            RUNC_OPTIONS => {
                let o = RuncOptions::parse_from_bytes(&any.value).map_err(|source| {
                    Error::Protobuf {
                        what: RUNC_OPTIONS,
                        source,
                    }
                })?;
                Ok(RuntimeOptions {
                    binary_name: o.binary_name,
                    root: o.root,
                    systemd_cgroup: o.systemd_cgroup,
                    no_pivot_root: o.no_pivot_root,
                    no_new_keyring: o.no_new_keyring,
                    io_uid: o.io_uid,
                    io_gid: o.io_gid,
                    shim_cgroup: o.shim_cgroup,
                    extra: BTreeMap::new(),
                })
            }
            CRI_OPTIONS => {
                let cri = CriOptions::decode(&any.value)?;
                if !cri.config_body.trim().is_empty() {
                    return Self::from_toml(&cri.config_body);
                }
                // containerd 1.6's CRI decodes the runtime's options table into this message's
                // own fields and sends no ConfigBody: there, runc's keys reach the shim only
                // through a file named by `ConfigPath`.
                if !cri.config_path.is_empty() {
                    let body = std::fs::read_to_string(&cri.config_path).map_err(Error::io(
                        format!("reading the runtime options file {}", cri.config_path),
                    ))?;
                    return Self::from_toml(&body);
                }
                Ok(RuntimeOptions::default())
            }
            _ => Err(Error::UnknownOptions(any.type_url.clone())),
        }
    }

    /// The options table of CRI's runtime config, as TOML (`BinaryName = "..."`, ...). Keys
    /// this shim does not know are kept in `extra`.
    pub fn from_toml(body: &str) -> Result<RuntimeOptions> {
        let table: toml::Table = body.parse()?;
        let mut o = RuntimeOptions::default();
        let str_of = |v: &toml::Value, k: &str| -> Result<String> {
            v.as_str().map(String::from).ok_or_else(|| {
                Error::InvalidArgument(format!("runtime option {k} is not a string"))
            })
        };
        let bool_of = |v: &toml::Value, k: &str| -> Result<bool> {
            v.as_bool().ok_or_else(|| {
                Error::InvalidArgument(format!("runtime option {k} is not a boolean"))
            })
        };
        let u32_of = |v: &toml::Value, k: &str| -> Result<u32> {
            v.as_integer()
                .and_then(|i| u32::try_from(i).ok())
                .ok_or_else(|| {
                    Error::InvalidArgument(format!("runtime option {k} is not a uid/gid"))
                })
        };
        for (k, v) in table {
            match k.as_str() {
                "BinaryName" => o.binary_name = str_of(&v, &k)?,
                "Root" => o.root = str_of(&v, &k)?,
                "SystemdCgroup" => o.systemd_cgroup = bool_of(&v, &k)?,
                "NoPivotRoot" => o.no_pivot_root = bool_of(&v, &k)?,
                "NoNewKeyring" => o.no_new_keyring = bool_of(&v, &k)?,
                "IoUid" => o.io_uid = u32_of(&v, &k)?,
                "IoGid" => o.io_gid = u32_of(&v, &k)?,
                "ShimCgroup" => o.shim_cgroup = str_of(&v, &k)?,
                _ => {
                    o.extra.insert(k, v);
                }
            }
        }
        Ok(o)
    }

    /// Writes the options into the bundle (blocking; call off the runtime threads).
    pub fn store(&self, bundle: &Path) -> Result<()> {
        let path = bundle.join(OPTIONS_FILE);
        let data = serde_json::to_vec(self).map_err(|source| Error::Json {
            what: "runtime options",
            source,
        })?;
        std::fs::write(&path, data).map_err(Error::io(format!("writing {}", path.display())))
    }

    /// Reads the options stored in the bundle; defaults when there are none (blocking).
    pub fn load(bundle: &Path) -> Result<RuntimeOptions> {
        let path = bundle.join(OPTIONS_FILE);
        match std::fs::read(&path) {
            Ok(data) => serde_json::from_slice(&data).map_err(|source| Error::Json {
                what: "stored runtime options",
                source,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(RuntimeOptions::default()),
            Err(e) => Err(Error::io(format!("reading {}", path.display()))(e)),
        }
    }
}

/// CRI's `runtimeoptions.v1.Options` (`type_url = 1; config_path = 2; config_body = 3`, all
/// strings), decoded from the protobuf wire format by hand: it is not in the shim's protos.
#[derive(Debug, Default, PartialEq)]
pub struct CriOptions {
    pub type_url: String,
    pub config_path: String,
    pub config_body: String,
}

impl CriOptions {
    pub fn decode(mut buf: &[u8]) -> Result<CriOptions> {
        let bad = |why: &str| Error::InvalidArgument(format!("{CRI_OPTIONS}: {why}"));
        let mut o = CriOptions::default();
        while !buf.is_empty() {
            let key = read_varint(&mut buf).ok_or_else(|| bad("truncated tag"))?;
            let (field, wire) = (key >> 3, key & 7);
            match wire {
                0 => {
                    read_varint(&mut buf).ok_or_else(|| bad("truncated varint"))?;
                }
                1 | 5 => {
                    let n = if wire == 1 { 8 } else { 4 };
                    buf = buf.get(n..).ok_or_else(|| bad("truncated fixed field"))?;
                }
                2 => {
                    let len = read_varint(&mut buf).ok_or_else(|| bad("truncated length"))?;
                    let len = usize::try_from(len).map_err(|_| bad("length too large"))?;
                    let data = buf.get(..len).ok_or_else(|| bad("truncated field"))?;
                    buf = &buf[len..];
                    let text =
                        || String::from_utf8(data.to_vec()).map_err(|_| bad("string is not UTF-8"));
                    match field {
                        1 => o.type_url = text()?,
                        2 => o.config_path = text()?,
                        3 => o.config_body = text()?,
                        _ => {}
                    }
                }
                _ => return Err(bad(&format!("unsupported wire type {wire}"))),
            }
        }
        Ok(o)
    }
}

fn read_varint(buf: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = buf.split_first()?;
        *buf = rest;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(n: u8, s: &str) -> Vec<u8> {
        let mut v = vec![(n << 3) | 2];
        let mut len = s.len();
        loop {
            let b = (len & 0x7f) as u8;
            len >>= 7;
            if len == 0 {
                v.push(b);
                break;
            }
            v.push(b | 0x80);
        }
        v.extend_from_slice(s.as_bytes());
        v
    }

    #[test]
    fn no_options_are_defaults() {
        assert_eq!(
            RuntimeOptions::decode(None).unwrap(),
            RuntimeOptions::default()
        );
        assert_eq!(
            RuntimeOptions::decode(Some(&Any::default())).unwrap(),
            RuntimeOptions::default()
        );
    }

    #[test]
    fn runc_options_by_type_url() {
        let o = RuncOptions {
            binary_name: "/usr/sbin/runc".into(),
            root: "/run/x".into(),
            systemd_cgroup: true,
            ..Default::default()
        };
        let any = Any {
            type_url: "containerd.runc.v1.Options".into(),
            value: o.write_to_bytes().unwrap(),
            ..Default::default()
        };
        let got = RuntimeOptions::decode(Some(&any)).unwrap();
        assert_eq!(got.binary_name, "/usr/sbin/runc");
        assert_eq!(got.root, "/run/x");
        assert!(got.systemd_cgroup);
        let prefixed = Any {
            type_url: "types.containerd.io/containerd.runc.v1.Options".into(),
            ..any
        };
        assert_eq!(RuntimeOptions::decode(Some(&prefixed)).unwrap(), got);
    }

    #[test]
    fn cri_options_config_body_is_toml() {
        let body =
            "BinaryName = \"crun\"\nSystemdCgroup = true\nIoUid = 1000\n[arbor]\nport = 9000\n";
        let mut value = field(1, "io.containerd.arbor.v1.Options");
        value.extend(field(2, "/etc/x.toml"));
        value.extend(field(3, body));
        let cri = CriOptions::decode(&value).unwrap();
        assert_eq!(cri.config_path, "/etc/x.toml");
        assert_eq!(cri.config_body, body);
        let any = Any {
            type_url: "runtimeoptions.v1.Options".into(),
            value,
            ..Default::default()
        };
        let got = RuntimeOptions::decode(Some(&any)).unwrap();
        assert_eq!(got.binary_name, "crun");
        assert!(got.systemd_cgroup);
        assert_eq!(got.io_uid, 1000);
        assert!(got.extra.contains_key("arbor"), "{got:?}");
        // A body with a wrong type is an error, not a silent default.
        let bad = field(3, "SystemdCgroup = \"yes\"");
        let any = Any {
            type_url: "runtimeoptions.v1.Options".into(),
            value: bad,
            ..Default::default()
        };
        assert!(RuntimeOptions::decode(Some(&any)).is_err());
    }

    #[test]
    fn cri_options_config_path_is_read_when_there_is_no_body() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("arbor-runtime.toml");
        std::fs::write(
            &path,
            "BinaryName = \"/usr/local/sbin/runc\"\nNoPivotRoot = true\n",
        )
        .unwrap();
        let any = Any {
            type_url: "runtimeoptions.v1.Options".into(),
            value: field(2, path.to_str().unwrap()),
            ..Default::default()
        };
        let got = RuntimeOptions::decode(Some(&any)).unwrap();
        assert_eq!(got.binary_name, "/usr/local/sbin/runc");
        assert!(got.no_pivot_root);
        // containerd 1.6 with a table of runc keys only: an empty message, runc's defaults.
        let empty = Any {
            type_url: "runtimeoptions.v1.Options".into(),
            ..Default::default()
        };
        assert_eq!(
            RuntimeOptions::decode(Some(&empty)).unwrap(),
            RuntimeOptions::default()
        );
        // A named file that is missing is an error, not a silent default.
        let missing = Any {
            type_url: "runtimeoptions.v1.Options".into(),
            value: field(2, dir.path().join("nope.toml").to_str().unwrap()),
            ..Default::default()
        };
        assert!(RuntimeOptions::decode(Some(&missing)).is_err());
    }

    #[test]
    fn unknown_type_is_named() {
        let any = Any {
            type_url: "example.com/foo.Bar".into(),
            value: vec![1, 2],
            ..Default::default()
        };
        let e = RuntimeOptions::decode(Some(&any)).unwrap_err();
        assert!(e.to_string().contains("example.com/foo.Bar"), "{e}");
    }

    #[test]
    fn truncated_cri_options_are_errors() {
        let mut v = field(3, "abc");
        v.pop();
        assert!(CriOptions::decode(&v).is_err());
        assert!(CriOptions::decode(&[0x1a]).is_err());
        assert!(CriOptions::decode(&[0x1a, 0xff]).is_err());
    }

    #[test]
    fn store_and_load_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            RuntimeOptions::load(dir.path()).unwrap(),
            RuntimeOptions::default()
        );
        let o = RuntimeOptions {
            binary_name: "runc".into(),
            root: "/tmp/r".into(),
            ..Default::default()
        };
        o.store(dir.path()).unwrap();
        assert_eq!(RuntimeOptions::load(dir.path()).unwrap(), o);
    }
}
