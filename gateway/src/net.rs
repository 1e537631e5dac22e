//! An instance's network: a network namespace of its own (bind-mounted on a file, as
//! `ip netns` does, so runc can join it by path), given `lo` and an `eth0` on a host bridge
//! by the standard CNI plugins (`loopback`, `bridge` with `host-local` addresses; Debian
//! `containernetworking-plugins`), invoked as CNI 1.0 specifies: the plugin binary with
//! `CNI_*` variables and the network configuration on stdin.

use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{Value, json};

use crate::error::{Error, Result};

/// Where the CNI plugins are looked for by default.
pub const DEFAULT_CNI_BIN_DIRS: &[&str] = &["/usr/lib/cni", "/opt/cni/bin"];

/// The bridge network instances get.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// Directories searched for the plugins (`CNI_PATH`).
    pub bin_dirs: Vec<PathBuf>,
    /// The host bridge (created by the plugin on first use).
    pub bridge: String,
    /// IPv4 subnet of the instances, e.g. `10.89.0.0/16`.
    pub subnet: String,
    /// Masquerade instances' outbound traffic (needs iptables).
    pub masquerade: bool,
    /// Where namespace files live (`<root>/functions/netns`).
    pub netns_dir: PathBuf,
    /// host-local's allocation records (`<root>/functions/ipam`).
    pub ipam_dir: PathBuf,
}

impl NetConfig {
    fn bridge_conf(&self) -> Value {
        json!({
            "cniVersion": "1.0.0",
            "name": "arbor-functions",
            "type": "bridge",
            "bridge": self.bridge,
            "isGateway": true,
            "ipMasq": self.masquerade,
            "hairpinMode": true,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": self.subnet}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": self.ipam_dir,
            }
        })
    }

    fn loopback_conf() -> Value {
        json!({"cniVersion": "1.0.0", "name": "arbor-lo", "type": "loopback"})
    }

    /// The plugin binaries this needs, missing ones named.
    pub fn check(&self) -> Result<()> {
        for p in ["bridge", "host-local", "loopback"] {
            self.plugin(p)?;
        }
        Ok(())
    }

    fn plugin(&self, name: &str) -> Result<PathBuf> {
        self.bin_dirs
            .iter()
            .map(|d| d.join(name))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                Error::Internal(format!(
                    "the CNI plugin {name:?} is not in {} (Debian package containernetworking-plugins)",
                    self.bin_dirs
                        .iter()
                        .map(|d| d.display().to_string())
                        .collect::<Vec<_>>()
                        .join(":")
                ))
            })
    }

    fn netns_path(&self, id: &str) -> PathBuf {
        self.netns_dir.join(id)
    }

    /// Creates `id`'s namespace and attaches it: its path and IPv4 address. Blocking (runs
    /// plugins): call it off the async runtime. On failure nothing is left behind.
    pub fn setup(&self, id: &str) -> Result<(PathBuf, Ipv4Addr)> {
        let ns = self.netns_path(id);
        create_netns(&ns)?;
        let attached = self
            .cni("ADD", id, &ns, "lo", &Self::loopback_conf())
            .and_then(|_| self.cni("ADD", id, &ns, "eth0", &self.bridge_conf()))
            .and_then(|r| first_ipv4(&r));
        match attached {
            Ok(ip) => Ok((ns, ip)),
            Err(e) => {
                self.teardown(id);
                Err(e)
            }
        }
    }

    /// Detaches and removes `id`'s namespace; whatever is already gone is skipped, failures
    /// are logged (an address leaked in host-local is reclaimed by the next DEL of the id).
    pub fn teardown(&self, id: &str) {
        let ns = self.netns_path(id);
        let nsarg = if ns.exists() {
            ns.clone()
        } else {
            PathBuf::new()
        };
        if let Err(e) = self.cni("DEL", id, &nsarg, "eth0", &self.bridge_conf()) {
            tracing::warn!(id, error = %e, "CNI DEL");
        }
        remove_netns(&ns);
    }

    /// Namespace files left by an earlier run (their ids).
    pub fn leftovers(&self) -> Vec<String> {
        std::fs::read_dir(&self.netns_dir)
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn cni(&self, cmd: &str, id: &str, ns: &Path, ifname: &str, conf: &Value) -> Result<Value> {
        let ty = conf["type"].as_str().unwrap_or_default();
        let bin = self.plugin(ty)?;
        let path = std::env::join_paths(&self.bin_dirs)
            .map_err(|e| Error::Internal(format!("CNI_PATH: {e}")))?;
        let mut child = Command::new(&bin)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", cmd)
            .env("CNI_CONTAINERID", id)
            .env("CNI_NETNS", ns)
            .env("CNI_IFNAME", ifname)
            .env("CNI_PATH", path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(Error::io(format!("running {}", bin.display())))?;
        if let Some(mut i) = child.stdin.take() {
            i.write_all(conf.to_string().as_bytes())
                .map_err(Error::io(format!("writing to {}", bin.display())))?;
        }
        let out = child
            .wait_with_output()
            .map_err(Error::io(format!("running {}", bin.display())))?;
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        if !out.status.success() {
            let msg = v["msg"].as_str().map_or_else(
                || String::from_utf8_lossy(&out.stderr).trim().to_string(),
                |m| format!("{m} {}", v["details"].as_str().unwrap_or_default()),
            );
            return Err(Error::Internal(format!(
                "CNI {cmd} ({ty} on {ifname}) failed: {}",
                msg.trim()
            )));
        }
        Ok(v)
    }
}

fn first_ipv4(result: &Value) -> Result<Ipv4Addr> {
    result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|ip| ip["address"].as_str())
        .filter_map(|a| a.split('/').next()?.parse().ok())
        .next()
        .ok_or_else(|| Error::Internal(format!("the bridge plugin gave no IPv4 address: {result}")))
}

/// Creates a network namespace and bind-mounts it on `path` (created), from a thread of its
/// own that ends right after (`unshare` changes only the calling thread's namespace).
fn create_netns(path: &Path) -> Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(Error::io(format!("creating {}", d.display())))?;
    }
    std::fs::File::create(path).map_err(Error::io(format!("creating {}", path.display())))?;
    let target = path.to_path_buf();
    let made = std::thread::Builder::new()
        .name("arbor-netns".into())
        .spawn(move || -> std::io::Result<()> {
            use std::os::unix::ffi::OsStrExt as _;
            let src = c"/proc/thread-self/ns/net";
            let dst = std::ffi::CString::new(target.as_os_str().as_bytes())
                .map_err(std::io::Error::other)?;
            // SAFETY: on this short-lived thread only; the new namespace lives on through
            // the bind mount.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: valid C strings; a plain bind mount.
            let r = unsafe {
                libc::mount(
                    src.as_ptr(),
                    dst.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                )
            };
            if r != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
        .map_err(Error::io("starting the netns thread"))?
        .join()
        .map_err(|_| Error::Internal("the netns thread panicked".into()))?;
    if let Err(e) = made {
        let _ = std::fs::remove_file(path);
        return Err(Error::Internal(format!(
            "creating the network namespace {}: {e}",
            path.display()
        )));
    }
    Ok(())
}

fn remove_netns(path: &Path) {
    use std::os::unix::ffi::OsStrExt as _;
    if let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) {
        // SAFETY: a valid C string; detaching a mount we made (or nothing).
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
    if let Err(e) = std::fs::remove_file(path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), error = %e, "removing a network namespace file");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_ipv4_of_a_result() {
        let r = json!({"cniVersion":"1.0.0","ips":[{"address":"fd00::5/64"},{"address":"10.89.0.7/16","gateway":"10.89.0.1"}]});
        assert_eq!(first_ipv4(&r).unwrap(), Ipv4Addr::new(10, 89, 0, 7));
        assert!(first_ipv4(&json!({"ips": []})).is_err());
    }

    #[test]
    fn a_missing_plugin_is_named() {
        let c = NetConfig {
            bin_dirs: vec!["/nonexistent".into()],
            bridge: "x".into(),
            subnet: "10.0.0.0/24".into(),
            masquerade: false,
            netns_dir: "/nonexistent".into(),
            ipam_dir: "/nonexistent".into(),
        };
        let e = c.check().unwrap_err().to_string();
        assert!(
            e.contains("bridge") && e.contains("containernetworking-plugins"),
            "{e}"
        );
    }
}
