//! The errors that stop the daemon: start-up problems and the poller failing. Must never carry
//! one peer's failure (those close that peer's connection and nothing else).

use std::io;

use crate::config;
use crate::store::StoreError;

/// Errors that stop the daemon (start-up, or the poller itself failing).
#[derive(Debug)]
pub enum DaemonError {
    /// Configuration is invalid.
    Config(config::ConfigError),
    /// A file-system or permission problem at start-up; the message says how to fix it.
    Setup(String),
    /// The database could not be opened.
    Store(StoreError),
    /// A socket could not be created or bound.
    Bind(String, io::Error),
    /// The poller failed.
    Poll(io::Error),
}

impl std::fmt::Display for DaemonError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DaemonError::Config(e) => write!(f, "{e}"),
            DaemonError::Setup(m) => write!(f, "{m}"),
            DaemonError::Store(e) => write!(f, "{e}"),
            DaemonError::Bind(what, e) => write!(f, "cannot listen on {what}: {e}"),
            DaemonError::Poll(e) => write!(f, "event loop failed: {e}"),
        }
    }
}

impl std::error::Error for DaemonError {}
