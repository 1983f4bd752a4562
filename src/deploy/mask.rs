//! Secret masking and the bounded output tail of a unit.
//!
//! Command output is handled one line at a time, so a secret that arrives split across two
//! reads of a pipe is still whole when it is masked: [`Masker::mask`] runs on complete lines
//! before anything is logged, printed or kept.

use secrecy::{ExposeSecret, SecretString};

/// Secrets shorter than this are not masked: replacing every `abc` would garble output
/// and hide nothing worth hiding.
pub const MIN_SECRET_LEN: usize = 6;

/// What replaces a secret in output.
pub const MASK: &str = "***";

/// Replaces every configured secret value with [`MASK`].
#[derive(Clone, Default)]
pub struct Masker {
    /// Longest first, so a secret that contains another is replaced whole.
    secrets: Vec<SecretString>,
}

impl std::fmt::Debug for Masker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Masker({} secrets)", self.secrets.len())
    }
}

impl Masker {
    pub fn new(secrets: impl IntoIterator<Item = SecretString>) -> Masker {
        let mut secrets: Vec<SecretString> = secrets
            .into_iter()
            .filter(|s| s.expose_secret().len() >= MIN_SECRET_LEN)
            .collect();
        secrets.sort_by_key(|s| std::cmp::Reverse(s.expose_secret().len()));
        secrets.dedup_by(|a, b| a.expose_secret() == b.expose_secret());
        Masker { secrets }
    }

    pub fn mask(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for secret in &self.secrets {
            let value = secret.expose_secret();
            if out.contains(value) {
                out = out.replace(value, MASK);
            }
        }
        out
    }
}

/// The last `cap` bytes of a unit's output, cut at a character boundary.
#[derive(Debug, Clone)]
pub struct Tail {
    text: String,
    cap: usize,
}

impl Tail {
    pub fn new(cap: usize) -> Tail {
        Tail {
            text: String::new(),
            cap,
        }
    }

    /// Appends one line (a newline is added).
    pub fn push_line(&mut self, line: &str) {
        self.text.push_str(line);
        self.text.push('\n');
        // Trim only when twice over the cap, so each line costs amortised O(line).
        if self.text.len() > self.cap.saturating_mul(2) {
            self.trim();
        }
    }

    fn trim(&mut self) {
        if self.text.len() <= self.cap {
            return;
        }
        let mut start = self.text.len() - self.cap;
        while !self.text.is_char_boundary(start) {
            start += 1;
        }
        self.text.drain(..start);
    }

    /// The kept text, at most `cap` bytes.
    pub fn into_string(mut self) -> String {
        self.trim();
        self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_long_secrets_only_and_longest_first() {
        let masker = Masker::new(
            ["abc", "secret-1", "secret-1-long"]
                .into_iter()
                .map(SecretString::from),
        );
        assert_eq!(
            masker.mask("abc secret-1 secret-1-long"),
            "abc *** ***",
            "short values stay, longer secrets are replaced whole"
        );
    }

    #[test]
    fn tail_keeps_the_end_at_a_char_boundary() {
        let mut tail = Tail::new(8);
        for line in ["first", "second", "dritté"] {
            tail.push_line(line);
        }
        let text = tail.into_string();
        assert!(text.len() <= 8, "{text:?}");
        assert!(text.ends_with("dritté\n"), "{text:?}");
    }
}
