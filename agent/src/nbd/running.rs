//! A running VM's disk as a source (`--qmp SOCKET --node NAME`): its
//! dirty bitmaps kept over QMP, and the node read through QEMU's own NBD
//! server (`nbd-server-start`, `block-export-add`) on a private socket.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use diskferry_protocol::ErrorCode;
use diskferry_sync_engine::Error;
use serde_json::{json, Value};

use super::bitmap::{Bitmap, BitmapStore};
use super::leftover::{self, OwnedDir};
use super::qmp::Qmp;
use super::storage_daemon::Daemon;
use super::url::{NbdUrl, Transport};

/// Exports diskferry made carry this id prefix; a killed agent's leftovers
/// are removed by the next pass.
const EXPORT_PREFIX: &str = "diskferry-";
/// The name of every socket directory begins so.
const PREFIX: &str = "diskferry-qmp-";

/// A running VM's block node, over one shared QMP connection.
#[derive(Clone, Debug)]
pub struct Node {
    pub qmp: Arc<Mutex<Qmp>>,
    pub name: String,
    socket: PathBuf,
    /// An image at rest served by diskferry's own daemon (quit when the
    /// last clone of its node drops), rather than a VM's disk.
    at_rest: Option<(PathBuf, Arc<Daemon>)>,
}

impl Node {
    /// Checks that `name` is a block node of the VM at `qmp`.
    pub fn open(qmp: Qmp, socket: &Path, name: &str) -> Result<Node, Error> {
        let node = Node {
            qmp: Arc::new(Mutex::new(qmp)),
            name: name.to_string(),
            socket: socket.to_path_buf(),
            at_rest: None,
        };
        node.info()?;
        Ok(node)
    }

    /// Node `name` of `image`, served by `daemon` (which this node keeps).
    pub(super) fn open_served(
        qmp: Arc<Mutex<Qmp>>,
        socket: &Path,
        name: &str,
        image: &Path,
        daemon: Daemon,
    ) -> Result<Node, Error> {
        let at_rest = Some((image.to_path_buf(), Arc::new(daemon)));
        let node = Node { qmp, name: name.to_string(), socket: socket.to_path_buf(), at_rest };
        node.info()?;
        Ok(node)
    }

    /// The monitor's socket.
    pub fn qmp_socket(&self) -> &Path {
        &self.socket
    }

    /// The image, when it is at rest and served by diskferry's own daemon.
    pub fn image_at_rest(&self) -> Option<&Path> {
        self.at_rest.as_ref().map(|(image, _)| image.as_path())
    }

    fn run(&self, command: &str, arguments: Value) -> Result<Value, Error> {
        self.qmp.lock().unwrap_or_else(|p| p.into_inner()).run(command, arguments)
    }

    /// The node's entry in `query-named-block-nodes`.
    fn info(&self) -> Result<Value, Error> {
        let nodes = self.run("query-named-block-nodes", json!({ "flat": true }))?;
        let list = nodes.as_array().cloned().unwrap_or_default();
        let found = list.iter().find(|n| n["node-name"] == self.name.as_str()).cloned();
        found.ok_or_else(|| {
            let names: Vec<&str> = list.iter().filter_map(|n| n["node-name"].as_str()).collect();
            Error::new(
                ErrorCode::NotFound,
                format!("the VM has no block node {:?} (it has: {})", self.name, names.join(", ")),
            )
            .hint("--node names the disk's format node (qcow2), as `query-named-block-nodes` lists it")
        })
    }

    /// How many bytes the bitmap `name` marks dirty (it only grows).
    pub fn dirty_bytes(&self, name: &str) -> Result<u64, Error> {
        let info = self.info()?;
        let bitmaps = info["dirty-bitmaps"].as_array().cloned().unwrap_or_default();
        let b = bitmaps.iter().find(|b| b["name"] == name);
        b.and_then(|b| b["count"].as_u64())
            .ok_or_else(|| Error::new(ErrorCode::NotFound, format!("the bitmap {name} left node {}", self.name)))
    }

    fn transaction(&self, actions: Vec<Value>) -> Result<(), Error> {
        self.run("transaction", json!({ "actions": actions })).map(|_| ())
    }

    fn action(&self, kind: &str, mut data: Value) -> Value {
        data["node"] = json!(self.name);
        json!({ "type": kind, "data": data })
    }
}

impl BitmapStore for Node {
    fn list(&mut self) -> Result<Vec<Bitmap>, Error> {
        let info = self.info()?;
        let bitmaps = info["dirty-bitmaps"].as_array().cloned().unwrap_or_default();
        Ok(bitmaps
            .iter()
            .filter_map(|b| {
                Some(Bitmap {
                    name: b["name"].as_str()?.to_string(),
                    inconsistent: b["inconsistent"].as_bool().unwrap_or(false),
                    recording: b["recording"].as_bool().unwrap_or(false),
                })
            })
            .collect())
    }

    /// One transaction: QEMU drains the guest's I/O around it, so every
    /// write lands in exactly one of the old bitmaps or the new one.
    fn start(&mut self, pending: &str, stop: &[String]) -> Result<(), Error> {
        let mut actions = vec![self.action("block-dirty-bitmap-add", json!({ "name": pending, "persistent": true }))];
        actions.extend(stop.iter().map(|s| self.action("block-dirty-bitmap-disable", json!({ "name": s }))));
        self.transaction(actions)
    }

    fn union(&mut self, into: &str, from: &[String]) -> Result<(), Error> {
        self.transaction(vec![
            self.action("block-dirty-bitmap-add", json!({ "name": into, "disabled": true })),
            self.action("block-dirty-bitmap-merge", json!({ "target": into, "bitmaps": from })),
        ])
    }

    fn rename(&mut self, from: &str, to: &str) -> Result<(), Error> {
        self.transaction(vec![
            self.action("block-dirty-bitmap-add", json!({ "name": to, "persistent": true })),
            self.action("block-dirty-bitmap-merge", json!({ "target": to, "bitmaps": [from] })),
            self.action("block-dirty-bitmap-remove", json!({ "name": from })),
        ])
    }

    /// One transaction: every write is in `into` or still in one of `from`.
    fn collapse(&mut self, into: &str, from: &[String]) -> Result<(), Error> {
        let mut actions = Vec::new();
        if !from.is_empty() {
            actions.push(self.action("block-dirty-bitmap-merge", json!({ "target": into, "bitmaps": from })));
        }
        actions.push(self.action("block-dirty-bitmap-enable", json!({ "name": into })));
        actions.extend(from.iter().map(|f| self.action("block-dirty-bitmap-remove", json!({ "name": f }))));
        self.transaction(actions)
    }

    fn remove(&mut self, name: &str) -> Result<(), Error> {
        self.run("block-dirty-bitmap-remove", json!({ "node": self.name, "name": name })).map(|_| ())
    }
}

/// The node exported read-only by QEMU's NBD server on a socket in a
/// private directory; the export and the server are stopped when dropped.
#[derive(Debug)]
pub struct Export {
    node: Node,
    id: String,
    dir: OwnedDir,
}

impl Export {
    /// Exports the node as `disk`, with `bitmap` (a bitmap that does not
    /// record: QEMU refuses a recording one on a read-only export).
    pub fn start(node: &Node, bitmap: Option<&str>) -> Result<(Export, NbdUrl), Error> {
        // Under systemd, /tmp is the unit's own (PrivateTmp): QEMU, outside
        // it, must find the socket in the runtime directory.
        let parent = std::env::var_os("RUNTIME_DIRECTORY").map(PathBuf::from).unwrap_or_else(|| "/tmp".into());
        // A killed push's directory is left, its socket stale (the next
        // push restarts the server on its own).
        leftover::remove_orphans(&parent, PREFIX, None);
        let dir = OwnedDir::new(&parent, PREFIX)
            .map_err(|e| Error::new(ErrorCode::Io, format!("a directory for QEMU's NBD socket: {e}")))?;
        let socket: PathBuf = dir.path().join("s");
        node.clear_leftovers()?;
        let addr = json!({ "addr": { "type": "unix", "data": { "path": socket } } });
        let started = node.qmp.lock().unwrap_or_else(|p| p.into_inner()).execute("nbd-server-start", addr.clone())?;
        if let Err(refusal) = started {
            // A server with no exports but diskferry's is a killed
            // agent's: restart it on this socket. Anyone else's stays.
            let exports = node.run("query-block-exports", json!({}))?;
            if exports.as_array().is_some_and(|e| !e.is_empty()) {
                return Err(Error::new(
                    ErrorCode::Busy,
                    format!("QEMU's NBD server already runs with exports of its own ({})", refusal.desc),
                )
                .hint("QEMU runs one NBD server: stop the other user's (nbd-server-stop) or push at another time"));
            }
            node.run("nbd-server-stop", json!({}))?;
            node.run("nbd-server-start", addr)?;
        }
        let id = format!("{EXPORT_PREFIX}{:016x}", rand::random::<u64>());
        let mut args = json!({ "type": "nbd", "id": id, "node-name": node.name, "name": "disk", "writable": false });
        if let Some(b) = bitmap {
            args["bitmaps"] = json!([b]);
        }
        let export = Export { node: node.clone(), id: id.clone(), dir };
        node.run("block-export-add", args)?;
        let url = NbdUrl { transport: Transport::Unix(socket), export: "disk".into() };
        Ok((export, url))
    }

    /// The directory holding the socket.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The node it exports.
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// The NBD server's socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("s")
    }
}

/// The byte ranges the recording bitmap `name` marks now: a frozen copy of
/// it exported beside the source on the NBD server at `socket` (QEMU
/// exports no recording bitmap read-only), read, and dropped.
pub fn written_ranges(node: &Node, socket: &Path, name: &str) -> Result<Vec<(u64, u64)>, Error> {
    let id = format!("{:016x}", rand::random::<u64>());
    let copy = format!("diskferry-union-{id}");
    let mut store = node.clone();
    store.union(&copy, &[name.to_string()])?;
    let export_id = format!("{EXPORT_PREFIX}{id}");
    let added = node.run(
        "block-export-add",
        json!({ "type": "nbd", "id": export_id, "node-name": node.name, "name": copy, "writable": false, "bitmaps": [copy] }),
    );
    let ranges = added.and_then(|_| {
        let url = NbdUrl { transport: Transport::Unix(socket.to_path_buf()), export: copy.clone() };
        let source = super::connect::connect(&url, Some(&copy), None)?;
        let ctx = source
            .export()
            .context(&format!("qemu:dirty-bitmap:{copy}"))
            .ok_or_else(|| Error::new(ErrorCode::Protocol, "QEMU did not export the bitmap asked for"))?;
        super::connect::dirty_extents(&source, ctx)
    });
    let _ = node.run("block-export-del", json!({ "id": export_id, "mode": "hard" }));
    wait_export_gone(&mut node.qmp.lock().unwrap_or_else(|p| p.into_inner()), &export_id);
    let _ = store.remove(&copy);
    ranges
}

/// Waits (a while) until QEMU has let go of export `id`: until then its
/// bitmap is busy and cannot be removed.
fn wait_export_gone(q: &mut Qmp, id: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        let gone = match q.execute("query-block-exports", json!({})) {
            Ok(Ok(v)) => !v.as_array().is_some_and(|a| a.iter().any(|e| e["id"] == id)),
            _ => true,
        };
        if gone {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

impl Node {
    /// Removes the exports an earlier, killed agent left behind, and waits
    /// until QEMU let go of them (their bitmaps are busy until then).
    pub fn clear_leftovers(&self) -> Result<(), Error> {
        let exports = self.run("query-block-exports", json!({}))?;
        for e in exports.as_array().cloned().unwrap_or_default() {
            let Some(id) = e["id"].as_str().filter(|id| id.starts_with(EXPORT_PREFIX)) else { continue };
            if !e["shutting-down"].as_bool().unwrap_or(false) {
                self.run("block-export-del", json!({ "id": id, "mode": "hard" }))?;
            }
            wait_export_gone(&mut self.qmp.lock().unwrap_or_else(|p| p.into_inner()), id);
        }
        Ok(())
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        let mut q = self.node.qmp.lock().unwrap_or_else(|p| p.into_inner());
        let del = q.execute("block-export-del", json!({ "id": self.id, "mode": "hard" }));
        wait_export_gone(&mut q, &self.id);
        let stop = q.execute("nbd-server-stop", json!({}));
        if !matches!((&del, &stop), (Ok(Ok(_)), Ok(Ok(_)))) {
            tracing::warn!("stopping QEMU's NBD export {}: {del:?} {stop:?}", self.id);
        }
    }
}
