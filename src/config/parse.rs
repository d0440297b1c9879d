//! Reading a pipeline file so that every mistake in it names its place.
//!
//! The text is parsed once into toml's spanned tree, `${VAR}` is expanded in
//! place in its strings (each string keeps its span), and the typed config is
//! deserialised straight from that tree through `serde_path_to_error`. An
//! error therefore carries the line and column (from the span), the key path
//! (`[load].batch_size`, from the path) and, for an unknown key or value, the
//! closest known one. Nothing is read twice, and no value ever appears in an
//! error unless serde quotes the offending one.

use std::ops::Range;

use serde::de::DeserializeOwned;
use serde_path_to_error::Segment;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

use crate::error::Error;

/// A configuration mistake and where it is.
#[derive(Debug)]
pub(crate) struct Mistake {
    /// Key path segments: table names and keys (`["load", "batch_size"]`).
    pub path: Vec<PathPart>,
    /// Byte range in the text, when known.
    pub span: Option<Range<usize>>,
    pub message: String,
}

/// One step of a key path.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum PathPart {
    Key(String),
    Index(usize),
}

impl Mistake {
    pub(crate) fn new(path: &[&str], message: impl Into<String>) -> Mistake {
        Mistake {
            path: path.iter().map(|k| PathPart::Key(k.to_string())).collect(),
            span: None,
            message: message.into(),
        }
    }

    /// The error without a place in a file (the config was not read from one).
    pub(crate) fn into_plain(self) -> Error {
        let path = show_path(&self.path, is_section(&self.path));
        Error::config(format!("{path}: {}", self.message))
    }

    /// The configuration error, located in `text` (the file named `origin`).
    pub(crate) fn into_error(mut self, text: &str, origin: Option<&str>, root: &DeTable) -> Error {
        // An unknown key is shown at the key, under the table holding it.
        if let Some(PathPart::Key(last)) = self.path.last() {
            if self.message.starts_with(&format!("unknown key `{last}`")) {
                if self.span.is_none() {
                    self.span = find(root, &self.path).and_then(|n| n.key_span);
                }
                self.path.pop();
            }
        }
        let node = find(root, &self.path);
        let span = self.span.or_else(|| node.as_ref().map(|n| n.span.clone()));
        let place = match span {
            Some(span) => {
                let (line, column) = line_column(text, span.start);
                match origin {
                    Some(file) => format!("{file}:{line}:{column}"),
                    None => format!("line {line}, column {column}"),
                }
            }
            None => origin.unwrap_or("pipeline").to_string(),
        };
        let is_table = node.map_or_else(|| is_section(&self.path), |n| n.is_table);
        let path = show_path(&self.path, is_table);
        if path.is_empty() {
            Error::config(format!("{place}: {}", self.message))
        } else {
            Error::config(format!("{place}: {path}: {}", self.message))
        }
    }
}

/// Whether the path is one of the file's top tables, present or not.
fn is_section(path: &[PathPart]) -> bool {
    matches!(path, [PathPart::Key(k)] if ["source", "destination", "load", "trigger"].contains(&k.as_str()))
}

/// Serde names Rust types; a pipeline file's reader knows TOML's.
fn toml_words(message: &str) -> String {
    let mut out = message.to_string();
    for (rust, toml) in [
        ("expected usize", "expected an integer"),
        ("expected u64", "expected an integer"),
        ("expected u32", "expected an integer"),
        ("expected i64", "expected an integer"),
        ("expected f64", "expected a number"),
        ("expected a boolean", "expected true or false"),
    ] {
        if let Some(head) = out.strip_suffix(rust) {
            out = format!("{head}{toml}");
        }
    }
    out
}

/// Parses TOML text into the spanned tree, `${VAR}` expanded.
pub(crate) fn tree(text: &str) -> Result<Spanned<DeTable<'_>>, Mistake> {
    let mut root = DeTable::parse(text).map_err(|e| Mistake {
        path: Vec::new(),
        span: e.span(),
        message: format!("invalid TOML: {}", lowercase_first(e.message().trim())),
    })?;
    let mut path = Vec::new();
    expand_table(root.get_mut(), &mut path)?;
    Ok(root)
}

/// Deserialises `T` from the tree, locating what does not fit.
pub(crate) fn typed<T: DeserializeOwned>(root: &Spanned<DeTable<'_>>) -> Result<T, Mistake> {
    let de = toml::de::Deserializer::from(root.clone());
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e
            .path()
            .iter()
            .filter_map(|s| match s {
                Segment::Map { key } => Some(PathPart::Key(key.clone())),
                Segment::Seq { index } => Some(PathPart::Index(*index)),
                Segment::Enum { .. } | Segment::Unknown => None,
            })
            .collect();
        let inner = e.into_inner();
        mistake(path, inner.message(), inner.span(), root.get_ref())
    })
}

/// Deserialises the value at `path` (a table) as `T`, without the keys in
/// `skip`: locates mistakes inside a table that serde reads as a whole
/// first (an internally tagged enum such as `[source]`), where neither the
/// path nor the span reach inside.
pub(crate) fn typed_at<T: DeserializeOwned>(
    root: &Spanned<DeTable<'_>>,
    path: &[&str],
    skip: &[&str],
) -> Option<Mistake> {
    let mut node = root.clone();
    for key in path {
        let child = node.get_ref().iter().find(|(k, _)| k.get_ref() == key)?.1;
        let span = child.span();
        match child.get_ref() {
            DeValue::Table(t) => node = Spanned::new(span, t.clone()),
            _ => return None,
        }
    }
    let span = node.span();
    let mut table = DeTable::new();
    for (k, v) in node.into_inner() {
        if !skip.contains(&k.get_ref().as_ref()) {
            table.insert(k, v);
        }
    }
    let sub = Spanned::new(span, table);
    let mut mistake = typed::<T>(&sub).err()?;
    let mut full: Vec<PathPart> = path.iter().map(|k| PathPart::Key(k.to_string())).collect();
    full.append(&mut mistake.path);
    mistake.path = full;
    Some(mistake)
}

/// Turns serde's message into ours: an unknown key or value gets the
/// closest known one.
fn mistake(
    mut path: Vec<PathPart>,
    message: &str,
    span: Option<Range<usize>>,
    root: &DeTable,
) -> Mistake {
    let mut span = span;
    // Set when the span is the offending key's own.
    let mut at_key = false;
    let message = if let Some((unknown, known)) = parse_unknown(message, "unknown field `") {
        // Point at the key itself rather than its value or table.
        if path.last() != Some(&PathPart::Key(unknown.clone())) {
            path.push(PathPart::Key(unknown.clone()));
        }
        if let Some(node) = find(root, &path) {
            span = Some(node.key_span.unwrap_or(node.span));
            at_key = true;
        }
        path.pop();
        let mut text = format!("unknown key `{unknown}`");
        text.push_str(&suggest(&unknown, &known, "key"));
        text
    } else if let Some((unknown, known)) = parse_unknown(message, "unknown variant `") {
        let mut text = format!("unknown value {unknown:?}");
        text.push_str(&suggest(&unknown, &known, "value"));
        text
    } else if let Some(field) = message
        .strip_prefix("missing field `")
        .and_then(|r| r.strip_suffix('`'))
    {
        format!("missing key `{field}`")
    } else {
        toml_words(message)
    };
    // A span toml gives is exact when it lies inside the node the path names;
    // otherwise (a table serde read as a whole) the path's own node is closer.
    if let Some(node) = find(root, &path).filter(|_| !at_key) {
        let inside = span
            .as_ref()
            .is_some_and(|s| s.start >= node.span.start && s.end <= node.span.end);
        if !inside {
            span = Some(node.span);
        }
    }
    Mistake {
        path,
        span,
        message,
    }
}

/// `unknown field `x`, expected one of `a`, `b`` -> ("x", ["a", "b"]).
pub(crate) fn parse_unknown(message: &str, prefix: &str) -> Option<(String, Vec<String>)> {
    let rest = message.strip_prefix(prefix)?;
    let end = rest.find('`')?;
    let unknown = rest[..end].to_string();
    let known = rest[end + 1..]
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect();
    Some((unknown, known))
}

/// "; did you mean `cursor`?" or the list of known names.
fn suggest(unknown: &str, known: &[String], what: &str) -> String {
    let best = known
        .iter()
        .map(|k| (strsim::jaro_winkler(unknown, k), k))
        .max_by(|a, b| a.0.total_cmp(&b.0));
    match best {
        Some((score, name)) if score >= 0.8 => format!("; did you mean `{name}`?"),
        _ if known.is_empty() => String::new(),
        _ => format!(
            "; known {what}s: {}",
            known
                .iter()
                .map(|k| format!("`{k}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// What the path leads to in the tree.
struct Node {
    span: Range<usize>,
    key_span: Option<Range<usize>>,
    is_table: bool,
}

/// Follows a key path through the tree as far as it goes; `None` when not
/// even its first step exists.
fn find(root: &DeTable, path: &[PathPart]) -> Option<Node> {
    let mut found: Option<Node> = None;
    let mut value: Option<&DeValue> = None;
    for part in path {
        let next = match (part, value) {
            (PathPart::Key(k), None) => root
                .iter()
                .find(|(key, _)| key.get_ref() == k)
                .map(|(key, v)| (Some(key.span()), v)),
            (PathPart::Key(k), Some(DeValue::Table(t))) => t
                .iter()
                .find(|(key, _)| key.get_ref() == k)
                .map(|(key, v)| (Some(key.span()), v)),
            (PathPart::Index(i), Some(DeValue::Array(a))) => a.get(*i).map(|v| (None, v)),
            _ => None,
        };
        let Some((key_span, v)) = next else { break };
        found = Some(Node {
            span: v.span(),
            key_span,
            is_table: matches!(v.get_ref(), DeValue::Table(_)),
        });
        value = Some(v.get_ref());
    }
    found
}

/// `[source.pagination].size`, `[load]`, `name`, `[source].headers.X`.
fn show_path(path: &[PathPart], is_table: bool) -> String {
    let mut tables = Vec::new();
    let mut rest = String::new();
    let mut in_tables = true;
    for (i, part) in path.iter().enumerate() {
        let table = match path.get(i + 1) {
            Some(PathPart::Key(_)) => true,
            Some(PathPart::Index(_)) => false,
            None => is_table,
        };
        match part {
            PathPart::Key(k) if in_tables && table => tables.push(k.as_str()),
            PathPart::Key(k) => {
                in_tables = false;
                if !rest.is_empty() {
                    rest.push('.');
                }
                rest.push_str(k);
            }
            PathPart::Index(n) => {
                in_tables = false;
                rest.push_str(&format!("[{n}]"));
            }
        }
    }
    match (tables.is_empty(), rest.is_empty()) {
        (true, _) => rest,
        (false, true) => format!("[{}]", tables.join(".")),
        (false, false) => format!("[{}].{rest}", tables.join(".")),
    }
}

fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

fn lowercase_first(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(c) => c.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

fn expand_table(table: &mut DeTable, path: &mut Vec<PathPart>) -> Result<(), Mistake> {
    for (key, value) in table.iter_mut() {
        path.push(PathPart::Key(key.get_ref().to_string()));
        expand_value(value, path)?;
        path.pop();
    }
    Ok(())
}

fn expand_value(value: &mut Spanned<DeValue>, path: &mut Vec<PathPart>) -> Result<(), Mistake> {
    let span = value.span();
    match value.get_mut() {
        DeValue::String(s) if s.contains("${") => {
            let expanded = super::expand_str(s).map_err(|e| Mistake {
                path: path.clone(),
                span: Some(span),
                message: e.to_string(),
            })?;
            *s = expanded.into();
        }
        DeValue::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                path.push(PathPart::Index(i));
                expand_value(item, path)?;
                path.pop();
            }
        }
        DeValue::Table(t) => expand_table(t, path)?,
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_read_as_tables_and_keys() {
        let k = |s: &str| PathPart::Key(s.into());
        assert_eq!(
            show_path(&[k("load"), k("batch_size")], false),
            "[load].batch_size"
        );
        assert_eq!(show_path(&[k("load")], true), "[load]");
        assert_eq!(show_path(&[k("name")], false), "name");
        assert_eq!(
            show_path(&[k("source"), k("headers"), k("X")], false),
            "[source.headers].X"
        );
        assert_eq!(
            show_path(&[k("load"), k("key"), PathPart::Index(1)], false),
            "[load].key[1]"
        );
    }

    #[test]
    fn lines_and_columns_count_from_one() {
        assert_eq!(line_column("a = 1\nb = 2\n", 6), (2, 1));
        assert_eq!(line_column("a = 1\nb = 2\n", 10), (2, 5));
        assert_eq!(line_column("é = 1", 5), (1, 5));
    }

    #[test]
    fn unknown_names_suggest_the_closest() {
        let known: Vec<String> = ["key", "cursor", "mode"].map(String::from).into();
        assert_eq!(suggest("curser", &known, "key"), "; did you mean `cursor`?");
        assert!(suggest("zzz", &known, "key").contains("known keys: `key`"));
    }
}
