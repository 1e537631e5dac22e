//! Static import scanner for Python source files.
//!
//! At conversion time Arbor guesses which files a Python program reads at start-up by following
//! its imports. [`imports`] takes the bytes of one source file and returns the `import` and
//! `from ... import` statements that run when the module is imported, in source order.
//!
//! It is not a Python parser. A small tokenizer tracks string literals of every kind (prefixes,
//! triple quotes, escapes), comments, bracket depth, backslash continuations and indentation,
//! and groups tokens into logical lines. A recognizer then looks for `import` / `from` at the
//! start of each simple statement: at the start of a logical line, after a `;`, or after the `:`
//! of a one-line compound statement (`if x: import y`). Block membership comes from indentation:
//! a logical line ending with `:` is a block header and its body is the following logical lines
//! indented more deeply. Statements at module level and in blocks that run at import time
//! (`if`/`elif`/`else`, `try`/`except`/`else`/`finally`, `with`, `for`, `while`, `match`/`case`,
//! class bodies) are counted; everything under a `def` / `async def` is skipped, as are
//! `if TYPE_CHECKING:` / `if typing.TYPE_CHECKING:` blocks (their `else` branch is counted) and
//! `from __future__ import ...`.
//!
//! Deliberately not followed: dynamic imports (`importlib.import_module`, `__import__`, `exec`),
//! imports inside functions (even ones called at import time), lazy loaders (module-level
//! `__getattr__`), and conditions in general (both branches of an `if` are reported). Python
//! 3.12 f-strings that reuse their own quote character inside a replacement field are not
//! understood; such a line may be mis-tokenized, but no more than that line and the lines up to
//! the next quote of the same kind.
//!
//! The scanner accepts arbitrary bytes: a UTF-8 byte-order mark is skipped, invalid UTF-8 is
//! decoded lossily in reported names, CRLF and lone CR line endings are accepted, and it never
//! panics. It runs in time linear in the input and does not recurse, whatever the nesting depth.

/// One import a module makes when it is imported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Import {
    /// Leading dots of a relative import (`from ..x import y`: 2); 0 for absolute imports.
    pub level: u32,
    /// The dotted module named (`a.b` in `import a.b as c` or `from a.b import c`); empty for `from . import x`.
    pub module: String,
    /// For `from M import n1, n2`: n1, n2 (each may be a submodule of M); empty for `import M` and for `from M import *`.
    pub names: Vec<String>,
}

/// The imports of a Python source file that run at import time, in source order.
pub fn imports(source: &[u8]) -> Vec<Import> {
    let src = source.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(source);
    let mut lexer = Lexer { src, pos: 0 };
    let mut toks = Vec::new();
    let mut out = Vec::new();
    // Indentation of the header of the skipped block (def, TYPE_CHECKING) we are inside, if any.
    // Everything inside a skipped block is skipped, so one level is all we need to remember.
    let mut skip_header: Option<usize> = None;
    while let Some(indent) = lexer.next_line(&mut toks) {
        if let Some(header) = skip_header {
            if indent > header {
                continue;
            }
            skip_header = None;
        }
        if scan_line(src, &toks, &mut out) {
            skip_header = Some(indent);
        }
    }
    out
}

/// A token of a logical line. Only what the recognizer needs is distinguished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tok {
    /// An identifier or keyword: its byte range in the source.
    Name(usize, usize),
    Dot,
    Comma,
    Star,
    LParen,
    RParen,
    /// A `:` outside brackets (not part of `:=`).
    Colon,
    /// A `;` outside brackets.
    Semi,
    /// Anything else: numbers, strings, other operators, brackets other than `(`.
    Other,
}

struct Lexer<'a> {
    src: &'a [u8],
    pos: usize,
}

impl Lexer<'_> {
    fn byte(&self, at: usize) -> Option<u8> {
        self.src.get(at).copied()
    }

    /// Length of the line ending at `at` (`\n`, `\r\n` or `\r`), 0 if there is none.
    fn newline_len(&self, at: usize) -> usize {
        match self.byte(at) {
            Some(b'\n') => 1,
            Some(b'\r') if self.byte(at + 1) == Some(b'\n') => 2,
            Some(b'\r') => 1,
            _ => 0,
        }
    }

    /// Reads the next non-blank logical line into `toks`; returns its indentation, or `None` at
    /// the end of the input.
    fn next_line(&mut self, toks: &mut Vec<Tok>) -> Option<usize> {
        loop {
            if self.pos >= self.src.len() {
                return None;
            }
            let indent = self.indentation();
            toks.clear();
            self.logical_line(toks);
            if !toks.is_empty() {
                return Some(indent);
            }
        }
    }

    /// Skips the leading whitespace of a physical line and returns its width (tabs to the next
    /// multiple of 8, form feed resets, as in CPython).
    fn indentation(&mut self) -> usize {
        let mut col: usize = 0;
        while let Some(c) = self.byte(self.pos) {
            match c {
                b' ' => col = col.saturating_add(1),
                b'\t' => col = (col / 8).saturating_add(1).saturating_mul(8),
                0x0c => col = 0,
                _ => break,
            }
            self.pos += 1;
        }
        col
    }

    /// Tokenizes up to and including the newline that ends the logical line.
    fn logical_line(&mut self, toks: &mut Vec<Tok>) {
        let mut depth: usize = 0;
        while let Some(c) = self.byte(self.pos) {
            match c {
                b'\n' | b'\r' => {
                    self.pos += self.newline_len(self.pos);
                    if depth == 0 {
                        return;
                    }
                }
                b' ' | b'\t' | 0x0c => self.pos += 1,
                b'#' => {
                    while let Some(c) = self.byte(self.pos) {
                        if c == b'\n' || c == b'\r' {
                            break;
                        }
                        self.pos += 1;
                    }
                }
                b'\\' => {
                    let nl = self.newline_len(self.pos + 1);
                    if nl == 0 {
                        toks.push(Tok::Other);
                    }
                    self.pos += 1 + nl;
                }
                b'\'' | b'"' => {
                    self.string();
                    toks.push(Tok::Other);
                }
                b'0'..=b'9' => {
                    self.word();
                    toks.push(Tok::Other);
                }
                c if is_ident_start(c) => {
                    let start = self.pos;
                    self.word();
                    let end = self.pos;
                    if matches!(self.byte(end), Some(b'\'' | b'"'))
                        && self.src.get(start..end).is_some_and(is_string_prefix)
                    {
                        self.string();
                        toks.push(Tok::Other);
                    } else {
                        toks.push(Tok::Name(start, end));
                    }
                }
                _ => {
                    self.pos += 1;
                    let tok = match c {
                        b'.' => Tok::Dot,
                        b',' => Tok::Comma,
                        b'*' => Tok::Star,
                        b'(' => {
                            depth = depth.saturating_add(1);
                            Tok::LParen
                        }
                        b')' => {
                            depth = depth.saturating_sub(1);
                            Tok::RParen
                        }
                        b'[' | b'{' => {
                            depth = depth.saturating_add(1);
                            Tok::Other
                        }
                        b']' | b'}' => {
                            depth = depth.saturating_sub(1);
                            Tok::Other
                        }
                        b':' if self.byte(self.pos) == Some(b'=') => {
                            self.pos += 1;
                            Tok::Other
                        }
                        b':' if depth == 0 => Tok::Colon,
                        b';' if depth == 0 => Tok::Semi,
                        _ => Tok::Other,
                    };
                    toks.push(tok);
                }
            }
        }
    }

    /// Skips identifier characters (also used for numbers).
    fn word(&mut self) {
        while let Some(c) = self.byte(self.pos) {
            if !(is_ident_start(c) || c.is_ascii_digit()) {
                break;
            }
            self.pos += 1;
        }
    }

    /// Skips a string literal whose opening quote is at `pos` (any prefix already skipped).
    /// An unterminated single-quoted string ends at the end of its line; an unterminated
    /// triple-quoted one at the end of the input.
    fn string(&mut self) {
        let Some(q) = self.byte(self.pos) else {
            return;
        };
        let triple = self.byte(self.pos + 1) == Some(q) && self.byte(self.pos + 2) == Some(q);
        self.pos += if triple { 3 } else { 1 };
        while let Some(c) = self.byte(self.pos) {
            if c == b'\\' {
                // An escaped character, or a backslash-newline, never ends the string (in raw
                // strings too).
                let nl = self.newline_len(self.pos + 1);
                self.pos += 1 + nl.max(1);
            } else if c == q {
                if !triple {
                    self.pos += 1;
                    return;
                }
                if self.byte(self.pos + 1) == Some(q) && self.byte(self.pos + 2) == Some(q) {
                    self.pos += 3;
                    return;
                }
                self.pos += 1;
            } else if !triple && (c == b'\n' || c == b'\r') {
                return;
            } else {
                self.pos += 1;
            }
        }
        self.pos = self.pos.min(self.src.len());
    }
}

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c >= 0x80
}

/// String prefixes: `r`, `b`, `f`, `u`, `t` and two-letter combinations, in any case.
fn is_string_prefix(word: &[u8]) -> bool {
    (1..=2).contains(&word.len())
        && word
            .iter()
            .all(|c| matches!(c.to_ascii_lowercase(), b'r' | b'b' | b'f' | b'u' | b't'))
}

fn is_name(src: &[u8], tok: Option<&Tok>, word: &[u8]) -> bool {
    matches!(tok, Some(&Tok::Name(s, e)) if src.get(s..e) == Some(word))
}

fn text(src: &[u8], s: usize, e: usize) -> String {
    String::from_utf8_lossy(src.get(s..e).unwrap_or_default()).into_owned()
}

/// Keywords that start a compound statement (`match` and `case` are soft keywords: they start
/// one only if a `:` follows).
const COMPOUND: &[&[u8]] = &[
    b"if", b"elif", b"else", b"try", b"except", b"finally", b"with", b"for", b"while", b"class",
    b"def", b"async", b"match", b"case",
];

/// Scans one logical line, appending its imports to `out`. Returns true if the line is the
/// header of a block whose body must be skipped (ends with `:` after `def` or TYPE_CHECKING).
fn scan_line(src: &[u8], toks: &[Tok], out: &mut Vec<Import>) -> bool {
    let mut i = 0;
    while i < toks.len() {
        if toks[i] == Tok::Semi {
            i += 1;
            continue;
        }
        let compound = match toks[i] {
            Tok::Name(s, e) => src.get(s..e).is_some_and(|w| COMPOUND.contains(&w)),
            _ => false,
        };
        if compound {
            let colon = toks[i + 1..]
                .iter()
                .position(|t| matches!(t, Tok::Colon | Tok::Semi))
                .map(|p| i + 1 + p)
                .filter(|&p| toks[p] == Tok::Colon);
            if let Some(colon) = colon {
                let skip = is_skipped_header(src, &toks[i..colon]);
                if colon + 1 == toks.len() {
                    return skip;
                }
                if skip {
                    // A one-line `def f(): ...` or `if TYPE_CHECKING: ...`: the rest is skipped.
                    return false;
                }
                i = colon + 1;
                continue;
            }
        }
        let end = toks[i..]
            .iter()
            .position(|t| *t == Tok::Semi)
            .map_or(toks.len(), |p| i + p);
        simple_statement(src, &toks[i..end], out);
        i = end;
    }
    false
}

/// Whether a compound statement header (without its `:`) opens a body that does not run at
/// import time: `def`, `async def`, `if TYPE_CHECKING`, `if <name>.TYPE_CHECKING`.
fn is_skipped_header(src: &[u8], header: &[Tok]) -> bool {
    let first = header.first();
    if is_name(src, first, b"def") {
        return true;
    }
    if is_name(src, first, b"async") {
        return is_name(src, header.get(1), b"def");
    }
    if is_name(src, first, b"if") || is_name(src, first, b"elif") {
        return match header {
            [_, last] => is_name(src, Some(last), b"TYPE_CHECKING"),
            [_, Tok::Name(..), Tok::Dot, last] => is_name(src, Some(last), b"TYPE_CHECKING"),
            _ => false,
        };
    }
    false
}

/// Recognizes `import ...` and `from ... import ...` in the tokens of one simple statement.
/// Lenient: on malformed input it reports what it could parse before the problem.
fn simple_statement(src: &[u8], toks: &[Tok], out: &mut Vec<Import>) {
    let first = toks.first();
    if is_name(src, first, b"import") {
        let mut i = 1;
        while let Some((module, next)) = dotted(src, toks, i) {
            out.push(Import {
                level: 0,
                module,
                names: Vec::new(),
            });
            i = skip_alias(src, toks, next);
            if toks.get(i) != Some(&Tok::Comma) {
                break;
            }
            i += 1;
        }
    } else if is_name(src, first, b"from") {
        from_import(src, toks, out);
    }
}

fn from_import(src: &[u8], toks: &[Tok], out: &mut Vec<Import>) {
    let mut i = 1;
    let mut level: u32 = 0;
    while toks.get(i) == Some(&Tok::Dot) {
        level = level.saturating_add(1);
        i += 1;
    }
    let mut module = String::new();
    if !is_name(src, toks.get(i), b"import") {
        let Some((m, next)) = dotted(src, toks, i) else {
            return;
        };
        module = m;
        i = next;
    }
    if !is_name(src, toks.get(i), b"import") {
        return;
    }
    i += 1;
    if level == 0 && (module.is_empty() || module == "__future__") {
        return;
    }
    let mut names = Vec::new();
    match toks.get(i) {
        Some(Tok::Star) => {}
        _ => {
            if toks.get(i) == Some(&Tok::LParen) {
                i += 1;
            }
            while let Some(&Tok::Name(s, e)) = toks.get(i) {
                names.push(text(src, s, e));
                i = skip_alias(src, toks, i + 1);
                if toks.get(i) != Some(&Tok::Comma) {
                    break;
                }
                i += 1;
            }
            if names.is_empty() {
                return;
            }
        }
    }
    out.push(Import {
        level,
        module,
        names,
    });
}

/// Parses a dotted name starting at `i` (its parts may be separated by whitespace or line
/// continuations); returns it and the index after it.
fn dotted(src: &[u8], toks: &[Tok], mut i: usize) -> Option<(String, usize)> {
    let Some(&Tok::Name(s, e)) = toks.get(i) else {
        return None;
    };
    let mut name = text(src, s, e);
    i += 1;
    while toks.get(i) == Some(&Tok::Dot) {
        let Some(&Tok::Name(s, e)) = toks.get(i + 1) else {
            break;
        };
        name.push('.');
        name.push_str(&text(src, s, e));
        i += 2;
    }
    Some((name, i))
}

/// Skips `as name` at `i` if present.
fn skip_alias(src: &[u8], toks: &[Tok], i: usize) -> usize {
    if is_name(src, toks.get(i), b"as") && matches!(toks.get(i + 1), Some(Tok::Name(..))) {
        i + 2
    } else {
        i
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn imp(module: &str) -> Import {
        Import {
            level: 0,
            module: module.to_string(),
            names: Vec::new(),
        }
    }

    fn from(level: u32, module: &str, names: &[&str]) -> Import {
        Import {
            level,
            module: module.to_string(),
            names: names.iter().map(|n| n.to_string()).collect(),
        }
    }

    fn scan(src: &str) -> Vec<Import> {
        imports(src.as_bytes())
    }

    /// Just the module names, for tests that only care which imports were found.
    fn modules(src: &str) -> Vec<String> {
        scan(src).into_iter().map(|i| i.module).collect()
    }

    #[test]
    fn plain_imports() {
        assert_eq!(scan("import os\n"), vec![imp("os")]);
        assert_eq!(scan("import a.b as c, d\n"), vec![imp("a.b"), imp("d")]);
        assert_eq!(scan("import a . b\n"), vec![imp("a.b")]);
        assert_eq!(scan("import os"), vec![imp("os")], "no trailing newline");
        assert_eq!(scan(""), vec![]);
    }

    #[test]
    fn from_imports() {
        assert_eq!(scan("from a.b import c\n"), vec![from(0, "a.b", &["c"])]);
        assert_eq!(
            scan("from a import b as bb, c\n"),
            vec![from(0, "a", &["b", "c"])]
        );
        assert_eq!(
            scan("from a import (b as bb,\n    c,\n)\nimport d\n"),
            vec![from(0, "a", &["b", "c"]), imp("d")]
        );
        assert_eq!(scan("from a import *\n"), vec![from(0, "a", &[])]);
    }

    #[test]
    fn relative_imports() {
        assert_eq!(scan("from . import x\n"), vec![from(1, "", &["x"])]);
        assert_eq!(scan("from .import x\n"), vec![from(1, "", &["x"])]);
        assert_eq!(scan("from ..x import y\n"), vec![from(2, "x", &["y"])]);
        assert_eq!(scan("from .m import *\n"), vec![from(1, "m", &[])]);
        assert_eq!(scan("from ... import z\n"), vec![from(3, "", &["z"])]);
        assert_eq!(
            scan("from ...a.b import (c)\n"),
            vec![from(3, "a.b", &["c"])]
        );
    }

    #[test]
    fn future_and_malformed_are_skipped() {
        assert_eq!(
            scan("from __future__ import annotations\nimport os\n"),
            vec![imp("os")]
        );
        // `.__future__` is a relative module, not the future statement.
        assert_eq!(
            scan("from .__future__ import x\n"),
            vec![from(1, "__future__", &["x"])]
        );
        assert_eq!(
            scan("from a\nfrom import b\nfrom a import\nimport\n"),
            vec![]
        );
    }

    #[test]
    fn function_bodies_are_skipped() {
        let src = "\
import a
def f():
    import b
    class C:
        import c
        def g():
            import d
    if x:
        import e

    # a comment at column 0 does not end the body
    import f
async def h():
    import g
@decorator
def i(
    x,
    y=lambda: 1,
) -> int:
    import h
import i
";
        assert_eq!(modules(src), ["a", "i"]);
    }

    #[test]
    fn class_bodies_run_but_their_methods_do_not() {
        let src = "\
class A(Base):
    import a
    def m(self):
        import b
    import c
    class Inner:
        from d import e
";
        assert_eq!(scan(src), vec![imp("a"), imp("c"), from(0, "d", &["e"])]);
    }

    #[test]
    fn import_time_blocks_are_counted() {
        let src = "\
if sys.platform == 'win32':
    import a
elif x:
    import b
else:
    import c
try:
    import d
except ImportError:
    import e
except* ValueError:
    import e2
else:
    import f
finally:
    import g
with lock:
    import h
for x in y:
    import i
while True:
    import j
    break
async with z:
    import k
match command:
    case 1:
        import l
";
        assert_eq!(
            modules(src),
            [
                "a", "b", "c", "d", "e", "e2", "f", "g", "h", "i", "j", "k", "l"
            ]
        );
    }

    #[test]
    fn type_checking_blocks_are_skipped() {
        let src = "\
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    import a
    if x:
        import b
else:
    import c
if typing.TYPE_CHECKING:  # comment
    from d import e
try:
    if TYPE_CHECKING:
        import f
    import g
except ImportError:
    pass
if not TYPE_CHECKING:
    import h
if TYPE_CHECKING: import i
import j
";
        assert_eq!(modules(src), ["typing", "c", "g", "h", "j"]);
    }

    #[test]
    fn strings_and_comments_hide_imports() {
        let src = r##"
"""Module docstring.

import os
from a import b
"""
x = 'import s1'; y = "import s2"
z = '''
import s3'''
w = r"import s4\" import s5"
v = b'\'import s6'
u = f"{x} import s7" + rb'import s8' + BR"import s9" + Fr'import s10' + u"import s11"
t = 'it\'s' ; import real1
# import commented
s = "#"; import real2
r = r'\\'; import real3
q = """a "quote" and ""two"" \""" import s12"""
p = '''
''' ; import real4
"##;
        assert_eq!(modules(src), ["real1", "real2", "real3", "real4"]);
    }

    #[test]
    fn keywords_must_be_whole_tokens() {
        let src = "\
importlib.import_module('x')
imported = 1
from_x = 2
__import__('y')
x = yield from z
raise E from err
print(import_me)
obj.import_
";
        assert_eq!(scan(src), vec![]);
    }

    #[test]
    fn continuations() {
        assert_eq!(
            scan("import a, \\\n    b\nfrom c \\\n  import d\n"),
            vec![imp("a"), imp("b"), from(0, "c", &["d"])]
        );
        // Bracketed lines that look like they start with `import` are not statements.
        assert_eq!(
            scan("x = (\nimport_a,\n  1)\nimport b\ny = [\n'import c'\n]\n"),
            vec![imp("b")]
        );
        // A def whose signature spans lines, with a CRLF continuation.
        assert_eq!(
            modules("def f(a,\n      b) \\\r\n        :\n    import x\nimport y\n"),
            ["y"]
        );
    }

    #[test]
    fn semicolons_and_one_line_compounds() {
        assert_eq!(modules("import os; import sys\n"), ["os", "sys"]);
        assert_eq!(modules("x = 1; from a import b; y = {1: 2}\n"), ["a"]);
        assert_eq!(modules("if x: import y\n"), ["y"]);
        assert_eq!(modules("if x: a = 1; import y\n"), ["y"]);
        assert_eq!(modules("def f(): import z\nimport w\n"), ["w"]);
        assert_eq!(modules("async def f(): import z\n"), Vec::<String>::new());
        assert_eq!(modules("class A: import q\n"), ["q"]);
        assert_eq!(
            modules("try: import a\nexcept ImportError: import b\nelse: import c\n"),
            ["a", "b", "c"]
        );
        assert_eq!(
            modules("if TYPE_CHECKING: import t\nelse: import u\n"),
            ["u"]
        );
        assert_eq!(modules("if (x := 1): import v\n"), ["v"]);
        assert_eq!(modules("f = lambda: 0; import w\n"), ["w"]);
        // `match` as an ordinary name.
        assert_eq!(modules("match = re.match(p, s); import m\n"), ["m"]);
    }

    #[test]
    fn indentation_line_endings_and_encoding() {
        let tabs = "def f():\n\timport a\n\tif x:\n\t\timport b\nimport c\n";
        assert_eq!(modules(tabs), ["c"]);
        // A tab is 8 columns: the eight-space line is inside the tab-indented def body.
        let mixed = "if x:\n\tdef f():\n\t        import a\n\timport b\n";
        assert_eq!(modules(mixed), ["b"]);
        let crlf = "import a\r\ndef f():\r\n    import b\r\nimport c\r\n";
        assert_eq!(modules(crlf), ["a", "c"]);
        let cr = "import a\rdef f():\r    import b\rimport c\r";
        assert_eq!(modules(cr), ["a", "c"]);
        let bom = b"\xEF\xBB\xBFimport a\n";
        assert_eq!(imports(bom), vec![imp("a")]);
        let invalid = b"# \xff\xfe comment\nimport caf\xe9\nx = '\xc3\x28'\nimport b\n";
        assert_eq!(imports(invalid), vec![imp("caf\u{fffd}"), imp("b")]);
        assert_eq!(modules("import caf\u{e9}.\u{3b1}\n"), ["caf\u{e9}.\u{3b1}"]);
    }

    #[test]
    fn unterminated_constructs_do_not_panic() {
        for src in [
            "'",
            "\"\"\"",
            "(",
            ")",
            "\\",
            "x = '\nimport a\n",
            "from",
            "from .",
            "import a.",
            "from a import (",
            "if x:",
            "def",
            "r'\\",
            "\"\"\"\\",
            "from a import b as",
            "\u{feff}",
            ":=",
            "if TYPE_CHECKING",
            "async",
            "f(\\\r",
        ] {
            let _ = scan(src);
        }
        // A single-quoted string ends at its line, so the next line is still seen.
        assert_eq!(modules("x = 'oops\nimport a\n"), ["a"]);
        // An unclosed bracket swallows the rest of the file, as it does for Python.
        assert_eq!(modules("x = (\nimport a\n"), Vec::<String>::new());
    }

    #[test]
    fn numpy_like_init() {
        let src = r#""""
NumPy-like package
==================

Use it like this::

  >>> import os
  >>> from numpy import array
"""
import os
import sys
import warnings

from ._globals import _NoValue, _CopyMode
from ._utils import set_module

try:
    __NUMPY_SETUP__
except NameError:
    __NUMPY_SETUP__ = False

if __NUMPY_SETUP__:
    sys.stderr.write('Running from numpy source directory.\n')
else:
    try:
        from numpy.__config__ import show as show_config
    except ImportError as e:
        msg = """Error importing numpy: you should not try to import numpy from
        its source directory; please exit the numpy source tree."""
        raise ImportError(msg) from e

    from . import _core
    from ._core import (
        False_, ScalarType, True_,
        abs, absolute,  # a comment in the list
    )
    from .lib import (a, b)
    from . import linalg, fft; from .version import __version__

    if TYPE_CHECKING:
        from .typing import NDArray

    def __getattr__(attr):
        import math
        if attr == "testing":
            import numpy.testing as testing
            return testing
        raise AttributeError(attr)

    def _sanity_check():
        """Quick sanity checks.

        import should_not_appear
        """
        try:
            x = ones(2, dtype=float32)
        except AssertionError:
            import traceback
            raise RuntimeError(traceback.format_exc())

    _sanity_check()
    del _sanity_check

    class _Lazy:
        from ._pytesttester import PytestTester
        def __init__(self):
            import inspect
"#;
        assert_eq!(
            scan(src),
            vec![
                imp("os"),
                imp("sys"),
                imp("warnings"),
                from(1, "_globals", &["_NoValue", "_CopyMode"]),
                from(1, "_utils", &["set_module"]),
                from(0, "numpy.__config__", &["show"]),
                from(1, "", &["_core"]),
                from(
                    1,
                    "_core",
                    &["False_", "ScalarType", "True_", "abs", "absolute"]
                ),
                from(1, "lib", &["a", "b"]),
                from(1, "", &["linalg", "fft"]),
                from(1, "version", &["__version__"]),
                from(1, "_pytesttester", &["PytestTester"]),
            ]
        );
    }

    #[test]
    fn deep_nesting_and_large_inputs() {
        // Ten thousand nested blocks: no recursion, so no stack overflow.
        let mut src = String::new();
        for depth in 0..10_000 {
            src.push_str(&" ".repeat(depth));
            src.push_str("if x:\n");
        }
        src.push_str(&" ".repeat(10_000));
        src.push_str("import deep\n");
        assert_eq!(modules(&src), ["deep"]);

        // Inputs of a few MiB that would be slow with a quadratic scan.
        let n = 2 << 20;
        let _ = imports(&vec![b'('; n]);
        let _ = imports(&vec![b'"'; n]);
        let _ = imports(&vec![b'\''; n]);
        let _ = imports(&vec![b'.'; n]);
        let _ = imports(&vec![b'\t'; n]);
        let _ = imports(&vec![b'\\'; n]);
        let _ = imports("if x: ".repeat(n / 6).as_bytes());
        let _ = imports("if ".repeat(n / 3).as_bytes());
        let _ = imports(format!("from {} import x", ".".repeat(n)).as_bytes());
        let many = "import a, b.c as d\n".repeat(100_000);
        assert_eq!(imports(many.as_bytes()).len(), 200_000);
        let in_def = format!("def f():\n{}", "    import a\n".repeat(200_000));
        assert_eq!(imports(in_def.as_bytes()), vec![]);
    }

    /// xorshift64: deterministic pseudo-random numbers for the property tests below.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    const REALISTIC: &str = "\
\u{feff}\"\"\"Doc with import os.\"\"\"
from __future__ import annotations
import os, sys as system
from . import _core
from .lib import (a as aa,
                  b)
try:
    import json
except ImportError:  # fallback
    json = None
if TYPE_CHECKING:
    from typing import Any
else:
    import typing
def f(x=r'\\\\', *a, **k):
    import inner; return f\"{x!r}\"
class C:
    from ..pkg.mod import *
    if x: import y; z = 1 \\
        + 2
";

    #[test]
    fn never_panics_on_random_bytes() {
        // Bytes drawn mostly from those the tokenizer treats specially.
        const ALPHABET: &[u8] =
            b"imprtfoasdefclTYPE_CHKING \t\n\r\x0c\\'\"#()[]{}:;.,*=@\xef\xbb\xbf\xff\x80";
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for _ in 0..3_000 {
            let len = rng.below(200);
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    if rng.below(4) == 0 {
                        rng.next() as u8
                    } else {
                        ALPHABET[rng.below(ALPHABET.len())]
                    }
                })
                .collect();
            let _ = imports(&bytes);
        }
    }

    #[test]
    fn never_panics_on_mutations_of_realistic_source() {
        let base = REALISTIC.as_bytes();
        let expected = imports(base);
        assert_eq!(
            expected,
            vec![
                imp("os"),
                imp("sys"),
                from(1, "", &["_core"]),
                from(1, "lib", &["a", "b"]),
                imp("json"),
                imp("typing"),
                from(2, "pkg.mod", &[]),
                imp("y"),
            ]
        );
        let mut rng = Rng(0xD1B5_4A32_D192_ED03);
        for _ in 0..3_000 {
            let mut bytes = base.to_vec();
            for _ in 0..=rng.below(8) {
                let at = rng.below(bytes.len() + 1);
                match rng.below(4) {
                    0 if at < bytes.len() => {
                        bytes.remove(at);
                    }
                    1 if at < bytes.len() => bytes[at] = rng.next() as u8,
                    2 => {
                        let from = rng.below(base.len());
                        let len = rng.below(40).min(base.len() - from);
                        let chunk = base[from..from + len].to_vec();
                        bytes.splice(at..at, chunk);
                    }
                    _ => {
                        const SPECIAL: &[u8] = b"'\"\\#():;\n\r\t";
                        bytes.insert(at, SPECIAL[rng.below(SPECIAL.len())]);
                    }
                }
            }
            let _ = imports(&bytes);
        }
    }

    #[test]
    fn line_endings_and_bom_do_not_change_the_result() {
        let base = imports(REALISTIC.as_bytes());
        let crlf = REALISTIC.replace('\n', "\r\n");
        assert_eq!(imports(crlf.as_bytes()), base);
        let cr = REALISTIC.replace('\n', "\r");
        assert_eq!(imports(cr.as_bytes()), base);
        let no_bom = REALISTIC.trim_start_matches('\u{feff}');
        assert_eq!(imports(no_bom.as_bytes()), base);
    }
}
