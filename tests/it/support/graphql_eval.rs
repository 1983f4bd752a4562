//! A small GraphQL evaluator for fake GitHubs: it parses a query (operation, variable
//! definitions, fields with aliases and arguments, nested selections), resolves variables,
//! and answers the subset of GitHub's schema Sentry asks for —
//! `repository(owner, name) { ref(qualifiedName) { target { oid } } refs(refPrefix, first,
//! after) { nodes { name target { oid } } pageInfo { hasNextPage endCursor } } }` — with
//! GitHub's conventions: a missing repository is `null` plus an `errors[]` entry whose `path`
//! names the alias and whose `type` is `NOT_FOUND` (or `FORBIDDEN`); a missing ref is `null`.
//!
//! It computes the query's cost and node count by GitHub's documented rules from the parsed
//! query (every field with `first:`/`last:` is a connection; requests = product of the
//! enclosing connections' sizes; cost = requests / 100 rounded, at least 1), independently of
//! what the client believes. Shared by the integration tests and the benchmark
//! (`#[path]`-included there).

#![allow(dead_code)]

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

/// How a repository looks to the token asking.
pub enum Access<'a> {
    Found(&'a BTreeMap<String, String>),
    NotFound,
    Forbidden,
}

/// The answer to one query.
pub struct Evaluated {
    pub body: Value,
    /// GitHub's primary cost of the query.
    pub cost: u64,
    /// The most nodes the query could return.
    pub nodes: u64,
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Name(String),
    Str(String),
    Int(i64),
    Punct(char),
}

fn tokenize(text: &str) -> Result<Vec<Token>, String> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() || c == ',' {
            i += 1;
        } else if c == '#' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            out.push(Token::Name(chars[start..i].iter().collect()));
        } else if c.is_ascii_digit() || c == '-' {
            let start = i;
            i += 1;
            while i < chars.len() && chars[i].is_ascii_digit() {
                i += 1;
            }
            let text: String = chars[start..i].iter().collect();
            out.push(Token::Int(
                text.parse().map_err(|_| format!("bad number {text}"))?,
            ));
        } else if c == '"' {
            let mut s = String::new();
            i += 1;
            loop {
                match chars.get(i) {
                    None => return Err("unterminated string".into()),
                    Some('"') => break,
                    Some('\\') => {
                        i += 1;
                        match chars.get(i) {
                            Some('n') => s.push('\n'),
                            Some('t') => s.push('\t'),
                            Some(other) => s.push(*other),
                            None => return Err("unterminated escape".into()),
                        }
                    }
                    Some(other) => s.push(*other),
                }
                i += 1;
            }
            i += 1;
            out.push(Token::Str(s));
        } else if "{}():$!=[]".contains(c) {
            out.push(Token::Punct(c));
            i += 1;
        } else {
            return Err(format!("unexpected character {c:?}"));
        }
    }
    Ok(out)
}

#[derive(Debug, Clone)]
enum Arg {
    Var(String),
    Literal(Value),
}

#[derive(Debug, Clone)]
struct Field {
    alias: Option<String>,
    name: String,
    args: Vec<(String, Arg)>,
    selection: Vec<Field>,
}

impl Field {
    fn key(&self) -> &str {
        self.alias.as_deref().unwrap_or(&self.name)
    }
}

struct Parser {
    tokens: Vec<Token>,
    at: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at)
    }
    fn next(&mut self) -> Result<Token, String> {
        let t = self.tokens.get(self.at).cloned().ok_or("unexpected end")?;
        self.at += 1;
        Ok(t)
    }
    fn expect(&mut self, c: char) -> Result<(), String> {
        match self.next()? {
            Token::Punct(p) if p == c => Ok(()),
            other => Err(format!("expected {c:?}, found {other:?}")),
        }
    }
    fn name(&mut self) -> Result<String, String> {
        match self.next()? {
            Token::Name(n) => Ok(n),
            other => Err(format!("expected a name, found {other:?}")),
        }
    }
    fn is(&self, c: char) -> bool {
        self.peek() == Some(&Token::Punct(c))
    }

    /// `query Name(vars) { … }` or `{ … }`; returns the declared variables and the root.
    fn document(&mut self) -> Result<(Vec<String>, Vec<Field>), String> {
        let mut declared = Vec::new();
        if let Some(Token::Name(n)) = self.peek() {
            if n != "query" {
                return Err(format!("only queries are supported, not {n}"));
            }
            self.at += 1;
            if let Some(Token::Name(_)) = self.peek() {
                self.at += 1;
            }
            if self.is('(') {
                self.at += 1;
                while !self.is(')') {
                    self.expect('$')?;
                    declared.push(self.name()?);
                    self.expect(':')?;
                    self.name()?;
                    if self.is('!') {
                        self.at += 1;
                    }
                }
                self.at += 1;
            }
        }
        let root = self.selection()?;
        if self.peek().is_some() {
            return Err("text after the query".into());
        }
        Ok((declared, root))
    }

    fn selection(&mut self) -> Result<Vec<Field>, String> {
        self.expect('{')?;
        let mut fields = Vec::new();
        while !self.is('}') {
            let first = self.name()?;
            let (alias, name) = if self.is(':') {
                self.at += 1;
                (Some(first), self.name()?)
            } else {
                (None, first)
            };
            let mut args = Vec::new();
            if self.is('(') {
                self.at += 1;
                while !self.is(')') {
                    let key = self.name()?;
                    self.expect(':')?;
                    let value = match self.next()? {
                        Token::Punct('$') => Arg::Var(self.name()?),
                        Token::Str(s) => Arg::Literal(json!(s)),
                        Token::Int(n) => Arg::Literal(json!(n)),
                        Token::Name(n) if n == "null" => Arg::Literal(Value::Null),
                        Token::Name(n) if n == "true" || n == "false" => {
                            Arg::Literal(json!(n == "true"))
                        }
                        other => return Err(format!("unsupported argument value {other:?}")),
                    };
                    args.push((key, value));
                }
                self.at += 1;
            }
            let selection = if self.is('{') {
                self.selection()?
            } else {
                Vec::new()
            };
            fields.push(Field {
                alias,
                name,
                args,
                selection,
            });
        }
        self.at += 1;
        Ok(fields)
    }
}

/// Connection requests and nodes of `fields` under a multiplier `parents`.
fn count(fields: &[Field], parents: u64, vars: &Map<String, Value>) -> (u64, u64) {
    let (mut requests, mut nodes) = (0, 0);
    for f in fields {
        let size = f
            .args
            .iter()
            .find(|(k, _)| k == "first" || k == "last")
            .and_then(|(_, a)| resolve(a, vars).as_u64());
        match size {
            Some(n) => {
                requests += parents;
                nodes += parents * n;
                let (r, m) = count(&f.selection, parents * n, vars);
                requests += r;
                nodes += m;
            }
            None => {
                let (r, m) = count(&f.selection, parents, vars);
                requests += r;
                nodes += m;
            }
        }
    }
    (requests, nodes)
}

fn resolve(arg: &Arg, vars: &Map<String, Value>) -> Value {
    match arg {
        Arg::Var(v) => vars.get(v).cloned().unwrap_or(Value::Null),
        Arg::Literal(v) => v.clone(),
    }
}

fn arg(field: &Field, key: &str, vars: &Map<String, Value>) -> Value {
    field
        .args
        .iter()
        .find(|(k, _)| k == key)
        .map_or(Value::Null, |(_, a)| resolve(a, vars))
}

/// The cursor after the `n`-th branch (opaque to clients, as GitHub's are).
fn cursor(n: usize) -> String {
    format!("Y3Vyc29yOnYyOpHO{n:08}")
}

fn position(cursor: &str) -> Option<usize> {
    cursor.strip_prefix("Y3Vyc29yOnYyOpHO")?.parse().ok()
}

/// Evaluates `query` with `variables`; `repos(owner, name)` is the model. `Err` is a
/// document-level error (the caller answers it as GitHub does: `errors` without `data`).
pub fn evaluate<'m>(
    query: &str,
    variables: &Value,
    repos: &dyn Fn(&str, &str) -> Access<'m>,
) -> Result<Evaluated, String> {
    let mut parser = Parser {
        tokens: tokenize(query)?,
        at: 0,
    };
    let (declared, root) = parser.document()?;
    let vars = variables.as_object().cloned().unwrap_or_default();
    for used in vars.keys() {
        if !declared.contains(used) {
            return Err(format!("variable ${used} is not declared"));
        }
    }
    let (requests, nodes) = count(&root, 1, &vars);
    if nodes > 500_000 {
        return Err(format!(
            "the query may return {nodes} nodes; the limit is 500,000"
        ));
    }
    let mut data = Map::new();
    let mut errors = Vec::new();
    for field in &root {
        let key = field.key().to_owned();
        if field.name != "repository" {
            return Err(format!("unknown field {} on Query", field.name));
        }
        let owner = arg(field, "owner", &vars);
        let name = arg(field, "name", &vars);
        let (Some(owner), Some(name)) = (owner.as_str(), name.as_str()) else {
            return Err("repository needs owner and name".into());
        };
        match repos(owner, name) {
            Access::NotFound => {
                data.insert(key.clone(), Value::Null);
                errors.push(json!({"type": "NOT_FOUND", "path": [key],
                    "message": format!("Could not resolve to a Repository with the name '{owner}/{name}'.")}));
            }
            Access::Forbidden => {
                data.insert(key.clone(), Value::Null);
                errors.push(json!({"type": "FORBIDDEN", "path": [key],
                    "message": "Resource not accessible by integration"}));
            }
            Access::Found(branches) => {
                data.insert(key, repository(field, branches, &vars)?);
            }
        }
    }
    let mut body = json!({ "data": data });
    if !errors.is_empty() {
        body["errors"] = Value::Array(errors);
    }
    Ok(Evaluated {
        body,
        cost: ((requests + 50) / 100).max(1),
        nodes,
    })
}

fn repository(
    field: &Field,
    branches: &BTreeMap<String, String>,
    vars: &Map<String, Value>,
) -> Result<Value, String> {
    let mut out = Map::new();
    for f in &field.selection {
        let value = match f.name.as_str() {
            "ref" => {
                let name = arg(f, "qualifiedName", vars);
                let sha = name
                    .as_str()
                    .and_then(|n| n.strip_prefix("refs/heads/"))
                    .and_then(|b| branches.get(b));
                match sha {
                    Some(sha) => object(&f.selection, None, sha)?,
                    None => Value::Null,
                }
            }
            "refs" => {
                let prefix = arg(f, "refPrefix", vars);
                if prefix.as_str() != Some("refs/heads/") {
                    return Err("refs: only refPrefix \"refs/heads/\" is served".into());
                }
                let first = arg(f, "first", vars).as_u64().ok_or("refs needs first")?;
                if first > 100 {
                    return Err(format!("refs: first {first} exceeds the maximum of 100"));
                }
                let start = match arg(f, "after", vars) {
                    Value::Null => 0,
                    Value::String(c) => position(&c).ok_or("refs: bad cursor")? + 1,
                    _ => return Err("refs: after must be a string".into()),
                };
                let all: Vec<(&String, &String)> = branches.iter().collect();
                let end = (start + first as usize).min(all.len());
                let page = &all[start.min(end)..end];
                connection(f, page, end < all.len(), end)?
            }
            other => return Err(format!("unknown field {other} on Repository")),
        };
        out.insert(f.key().to_owned(), value);
    }
    Ok(Value::Object(out))
}

/// A ref object: `name`, `target { oid }`.
fn object(selection: &[Field], name: Option<&str>, sha: &str) -> Result<Value, String> {
    let mut out = Map::new();
    for f in selection {
        let value = match (f.name.as_str(), name) {
            ("name", Some(n)) => json!(n),
            ("target", _) => {
                let mut target = Map::new();
                for t in &f.selection {
                    match t.name.as_str() {
                        "oid" => target.insert(t.key().to_owned(), json!(sha)),
                        other => return Err(format!("unknown field {other} on GitObject")),
                    };
                }
                Value::Object(target)
            }
            (other, _) => return Err(format!("unknown field {other} on Ref")),
        };
        out.insert(f.key().to_owned(), value);
    }
    Ok(Value::Object(out))
}

fn connection(
    field: &Field,
    page: &[(&String, &String)],
    more: bool,
    end: usize,
) -> Result<Value, String> {
    let mut out = Map::new();
    for f in &field.selection {
        let value = match f.name.as_str() {
            "nodes" => Value::Array(
                page.iter()
                    .map(|(name, sha)| object(&f.selection, Some(name), sha))
                    .collect::<Result<_, _>>()?,
            ),
            "pageInfo" => {
                let mut info = Map::new();
                for p in &f.selection {
                    let v = match p.name.as_str() {
                        "hasNextPage" => json!(more),
                        "endCursor" if end > 0 && !page.is_empty() => json!(cursor(end - 1)),
                        "endCursor" => Value::Null,
                        other => return Err(format!("unknown field {other} on PageInfo")),
                    };
                    info.insert(p.key().to_owned(), v);
                }
                Value::Object(info)
            }
            other => return Err(format!("unknown field {other} on RefConnection")),
        };
        out.insert(f.key().to_owned(), value);
    }
    Ok(Value::Object(out))
}
