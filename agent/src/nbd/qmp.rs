//! A QMP client: JSON lines over QEMU's monitor socket. Written here rather
//! than taken from the `qapi` crate because diskferry needs six commands
//! and their plain JSON, not a generated binding pinned to one QEMU schema.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use diskferry_protocol::ErrorCode;
use diskferry_sync_engine::Error;
use serde_json::{json, Value};

/// How long QEMU may take to answer one command: a transaction drains the
/// guest's in-flight I/O first, which under TCG can take seconds.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// One QMP connection, past its capabilities handshake.
#[derive(Debug)]
pub struct Qmp {
    socket: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Each command's id: a late answer (after a timeout) is never taken
    /// for a later command's.
    next_id: u64,
}

/// A command QEMU refused: its class and description.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub class: String,
    pub desc: String,
}

impl Qmp {
    /// Connects to the monitor at `socket`. `Ok(None)` when no QEMU listens
    /// there (the socket is gone or refuses: the VM is not running).
    pub fn connect(socket: &Path) -> Result<Option<Qmp>, Error> {
        // QEMU listens again a moment after its last client left; a socket
        // that still refuses after that is a VM that stopped (killed: a
        // clean exit removes the socket).
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(s) => break s,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    if std::time::Instant::now() > deadline {
                        return Ok(None);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(qmp_error(socket, format!("cannot connect: {e}"))),
            }
        };
        let io = |e: io::Error| qmp_error(socket, e.to_string());
        stream.set_read_timeout(Some(ANSWER_TIMEOUT)).map_err(io)?;
        stream.set_write_timeout(Some(ANSWER_TIMEOUT)).map_err(io)?;
        let writer = stream.try_clone().map_err(io)?;
        let mut q = Qmp { socket: socket.to_path_buf(), reader: BufReader::new(stream), writer, next_id: 1 };
        // QEMU serves one client per monitor: a second one waits in the
        // listen queue and never sees the greeting.
        let greeting = q.line().map_err(|e| {
            Error::new(ErrorCode::Busy, format!("QMP {}: no greeting from QEMU ({e})", socket.display()))
                .hint("another client (libvirt?) holds this monitor: give diskferry a QMP socket of its own (-qmp unix:PATH,server=on,wait=off)")
        })?;
        if greeting.get("QMP").is_none() {
            return Err(qmp_error(socket, format!("not a QMP greeting: {greeting}")));
        }
        q.execute("qmp_capabilities", json!({}))?
            .map_err(|r| qmp_error(socket, format!("qmp_capabilities: {}", r.desc)))?;
        Ok(Some(q))
    }

    /// The next message that is not an event.
    fn line(&mut self) -> io::Result<Value> {
        let mut line = String::new();
        loop {
            line.clear();
            if self.reader.read_line(&mut line)? == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "QEMU closed the monitor"));
            }
            let v: Value = serde_json::from_str(&line)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{e}: {}", line.trim())))?;
            if v.get("event").is_none() {
                return Ok(v);
            }
        }
    }

    /// Runs `command`: its `return` value, or QEMU's refusal. A lost or
    /// garbled monitor is an error of its own.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Result<Value, Refusal>, Error> {
        let id = self.next_id;
        self.next_id += 1;
        let msg = json!({ "execute": command, "arguments": arguments, "id": id });
        let sent = writeln!(self.writer, "{msg}");
        let answer = sent
            .and_then(|()| loop {
                let a = self.line()?;
                if a.get("id").and_then(Value::as_u64) == Some(id) {
                    break Ok(a);
                }
            })
            .map_err(|e| qmp_error(&self.socket, format!("{command}: {e}")))?;
        if let Some(r) = answer.get("return") {
            return Ok(Ok(r.clone()));
        }
        let err = &answer["error"];
        Ok(Err(Refusal {
            class: err["class"].as_str().unwrap_or("?").to_string(),
            desc: err["desc"].as_str().unwrap_or("(no description)").to_string(),
        }))
    }

    /// [`Qmp::execute`] where a refusal is an error too.
    pub fn run(&mut self, command: &str, arguments: Value) -> Result<Value, Error> {
        self.execute(command, arguments)?.map_err(|r| {
            Error::new(ErrorCode::InvalidInput, format!("QMP {command} refused: {}", r.desc))
                .hint("check --node against `query-named-block-nodes`, and that QEMU is 6.0 or newer")
        })
    }

    /// The monitor's socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

fn qmp_error(socket: &Path, what: String) -> Error {
    Error::new(ErrorCode::Connection, format!("QMP {}: {what}", socket.display()))
        .hint("check --qmp: it names the running VM's QMP socket")
}
