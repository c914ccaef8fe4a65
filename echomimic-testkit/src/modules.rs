//! Module dependencies inside one crate, read from its source, and the check that they form
//! no cycle.
//!
//! Each `.rs` file under `src/` is a module (`lib.rs` is the root, `a/mod.rs` and `a.rs` are
//! `a`); `main.rs` and `src/bin/` are separate crates and left out. An edge `a → b` is any path
//! in `a`'s code (outside comments, strings and `#[cfg(test)]` items) that names module `b` or
//! something inside it: `crate::b::…`, `super::…`, `self::…`, grouped `use crate::{b, c::X}`,
//! and a parent's `use child::…` or `child::item`. Edges to the crate root (which only re-exports) are left out.
//! This is a reading of the text, not of the compiler's resolution, which is enough for code that
//! names its imports plainly, as ours does.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Module path (`["pipeline", "denoise"]`) → the modules it uses.
pub type Graph = BTreeMap<Vec<String>, BTreeSet<Vec<String>>>;

/// The module graph of the crate whose `src/` folder is `src`.
///
/// # Panics
///
/// When a file cannot be read.
pub fn graph(src: &Path) -> Graph {
    let mut files = Vec::new();
    collect(src, &mut files);
    let modules: BTreeMap<Vec<String>, PathBuf> = files
        .into_iter()
        .filter_map(|f| module_path(src, &f).map(|m| (m, f)))
        .collect();
    let known: BTreeSet<Vec<String>> = modules.keys().cloned().collect();
    modules
        .iter()
        .map(|(m, file)| {
            let text = std::fs::read_to_string(file)
                .unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
            let uses = uses_of(m, &text, &known);
            (m.clone(), uses)
        })
        .collect()
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            if p.file_name().is_some_and(|n| n != "bin") {
                collect(&p, out);
            }
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// `src/a/b.rs` → `["a", "b"]`; `src/a/mod.rs` → `["a"]`; `src/lib.rs` → `[]`; `main.rs` → none.
fn module_path(src: &Path, file: &Path) -> Option<Vec<String>> {
    let rel = file.strip_prefix(src).ok()?.with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    match parts.last().map(String::as_str) {
        Some("main") if parts.len() == 1 => return None,
        Some("lib") if parts.len() == 1 => parts.clear(),
        Some("mod") => {
            parts.pop();
        }
        _ => {}
    }
    Some(parts)
}

/// The modules `module`'s source `text` uses (itself and the root left out).
pub fn uses_of(
    module: &[String],
    text: &str,
    known: &BTreeSet<Vec<String>>,
) -> BTreeSet<Vec<String>> {
    let code = without_tests(&code_only(text));
    let b = code.as_bytes();
    let mut paths = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if !is_ident(b[i]) || (i > 0 && (is_ident(b[i - 1]) || b[i - 1] == b':')) {
            i += 1;
            continue;
        }
        let word = ident_at(b, i);
        let after = i + word.len();
        let base: Option<Vec<String>> = match word {
            "crate" => Some(Vec::new()),
            "super" => Some(module[..module.len().saturating_sub(1)].to_vec()),
            "self" => Some(module.to_vec()),
            _ => None,
        };
        match base {
            Some(base) if code[after..].starts_with("::") => {
                tree(b, after + 2, base, &mut paths);
            }
            _ if word == "use" => {
                // `use child::…` relative to this module (2018 paths).
                let j = skip_ws(b, after);
                if j < b.len() && (is_ident(b[j]) || b[j] == b'{') {
                    let first = ident_at(b, j);
                    if !matches!(first, "crate" | "super" | "self") {
                        tree(b, j, module.to_vec(), &mut paths);
                    }
                }
            }
            _ if code[after..].starts_with("::") => {
                // `child::item` relative to this module.
                let mut child = module.to_vec();
                child.push(word.to_owned());
                if known.contains(&child) {
                    tree(b, i, module.to_vec(), &mut paths);
                }
            }
            _ => {}
        }
        i = after;
    }
    paths
        .into_iter()
        .filter_map(|p| {
            (1..=p.len())
                .rev()
                .map(|k| p[..k].to_vec())
                .find(|m| known.contains(m))
        })
        .filter(|m| !m.is_empty() && m.as_slice() != module)
        .collect()
}

/// Reads a use tree or a path at `i` (`a::b::C`, `{a, b::{c, d}}`), appending each full path
/// to `out`, prefixed with `base`.
fn tree(b: &[u8], i: usize, base: Vec<String>, out: &mut Vec<Vec<String>>) -> usize {
    let mut path = base;
    let mut i = skip_ws(b, i);
    loop {
        if i < b.len() && b[i] == b'{' {
            i += 1;
            loop {
                i = skip_ws(b, i);
                if i >= b.len() || b[i] == b'}' {
                    out.push(path);
                    return i + 1;
                }
                if b[i] == b',' {
                    i += 1;
                    continue;
                }
                let before = i;
                i = tree(b, i, path.clone(), out);
                if i == before {
                    i += 1;
                }
            }
        }
        let word = ident_at(b, i);
        if word.is_empty() {
            out.push(path);
            return i;
        }
        if word != "self" {
            path.push(word.to_owned());
        }
        i += word.len();
        let j = skip_ws(b, i);
        if b[j..].starts_with(b"::") {
            i = skip_ws(b, j + 2);
        } else {
            out.push(path);
            return i;
        }
    }
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

fn ident_at(b: &[u8], i: usize) -> &str {
    let end = (i..b.len()).find(|&k| !is_ident(b[k])).unwrap_or(b.len());
    std::str::from_utf8(&b[i..end]).unwrap_or("")
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && b[i].is_ascii_whitespace() {
        i += 1;
    }
    i
}

/// The text with comments, string and char literals blanked out (byte positions kept).
fn code_only(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = b.to_vec();
    let blank = |from: usize, to: usize, out: &mut Vec<u8>| {
        for c in &mut out[from..to.min(b.len())] {
            if *c != b'\n' {
                *c = b' ';
            }
        }
    };
    let mut i = 0;
    while i < b.len() {
        let prev_ident = i > 0 && is_ident(b[i - 1]);
        if b[i..].starts_with(b"//") {
            let end = (i..b.len()).find(|&k| b[k] == b'\n').unwrap_or(b.len());
            blank(i, end, &mut out);
            i = end;
        } else if b[i..].starts_with(b"/*") {
            let mut depth = 0;
            let mut k = i;
            while k < b.len() {
                if b[k..].starts_with(b"/*") {
                    depth += 1;
                    k += 2;
                } else if b[k..].starts_with(b"*/") {
                    depth -= 1;
                    k += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    k += 1;
                }
            }
            blank(i, k, &mut out);
            i = k;
        } else if !prev_ident && (b[i] == b'r' || b[i..].starts_with(b"br")) {
            let start = if b[i] == b'b' { i + 2 } else { i + 1 };
            let hashes = (start..b.len()).take_while(|&k| b[k] == b'#').count();
            if b.get(start + hashes) == Some(&b'"') {
                let close: Vec<u8> = std::iter::once(b'"')
                    .chain(std::iter::repeat_n(b'#', hashes))
                    .collect();
                let body = start + hashes + 1;
                let end = (body..b.len())
                    .find(|&k| b[k..].starts_with(&close))
                    .map_or(b.len(), |k| k + close.len());
                blank(i, end, &mut out);
                i = end;
            } else {
                i += 1;
            }
        } else if b[i] == b'"' {
            let mut k = i + 1;
            while k < b.len() && b[k] != b'"' {
                k += if b[k] == b'\\' { 2 } else { 1 };
            }
            blank(i, k + 1, &mut out);
            i = k + 1;
        } else if b[i] == b'\'' {
            // A char literal ('x', '\n', '\u{..}'), or a lifetime (left alone).
            let end = if b.get(i + 1) == Some(&b'\\') {
                (i + 2..b.len()).find(|&k| b[k] == b'\'').map(|k| k + 1)
            } else {
                let ch_len = text[i + 1..].chars().next().map_or(1, char::len_utf8);
                (b.get(i + 1 + ch_len) == Some(&b'\'')).then_some(i + 2 + ch_len)
            };
            match end {
                Some(end) => {
                    blank(i, end, &mut out);
                    i = end;
                }
                None => i += 1,
            }
        } else {
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The code without its `#[cfg(test)]` items.
fn without_tests(code: &str) -> String {
    let mut out = code.to_owned();
    let mut from = 0;
    while let Some(at) = out[from..].find("#[cfg(test)]").map(|k| k + from) {
        let b = out.as_bytes();
        // The item ends at `;` or at the brace that closes its first `{`.
        let mut depth = 0usize;
        let mut end = b.len();
        for (k, &c) in b.iter().enumerate().skip(at + "#[cfg(test)]".len()) {
            match c {
                b'{' => depth += 1,
                b'}' => {
                    depth = depth.saturating_sub(1);
                    if depth == 0 {
                        end = k + 1;
                        break;
                    }
                }
                b';' if depth == 0 => {
                    end = k + 1;
                    break;
                }
                _ => {}
            }
        }
        out.replace_range(at..end, &" ".repeat(end - at));
        from = end;
    }
    out
}

/// The cycles of `graph` (its strongly connected components with more than one module), each
/// sorted, as `a -> b -> a` paths through the component.
pub fn cycles(graph: &Graph) -> Vec<String> {
    let mut found = Vec::new();
    let mut seen = BTreeSet::new();
    for start in graph.keys() {
        if seen.contains(start) {
            continue;
        }
        let reach = reachable(graph, start);
        let component: BTreeSet<_> = reach
            .iter()
            .filter(|m| reachable(graph, m).contains(start))
            .cloned()
            .collect();
        seen.extend(component.iter().cloned());
        if component.len() > 1 {
            found.push(describe_cycle(graph, start, &component));
        }
    }
    found
}

fn reachable(graph: &Graph, from: &[String]) -> BTreeSet<Vec<String>> {
    let mut seen = BTreeSet::new();
    let mut todo = vec![from.to_vec()];
    while let Some(m) = todo.pop() {
        for n in graph.get(&m).into_iter().flatten() {
            if seen.insert(n.clone()) {
                todo.push(n.clone());
            }
        }
    }
    seen
}

/// One concrete cycle through `start` inside `component`, for the failure message.
fn describe_cycle(graph: &Graph, start: &Vec<String>, component: &BTreeSet<Vec<String>>) -> String {
    // Breadth-first from `start` back to `start`, staying in the component.
    let mut prev: BTreeMap<Vec<String>, Vec<String>> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([start.to_vec()]);
    let mut last = None;
    'search: while let Some(m) = queue.pop_front() {
        for n in graph.get(&m).into_iter().flatten() {
            if !component.contains(n) {
                continue;
            }
            if n == start {
                last = Some(m.clone());
                break 'search;
            }
            if !prev.contains_key(n) {
                prev.insert(n.clone(), m.clone());
                queue.push_back(n.clone());
            }
        }
    }
    let mut path = vec![start.to_vec()];
    let mut at = last;
    while let Some(m) = at {
        if m.as_slice() == start {
            break;
        }
        path.push(m.clone());
        at = prev.get(&m).cloned();
    }
    path.push(start.to_vec());
    let n = path.len();
    path[1..n - 1].reverse();
    let mut s = String::new();
    for (k, m) in path.iter().enumerate() {
        let _ = write!(s, "{}{}", if k > 0 { " -> " } else { "" }, m.join("::"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known(names: &[&str]) -> BTreeSet<Vec<String>> {
        names
            .iter()
            .map(|n| {
                n.split("::")
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect()
            })
            .collect()
    }

    fn m(n: &str) -> Vec<String> {
        n.split("::").map(String::from).collect()
    }

    #[test]
    fn reads_every_form_of_use_and_ignores_comments_strings_and_tests() {
        let k = known(&["", "a", "b", "c", "d", "e", "p", "p::kid", "f", "g"]);
        let text = r##"
            use crate::a::X;
            use crate::{b, c::{Y, Z}};
            pub(crate) fn f() { crate::d::go(); }
            // crate::e::not_this
            const S: &str = "crate::e::nor_this";
            const R: &str = r#"crate::e::nor_raw"#;
            fn l<'a>(x: &'a str) -> char { '"' }
            #[cfg(test)]
            mod tests { use crate::g::T; }
        "##;
        let uses = uses_of(&m("p"), text, &k);
        assert_eq!(uses, known(&["a", "b", "c", "d"]));
        let uses = uses_of(&m("p::kid"), "use super::Thing; use self::x;", &k);
        assert_eq!(uses, known(&["p"]));
        let uses = uses_of(&m("p"), "mod kid;\npub use kid::{A, B};", &k);
        assert_eq!(uses, known(&["p::kid"]));
        let uses = uses_of(&m("p"), "fn f() { kid::make(); }", &k);
        assert_eq!(uses, known(&["p::kid"]));
    }

    #[test]
    fn finds_a_cycle_and_passes_a_tree() {
        let mut g = Graph::new();
        g.insert(m("a"), known(&["b"]));
        g.insert(m("b"), known(&["c"]));
        g.insert(m("c"), known(&[]));
        assert!(cycles(&g).is_empty());
        g.insert(m("c"), known(&["a"]));
        assert_eq!(cycles(&g), vec!["a -> b -> c -> a".to_string()]);
    }
}
