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
            s.set_read_timeout(Some(timeout)).map_err(io)?;
            s.set_write_timeout(Some(timeout)).map_err(io)?;
            exchange(s, &head, &body).map_err(io)?
        }
        Addr::Tcp(a) => {
            let s = std::net::TcpStream::connect_timeout(&a, timeout).map_err(io)?;
            s.set_read_timeout(Some(timeout)).map_err(io)?;
            s.set_write_timeout(Some(timeout)).map_err(io)?;
            exchange(s, &head, &body).map_err(io)?
        }
    };
    let text = String::from_utf8_lossy(&raw);
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status =
        head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or_else(|| {
            Error::new(ErrorCode::Protocol, format!("the agent's answer to {method} {path} is not HTTP"))
        })?;
    let body = match head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        true => dechunk(rest),
        false => rest.to_string(),
    };
    Ok(Answer { status, body })
}

/// `GET path`, requiring 200 and JSON.
pub fn get_json(addr: Addr<'_>, path: &str, token: Option<&str>) -> Result<Value, Error> {
    let a = request(addr, "GET", path, token, None, Duration::from_secs(10))?;
    if a.status != 200 {
        return Err(Error::new(ErrorCode::Protocol, format!("GET {path}: HTTP {}: {}", a.status, a.body)));
    }
    a.json()
}

fn exchange<S: Read + Write>(mut s: S, head: &str, body: &str) -> std::io::Result<Vec<u8>> {
    s.write_all(head.as_bytes())?;
    s.write_all(body.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    Ok(raw)
}

/// The body of a chunked HTTP/1.1 answer.
fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { break };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn dechunks() {
        assert_eq!(super::dechunk("4\r\nWiki\r\n5\r\npedia\r\n0\r\n\r\n"), "Wikipedia");
        assert_eq!(super::dechunk("zz\r\n"), "");
    }
}
