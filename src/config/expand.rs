//! `${VAR}` expansion of single configuration values.
//!
//! Expansion runs per field after the YAML is parsed, never on the raw file text, so a
//! variable's value can never change the structure of the document. `deploy.commands`
//! is never expanded: `$VAR` there belongs to the shell.

use std::collections::BTreeMap;

/// Where variables come from: the process environment first, then the env file.
#[derive(Debug, Clone, Default)]
pub struct Env {
    file_vars: BTreeMap<String, String>,
    /// Tests replace the process environment with a fixed map.
    process_override: Option<BTreeMap<String, String>>,
}

impl Env {
    /// The real process environment, backed by variables read from an env file.
    pub fn with_file_vars(file_vars: BTreeMap<String, String>) -> Self {
        Env {
            file_vars,
            process_override: None,
        }
    }

    /// A fixed set of variables and nothing else (for tests and benchmarks).
    pub fn fixed<I, K, V>(vars: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        Env {
            file_vars: BTreeMap::new(),
            process_override: Some(
                vars.into_iter()
                    .map(|(k, v)| (k.into(), v.into()))
                    .collect(),
            ),
        }
    }

    pub fn get(&self, name: &str) -> Option<String> {
        let from_process = match &self.process_override {
            Some(map) => map.get(name).cloned(),
            None => std::env::var(name).ok(),
        };
        from_process.or_else(|| self.file_vars.get(name).cloned())
    }

    /// Every value the env file holds (masked in command output).
    pub fn file_values(&self) -> impl Iterator<Item = &String> {
        self.file_vars.values()
    }

    /// Variables from the env file that the process environment does not already set;
    /// deploy commands get them too.
    pub fn file_only_vars(&self) -> impl Iterator<Item = (&String, &String)> {
        self.file_vars
            .iter()
            .filter(|(k, _)| match &self.process_override {
                Some(map) => !map.contains_key(*k),
                None => std::env::var_os(k).is_none(),
            })
    }
}

/// Whether `value` is exactly one `${VAR}` or `${VAR:-default}` reference: such a value
/// comes from the environment whole, the way credentials are passed, and is masked.
pub fn is_single_reference(value: &str) -> bool {
    let Some(inner) = value.strip_prefix("${").and_then(|v| v.strip_suffix('}')) else {
        return false;
    };
    let name = inner.split_once(":-").map_or(inner, |(name, _)| name);
    is_var_name(name) && !inner.contains(['{', '}', '$'])
}

/// Why a value could not be expanded. The path of the field is added by the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExpandError {
    #[error("environment variable {0} is not set")]
    Unset(String),
    #[error("unterminated `${{` (write `$$` for a literal `$`)")]
    Unterminated,
    #[error("`${{{0}}}` is not a valid variable reference")]
    BadName(String),
}

/// Expands `${VAR}` and `${VAR:-default}`; `$$` is a literal `$`, and so is a `$` that
/// is followed by anything else. Every unset variable is reported, not just the first.
pub fn expand(input: &str, env: &Env) -> Result<String, Vec<ExpandError>> {
    let mut out = String::with_capacity(input.len());
    let mut errors = Vec::new();
    let mut rest = input;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(body_and_tail) = after.strip_prefix('{') {
            let Some(end) = body_and_tail.find('}') else {
                errors.push(ExpandError::Unterminated);
                return Err(errors);
            };
            let body = &body_and_tail[..end];
            rest = &body_and_tail[end + 1..];
            let (name, default) = match body.split_once(":-") {
                Some((name, default)) => (name, Some(default)),
                None => (body, None),
            };
            if !is_var_name(name) {
                errors.push(ExpandError::BadName(body.to_owned()));
                continue;
            }
            match (env.get(name), default) {
                (Some(value), Some(default)) if value.is_empty() => out.push_str(default),
                (Some(value), _) => out.push_str(&value),
                (None, Some(default)) => out.push_str(default),
                (None, None) => errors.push(ExpandError::Unset(name.to_owned())),
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

pub fn is_var_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> Env {
        Env::fixed([("TOKEN", "s3cret"), ("EMPTY", "")])
    }

    #[test]
    fn expands_set_variables() {
        assert_eq!(expand("a-${TOKEN}-b", &env()).unwrap(), "a-s3cret-b");
    }

    #[test]
    fn unset_variable_is_an_error_naming_it() {
        assert_eq!(
            expand("${NOPE} ${NADA}", &env()).unwrap_err(),
            vec![
                ExpandError::Unset("NOPE".into()),
                ExpandError::Unset("NADA".into())
            ]
        );
    }

    #[test]
    fn default_applies_when_unset_or_empty() {
        assert_eq!(expand("${NOPE:-x}", &env()).unwrap(), "x");
        assert_eq!(expand("${EMPTY:-x}", &env()).unwrap(), "x");
        assert_eq!(expand("${TOKEN:-x}", &env()).unwrap(), "s3cret");
        assert_eq!(expand("${NOPE:-}", &env()).unwrap(), "");
    }

    #[test]
    fn double_dollar_is_literal() {
        assert_eq!(expand("$${TOKEN} $$", &env()).unwrap(), "${TOKEN} $");
    }

    #[test]
    fn lone_dollar_is_literal() {
        assert_eq!(
            expand("cost $5 and $HOME", &env()).unwrap(),
            "cost $5 and $HOME"
        );
    }

    #[test]
    fn malformed_references_are_errors() {
        assert_eq!(
            expand("${TOKEN", &env()).unwrap_err(),
            vec![ExpandError::Unterminated]
        );
        assert_eq!(
            expand("${1A}", &env()).unwrap_err(),
            vec![ExpandError::BadName("1A".into())]
        );
    }

    #[test]
    fn process_env_wins_over_file() {
        let env = Env {
            file_vars: [("A".to_string(), "file".to_string())].into(),
            process_override: Some([("A".to_string(), "proc".to_string())].into()),
        };
        assert_eq!(env.get("A").as_deref(), Some("proc"));
        assert_eq!(env.file_only_vars().count(), 0);
    }
}
