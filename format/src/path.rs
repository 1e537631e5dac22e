//! Entry-name normalization: the one place that decides which names are safe.
//!
//! Names are stored relative to the layer root, without `./` or `/` prefixes, with `.` for the
//! root itself. A name that is absolute, climbs with `..`, or holds a NUL is refused: such
//! entries could write outside the target when unpacked.

use crate::error::{Error, Result};

/// Normalizes a tar or TOC entry name; see the module docs for what is refused.
pub fn normalize(name: &str) -> Result<String> {
    if name.contains('\0') {
        return Err(Error::UnsafePath {
            name: name.to_string(),
            reason: "contains a NUL byte",
        });
    }
    if name.starts_with('/') {
        return Err(Error::UnsafePath {
            name: name.to_string(),
            reason: "absolute path",
        });
    }
    let mut parts: Vec<&str> = Vec::new();
    for comp in name.split('/') {
        match comp {
            "" | "." => {}
            ".." => {
                return Err(Error::UnsafePath {
                    name: name.to_string(),
                    reason: "contains a `..` component",
                });
            }
            c => parts.push(c),
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
}
