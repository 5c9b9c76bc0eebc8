//! A blocking client of the agent's status API: `diskferry status`, the
//! local commands that report their jobs or ask for a target's release
//! (over the agent's unix socket), and the tests (over TCP).
//!
//! Written here, not taken from hyper's client: callers are plain threads,
//! some of them inside a tokio runtime (where a runtime of a client's own
//! cannot block), and the requests are a few small JSON exchanges with our
//! own axum server over one connection each.

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use diskferry_protocol::ErrorCode;
use diskferry_sync_engine::Error;
use serde_json::Value;

/// Where the API is.
#[derive(Clone, Copy, Debug)]
pub enum Addr<'a> {
    /// The agent's unix socket (no token: the file's mode is the check).
    Unix(&'a Path),
    Tcp(std::net::SocketAddr),
}

/// An answer: the HTTP status and the body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

impl Answer {
    /// The body as JSON (`Null` when empty).
    pub fn json(&self) -> Result<Value, Error> {
        if self.body.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&self.body)
            .map_err(|e| Error::new(ErrorCode::Protocol, format!("the agent's answer is not JSON: {e}")))
    }
}

/// One request; `body` is sent as JSON. `timeout` bounds each read and write.
pub fn request(
    addr: Addr<'_>,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
    timeout: Duration,
) -> Result<Answer, Error> {
    let io = |e: std::io::Error| Error::new(ErrorCode::Connection, format!("the agent's status API: {e}"));
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: agent\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let raw = match addr {
        Addr::Unix(socket) => {
            let s = std::os::unix::net::UnixStream::connect(socket).map_err(|e| {
                Error::new(ErrorCode::NotFound, format!("no agent answers at {} ({e})", socket.display()))
                    .hint("start `diskferry serve` with this state directory (or give --config / --state-dir)")
            })?;
            s.set_write_timeout(Some(timeout)).map_err(io)?;
            exchange(s, &head, &body, timeout, |s, t| s.set_read_timeout(t)).map_err(io)?
        }
        Addr::Tcp(a) => {
            let s = std::net::TcpStream::connect_timeout(&a, timeout).map_err(io)?;
            s.set_write_timeout(Some(timeout)).map_err(io)?;
            exchange(s, &head, &body, timeout, |s, t| s.set_read_timeout(t)).map_err(io)?
        }
    };
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n");
    let (head, rest) = match split {
        Some(at) => (&raw[..at], &raw[at + 4..]),
        None => (&raw[..], &[][..]),
    };
    let head = String::from_utf8_lossy(head);
    let status =
        head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or_else(|| {
            Error::new(ErrorCode::Protocol, format!("the agent's answer to {method} {path} is not HTTP"))
        })?;
    let body = match head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        true => dechunk(rest),
        false => rest.to_vec(),
    };
    Ok(Answer { status, body: String::from_utf8_lossy(&body).into_owned() })
}

/// `GET path`, requiring 200 and JSON.
pub fn get_json(addr: Addr<'_>, path: &str, token: Option<&str>) -> Result<Value, Error> {
    let a = request(addr, "GET", path, token, None, Duration::from_secs(10))?;
    if a.status != 200 {
        return Err(Error::new(ErrorCode::Protocol, format!("GET {path}: HTTP {}: {}", a.status, a.body)));
    }
    a.json()
}

/// The largest answer read (the job list of 200 jobs is about 100 KiB).
const MAX_ANSWER: usize = 16 << 20;

/// Sends the request and reads the answer until the server closes, within
/// `timeout` in all (a server trickling bytes does not hold the caller).
fn exchange<S: Read + Write>(
    mut s: S,
    head: &str,
    body: &str,
    timeout: Duration,
    set_read_timeout: impl Fn(&S, Option<Duration>) -> std::io::Result<()>,
) -> std::io::Result<Vec<u8>> {
    let deadline = std::time::Instant::now() + timeout;
    s.write_all(head.as_bytes())?;
    s.write_all(body.as_bytes())?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 << 10];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "the answer took too long"));
        }
        set_read_timeout(&s, Some(left))?;
        match s.read(&mut buf) {
            Ok(0) => return Ok(raw),
            Ok(n) if raw.len() + n > MAX_ANSWER => {
                return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "the answer is too large"))
            }
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// The body of a chunked HTTP/1.1 answer (what parses of it).
fn dechunk(mut rest: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&rest[..eol]).ok();
        let Some(n) = size.and_then(|s| usize::from_str_radix(s.trim(), 16).ok()) else { break };
        let after = &rest[eol + 2..];
        let Some(chunk) = after.get(..n).filter(|_| n > 0) else { break };
        out.extend_from_slice(chunk);
        rest = after[n..].strip_prefix(b"\r\n").unwrap_or(&after[n..]);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn dechunks() {
        assert_eq!(super::dechunk(b"4\r\nWiki\r\n5\r\npedia\r\n0\r\n\r\n"), b"Wikipedia");
        assert_eq!(super::dechunk(b"zz\r\n"), b"");
        // A hostile size: inside a character, past the end, absurd.
        assert_eq!(super::dechunk("1\r\n\u{e9}\r\n".as_bytes()), vec![0xc3]);
        assert_eq!(super::dechunk(b"ff\r\nshort"), b"");
        assert_eq!(super::dechunk(b"ffffffffffffffffffff\r\nx"), b"");
    }
}
