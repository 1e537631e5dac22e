//! The subset of containerd's filter syntax (`github.com/containerd/containerd/filters`) that
//! snapshot listings use: `field==value`, `field!=value`, `field~=regexp-free substring`, or a
//! bare `field` (present), joined with `,` (and); several filters are or-ed. Fields: `name`,
//! `parent`, `kind`, `labels.<key>` with the key optionally double-quoted
//! (`labels."containerd.io/snapshot.ref"==sha256:...`).

use crate::error::{Error, Result};
use crate::meta::{Kind, Record};

#[derive(Debug, Clone, PartialEq)]
enum Op {
    Present,
    Eq(String),
    Ne(String),
    Contains(String),
}

#[derive(Debug, Clone, PartialEq)]
struct Term {
    field: Vec<String>,
    op: Op,
}

/// A parsed filter list (or of ands).
#[derive(Debug, Clone, Default)]
pub struct Filters(Vec<Vec<Term>>);

fn split_outside_quotes(s: &str, sep: char) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut escaped = false;
    for c in s.chars() {
        if escaped {
            cur.push(c);
            escaped = false;
            continue;
        }
        match c {
            '\\' if quoted => {
                cur.push(c);
                escaped = true;
            }
            '"' => {
                quoted = !quoted;
                cur.push(c);
            }
            c if c == sep && !quoted => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    out.push(cur);
    out
}

fn unquote(s: &str) -> String {
    let s = s.trim();
    if s.len() >= 2 && s.starts_with('"') && s.ends_with('"') {
        let inner = &s[1..s.len() - 1];
        let mut out = String::new();
        let mut it = inner.chars();
        while let Some(c) = it.next() {
            if c == '\\' {
                if let Some(n) = it.next() {
                    out.push(n);
                }
            } else {
                out.push(c);
            }
        }
        out
    } else {
        s.to_string()
    }
}

fn parse_term(t: &str) -> Result<Term> {
    let bad = || Error::InvalidArgument(format!("cannot parse filter term {t:?}"));
    // Find the operator outside quotes.
    let mut quoted = false;
    let bytes = t.as_bytes();
    let mut at = None;
    for i in 0..bytes.len() {
        match bytes[i] {
            b'"' => quoted = !quoted,
            b'=' | b'!' | b'~' if !quoted && bytes.get(i + 1) == Some(&b'=') => {
                at = Some(i);
                break;
            }
            _ => {}
        }
    }
    let (sel, op) = match at {
        Some(i) => {
            let value = unquote(&t[i + 2..]);
            let op = match bytes[i] {
                b'=' => Op::Eq(value),
                b'!' => Op::Ne(value),
                _ => Op::Contains(value),
            };
            (&t[..i], op)
        }
        None => (t, Op::Present),
    };
    let field: Vec<String> = split_outside_quotes(sel.trim(), '.')
        .iter()
        .map(|s| unquote(s))
        .collect();
    if field.iter().any(|f| f.is_empty()) {
        return Err(bad());
    }
    Ok(Term { field, op })
}

impl Filters {
    pub fn parse(filters: &[String]) -> Result<Filters> {
        let mut out = Vec::new();
        for f in filters {
            if f.trim().is_empty() {
                continue;
            }
            let terms = split_outside_quotes(f, ',')
                .iter()
                .map(|t| parse_term(t))
                .collect::<Result<Vec<_>>>()?;
            out.push(terms);
        }
        Ok(Filters(out))
    }

    /// Whether snapshot `name` matches (no filters: everything matches).
    pub fn matches(&self, name: &str, rec: &Record) -> bool {
        self.0.is_empty()
            || self
                .0
                .iter()
                .any(|ands| ands.iter().all(|t| term_matches(t, name, rec)))
    }
}

fn term_matches(t: &Term, name: &str, rec: &Record) -> bool {
    let kind = match rec.kind {
        Kind::View => "view",
        Kind::Active => "active",
        Kind::Committed => "committed",
    };
    let value: Option<&str> = match t.field.first().map(String::as_str) {
        Some("name") if t.field.len() == 1 => Some(name),
        Some("parent") if t.field.len() == 1 => Some(rec.parent.as_str()),
        Some("kind") if t.field.len() == 1 => Some(kind),
        Some("labels") if t.field.len() >= 2 => {
            let key = t.field[1..].join(".");
            rec.labels.get(&key).map(String::as_str)
        }
        _ => None,
    };
    match (&t.op, value) {
        (Op::Present, v) => v.is_some(),
        (Op::Eq(want), Some(v)) => v == want,
        (Op::Eq(want), None) => want.is_empty() && t.field.len() == 1,
        (Op::Ne(want), v) => v.unwrap_or("") != want,
        (Op::Contains(want), Some(v)) => v.contains(want.as_str()),
        (Op::Contains(_), None) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn rec(parent: &str, labels: &[(&str, &str)]) -> Record {
        Record {
            id: 1,
            kind: Kind::Committed,
            parent: parent.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
            created: 0,
            updated: 0,
            usage: None,
            remote: None,
        }
    }

    #[test]
    fn containerd_remote_snapshot_filter() {
        // What containerd 1.6 sends after a remote Prepare returned AlreadyExists.
        let f = Filters::parse(&[
            r#"labels."containerd.io/snapshot.ref"==sha256:abc,parent=="""#.to_string(),
        ])
        .unwrap();
        let r = rec("", &[("containerd.io/snapshot.ref", "sha256:abc")]);
        assert!(f.matches("sha256:abc", &r));
        assert!(!f.matches(
            "x",
            &rec("p", &[("containerd.io/snapshot.ref", "sha256:abc")])
        ));
        assert!(!f.matches(
            "x",
            &rec("", &[("containerd.io/snapshot.ref", "sha256:abd")])
        ));
        let f = Filters::parse(&[r#"parent=="sha256:p",kind==committed"#.to_string()]).unwrap();
        assert!(f.matches("x", &rec("sha256:p", &[])));
        let f = Filters::parse(&["labels.a".to_string(), "name~=zz".to_string()]).unwrap();
        assert!(f.matches("x", &rec("", &[("a", "")])));
        assert!(f.matches("azzb", &rec("", &[])));
        assert!(!f.matches("x", &rec("", &[])));
        assert!(Filters::parse(&["labels.==x".to_string()]).is_err());
        assert!(Filters::parse(&[]).unwrap().matches("any", &rec("", &[])));
    }
}
