//! The `sentry` binary: everything it does is the library's [`sentry::main`]; this only
//! hands over the arguments and turns the outcome into the exit code.

use std::process::ExitCode;

fn main() -> ExitCode {
    sentry::main(std::env::args_os().collect()).into()
}
