//! Unknown keys, found by walking the parsed YAML alongside the configuration's JSON Schema.
//!
//! serde's `deny_unknown_fields` stops at the first unknown key of an item and hides every
//! other problem in it. Walking the document against the schema derived from
//! [`super::raw`] finds them all, and the schema's property names give the suggestion
//! for a typo, with no second list of keys to keep in step.

use serde_json::Value as Json;
use serde_yaml::Value as Yaml;

use super::Diagnostic;

pub(super) fn check_unknown_keys(doc: &Yaml, diagnostics: &mut Vec<Diagnostic>) {
    let schema = super::json_schema();
    walk(doc, &schema, &schema, "", diagnostics);
}

fn walk(value: &Yaml, schema: &Json, root: &Json, path: &str, out: &mut Vec<Diagnostic>) {
    let schema = resolve(schema, root);
    match value {
        Yaml::Mapping(map) => {
            let properties = schema.get("properties").and_then(Json::as_object);
            let additional = schema.get("additionalProperties");
            for (key, child) in map {
                let Some(key) = key.as_str() else { continue };
                let child_path = if path.is_empty() {
                    key.to_owned()
                } else {
                    format!("{path}.{key}")
                };
                if let Some(sub) = properties.and_then(|p| p.get(key)) {
                    walk(child, sub, root, &child_path, out);
                } else if let Some(sub) = additional.filter(|a| a.is_object()) {
                    walk(child, sub, root, &child_path, out);
                } else if let Some(props) =
                    properties.filter(|_| additional == Some(&Json::Bool(false)))
                {
                    out.push(unknown_key(&child_path, key, props.keys()));
                }
            }
        }
        Yaml::Sequence(items) => {
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    walk(item, item_schema, root, &format!("{path}[{i}]"), out);
                }
            }
        }
        _ => {}
    }
}

/// Follows `$ref` and picks the object branch of `anyOf`/`oneOf` (how `Option<T>` appears).
fn resolve<'a>(schema: &'a Json, root: &'a Json) -> &'a Json {
    if let Some(reference) = schema.get("$ref").and_then(Json::as_str) {
        let pointer = reference.trim_start_matches('#');
        if let Some(target) = root.pointer(pointer) {
            return resolve(target, root);
        }
    }
    for combinator in ["anyOf", "oneOf", "allOf"] {
        if let Some(branches) = schema.get(combinator).and_then(Json::as_array) {
            if let Some(branch) = branches.iter().map(|b| resolve(b, root)).find(|b| {
                b.get("properties").is_some()
                    || b.get("additionalProperties").is_some()
                    || b.get("items").is_some()
            }) {
                return branch;
            }
        }
    }
    schema
}

fn unknown_key<'a>(path: &str, key: &str, known: impl Iterator<Item = &'a String>) -> Diagnostic {
    let known: Vec<&String> = known.collect();
    let message = match suggest(key, known.iter().map(|k| k.as_str())) {
        Some(best) => format!("unknown key `{key}`; did you mean `{best}`?"),
        None => {
            let list: Vec<String> = known.iter().map(|k| format!("`{k}`")).collect();
            format!("unknown key `{key}`; expected one of {}", list.join(", "))
        }
    };
    Diagnostic::error(path, message)
}

/// The closest candidate to `word`, if any is close enough to be a likely typo.
pub(super) fn suggest<'a>(
    word: &str,
    candidates: impl Iterator<Item = &'a str>,
) -> Option<&'a str> {
    let limit = (word.chars().count() / 3).max(2);
    candidates
        .map(|c| (strsim::damerau_levenshtein(word, c), c))
        .filter(|(distance, _)| *distance <= limit)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unknown(yaml: &str) -> Vec<Diagnostic> {
        let doc: Yaml = serde_yaml::from_str(yaml).unwrap();
        let mut out = Vec::new();
        check_unknown_keys(&doc, &mut out);
        out
    }

    #[test]
    fn typo_in_group_suggests_the_known_key() {
        let diags = unknown("groups:\n  g:\n    exectuion_strategy: parallel\n");
        assert_eq!(diags.len(), 1);
        assert_eq!(diags[0].path, "groups.g.exectuion_strategy");
        assert!(
            diags[0]
                .message
                .contains("did you mean `execution_strategy`")
        );
    }

    #[test]
    fn finds_every_unknown_key_at_every_depth() {
        let diags = unknown(
            "polling: 5\nrepositories:\n  - name: a\n    monitor:\n      branchs: [main]\n      auth: {tokn: x}\n    deploy:\n      comands: []\n",
        );
        let paths: Vec<&str> = diags.iter().map(|d| d.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "polling",
                "repositories[0].monitor.branchs",
                "repositories[0].monitor.auth.tokn",
                "repositories[0].deploy.comands"
            ]
        );
    }

    #[test]
    fn free_form_maps_accept_any_key() {
        assert!(unknown("repositories:\n  - deploy:\n      env: {ANYTHING: x}\n").is_empty());
    }

    #[test]
    fn suggestion_needs_a_close_match() {
        assert_eq!(
            suggest("brnch", ["branches", "branch"].into_iter()),
            Some("branch")
        );
        assert_eq!(suggest("zzzzzz", ["branches"].into_iter()), None);
    }
}
