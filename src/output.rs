//! What Sentry prints for people and scripts on stdout, and whether anything it prints may
//! be coloured.
//!
//! Rust ignores SIGPIPE, so a write to a closed pipe (`sentry status | head -1`) returns
//! `EPIPE` and `println!` would panic with exit 101. Output goes through [`outln!`](crate::outln) instead:
//! once the reader has gone, the rest of the output is dropped quietly and the command
//! carries on, as ripgrep does — a deployment is never abandoned because nobody reads it.
//!
//! Colour follows `--color` (`auto`, `always`, `never`); in `auto`, a stream is coloured
//! only when it is a terminal and `NO_COLOR` is unset or empty (<https://no-color.org>).

use std::fmt;
use std::io::{self, IsTerminal, Write};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::cli::ColorChoice;

/// Set once stdout is known to be closed, so later writes do not even try.
static STDOUT_CLOSED: AtomicBool = AtomicBool::new(false);

/// The `--color` choice of this process, set once by `main`.
static COLOR: OnceLock<ColorChoice> = OnceLock::new();

/// Prints a line on stdout; a closed stdout is not an error (see the module comment).
#[macro_export]
macro_rules! outln {
    () => {{
        $crate::output::write_stdout(format_args!("\n"));
    }};
    ($($arg:tt)*) => {{
        $crate::output::write_stdout(format_args!("{}\n", format_args!($($arg)*)));
    }};
}

/// Prints on stdout without a newline; a closed stdout is not an error.
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {{
        $crate::output::write_stdout(format_args!($($arg)*));
    }};
}

/// Writes to stdout. Returns false when the output went nowhere because stdout is closed
/// (or failed otherwise: output is best effort, the command's work is what counts).
pub fn write_stdout(args: fmt::Arguments<'_>) -> bool {
    if STDOUT_CLOSED.load(Ordering::Relaxed) {
        return false;
    }
    let mut out = io::stdout().lock();
    match out.write_fmt(args).and_then(|()| out.flush()) {
        Ok(()) => true,
        Err(e) => {
            // Any failure ends stdout for good: retrying a full disk line by line helps nobody.
            STDOUT_CLOSED.store(true, Ordering::Relaxed);
            if e.kind() != io::ErrorKind::BrokenPipe {
                let _ = writeln!(io::stderr(), "warning: cannot write to stdout: {e}");
            }
            false
        }
    }
}

/// Writes bytes produced elsewhere (completions, the man page) to stdout, like [`outln!`](crate::outln).
pub fn write_stdout_bytes(bytes: &[u8]) -> bool {
    write_stdout(format_args!("{}", String::from_utf8_lossy(bytes)))
}

/// Records the `--color` choice; the first call wins.
pub fn set_color(choice: ColorChoice) {
    let _ = COLOR.set(choice);
}

/// Whether stdout may carry colour.
pub fn stdout_color() -> bool {
    color_enabled(choice(), io::stdout().is_terminal(), no_color_set())
}

/// Whether stderr (the text logs) may carry colour.
pub fn stderr_color() -> bool {
    color_enabled(choice(), io::stderr().is_terminal(), no_color_set())
}

fn choice() -> ColorChoice {
    COLOR.get().copied().unwrap_or(ColorChoice::Auto)
}

/// `NO_COLOR` counts only when it is set to something: an empty value means unset.
fn no_color_set() -> bool {
    std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty())
}

/// The rule: an explicit `--color` wins over the environment, `auto` needs a terminal and
/// no `NO_COLOR`.
pub fn color_enabled(choice: ColorChoice, is_terminal: bool, no_color: bool) -> bool {
    match choice {
        ColorChoice::Always => true,
        ColorChoice::Never => false,
        ColorChoice::Auto => is_terminal && !no_color,
    }
}

/// How a status word is shown on a terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tone {
    Good,
    Bad,
    Warn,
}

/// `text` in the colour of `tone` when stdout may be coloured, else `text` unchanged —
/// for status words in tables (`succeeded`, `failed`).
pub fn paint(text: &str, tone: Tone) -> String {
    paint_if(stdout_color(), text, tone)
}

/// A unit or run result word (`succeeded`, `failed`, …) in its colour, as [`paint`].
pub fn paint_result(result: &str) -> String {
    let tone = match result {
        "succeeded" => Tone::Good,
        "failed" | "timed_out" => Tone::Bad,
        _ => Tone::Warn,
    };
    paint(result, tone)
}

fn paint_if(enabled: bool, text: &str, tone: Tone) -> String {
    if !enabled {
        return text.to_owned();
    }
    let code = match tone {
        Tone::Good => "32",
        Tone::Bad => "31",
        Tone::Warn => "33",
    };
    format!("\x1b[{code}m{text}\x1b[0m")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_choice_wins_over_terminal_and_no_color() {
        assert!(color_enabled(ColorChoice::Always, false, true));
        assert!(!color_enabled(ColorChoice::Never, true, false));
    }

    #[test]
    fn auto_needs_a_terminal_and_no_no_color() {
        assert!(color_enabled(ColorChoice::Auto, true, false));
        assert!(!color_enabled(ColorChoice::Auto, false, false));
        assert!(!color_enabled(ColorChoice::Auto, true, true));
    }

    #[test]
    fn paint_adds_escapes_only_when_enabled() {
        assert_eq!(paint_if(false, "failed", Tone::Bad), "failed");
        assert_eq!(paint_if(true, "failed", Tone::Bad), "\x1b[31mfailed\x1b[0m");
    }
}
