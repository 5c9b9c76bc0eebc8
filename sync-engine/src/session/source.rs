//! The source side of a session, for local and network syncs alike: hash
//! the source region by region (a full copy hands every non-zero block on
//! as it is hashed), read the blocks the target wants and build their
//! frames, tell whether the source stayed still, and record what was sent
//! as the disk's history (`history.rs`).
//!
//! A driver feeds it from [`diskferry_protocol::session::SenderSession`]'s
//! events: `Accepted` → [`SourceSession::set_link`] and
//! [`SourceSession::hash_region`] per window token, `SendBlocks`/`Resend` →
//! [`SourceSession::frames`], before `Finish` →
//! [`SourceSession::consistency`], `Committed` →
//! [`SourceSession::commit_history`]. Its methods take `&self` and may run
//! on several threads at once.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use diskferry_protocol::message::{Message, WantBlock};
use diskferry_protocol::session::SourceRegion;
use diskferry_protocol::{BlockHash, BlockSize, Consistency, ErrorCode, Generation, Geometry, RegionHashes};

use super::hinted::{self, Hinted, Offer};
use super::lineage::lineage_of;
use crate::block::VerifiedSlice;
use crate::changes::{ChangeHint, HintOutcome, SpotCheck};
use crate::disk::Disk;
use crate::error::{Error, IoContext, Place, Result};
use crate::hash::{hash_block, hash_blocks_counted};
use crate::history::HistoryWriter;
use crate::manifest::ManifestMeta;
use crate::remote::{block_frame, whole_block_frame, WireFrame};
use crate::store::{Meta, Vfs};
use crate::tree::region_nodes;

/// The consumer of a full copy's items stopped (the session ended, or the
/// local target failed: its driver keeps that error).
fn ended(e: io::Error) -> Error {
    Error::new(ErrorCode::Cancelled, format!("the session ended while the source was read: {e}"))
}

/// What a full copy hands on while it hashes a region.
#[derive(Debug)]
pub enum Item<'a> {
    /// A non-zero block, with the bytes that were hashed.
    Block(VerifiedSlice<'a>),
    /// Blocks `first..first+count` are zeros (sent after the region's blocks).
    Zero {
        /// First block.
        first: u64,
        /// Number of blocks.
        count: u64,
    },
}

/// Where a full copy's items go while a region is hashed (from the hashing threads).
pub type ItemSink<'a> = &'a (dyn Fn(Item<'_>) -> io::Result<()> + Sync);

/// How blocks travel, as the target accepted.
#[derive(Clone, Copy, Debug, Default)]
pub struct Link {
    /// zstd level for payloads (`None`: raw).
    pub level: Option<i32>,
    /// Whether the target takes page patches (else whole blocks).
    pub pages: bool,
}

/// The source side of one session.
#[derive(Debug)]
pub struct SourceSession {
    vfs: Arc<dyn Vfs>,
    path: PathBuf,
    disk: Arc<Disk>,
    geometry: Geometry,
    before: Meta,
    link: Mutex<Link>,
    changed_while_read: AtomicBool,
    bytes_sent: AtomicU64,
    /// The disk whose history this is (`path` may be a snapshot of it).
    origin: PathBuf,
    /// The agent's state directory, where the disk's history is kept.
    state_root: Option<PathBuf>,
    lineage: Vec<Generation>,
    writer: Mutex<Option<HistoryWriter>>,
    /// A change hint offered before the target answered.
    offered: Mutex<Option<(ChangeHint, SpotCheck)>>,
    /// The hint in use, once the target's generation matched it.
    hinted: OnceLock<Hinted>,
    outcome: Mutex<HintOutcome>,
    /// Source bytes read: hashing (holes are not read), the spot check,
    /// and the blocks read again to send them.
    bytes_read: AtomicU64,
}

impl SourceSession {
    /// Opens the source (`path` on `vfs`, or a disk already open) for a
    /// session with `block_size` blocks. With `state_root`, the disk's
    /// lineage is read from there and what was sent becomes its history.
    pub fn open(vfs: Arc<dyn Vfs>, path: &Path, block_size: BlockSize, state_root: Option<&Path>) -> Result<Self> {
        Self::open_as(vfs, path, path, block_size, state_root)
    }

    /// [`SourceSession::open`] reading `path` — a snapshot of the disk
    /// `origin` — while the lineage and history are `origin`'s. A snapshot
    /// is never the origin at rest: its history gets no at-rest stamp.
    pub fn open_as(
        vfs: Arc<dyn Vfs>,
        path: &Path,
        origin: &Path,
        block_size: BlockSize,
        state_root: Option<&Path>,
    ) -> Result<Self> {
        let before = vfs.metadata(path).ctx(Place::Source, "reading", path)?.ok_or_else(|| {
            Error::new(ErrorCode::NotFound, format!("source {} does not exist", path.display())).hint("check the path")
        })?;
        let disk = crate::disk::Disk::open_on(vfs.as_ref(), path).ctx(Place::Source, "opening", path)?;
        let geometry = Geometry::new(disk.len(), block_size);
        let lineage = match state_root {
            Some(root) => lineage_of(vfs.as_ref(), root, origin)?,
            None => Vec::new(),
        };
        Ok(SourceSession {
            vfs,
            path: path.to_path_buf(),
            origin: origin.to_path_buf(),
            disk: Arc::new(disk),
            geometry,
            before,
            link: Mutex::new(Link { level: None, pages: true }),
            changed_while_read: AtomicBool::new(false),
            bytes_sent: AtomicU64::new(0),
            state_root: state_root.map(Path::to_path_buf),
            lineage,
            writer: Mutex::new(None),
            offered: Mutex::new(None),
            hinted: OnceLock::new(),
            outcome: Mutex::new(HintOutcome::full_scan()),
            bytes_read: AtomicU64::new(0),
        })
    }

    /// The source is a snapshot taken for this push alone: its blocks read
    /// into a buffer go past the page cache ([`Disk::read_once`]).
    pub fn read_once(mut self) -> Self {
        self.disk = match Arc::try_unwrap(self.disk) {
            Ok(disk) => Arc::new(disk.read_once()),
            // Shared already (not after open): left as it is, only slower.
            Err(shared) => shared,
        };
        self
    }

    /// Offers a change hint: the session reads only what it names, once
    /// [`SourceSession::start_hint`] found it tied to the target's
    /// generation and the spot check found it honest.
    pub fn offer_hint(&self, hint: ChangeHint, spot: SpotCheck) {
        *self.offered.lock().unwrap_or_else(|p| p.into_inner()) = Some((hint, spot));
    }

    /// Settles the offered hint once the target answered (`Accept`): it is
    /// used only if the target holds the hint's generation, the disk's
    /// history recorded that generation's manifest at this size, and the
    /// spot check of clean blocks passes; else the disk is read in full and
    /// [`SourceSession::hint_outcome`] says why. Call before hashing.
    pub fn start_hint(&self, target_generation: Option<Generation>, full_copy: bool) -> Result<()> {
        let Some((hint, spot)) = self.offered.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return Ok(());
        };
        let offer = Offer {
            vfs: &self.vfs,
            state_root: self.state_root.as_deref(),
            origin: &self.origin,
            path: &self.path,
            disk: &self.disk,
            geometry: self.geometry,
        };
        let (hinted, outcome) = hinted::start(&offer, &hint, &spot, target_generation, full_copy, &self.bytes_read)?;
        if let Some(h) = hinted {
            // Offered once, so set once.
            let _ = self.hinted.set(h);
        }
        *self.outcome.lock().unwrap_or_else(|p| p.into_inner()) = outcome;
        Ok(())
    }

    /// What came of the hint (full scan when none was offered).
    pub fn hint_outcome(&self) -> HintOutcome {
        self.outcome.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Source bytes read so far (hashing, spot check, sending).
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read.load(Ordering::Relaxed)
    }

    /// The session's geometry.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// The source as first seen (identity, size, stamp).
    pub fn before(&self) -> &Meta {
        &self.before
    }

    /// The disk's lineage, newest first (`Open.lineage`): its history as a
    /// source, or its chain as a target of this agent.
    pub fn lineage(&self) -> &[Generation] {
        &self.lineage
    }

    /// How blocks travel (after the target accepted), and starts the record.
    pub fn set_link(&self, link: Link) -> Result<()> {
        *self.link.lock().unwrap_or_else(|p| p.into_inner()) = link;
        if let Some(root) = &self.state_root {
            let w = HistoryWriter::create(self.vfs.clone(), root, &self.origin, self.geometry, self.lineage.clone())?;
            *self.writer.lock().unwrap_or_else(|p| p.into_inner()) = Some(w);
        }
        Ok(())
    }

    fn link(&self) -> Link {
        *self.link.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Block payload bytes built so far.
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent.load(Ordering::Relaxed)
    }

    /// Notes that a block was read with other bytes than it was hashed with.
    pub fn note_changed(&self) {
        self.changed_while_read.store(true, Ordering::Relaxed);
    }

    /// Whether [`SourceSession::hash_region`] of `region` reads nothing (a
    /// hint calls the whole region clean): on a large sparse disk nearly
    /// every region is such, and handing each to a thread pool would cost
    /// more than taking its hashes from the record.
    pub fn reads_nothing(&self, region: u64, full: bool) -> bool {
        !full && self.hinted.get().is_some_and(|h| h.clean(&self.geometry, region))
    }

    /// Hashes region `region` on the current rayon pool. A full copy hands
    /// every non-zero block to `out` as it is hashed, then the region's zero
    /// runs; the region's `items` counts them. An error from `out` stops
    /// the hashing and is returned as it is.
    pub fn hash_region(&self, region: u64, full: Option<ItemSink<'_>>) -> Result<SourceRegion> {
        let g = self.geometry;
        if let (Some(h), None) = (self.hinted.get(), full) {
            if let Some(hashes) = h.region(&self.disk, &g, region, &self.path, &self.bytes_read)? {
                return self.region_of(region, hashes);
            }
        }
        let range = g.region_range(region);
        let items = AtomicU64::new(0);
        let out_failed = Mutex::new(None);
        let visit = |b: VerifiedSlice<'_>| -> io::Result<()> {
            let out = full.ok_or_else(|| io::Error::other("no consumer"))?;
            if let Err(e) = out(Item::Block(b)) {
                let msg = e.to_string();
                out_failed.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
                return Err(io::Error::other(msg));
            }
            items.fetch_add(1, Ordering::Relaxed);
            Ok(())
        };
        let visitor: Option<crate::hash::BlockVisitor<'_>> = full.map(|_| &visit as crate::hash::BlockVisitor<'_>);
        let hashes = match hash_blocks_counted(&self.disk, &g, range.clone(), visitor, &self.bytes_read) {
            Ok(h) => h,
            Err(e) => {
                if let Some(e) = out_failed.lock().unwrap_or_else(|p| p.into_inner()).take() {
                    return Err(ended(e));
                }
                return Err(Error::io(Place::Source, "reading", &self.path, e));
            }
        };
        if let Some(out) = full {
            // Zero runs travel as ranges: the target records them (and zeroes
            // a block device) without bytes on the wire.
            let mut i = 0;
            while i < hashes.len() {
                if !hashes[i].is_zero() {
                    i += 1;
                    continue;
                }
                let start = i;
                while i < hashes.len() && hashes[i].is_zero() {
                    i += 1;
                }
                out(Item::Zero { first: range.start + start as u64, count: (i - start) as u64 }).map_err(ended)?;
                items.fetch_add(1, Ordering::Relaxed);
            }
        }
        let mut r = self.region_of(region, hashes)?;
        r.items = items.load(Ordering::Relaxed) as u32;
        Ok(r)
    }

    /// The source disk (a local sync compares the target's bytes with it).
    pub fn disk(&self) -> &Disk {
        &self.disk
    }

    /// Fails with `E_SOURCE_CHANGED` if the source is now shorter than at open.
    pub fn check_size(&self) -> Result<()> {
        self.disk.check_size().ctx(Place::Source, "reading", &self.path)
    }

    /// A region hashed elsewhere (a local sync hashes while it compares):
    /// its tree nodes, and its place in the record.
    pub fn region_of(&self, region: u64, hashes: impl Into<RegionHashes>) -> Result<SourceRegion> {
        let hashes = hashes.into().compact();
        if let Some(w) = self.writer.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            w.push_region(region, &hashes)?;
        }
        // An empty region's chunks are all ZERO and not kept
        // (SourceRegion::chunk_hashes): thousands may be in flight.
        let (chunks, hash) = match hashes {
            RegionHashes::Zero(_) => (Vec::new(), BlockHash::ZERO),
            _ => region_nodes(&hashes),
        };
        Ok(SourceRegion { region, blocks: hashes, chunks, hash, items: 0 })
    }

    /// A full copy's item as a frame: a whole block (compressed when that
    /// pays, else its payload shared with the map), or a zero range.
    pub fn encode(&self, item: &Item<'_>) -> WireFrame {
        match item {
            Item::Block(b) => {
                let (frame, payload) = whole_block_frame(b, self.link().level);
                self.bytes_sent.fetch_add(payload, Ordering::Relaxed);
                frame
            }
            Item::Zero { first, count } => Message::Zero { first: *first, count: *count }.to_bytes().into(),
        }
    }

    /// Reads block `index` as it is now; a block whose bytes no longer hash
    /// to `expected` (what was announced for it) marks the push fuzzy, and
    /// the target gets what is there now.
    pub fn read_block(&self, index: u64, expected: Option<BlockHash>) -> Result<Vec<u8>> {
        let g = self.geometry;
        if index >= g.block_count() {
            return Err(Error::new(ErrorCode::Protocol, format!("the target asked for block {index}")));
        }
        let mut bytes = vec![0u8; g.block_len(index) as usize];
        self.disk.read_at(g.block_offset(index), &mut bytes).ctx(Place::Source, "reading", &self.path)?;
        self.bytes_read.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        if expected.is_some_and(|e| e != hash_block(&bytes)) {
            self.note_changed();
        }
        Ok(bytes)
    }

    /// The frames of wanted blocks, each carrying only the pages whose hash
    /// differs from the target's (whole blocks when it gave none), handed to
    /// `out` in order; `out` returns `false` to stop. `expected[i]` is the
    /// hash announced for `wants[i]`.
    pub fn frames(
        &self,
        wants: &[WantBlock],
        expected: &[Option<BlockHash>],
        out: &mut dyn FnMut(u64, WireFrame) -> bool,
    ) -> Result<()> {
        let link = self.link();
        for (i, w) in wants.iter().enumerate() {
            let bytes = self.read_block(w.index, expected.get(i).copied().flatten())?;
            let pages: &[u64] = if link.pages { &w.page_hashes } else { &[] };
            let frame = block_frame(w.index, &bytes, pages, link.level);
            self.bytes_sent.fetch_add(frame.payload.len() as u64, Ordering::Relaxed);
            if !out(w.index, Message::Block(frame).to_bytes().into()) {
                return Ok(());
            }
        }
        Ok(())
    }

    /// The label of what was read, once every block was sent: crash-
    /// consistent (`app` when a quiesce hook ran) iff the source's stamp did
    /// not move and no block changed between hashing and reading, else
    /// fuzzy. A source that was removed, replaced or shrank is not the disk
    /// whose bytes were sent: `E_SOURCE_CHANGED`.
    pub fn consistency(&self, app: bool) -> Result<Consistency> {
        let changed = |why: String| {
            Error::new(ErrorCode::SourceChanged, format!("source {}: {why} while it was read", self.path.display()))
                .hint(
                    "sync from a snapshot, or run again once nothing truncates or replaces the source; the target keeps its last committed generation",
                )
        };
        let after = match self.vfs.metadata(&self.path).ctx(Place::Source, "reading", &self.path)? {
            None => return Err(changed("it was removed".into())),
            Some(m) if m.identity != self.before.identity => {
                return Err(changed("it was replaced by another file".into()))
            }
            Some(m) if m.len < self.geometry.disk_bytes => {
                return Err(changed(format!("it shrank from {} to {} bytes", self.geometry.disk_bytes, m.len)))
            }
            Some(m) => m,
        };
        let stable = after.stamp == self.before.stamp && !self.changed_while_read.load(Ordering::Relaxed);
        Ok(match (stable, app) {
            (false, _) => Consistency::Fuzzy,
            (true, true) => Consistency::App,
            (true, false) => Consistency::Crash,
        })
    }

    /// Records what this session sent as the disk's newest generation
    /// (`generation`, as the target committed it), with the disk's stamp
    /// when it was read at rest (`consistency` crash or app: the stamp did
    /// not move from start to end). Call after [`SourceSession::consistency`].
    pub fn commit_history(&self, generation: Generation, consistency: Consistency, now_unix_ns: i64) -> Result<()> {
        let writer = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(w) = writer else { return Ok(()) };
        // A hinted read took most hashes from the last record: it is no
        // proof of what the disk holds, so it records no at-rest stamp (a
        // later push onto this disk then hashes it instead of trusting it).
        let hinted = self.hinted.get().is_some();
        let at_rest =
            (consistency.is_recovery_point() && self.path == self.origin && !hinted).then_some(self.before.stamp);
        let meta = ManifestMeta { generation, parent: None, consistency, created_unix_ns: now_unix_ns };
        w.commit(self.vfs.as_ref(), meta, at_rest)
    }
}
