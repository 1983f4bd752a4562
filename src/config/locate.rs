//! Line and column of configuration paths, so that every diagnostic can point into the file.
//!
//! serde_yaml's values carry no positions, so a second, event-level pass over the text
//! (saphyr-parser) maps each path (`repositories[1].deploy.commands`) to where its key or
//! value starts. A diagnostic whose exact path is absent (a missing field) gets the
//! position of its nearest present parent.

use std::collections::HashMap;

use saphyr_parser::{Event, Parser, Span};

use super::Diagnostic;

pub(super) fn add_locations(text: &str, diagnostics: &mut [Diagnostic]) {
    if diagnostics.iter().all(|d| d.line.is_some()) {
        return;
    }
    let index = index_paths(text);
    for diag in diagnostics.iter_mut().filter(|d| d.line.is_none()) {
        let mut path = diag.path.as_str();
        loop {
            if let Some(&(line, column)) = index.get(path) {
                diag.line = Some(line);
                diag.column = Some(column);
                break;
            }
            match parent(path) {
                Some(p) if !p.is_empty() => path = p,
                _ => break,
            }
        }
    }
}

/// `a.b[2]` → `a.b`, `a.b` → `a`, `a` → ``.
fn parent(path: &str) -> Option<&str> {
    path.rfind(['.', '['])
        .map(|i| &path[..i])
        .or(Some(""))
        .filter(|_| !path.is_empty())
}

enum Frame {
    Map {
        path: String,
        /// The key whose value comes next; `None` while a key is expected.
        key: Option<String>,
    },
    Seq {
        path: String,
        index: usize,
    },
}

/// Path → (1-based line, 1-based column) of the first document in `text`.
fn index_paths(text: &str) -> HashMap<String, (usize, usize)> {
    let mut index = HashMap::new();
    let mut stack: Vec<Frame> = Vec::new();
    for item in Parser::new_from_str(text) {
        let Ok((event, span)) = item else { break };
        match event {
            Event::DocumentEnd => break,
            Event::Scalar(value, ..) => {
                if let Some(Frame::Map {
                    key: key @ None,
                    path,
                }) = stack.last_mut()
                {
                    let full = join_key(path, &value);
                    record(&mut index, full, span);
                    *key = Some(value.into_owned());
                } else if let Some(path) = value_path(&mut stack) {
                    record(&mut index, path, span);
                }
            }
            Event::Alias(_) => {
                if let Some(path) = value_path(&mut stack) {
                    record(&mut index, path, span);
                }
            }
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                let path = value_path(&mut stack).unwrap_or_default();
                record(&mut index, path.clone(), span);
                stack.push(if matches!(event, Event::MappingStart(..)) {
                    Frame::Map { path, key: None }
                } else {
                    Frame::Seq { path, index: 0 }
                });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                stack.pop();
            }
            _ => {}
        }
    }
    index
}

/// The path of the value that starts now, advancing the enclosing container.
/// `None` for a complex (non-scalar) mapping key, which has no path.
fn value_path(stack: &mut [Frame]) -> Option<String> {
    match stack.last_mut() {
        None => Some(String::new()),
        Some(Frame::Map { path, key }) => key.take().map(|k| join_key(path, &k)),
        Some(Frame::Seq { path, index }) => {
            let full = format!("{path}[{index}]");
            *index += 1;
            Some(full)
        }
    }
}

fn join_key(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_owned()
    } else {
        format!("{parent}.{key}")
    }
}

fn record(index: &mut HashMap<String, (usize, usize)>, path: String, span: Span) {
    index
        .entry(path)
        .or_insert((span.start.line(), span.start.col() + 1));
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
groups:
  web:
    max_parallel: 0
repositories:
  - name: a
    deploy:
      commands: []
  - name: b
";

    #[test]
    fn indexes_keys_and_sequence_items() {
        let index = index_paths(TEXT);
        assert_eq!(index["groups.web.max_parallel"], (3, 5));
        assert_eq!(index["repositories[0].deploy.commands"], (7, 7));
        assert_eq!(index["repositories[1]"], (8, 5));
        assert_eq!(index["repositories[1].name"], (8, 5));
    }

    #[test]
    fn missing_paths_fall_back_to_their_parent() {
        let mut diags = vec![Diagnostic::error("repositories[1].monitor", "missing")];
        add_locations(TEXT, &mut diags);
        assert_eq!((diags[0].line, diags[0].column), (Some(8), Some(5)));
    }

    #[test]
    fn parent_of_paths() {
        assert_eq!(parent("a.b[2]"), Some("a.b"));
        assert_eq!(parent("a.b"), Some("a"));
        assert_eq!(parent("a"), Some(""));
        assert_eq!(parent(""), None);
    }
}
