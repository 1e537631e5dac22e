//! Where the arbord behind a containerd snapshotter keeps its state: containerd's
//! introspection service reports a proxy plugin's `exports`, and Arbor's containerd snippets
//! (and the test kit) export `root`. `arbor pull` uses it to find the pull key of exactly the
//! arbord that will receive its labels.
//!
//! arbor-proto does not compile containerd's introspection protos, so the one request and the
//! three response fields needed are encoded and decoded here by hand (protobuf wire format).

use std::collections::HashMap;

use bytes::{Buf, BufMut};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;
use tonic::{Request, Status};

const PLUGINS: &str = "/containerd.services.introspection.v1.Introspection/Plugins";

/// Raw protobuf bytes in and out.
#[derive(Debug, Default, Clone, Copy)]
struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let mut v = vec![0u8; src.remaining()];
        src.copy_to_slice(&mut v);
        Ok(Some(v))
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn varint(b: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = b.split_first()?;
        *b = rest;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// The fields of a message: (field number, length-delimited bytes); other wire types skipped.
fn fields(mut b: &[u8]) -> Option<Vec<(u64, &[u8])>> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let key = varint(&mut b)?;
        match key & 7 {
            0 => {
                varint(&mut b)?;
            }
            1 => b = b.get(8..)?,
            5 => b = b.get(4..)?,
            2 => {
                let n = usize::try_from(varint(&mut b)?).ok()?;
                out.push((key >> 3, b.get(..n)?));
                b = &b[n..];
            }
            _ => return None,
        }
    }
    Some(out)
}

/// `exports` of the snapshotter plugin `name` (a proxy plugin of type
/// `io.containerd.snapshotter.v1`), from containerd's introspection service.
pub async fn snapshotter_exports(
    ch: &Channel,
    namespace: &str,
    name: &str,
) -> Result<HashMap<String, String>, Status> {
    let mut req = Vec::new();
    let filter = format!("type==io.containerd.snapshotter.v1,id=={name}");
    req.push(0x0a); // field 1 (filters), length-delimited
    put_varint(&mut req, filter.len() as u64);
    req.extend_from_slice(filter.as_bytes());
    let mut r = Request::new(req);
    if let Ok(v) = namespace.parse() {
        r.metadata_mut().insert("containerd-namespace", v);
    }
    let mut grpc = tonic::client::Grpc::new(ch.clone());
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(PLUGINS);
    let resp = grpc.unary(r, path, Raw).await?.into_inner();
    let bad = || Status::internal("undecodable introspection answer");
    for (f, plugin) in fields(&resp).ok_or_else(bad)? {
        if f != 1 {
            continue;
        }
        let (mut ty, mut id, mut exports) = ("", "", HashMap::new());
        for (f, v) in fields(plugin).ok_or_else(bad)? {
            match f {
                1 => ty = std::str::from_utf8(v).unwrap_or(""),
                2 => id = std::str::from_utf8(v).unwrap_or(""),
                5 => {
                    let (mut k, mut val) = (String::new(), String::new());
                    for (f, x) in fields(v).ok_or_else(bad)? {
                        let s = String::from_utf8_lossy(x).into_owned();
                        match f {
                            1 => k = s,
                            2 => val = s,
                            _ => {}
                        }
                    }
                    exports.insert(k, val);
                }
                _ => {}
            }
        }
        if ty == "io.containerd.snapshotter.v1" && id == name {
            return Ok(exports);
        }
    }
    Err(Status::not_found(format!("no snapshotter plugin {name:?}")))
}

/// The root of the arbord listening on the unix socket `socket` (containerd 1.6 exports only
/// a proxy plugin's `address`): the process holding that listening socket also holds
/// `<root>/arbord.lock` open for its whole life. Reads `/proc` (root only).
pub fn root_of_socket(socket: &std::path::Path) -> Option<std::path::PathBuf> {
    let want = socket.to_str()?;
    let table = std::fs::read_to_string("/proc/net/unix").ok()?;
    let inodes: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 8 && f[7] == want).then(|| format!("socket:[{}]", f[6]))
        })
        .collect();
    if inodes.is_empty() {
        return None;
    }
    for p in std::fs::read_dir("/proc").ok()?.flatten() {
        let fd_dir = p.path().join("fd");
        let Ok(fds) = std::fs::read_dir(&fd_dir) else {
            continue;
        };
        let links: Vec<std::path::PathBuf> = fds
            .flatten()
            .filter_map(|f| std::fs::read_link(f.path()).ok())
            .collect();
        if !links
            .iter()
            .any(|l| l.to_str().is_some_and(|s| inodes.iter().any(|i| i == s)))
        {
            continue;
        }
        if let Some(lock) = links
            .iter()
            .find(|l| l.file_name().is_some_and(|n| n == "arbord.lock"))
        {
            return lock.parent().map(std::path::Path::to_path_buf);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format_round_trip() {
        // PluginsResponse { plugins: [Plugin { type, id, exports: {root: /r} }] }
        let entry = [b"\x0a\x04root".as_slice(), b"\x12\x02/r"].concat();
        let mut plugin = Vec::new();
        for (f, v) in [
            (1u8, b"io.containerd.snapshotter.v1".as_slice()),
            (2, b"arbor"),
            (5, &entry),
        ] {
            plugin.push(f << 3 | 2);
            put_varint(&mut plugin, v.len() as u64);
            plugin.extend_from_slice(v);
        }
        plugin.extend_from_slice(&[0x30, 0x96, 0x01]); // a varint field, skipped
        let mut resp = vec![0x0a];
        put_varint(&mut resp, plugin.len() as u64);
        resp.extend_from_slice(&plugin);
        let top = fields(&resp).unwrap();
        assert_eq!(top.len(), 1);
        let inner = fields(top[0].1).unwrap();
        assert_eq!(inner[2].0, 5);
        assert_eq!(fields(inner[2].1).unwrap()[1].1, b"/r");
        assert!(fields(&[0x0a, 0x05, 0x01]).is_none(), "truncated");
    }
}
