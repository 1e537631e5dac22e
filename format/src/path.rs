//! Entry-name normalization: the one place that decides which names are safe.
//!
//! Names are stored relative to the layer root, without `./` or `/` prefixes, with `.` for the
//! root itself. A name that is absolute, climbs with `..`, or holds a NUL is refused: such
//! entries could write outside the target when unpacked.
//!
//! Names are also bounded by what Linux can represent, so a hostile layer cannot make a
//! reader build (or recurse over) an absurdly deep tree:
//! - [`MAX_PATH_LEN`]: the normalized name is at most 4095 bytes (`PATH_MAX` 4096 with its NUL);
//! - [`MAX_NAME_LEN`]: every component is at most 255 bytes (`NAME_MAX`);
//! - [`MAX_DEPTH`]: at most 512 components. Linux has no depth limit of its own (`PATH_MAX`
//!   alone allows 2048 one-letter components); real images stay under ~40 (deep
//!   `node_modules` trees), so 512 leaves a wide margin while bounding any per-component work.

use crate::error::{Error, Result};

/// Longest normalized name accepted, in bytes (Linux `PATH_MAX` minus the terminating NUL).
pub const MAX_PATH_LEN: usize = 4095;
/// Longest path component accepted, in bytes (Linux `NAME_MAX`).
pub const MAX_NAME_LEN: usize = 255;
/// Most components a name may have (see the module docs for the choice).
pub const MAX_DEPTH: usize = 512;

/// A name shortened for error messages (a hostile name may be megabytes long).
fn shown(name: &str) -> String {
    const SHOW: usize = 200;
    if name.len() <= SHOW {
        return name.to_string();
    }
    let mut end = SHOW;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &name[..end], name.len())
}

fn unsafe_path(name: &str, reason: &'static str) -> Error {
    Error::UnsafePath {
        name: shown(name),
        reason,
    }
}

/// Normalizes a tar or TOC entry name; see the module docs for what is refused.
pub fn normalize(name: &str) -> Result<String> {
    if name.contains('\0') {
        return Err(unsafe_path(name, "contains a NUL byte"));
    }
    if name.starts_with('/') {
        return Err(unsafe_path(name, "absolute path"));
    }
    let mut parts: Vec<&str> = Vec::new();
    let mut len = 0usize;
    for comp in name.split('/') {
        match comp {
            "" | "." => {}
            ".." => return Err(unsafe_path(name, "contains a `..` component")),
            c => {
                if c.len() > MAX_NAME_LEN {
                    return Err(unsafe_path(
                        name,
                        "has a component longer than NAME_MAX (255 bytes)",
                    ));
                }
                if parts.len() == MAX_DEPTH {
                    return Err(unsafe_path(name, "is deeper than 512 components"));
                }
                len += c.len() + usize::from(!parts.is_empty());
                if len > MAX_PATH_LEN {
                    return Err(unsafe_path(
                        name,
                        "is longer than PATH_MAX (4095 bytes normalized)",
                    ));
                }
                parts.push(c);
            }
        }
    }
    if parts.is_empty() {
        return Ok(".".to_string());
    }
    Ok(parts.join("/"))
}

/// Normalizes a path a user gives for a file in the image (`/usr/bin/python3` and
/// `usr/bin/python3` name the same entry); `..` is still refused.
pub fn normalize_image_path(p: &str) -> Result<String> {
    normalize(p.trim_start_matches('/'))
}

/// The parent of a normalized name (`.` for top-level names), or `None` for the root.
pub fn parent(name: &str) -> Option<&str> {
    if name == "." {
        return None;
    }
    Some(name.rsplit_once('/').map_or(".", |(p, _)| p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_and_refuses() {
        assert_eq!(normalize("./usr/bin/").unwrap(), "usr/bin");
        assert_eq!(normalize("usr//bin/./sh").unwrap(), "usr/bin/sh");
        assert_eq!(normalize("./").unwrap(), ".");
        assert_eq!(normalize("").unwrap(), ".");
        assert!(normalize("/etc/passwd").is_err());
        assert!(normalize("a/../../etc").is_err());
        assert!(normalize("..").is_err());
        assert!(normalize("a\0b").is_err());
        assert_eq!(parent("a/b/c"), Some("a/b"));
        assert_eq!(parent("a"), Some("."));
        assert_eq!(parent("."), None);
    }

    #[test]
    fn linux_limits_are_enforced() {
        // NAME_MAX: 255 bytes per component.
        assert!(normalize(&"n".repeat(255)).is_ok());
        let e = normalize(&format!("d/{}", "n".repeat(256))).unwrap_err();
        assert!(e.to_string().contains("NAME_MAX"), "{e}");
        // PATH_MAX: 4095 bytes once normalized (redundant `./` and `//` do not count).
        let ok = vec!["a".repeat(255); 16].join("/"); // 16 * 256 - 1 = 4095
        assert_eq!(ok.len(), 4095);
        assert_eq!(
            normalize(&format!("./{}/", ok.replace('/', "//"))).unwrap(),
            ok
        );
        let e = normalize(&format!("{ok}/b")).unwrap_err();
        assert!(e.to_string().contains("PATH_MAX"), "{e}");
        // Depth: 512 components.
        let deep = vec!["a"; 512].join("/");
        assert!(normalize(&deep).is_ok());
        let e = normalize(&format!("{deep}/a")).unwrap_err();
        assert!(e.to_string().contains("512"), "{e}");
        // The error shows a bounded prefix of a huge name.
        let huge = "a/".repeat(20_000);
        let e = normalize(&huge).unwrap_err().to_string();
        assert!(e.len() < 400, "{e}");
    }
}
