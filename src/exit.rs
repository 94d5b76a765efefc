//! Exit codes of the CLI, after sysexits(3) where one fits.

use std::fmt;

/// Bad usage or configuration: a flag, a config key or value.
pub const EX_USAGE: i32 = 64;
/// The admin API or a needed service cannot be reached.
pub const EX_UNAVAILABLE: i32 = 69;
/// Something the node needs on this machine failed (a file, a port).
pub const EX_SOFTWARE: i32 = 70;
/// Temporary failure: trying again later may work (sysexits.h).
pub const EX_TEMPFAIL: i32 = 75;

/// A failure the user sees as one line and an exit code.
#[derive(Debug)]
pub struct CliError {
    pub code: i32,
    pub message: String,
}

impl CliError {
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        CliError {
            code,
            message: message.into(),
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}
