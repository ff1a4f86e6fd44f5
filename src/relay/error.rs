//! The relay's protocol errors: what a client did wrong, the message it is told and the code
//! it is closed with. Must never: carry a message body or key material into its text.

use crate::proto::relay::ErrorCode;

/// Protocol errors a client can commit. Each ends its connection with an `Error` frame.
#[derive(Debug)]
pub enum RelayError {
    /// The frame is not a valid `ToRelay` message.
    Malformed(String),
    /// A valid message arrived in a state that does not expect it.
    Unexpected {
        /// What the state expects.
        expected: &'static str,
        /// What came.
        got: &'static str,
    },
    /// The login is invalid (bad name, bad key, bad signature).
    BadLogin(String),
    /// The relay could not store something the login needs; try again later.
    Storage(String),
    /// The name is bound to another key.
    NameTaken {
        /// The name.
        user: String,
        /// The key it is bound to.
        bound: String,
        /// The key that tried.
        offered: String,
    },
    /// The key already holds as many names as a key may (`max_names_per_key`).
    TooManyNames {
        /// The name it asked for.
        user: String,
        /// The key's fingerprint.
        key: String,
        /// How many names the key holds (more than `max` after a reload lowered it).
        held: usize,
        /// The limit.
        max: usize,
    },
    /// The relay bound as many new names in the last minute as it takes
    /// (`new_names_per_minute`); try again later.
    RegistrationRate {
        /// The limit.
        max: usize,
    },
}

impl std::fmt::Display for RelayError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RelayError::Malformed(e) => write!(f, "malformed frame: {e}"),
            RelayError::Unexpected { expected, got } => {
                write!(f, "protocol violation: expected {expected}, got {got}")
            }
            RelayError::BadLogin(e) => write!(f, "login refused: {e}"),
            RelayError::Storage(e) => write!(f, "login failed: {e}"),
            RelayError::NameTaken {
                user,
                bound,
                offered,
            } => write!(
                f,
                "name {user} is bound to key {bound}; key {offered} cannot use it \
                 (if the owner lost their key, the relay operator can run `chatctl forget {user}`)"
            ),
            RelayError::TooManyNames {
                user,
                key,
                held,
                max,
            } => write!(
                f,
                "cannot register {user}: key {key} already holds {held} names, and this relay \
                 allows one key {max} (max_names_per_key)"
            ),
            RelayError::RegistrationRate { max } => write!(
                f,
                "this relay registers at most {max} new names a minute (new_names_per_minute); \
                 try again in a minute"
            ),
        }
    }
}

impl std::error::Error for RelayError {}

impl RelayError {
    pub(super) fn code(&self) -> ErrorCode {
        match self {
            RelayError::Malformed(_) | RelayError::Unexpected { .. } => ErrorCode::Protocol,
            RelayError::BadLogin(_) => ErrorCode::BadLogin,
            RelayError::Storage(_) => ErrorCode::Storage,
            RelayError::NameTaken { .. } => ErrorCode::NameTaken,
            RelayError::TooManyNames { .. } => ErrorCode::TooManyNames,
            RelayError::RegistrationRate { .. } => ErrorCode::RegistrationRate,
        }
    }
}
