//! Secret masking and the bounded output tail of a unit.
//!
//! Every secret is masked in the forms it is likely to be printed in: as is, base64 (standard
//! and URL-safe alphabets, at each of the three alignments it can have inside a longer
//! encoded text such as a Basic `Authorization` header) and percent-encoded. Command output
//! is masked line by line; a line longer than the runner's read cap arrives in pieces, and
//! [`MaskStream`] holds back enough bytes at the end of each piece that a secret split
//! across two pieces is still masked whole.
//!
//! Secrets that only exist at run time (GitHub App installation tokens, minted hourly) are
//! added to a process-wide list with [`remember_runtime_secret`] as they arrive; every
//! [`Masker`], including those built before, masks them too, whatever their length.

use std::collections::VecDeque;
use std::sync::{Arc, PoisonError, RwLock};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use secrecy::{ExposeSecret, SecretString};

/// Secrets shorter than this are not masked: replacing every `ab` would garble output and
/// hide nothing a guess would not find. Three characters keep PINs and short passwords out.
pub const MIN_SECRET_LEN: usize = 3;

/// Encoded forms shorter than this are not masked (a 3-character secret has 4-character
/// base64 forms).
const MIN_ENCODED_LEN: usize = 4;

/// What replaces a secret in output.
pub const MASK: &str = "***";

/// What RFC 3986 leaves unescaped; everything else is percent-encoded.
const URL_ESCAPED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Runtime secrets kept for masking: the latest tokens, each in all its forms, longest
/// form first. Old ones go: an installation token lives an hour.
static RUNTIME: RwLock<VecDeque<Vec<SecretString>>> = RwLock::new(VecDeque::new());
/// How many runtime secrets are kept (a day of hourly tokens for a few installations).
const RUNTIME_KEPT: usize = 128;

/// Masks `secret` (and its encoded forms) in all output from now on, in every [`Masker`].
pub(crate) fn remember_runtime_secret(secret: &str) {
    if secret.len() < MIN_SECRET_LEN {
        return;
    }
    let mut all = RUNTIME.write().unwrap_or_else(PoisonError::into_inner);
    if all
        .iter()
        .any(|forms| forms.first().is_some_and(|f| f.expose_secret() == secret))
    {
        return;
    }
    let mut forms = forms(secret);
    forms.sort_by_key(|f| std::cmp::Reverse(f.len()));
    forms.retain(|f| f.len() >= MIN_ENCODED_LEN || f == secret);
    // The secret itself first (it is the longest of its forms but for base64 ones).
    forms.sort_by_key(|f| (f != secret, std::cmp::Reverse(f.len())));
    all.push_back(forms.into_iter().map(SecretString::from).collect());
    while all.len() > RUNTIME_KEPT {
        all.pop_front();
    }
}

/// Runs `f` over the runtime secrets' forms.
fn with_runtime<T>(f: impl FnOnce(&VecDeque<Vec<SecretString>>) -> T) -> T {
    f(&RUNTIME.read().unwrap_or_else(PoisonError::into_inner))
}

/// Replaces every configured secret value, and its encoded forms, with [`MASK`].
#[derive(Clone, Default)]
pub struct Masker {
    /// Every form of every secret, longest first, so a form that contains another is
    /// replaced whole. Shared: every unit's output sink holds a clone.
    patterns: Arc<Vec<SecretString>>,
}

impl std::fmt::Debug for Masker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Masker({} patterns)", self.patterns.len())
    }
}

impl Masker {
    pub fn new(secrets: impl IntoIterator<Item = SecretString>) -> Masker {
        let mut patterns: Vec<SecretString> = secrets
            .into_iter()
            .filter(|s| s.expose_secret().len() >= MIN_SECRET_LEN)
            .flat_map(|s| forms(s.expose_secret()))
            .map(SecretString::from)
            .collect();
        patterns.sort_by(|a, b| {
            b.expose_secret()
                .len()
                .cmp(&a.expose_secret().len())
                .then_with(|| a.expose_secret().cmp(b.expose_secret()))
        });
        patterns.dedup_by(|a, b| a.expose_secret() == b.expose_secret());
        Masker {
            patterns: Arc::new(patterns),
        }
    }

    pub fn mask(&self, text: &str) -> String {
        let mut out = text.to_owned();
        // Runtime tokens first: they are long, and a configured secret inside one would
        // otherwise break it up before it is found.
        with_runtime(|runtime| {
            for pattern in runtime.iter().flatten() {
                let value = pattern.expose_secret();
                if out.contains(value) {
                    out = out.replace(value, MASK);
                }
            }
        });
        for pattern in self.patterns.iter() {
            let value = pattern.expose_secret();
            if out.contains(value) {
                out = out.replace(value, MASK);
            }
        }
        out
    }

    /// Masks raw bytes (output that may not be UTF-8).
    fn mask_bytes(&self, bytes: &[u8]) -> Vec<u8> {
        let mut out = bytes.to_vec();
        with_runtime(|runtime| {
            for pattern in runtime.iter().flatten() {
                let needle = pattern.expose_secret().as_bytes();
                if find(&out, needle, 0).is_some() {
                    out = replace_all(&out, needle, MASK.as_bytes());
                }
            }
        });
        for pattern in self.patterns.iter() {
            let needle = pattern.expose_secret().as_bytes();
            if find(&out, needle, 0).is_some() {
                out = replace_all(&out, needle, MASK.as_bytes());
            }
        }
        out
    }

    /// A stream masker for output that arrives in pieces.
    pub fn stream(&self) -> MaskStream {
        MaskStream {
            masker: self.clone(),
            pending: Vec::new(),
        }
    }

    fn longest(&self) -> usize {
        let runtime = with_runtime(|runtime| {
            runtime
                .iter()
                .flatten()
                .map(|p| p.expose_secret().len())
                .max()
                .unwrap_or(0)
        });
        self.patterns
            .first()
            .map_or(0, |p| p.expose_secret().len())
            .max(runtime)
    }
}

/// Masks a stream of pieces of lines: a piece that does not end its line keeps its last
/// bytes back until the next piece shows whether they begin a secret.
pub struct MaskStream {
    masker: Masker,
    pending: Vec<u8>,
}

impl MaskStream {
    /// Feeds one piece of output without its line ending; `line_end` says whether the
    /// piece ended its line. Returns the masked text that is ready to be shown, if any.
    pub fn feed(&mut self, piece: &[u8], line_end: bool) -> Option<String> {
        self.pending.extend_from_slice(piece);
        if line_end {
            return self.finish_line();
        }
        let hold = self.masker.longest().saturating_sub(1);
        let mut cut = self.pending.len().saturating_sub(hold);
        cut = self.before_straddling(cut);
        // Never split a UTF-8 character between two emitted pieces.
        while cut > 0 && cut < self.pending.len() && (self.pending[cut] & 0xC0) == 0x80 {
            cut -= 1;
        }
        if cut == 0 {
            return None;
        }
        let ready: Vec<u8> = self.pending.drain(..cut).collect();
        Some(String::from_utf8_lossy(&self.masker.mask_bytes(&ready)).into_owned())
    }

    /// Whatever is still held back, masked (at the end of the stream). `None` when empty.
    pub fn finish(&mut self) -> Option<String> {
        if self.pending.is_empty() {
            return None;
        }
        self.finish_line()
    }

    fn finish_line(&mut self) -> Option<String> {
        let line = std::mem::take(&mut self.pending);
        Some(String::from_utf8_lossy(&self.masker.mask_bytes(&line)).into_owned())
    }

    /// Moves `cut` back before every occurrence of a pattern that spans it, so that each
    /// occurrence is masked whole on one side.
    fn before_straddling(&self, mut cut: usize) -> usize {
        let runtime: Vec<SecretString> = with_runtime(|r| r.iter().flatten().cloned().collect());
        loop {
            let mut moved = false;
            for pattern in self.masker.patterns.iter().chain(runtime.iter()) {
                let needle = pattern.expose_secret().as_bytes();
                let from = cut.saturating_sub(needle.len().saturating_sub(1));
                let mut at = from;
                while let Some(start) = find(&self.pending, needle, at) {
                    if start >= cut {
                        break;
                    }
                    if start + needle.len() > cut {
                        cut = start;
                        moved = true;
                        break;
                    }
                    at = start + 1;
                }
            }
            if !moved {
                return cut;
            }
        }
    }
}

/// The forms of one secret that output may carry.
fn forms(secret: &str) -> Vec<String> {
    let mut out = vec![secret.to_owned()];
    let bytes = secret.as_bytes();
    out.push(STANDARD.encode(bytes));
    for engine in [&STANDARD_NO_PAD, &URL_SAFE_NO_PAD] {
        for offset in 0..3 {
            out.push(base64_core(engine, bytes, offset));
        }
    }
    let escaped = utf8_percent_encode(secret, URL_ESCAPED).to_string();
    out.push(escaped.replace("%20", "+"));
    out.push(lowercase_escapes(&escaped));
    out.push(escaped);
    out.retain(|form| form == secret || form.len() >= MIN_ENCODED_LEN);
    out
}

/// The base64 characters that depend on `bytes` alone when they follow `offset` other
/// bytes inside a longer encoded text (base64 encodes 3 bytes as 4 characters, so the
/// characters at either end also carry bits of the neighbouring bytes).
fn base64_core(engine: &impl Engine, bytes: &[u8], offset: usize) -> String {
    let mut padded = vec![0u8; offset];
    padded.extend_from_slice(bytes);
    let encoded = engine.encode(&padded);
    let start = (8 * offset).div_ceil(6);
    let end = (8 * (offset + bytes.len()) / 6).min(encoded.len());
    encoded.get(start..end).unwrap_or_default().to_owned()
}

/// `%2F` → `%2f`: some encoders write lowercase hex.
fn lowercase_escapes(escaped: &str) -> String {
    let mut out = String::with_capacity(escaped.len());
    let mut after_percent = 0;
    for c in escaped.chars() {
        if c == '%' {
            after_percent = 2;
            out.push(c);
        } else if after_percent > 0 {
            after_percent -= 1;
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

fn find(haystack: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if needle.is_empty() || from >= haystack.len() {
        return None;
    }
    haystack[from..]
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|i| i + from)
}

fn replace_all(haystack: &[u8], needle: &[u8], with: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(haystack.len());
    let mut at = 0;
    while let Some(start) = find(haystack, needle, at) {
        out.extend_from_slice(&haystack[at..start]);
        out.extend_from_slice(with);
        at = start + needle.len();
    }
    out.extend_from_slice(&haystack[at..]);
    out
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

    fn masker(secrets: &[&str]) -> Masker {
        Masker::new(secrets.iter().map(|s| SecretString::from(*s)))
    }

    #[test]
    fn masks_secrets_of_three_characters_or_more_longest_first() {
        let masker = masker(&["ab", "pin", "secret-1", "secret-1-long"]);
        assert_eq!(
            masker.mask("ab pin secret-1 secret-1-long"),
            "ab *** *** ***",
            "two characters stay, longer secrets are replaced whole"
        );
    }

    #[test]
    fn masks_base64_forms_at_every_alignment_and_url_encoded_forms() {
        let secret = "tok/en+with?odd&chars";
        let masker = masker(&[secret]);
        for prefix in ["", "u", "us", "user:"] {
            let header = STANDARD.encode(format!("{prefix}{secret}"));
            let masked = masker.mask(&format!("Authorization: Basic {header}"));
            assert!(!masked.contains(&header), "{prefix:?}: {masked}");
            let core = base64_core(&STANDARD_NO_PAD, secret.as_bytes(), prefix.len() % 3);
            assert!(!masked.contains(&core), "{prefix:?}: {masked}");
            let url_safe = URL_SAFE_NO_PAD.encode(format!("{prefix}{secret}"));
            assert!(masker.mask(&url_safe).contains(MASK), "{url_safe}");
        }
        let escaped = utf8_percent_encode(secret, URL_ESCAPED).to_string();
        assert_eq!(masker.mask(&format!("?t={escaped}")), "?t=***");
        assert_eq!(
            masker.mask(&format!("?t={}", lowercase_escapes(&escaped))),
            "?t=***"
        );
    }

    #[test]
    fn a_secret_learnt_at_run_time_is_masked_by_maskers_built_before_whatever_its_length() {
        let masker = masker(&["configured-secret"]);
        // Neither 40 characters nor known at start: a GitHub App installation token.
        let token = format!("ghs_{}", "Rt7qZ".repeat(19));
        assert_eq!(masker.mask(&format!("t={token}")), format!("t={token}"));
        remember_runtime_secret(&token);
        assert_eq!(masker.mask(&format!("t={token}")), "t=***");
        let basic = STANDARD.encode(format!("x-access-token:{token}"));
        assert!(!masker.mask(&basic).contains(&basic[20..60]), "base64 form");
        for split in [1, 40, token.len() - 1] {
            let mut stream = masker.stream();
            let mut out = String::new();
            out.extend(stream.feed(format!("a {}", &token[..split]).as_bytes(), false));
            out.extend(stream.feed(&token.as_bytes()[split..], false));
            out.extend(stream.feed(b" b", true));
            assert_eq!(out, "a *** b", "split at {split}");
        }
    }

    #[test]
    fn a_secret_split_across_pieces_is_masked_whole() {
        let secret = "split-secret-value";
        let masker = masker(&[secret]);
        for split in 1..secret.len() {
            let mut stream = masker.stream();
            let mut out = String::new();
            let first = format!("{}{}", "x".repeat(100), &secret[..split]);
            out.extend(stream.feed(first.as_bytes(), false));
            out.extend(stream.feed(&secret.as_bytes()[split..], false));
            out.extend(stream.feed(b" end", true));
            assert_eq!(
                out,
                format!("{}*** end", "x".repeat(100)),
                "split at {split}"
            );
        }
        // What is held back comes out at the end of the stream, nothing is lost.
        let mut stream = masker.stream();
        let text = "a tail without a newline, longer than any form of the secret";
        let mut out: String = stream.feed(text.as_bytes(), false).unwrap_or_default();
        assert!(out.len() < text.len(), "{out}");
        out.extend(stream.finish());
        assert_eq!(out, text);
        assert_eq!(stream.finish(), None);
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
