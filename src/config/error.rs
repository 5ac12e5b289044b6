//! The single error type of CLI and config loading.

/// Every variant displays as one line naming the flag or config field and
/// the offending value, so `main` can print `kproxy: <error>` and exit.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Command-line syntax problems found by clap (unknown flag, missing value).
    #[error("{0}")]
    Usage(String),
    /// A flag value that does not parse or is out of range.
    #[error("invalid value {value:?} for --{flag}: {reason}")]
    Flag {
        flag: &'static str,
        value: String,
        reason: String,
    },
    /// The config file as a whole: unreadable, not YAML, wrong kind.
    #[error("config file {path}: {reason}")]
    File { path: String, reason: String },
    /// One field of the config file.
    #[error("config file {path}: {field}: {reason}")]
    Field {
        path: String,
        field: String,
        reason: String,
    },
    /// The node name could not be determined.
    #[error("cannot determine the node name: {0}")]
    NodeName(String),
}

/// Collapse multi-line library messages (YAML parser, io) onto one line.
pub(crate) fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
