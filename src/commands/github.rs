//! `validate --format github`: diagnostics as GitHub Actions workflow commands
//! (`::error file=F,line=L,col=C::message`), so a CI run marks the configuration's lines.
//!
//! Escaping follows GitHub's rules (actions/toolkit `command.ts`): in the message `%`, CR
//! and LF become `%25`, `%0D`, `%0A`; in property values `:` and `,` are escaped too, as
//! `%3A` and `%2C`, because they delimit the properties.

use std::path::Path;

use crate::config::{Diagnostic, Severity};

/// One annotation line for `diag` in the file `path`.
pub fn annotation(path: &Path, diag: &Diagnostic) -> String {
    let command = match diag.severity {
        Severity::Error => "error",
        Severity::Warning => "warning",
    };
    let mut properties = vec![format!(
        "file={}",
        escape_property(&path.display().to_string())
    )];
    if let Some(line) = diag.line {
        properties.push(format!("line={line}"));
        if let Some(column) = diag.column {
            properties.push(format!("col={column}"));
        }
    }
    let message = if diag.path.is_empty() {
        diag.message.clone()
    } else {
        format!("{}: {}", diag.path, diag.message)
    };
    format!(
        "::{command} {}::{}",
        properties.join(","),
        escape_data(&message)
    )
}

fn escape_data(text: &str) -> String {
    text.replace('%', "%25")
        .replace('\r', "%0D")
        .replace('\n', "%0A")
}

fn escape_property(text: &str) -> String {
    escape_data(text).replace(':', "%3A").replace(',', "%2C")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn diag(line: Option<usize>, message: &str) -> Diagnostic {
        Diagnostic {
            line,
            column: line.map(|_| 5),
            ..Diagnostic::error("groups.g.max_parallel", message)
        }
    }

    #[test]
    fn located_error_carries_file_line_and_column() {
        assert_eq!(
            annotation(
                Path::new("sentry.yaml"),
                &diag(Some(12), "must be at least 1")
            ),
            "::error file=sentry.yaml,line=12,col=5::groups.g.max_parallel: must be at least 1"
        );
    }

    #[test]
    fn warnings_and_unlocated_problems() {
        let d = Diagnostic::warning("", "group x is not used");
        assert_eq!(
            annotation(Path::new("a.yaml"), &d),
            "::warning file=a.yaml::group x is not used"
        );
    }

    #[test]
    fn message_and_properties_are_escaped() {
        assert_eq!(
            annotation(Path::new("c:/x,y.yaml"), &diag(None, "100% bad\r\nnext")),
            "::error file=c%3A/x%2Cy.yaml::groups.g.max_parallel: 100%25 bad%0D%0Anext"
        );
    }
}
