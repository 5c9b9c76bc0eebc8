//! NBD URLs (the subset of the NBD URI standard that QEMU and libnbd use):
//! `nbd+unix:///EXPORT?socket=PATH` and `nbd://HOST[:PORT]/EXPORT`.

use std::fmt;
use std::path::PathBuf;

/// How to reach the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transport {
    /// A unix socket.
    Unix(PathBuf),
    /// `HOST:PORT`.
    Tcp(String),
}

/// A parsed NBD URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdUrl {
    /// Where the server listens.
    pub transport: Transport,
    /// The export name (may be empty: the server's default export).
    pub export: String,
}

/// Whether a source argument names an NBD export rather than a file.
pub fn is_nbd_url(s: &str) -> bool {
    s.starts_with("nbd://") || s.starts_with("nbd+unix://")
}

impl std::str::FromStr for NbdUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<NbdUrl, String> {
        if let Some(rest) = s.strip_prefix("nbd+unix://") {
            let (path, query) = rest.split_once('?').ok_or("nbd+unix:// needs ?socket=PATH")?;
            let export =
                path.strip_prefix('/').ok_or("nbd+unix:///EXPORT?socket=PATH: the export follows the third /")?;
            let socket = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("socket="))
                .filter(|p| !p.is_empty())
                .ok_or("nbd+unix:// needs ?socket=PATH")?;
            return Ok(NbdUrl { transport: Transport::Unix(PathBuf::from(socket)), export: export.to_string() });
        }
        if let Some(rest) = s.strip_prefix("nbd://") {
            let (host, export) = rest.split_once('/').unwrap_or((rest, ""));
            if host.is_empty() {
                return Err("nbd://HOST[:PORT]/EXPORT needs a host".into());
            }
            // A bare host gets NBD's port; [v6]:port and host:port stay.
            let has_port = match host.rsplit_once(':') {
                Some((h, p)) => p.parse::<u16>().is_ok() && (!h.contains(':') || h.ends_with(']')),
                None => false,
            };
            let addr = if has_port { host.to_string() } else { format!("{host}:10809") };
            return Ok(NbdUrl { transport: Transport::Tcp(addr), export: export.to_string() });
        }
        Err("an NBD URL starts with nbd:// or nbd+unix://".into())
    }
}

impl fmt::Display for NbdUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.transport {
            Transport::Unix(p) => write!(f, "nbd+unix:///{}?socket={}", self.export, p.display()),
            Transport::Tcp(a) => write!(f, "nbd://{a}/{}", self.export),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u: NbdUrl = "nbd+unix:///disk0?socket=/run/q.sock".parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(u.transport, Transport::Unix("/run/q.sock".into()));
        assert_eq!(u.export, "disk0");
        assert_eq!(u.to_string(), "nbd+unix:///disk0?socket=/run/q.sock");
        let u: NbdUrl = "nbd://127.0.0.1:10900/vm".parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((u.transport, u.export.as_str()), (Transport::Tcp("127.0.0.1:10900".into()), "vm"));
        let u: NbdUrl = "nbd://host".parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((u.transport, u.export.as_str()), (Transport::Tcp("host:10809".into()), ""));
        let u: NbdUrl = "nbd://[::1]:99/x".parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(u.transport, Transport::Tcp("[::1]:99".into()));
        for bad in ["nbd+unix:///x", "nbd+unix://x?socket=/s", "nbd:///x", "http://x", "nbd+unix:///x?socket="] {
            assert!(bad.parse::<NbdUrl>().is_err(), "{bad}");
        }
        assert!(is_nbd_url("nbd://h/x") && !is_nbd_url("/dev/sda"));
    }
}
