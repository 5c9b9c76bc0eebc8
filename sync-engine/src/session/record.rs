//! The source's record of what it last sent to a (peer, target): the
//! manifest of the last committed push, kept in the source agent's state
//! directory (`STATE/sent/<target>-<16 hex>/<generation>.dfm`), so the next
//! push can tell the target which generation it believes the target holds.
//! Only a note: it is written without fsync and losing it costs nothing.

use std::path::PathBuf;
use std::sync::Arc;

use diskferry_protocol::{Consistency, Generation, Geometry};

use crate::error::{IoContext, Place, Result};
use crate::manifest::{ManifestMeta, ManifestWriter};
use crate::store::Vfs;

const SENDING: &str = "sending.tmp";

/// Where the record of one (peer, target) lives.
#[derive(Clone, Debug)]
pub struct SentRecord {
    dir: PathBuf,
    last: Option<Generation>,
}

impl SentRecord {
    /// The record of `target` on the peer with `peer_fingerprint`, under
    /// `state_root`; `None` (with a warning) if it cannot be kept there.
    pub fn open(vfs: &dyn Vfs, state_root: &std::path::Path, peer_fingerprint: &str, target: &str) -> Option<Self> {
        let key = blake3::hash(format!("{peer_fingerprint}/{target}").as_bytes());
        let dir = state_root.join("sent").join(format!("{target}-{}", &key.to_hex()[..16]));
        if let Err(e) = vfs.create_dir_all(&dir) {
            tracing::warn!("cannot keep a record of what is sent in {}: {e}", dir.display());
            return None;
        }
        let last =
            vfs.list_dir(&dir).ok()?.iter().filter_map(|n| n.strip_suffix(".dfm").and_then(|g| g.parse().ok())).next();
        Some(SentRecord { dir, last })
    }

    /// The generation of the last committed push.
    pub fn last_generation(&self) -> Option<Generation> {
        self.last
    }

    /// A manifest writer for the push that starts.
    pub fn writer(&self, vfs: Arc<dyn Vfs>, g: Geometry) -> Result<ManifestWriter> {
        ManifestWriter::create(vfs, &self.dir.join(SENDING), g)
    }

    /// Keeps `w` as the record of `generation`, replacing the older ones.
    pub fn commit(
        &self,
        vfs: &dyn Vfs,
        w: ManifestWriter,
        generation: Generation,
        consistency: Consistency,
        now_unix_ns: i64,
    ) {
        let meta = ManifestMeta { generation, parent: None, consistency, created_unix_ns: now_unix_ns };
        if w.finish_with(meta, false).is_err() {
            return;
        }
        let old: Vec<String> =
            vfs.list_dir(&self.dir).unwrap_or_default().into_iter().filter(|n| n.ends_with(".dfm")).collect();
        let to = self.dir.join(format!("{generation}.dfm"));
        if vfs.rename(&self.dir.join(SENDING), &to).ctx(Place::State, "renaming", &to).is_ok() {
            for name in old.iter().filter(|n| **n != format!("{generation}.dfm")) {
                let _ = vfs.remove_file(&self.dir.join(name));
            }
        }
    }
}
