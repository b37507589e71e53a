//! A configuration problem and where it is in the file.
//!
//! Validation names each field by its path (`policy[0].windows[1].per`); here
//! that path is walked through the file's syntax tree, which toml_edit parses
//! with byte spans, to the deepest part of it the file contains. So a field
//! the file leaves unset points at the table that would hold it, and a problem
//! about the file as a whole (no upstream at all) has no line. A parse error
//! comes with a span instead: the reverse walk names the field at that span.
//! This module reads the text again only when something is wrong.

use std::ops::Range;

use toml_edit::{ImDocument, Item, Table, TableLike, Value};

/// One thing wrong with a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The field as a path into the file: `listen`, `upstream[1].url`,
    /// `policy[0].windows[1].per`. Indexes count the file's own entries.
    pub path: String,
    /// The name of the entry the path starts in (a policy's or upstream's), for people.
    pub name: Option<String>,
    pub message: String,
    /// 1-based line in the file, when the file is at hand and holds the field.
    pub line: Option<usize>,
}

impl Problem {
    /// The field for people: `policy[0] (hunting).windows[1].per`.
    pub fn field(&self) -> String {
        match (&self.name, self.path.split_once('.')) {
            (Some(name), Some((head, rest))) => format!("{head} ({name}).{rest}"),
            (Some(name), None) => format!("{} ({name})", self.path),
            (None, _) => self.path.clone(),
        }
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field(), self.message)
    }
}

/// Fill in each problem's line from the TOML text it was found in.
pub fn locate(text: &str, problems: &mut [Problem]) {
    let Ok(doc) = ImDocument::parse(text) else { return };
    for problem in problems {
        problem.line = span_of(doc.as_item(), &problem.path).map(|span| line_at(text, span.start));
    }
}

/// The 1-based line holding byte `offset`.
pub fn line_at(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end].iter().filter(|&&b| b == b'\n').count() + 1
}

/// The path of the innermost field whose key or value covers byte `offset`.
pub fn path_at(text: &str, offset: usize) -> Option<String> {
    let doc = ImDocument::parse(text).ok()?;
    let mut path = String::new();
    let found = find(Node::Item(doc.as_item()), offset, &mut path);
    (found && !path.is_empty()).then_some(path)
}

/// A place in the syntax tree: tables of an array of tables and array
/// elements are not `Item`s.
#[derive(Clone, Copy)]
enum Node<'a> {
    Item(&'a Item),
    Table(&'a Table),
    Value(&'a Value),
}

impl<'a> Node<'a> {
    fn table(self) -> Option<&'a dyn TableLike> {
        match self {
            Node::Item(i) => i.as_table_like(),
            Node::Table(t) => Some(t),
            Node::Value(v) => v.as_inline_table().map(|t| t as &dyn TableLike),
        }
    }

    /// The `i`th element, and its span.
    fn element(self, i: usize) -> Option<(Node<'a>, Option<Range<usize>>)> {
        match self {
            Node::Item(Item::ArrayOfTables(a)) => a.get(i).map(|t| (Node::Table(t), t.span())),
            Node::Item(Item::Value(Value::Array(a))) | Node::Value(Value::Array(a)) => {
                a.get(i).map(|v| (Node::Value(v), v.span()))
            }
            _ => None,
        }
    }

    fn len(self) -> usize {
        match self {
            Node::Item(Item::ArrayOfTables(a)) => a.len(),
            Node::Item(Item::Value(Value::Array(a))) | Node::Value(Value::Array(a)) => a.len(),
            _ => 0,
        }
    }

    fn span(self) -> Option<Range<usize>> {
        match self {
            Node::Item(i) => i.span(),
            Node::Table(t) => t.span(),
            Node::Value(v) => v.span(),
        }
    }
}

/// The span of the deepest part of `path` present in the document.
fn span_of(root: &Item, path: &str) -> Option<Range<usize>> {
    let mut node = Node::Item(root);
    let mut best = None;
    for segment in path.split('.') {
        let (key, index) = match segment.split_once('[') {
            Some((key, rest)) => (key, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (segment, None),
        };
        let Some((k, child)) = node.table().and_then(|t| t.get_key_value(key)) else { break };
        best = k.span().or(best);
        node = Node::Item(child);
        if let Some(i) = index {
            let Some((element, span)) = node.element(i) else { break };
            best = span.or(best);
            node = element;
        }
    }
    best
}

/// Depth-first search for `offset`, appending the path walked to `path`.
/// Values (inline arrays and tables too) and the tables of an array of tables
/// are contiguous in the text and match by their span; a key's whole table or
/// array of tables may be split up by others, so it matches by its key only.
fn find(node: Node<'_>, offset: usize, path: &mut String) -> bool {
    let covers = |span: Option<Range<usize>>| span.is_some_and(|s| s.contains(&offset));
    let mut children: Vec<(String, Node<'_>, Option<Range<usize>>)> = Vec::new();
    if let Some(table) = node.table() {
        for (key, child) in table.iter() {
            let key_span = table.get_key_value(key).and_then(|(k, _)| k.span());
            children.push((key.to_string(), Node::Item(child), key_span));
        }
    } else {
        for i in 0..node.len() {
            if let Some((element, span)) = node.element(i) {
                children.push((format!("[{i}]"), element, span));
            }
        }
    }
    let before = path.len();
    let enter = |path: &mut String, segment: &str| {
        path.truncate(before);
        if !path.is_empty() && !segment.starts_with('[') {
            path.push('.');
        }
        path.push_str(segment);
    };
    for (segment, child, _) in &children {
        enter(path, segment);
        if find(*child, offset, path) {
            return true;
        }
    }
    for (segment, child, span) in &children {
        let is_value = matches!(child, Node::Value(_) | Node::Item(Item::Value(_)));
        if covers(span.clone()) || is_value && covers(child.span()) {
            enter(path, segment);
            return true;
        }
    }
    path.truncate(before);
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"listen = "127.0.0.1:1"
admin_listen = "127.0.0.1:2"

[[upstream]]
name = "d"
url = "https://x"
kind = "defender"

[[policy]]
name = "a"
paths = ["/a"]
windows = [{ limit = 1, per = "1m" }]

[[policy]]
name = "b"
paths = ["/b"]
windows = [
  { limit = 1, per = "1m" },
  { limit = 2, per = "1h" },
]
"#;

    fn line(path: &str) -> Option<usize> {
        let doc = ImDocument::parse(TEXT).unwrap();
        span_of(doc.as_item(), path).map(|s| line_at(TEXT, s.start))
    }

    #[test]
    fn a_field_path_maps_to_its_line() {
        assert_eq!(line("admin_listen"), Some(2));
        assert_eq!(line("upstream[0].url"), Some(6));
        assert_eq!(line("policy[1].windows[1].per"), Some(19));
        assert_eq!(line("policy[0].windows[0].limit"), Some(12));
    }

    #[test]
    fn an_unset_field_points_at_the_table_that_would_hold_it() {
        assert_eq!(line("policy[1].max_wait"), Some(14));
        assert_eq!(line("policy_defaults.mode"), None);
        assert_eq!(line("upstream"), Some(4));
    }

    #[test]
    fn an_offset_maps_back_to_its_field() {
        let at = |needle: &str| path_at(TEXT, TEXT.find(needle).unwrap());
        assert_eq!(at("\"1h\"").as_deref(), Some("policy[1].windows[1].per"));
        assert_eq!(at("kind").as_deref(), Some("upstream[0].kind"));
        assert_eq!(at("\"127.0.0.1:2\"").as_deref(), Some("admin_listen"));
    }
}
