//! Why an NBD request failed, and the lock helper the client and its
//! reader thread share.

use std::sync::Mutex;

use diskferry_protocol::nbd::NbdError;

/// Why a request failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The server broke the protocol or failed the request.
    #[error(transparent)]
    Nbd(#[from] NbdError),
    /// The connection failed or was closed.
    #[error("NBD connection to {url}: {message}")]
    Connection {
        /// The server.
        url: String,
        /// What happened.
        message: String,
    },
    /// No answer in time.
    #[error("the NBD server at {url} did not answer within {secs} s")]
    Timeout {
        /// The server.
        url: String,
        /// The timeout.
        secs: u64,
    },
}

impl From<ClientError> for std::io::Error {
    fn from(e: ClientError) -> Self {
        let kind = match &e {
            ClientError::Timeout { .. } => std::io::ErrorKind::TimedOut,
            ClientError::Connection { .. } => std::io::ErrorKind::ConnectionAborted,
            ClientError::Nbd(NbdError::Command { .. }) => std::io::ErrorKind::Other,
            ClientError::Nbd(_) => std::io::ErrorKind::InvalidData,
        };
        std::io::Error::new(kind, e)
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
