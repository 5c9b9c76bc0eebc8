//! The target side of a session.
//!
//! Polling order for a driver: after any `handle_*` call, drain
//! [`ReceiverSession::poll_transmit`] (control frames), then
//! [`ReceiverSession::poll_event`]. Views of the target's regions are fed in
//! region order with [`ReceiverSession::handle_view`] (ahead of the source,
//! ideally); block and zero frames from the data streams are staged by the
//! driver and reported with [`ReceiverSession::handle_staged`] and
//! [`ReceiverSession::handle_zeroed`].

use std::collections::{BTreeMap, BTreeSet, VecDeque};

mod full;

use super::sender::{slot_units, window_units};
use super::view::{HeldViews, RegionView, ViewBlocks};
use crate::error::ErrorCode;
use crate::message::{Accept, Committed, Message, Open, Plan, WantBlock, CAPABILITIES, MAX_FRAME, VERSION};
use crate::region_hashes::RegionHashes;
use crate::types::{BlockHash, Consistency, Geometry, CHUNK_BLOCKS};

/// A block whose source hash differs from what the target holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Differing {
    /// Block index.
    pub index: u64,
    /// The source's hash.
    pub source: BlockHash,
    /// What the target holds.
    pub target: Option<BlockHash>,
}

/// Work for the target's driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReceiverEvent {
    /// A session was requested: authorize it, open the target, then call
    /// [`ReceiverSession::accept`] or [`ReceiverSession::reject`].
    Open(Open),
    /// These blocks differ: stage what can be done locally (zeros, copies)
    /// and answer with [`ReceiverSession::handle_resolved`] listing the
    /// blocks to fetch.
    Resolve {
        /// Region index.
        region: u64,
        /// The differing blocks.
        blocks: Vec<Differing>,
    },
    /// A region is complete: its final block hashes, in region order.
    RegionComplete {
        /// Region index.
        region: u64,
        /// Hashes of every block of the region as staged.
        hashes: RegionHashes,
        /// Full copy: the region hash the source announced, to check.
        expected: Option<BlockHash>,
    },
    /// Every region is complete and the source finished: commit.
    Commit {
        /// Consistency the source reported.
        consistency: Consistency,
    },
    /// The session failed.
    Failed {
        /// Code.
        code: ErrorCode,
        /// Message.
        message: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    AwaitHello,
    AwaitOpen,
    Opening,
    Running,
    Committing,
    Done,
    Failed,
}

/// Bookkeeping of one region in flight.
#[derive(Debug, Default)]
struct Pending {
    /// The source's region hash, once announced.
    source_hash: Option<BlockHash>,
    /// Hashes as they will be committed (filled from the view, then updated).
    hashes: Vec<Option<BlockHash>>,
    /// Chunks whose block hashes are still awaited.
    chunks_awaited: usize,
    /// Differing blocks collected from those chunks.
    differing: Vec<Differing>,
    /// Blocks fetched from the source and not yet staged.
    fetching: BTreeSet<u64>,
    /// Full copy: frames announced and received.
    items_expected: Option<u32>,
    items_seen: u32,
    /// Waiting for the driver's resolution.
    resolving: bool,
    /// Compare: the region's view arrived.
    viewed: bool,
    /// Compare: the source's region message arrived before the view.
    parked: bool,
    /// Nacks sent per block.
    nacks: BTreeMap<u64, u8>,
    /// Full copy: blocks staged or zeroed so far (each at most once).
    covered: Vec<bool>,
    /// Full copy: a block was resent after failing verification (the source
    /// changed under its read), so the announced region hash is stale.
    amended: bool,
}

impl Pending {
    /// A full copy's region of `len` blocks: zeros until frames say otherwise.
    fn full(len: usize) -> Pending {
        Pending { hashes: vec![Some(BlockHash::ZERO); len], covered: vec![false; len], ..Pending::default() }
    }
}

/// Target-side session state machine.
#[derive(Debug)]
pub struct ReceiverSession {
    state: State,
    geometry: Option<Geometry>,
    plan: Option<Plan>,
    window: u32,
    /// Units of a window slot, once capabilities are agreed ([`slot_units`]).
    slot: u32,
    /// Window units of the regions announced and not done ([`window_units`]).
    in_flight: BTreeMap<u64, u32>,
    units_in_flight: u64,
    views: HeldViews,
    pending: BTreeMap<u64, Pending>,
    complete: BTreeMap<u64, (RegionHashes, Option<BlockHash>)>,
    next_to_emit: u64,
    regions_done: u64,
    bytes_staged: u64,
    finish: Option<Consistency>,
    transmit: VecDeque<Message>,
    events: VecDeque<ReceiverEvent>,
}

impl Default for ReceiverSession {
    fn default() -> Self {
        Self::new()
    }
}

impl ReceiverSession {
    /// A session waiting for the source's Hello.
    pub fn new() -> Self {
        ReceiverSession {
            state: State::AwaitHello,
            geometry: None,
            plan: None,
            window: 0,
            slot: slot_units(0),
            in_flight: BTreeMap::new(),
            units_in_flight: 0,
            views: HeldViews::default(),
            pending: BTreeMap::new(),
            complete: BTreeMap::new(),
            next_to_emit: 0,
            regions_done: 0,
            bytes_staged: 0,
            finish: None,
            transmit: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// Next frame for the control stream.
    pub fn poll_transmit(&mut self) -> Option<Message> {
        self.transmit.pop_front()
    }

    /// Next piece of work for the driver.
    pub fn poll_event(&mut self) -> Option<ReceiverEvent> {
        self.events.pop_front()
    }

    /// Whether the session is committing (it should be let finish).
    pub fn is_committing(&self) -> bool {
        self.state == State::Committing
    }

    /// Whether the session ended.
    pub fn is_finished(&self) -> bool {
        matches!(self.state, State::Done | State::Failed)
    }

    /// The geometry, once accepted.
    pub fn geometry(&self) -> Option<Geometry> {
        self.geometry
    }

    /// The plan, once accepted.
    pub fn plan(&self) -> Option<Plan> {
        self.plan
    }

    fn fail(&mut self, code: ErrorCode, message: impl Into<String>, tell_peer: bool) {
        if self.is_finished() {
            return;
        }
        let message = message.into();
        if tell_peer {
            self.transmit.push_back(Message::Error { code, message: message.clone() });
        }
        self.state = State::Failed;
        self.events.push_back(ReceiverEvent::Failed { code, message });
    }

    /// Aborts locally (storage failed, divergence found…), telling the peer.
    pub fn abort(&mut self, code: ErrorCode, message: impl Into<String>) {
        self.fail(code, message, true);
    }

    /// Accepts the opened session.
    pub fn accept(&mut self, accept: Accept, geometry: Geometry) {
        if self.state != State::Opening {
            return;
        }
        self.geometry = Some(geometry);
        self.plan = Some(accept.plan);
        self.window = accept.window;
        self.state = State::Running;
        self.transmit.push_back(Message::Accept(accept));
        self.maybe_commit();
    }

    /// Refuses the opened session.
    pub fn reject(&mut self, code: ErrorCode, message: impl Into<String>) {
        self.fail(code, message, true);
    }

    /// A control message from the source.
    pub fn handle_message(&mut self, m: Message) {
        match (self.state, m) {
            (_, Message::Error { code, message }) => self.fail(code, message, false),
            (State::AwaitHello, Message::Hello { min_version, max_version, capabilities }) => {
                if !(min_version..=max_version).contains(&VERSION) {
                    return self.fail(
                        ErrorCode::Version,
                        format!("the source speaks versions {min_version}..={max_version}, this agent {VERSION}"),
                        true,
                    );
                }
                self.state = State::AwaitOpen;
                let capabilities = capabilities & CAPABILITIES;
                self.slot = slot_units(capabilities);
                self.transmit.push_back(Message::Welcome { version: VERSION, capabilities, max_frame: MAX_FRAME });
            }
            (State::AwaitOpen, Message::Open(o)) => {
                self.state = State::Opening;
                self.events.push_back(ReceiverEvent::Open(o));
            }
            (State::Running, m) => self.handle_running(m),
            (_, m) => {
                let ty = m.type_byte();
                self.fail(ErrorCode::Protocol, format!("unexpected message type {ty:#04x}"), true)
            }
        }
    }

    fn region_len(&self, region: u64) -> Option<u64> {
        let g = self.geometry?;
        (region < g.region_count()).then(|| {
            let r = g.region_range(region);
            r.end - r.start
        })
    }

    fn handle_running(&mut self, m: Message) {
        let full = self.plan == Some(Plan::Full);
        let region = match &m {
            Message::Region { region, .. }
            | Message::Chunks { region, .. }
            | Message::BlockHashes { region, .. }
            | Message::RegionEnd { region, .. } => Some(*region),
            _ => None,
        };
        if let Some(region) = region.filter(|&r| self.is_done(r)) {
            return self.fail(ErrorCode::Protocol, format!("region {region} is already done"), true);
        }
        match m {
            Message::Region { region, hash } if !full => {
                if self.region_len(region).is_none()
                    || self.pending.get(&region).is_some_and(|p| p.source_hash.is_some())
                {
                    return self.fail(ErrorCode::Protocol, format!("region {region} unexpected"), true);
                }
                if !self.announce(region, &hash) {
                    return;
                }
                self.pending.entry(region).or_default().source_hash = Some(hash);
                if self.views.contains(region) {
                    self.compare_region(region);
                } else if let Some(p) = self.pending.get_mut(&region) {
                    p.parked = true;
                }
            }
            Message::Chunks { region, hashes } if !full => self.handle_chunks(region, hashes),
            Message::BlockHashes { region, chunk, hashes } if !full => self.handle_block_hashes(region, chunk, hashes),
            Message::RegionEnd { region, hash, items } if full => {
                let Some(len) = self.region_len(region) else {
                    return self.fail(ErrorCode::Protocol, format!("region {region} is outside the disk"), true);
                };
                let p = self.pending.entry(region).or_insert_with(|| Pending::full(len as usize));
                if p.items_expected.is_some() {
                    return self.fail(ErrorCode::Protocol, format!("region {region} ended twice"), true);
                }
                p.items_expected = Some(items);
                p.source_hash = Some(hash);
                if !self.announce(region, &hash) {
                    return;
                }
                self.check_full_region(region);
            }
            Message::Finish { consistency } => {
                self.finish = Some(consistency);
                self.maybe_commit();
            }
            m => {
                let ty = m.type_byte();
                self.fail(ErrorCode::Protocol, format!("unexpected message type {ty:#04x}"), true)
            }
        }
    }

    /// Counts an announced region against the window; a source with more
    /// in flight than it was given fails the session (its regions would
    /// otherwise hold the target's memory without bound).
    fn announce(&mut self, region: u64, hash: &BlockHash) -> bool {
        let units = window_units(self.plan, hash, self.slot);
        self.in_flight.insert(region, units);
        self.units_in_flight += u64::from(units);
        if self.units_in_flight > u64::from(self.window) * u64::from(self.slot) {
            self.fail(ErrorCode::Protocol, format!("region {region} is past the window of {}", self.window), true);
            return false;
        }
        true
    }

    /// The target's view of the next region (in region order).
    pub fn handle_view(&mut self, region: u64, view: RegionView) {
        if self.state != State::Running {
            return;
        }
        let parked = self.pending.get(&region).is_some_and(|p| p.parked);
        self.views.insert(region, view);
        if parked {
            self.compare_region(region);
        }
    }

    /// Whether the driver should produce the view of `region` now: at most
    /// 2 × window views that list blocks (the memory budget's count), and
    /// as far ahead as the window's units let empty regions be in flight.
    pub fn wants_view(&self, region: u64) -> bool {
        let window = u64::from(self.window.max(1));
        self.state == State::Running
            && self.plan != Some(Plan::Full)
            && (self.views.listed() as u64) < 2 * window
            && region < self.next_to_emit + 2 * window * u64::from(self.slot)
    }

    fn compare_region(&mut self, region: u64) {
        let Some(view) = self.views.get_mut(region) else { return };
        let Some(p) = self.pending.get_mut(&region) else { return };
        p.parked = false;
        p.viewed = true;
        if view.hash.is_some() && view.hash == p.source_hash {
            // Equal: the view is not looked at again.
            return match std::mem::replace(&mut view.blocks, ViewBlocks::Known(RegionHashes::Zero(0))) {
                ViewBlocks::Known(hashes) => {
                    self.pending.remove(&region);
                    self.region_completed(region, hashes, None)
                }
                ViewBlocks::Partial(hashes) => {
                    p.hashes = hashes;
                    self.complete_region(region)
                }
            };
        }
        p.hashes = view.blocks.to_options();
        self.transmit.push_back(Message::NeedChunks { region });
    }

    fn handle_chunks(&mut self, region: u64, hashes: Vec<BlockHash>) {
        let Some(view) = self.views.get(region) else {
            return self.fail(ErrorCode::Protocol, format!("chunks for region {region} not asked for"), true);
        };
        let expected_chunks = view.blocks.len().div_ceil(CHUNK_BLOCKS as usize);
        if hashes.len() != expected_chunks {
            return self.fail(ErrorCode::Protocol, format!("region {region}: {} chunk hashes", hashes.len()), true);
        }
        let differing: Vec<u32> =
            hashes.iter().enumerate().filter(|(i, h)| view.chunk(*i) != Some(**h)).map(|(i, _)| i as u32).collect();
        let Some(p) = self.pending.get_mut(&region) else { return };
        if differing.is_empty() {
            return self.complete_region(region);
        }
        p.chunks_awaited = differing.len();
        self.transmit.push_back(Message::NeedBlocks { region, chunks: differing });
    }

    fn handle_block_hashes(&mut self, region: u64, chunk: u32, hashes: Vec<BlockHash>) {
        let first_in_region = chunk as u64 * CHUNK_BLOCKS;
        let Some(g) = self.geometry else { return };
        let Some(p) = self.pending.get_mut(&region) else {
            return self.fail(ErrorCode::Protocol, format!("block hashes for region {region} not asked for"), true);
        };
        let end = first_in_region as usize + hashes.len();
        if p.chunks_awaited == 0 || end > p.hashes.len() || hashes.len() > CHUNK_BLOCKS as usize {
            return self.fail(
                ErrorCode::Protocol,
                format!("block hashes for region {region} chunk {chunk} unexpected"),
                true,
            );
        }
        let base = g.region_range(region).start;
        for (i, h) in hashes.iter().enumerate() {
            let at = first_in_region as usize + i;
            let target = p.hashes[at];
            if target != Some(*h) {
                p.differing.push(Differing { index: base + at as u64, source: *h, target });
            }
            p.hashes[at] = Some(*h);
        }
        p.chunks_awaited -= 1;
        if p.chunks_awaited == 0 {
            if p.differing.is_empty() {
                return self.complete_region(region);
            }
            p.resolving = true;
            let blocks = std::mem::take(&mut p.differing);
            self.events.push_back(ReceiverEvent::Resolve { region, blocks });
        }
    }

    /// The driver staged what it could locally; `wants` are fetched from the source.
    pub fn handle_resolved(&mut self, region: u64, wants: Vec<WantBlock>) {
        let Some(p) = self.pending.get_mut(&region) else { return };
        if !p.resolving {
            return;
        }
        p.resolving = false;
        p.fetching = wants.iter().map(|w| w.index).collect();
        if wants.is_empty() {
            return self.complete_region(region);
        }
        self.transmit.push_back(Message::Want { region, blocks: wants });
    }

    /// A block frame was verified and staged with `hash` and `bytes` of content.
    pub fn handle_staged(&mut self, index: u64, hash: BlockHash, bytes: u64) {
        let Some(g) = self.geometry else { return };
        if index >= g.block_count() {
            return self.fail(ErrorCode::Protocol, format!("block {index} is outside the disk"), true);
        }
        let region = g.region_of(index);
        if self.is_done(region) {
            return self.fail(ErrorCode::Protocol, format!("block {index} is in region {region}, already done"), true);
        }
        self.bytes_staged += bytes;
        let at = (index - g.region_range(region).start) as usize;
        if self.plan == Some(Plan::Full) {
            let len = g.region_range(region).end - g.region_range(region).start;
            let p = self.pending.entry(region).or_insert_with(|| Pending::full(len as usize));
            // Each block once: a duplicate could stand in for a missing block.
            if std::mem::replace(&mut p.covered[at], true) {
                return self.fail(ErrorCode::Protocol, format!("block {index} arrived twice"), true);
            }
            p.hashes[at] = Some(hash);
            p.items_seen += 1;
            return self.check_full_region(region);
        }
        // Only a block that was asked for, once, completes anything: an
        // unasked one would leave its hash in the manifest over other bytes.
        let Some(p) = self.pending.get_mut(&region) else {
            return self.fail(ErrorCode::Protocol, format!("block {index} was not asked for"), true);
        };
        if !p.fetching.remove(&index) {
            return self.fail(ErrorCode::Protocol, format!("block {index} was not asked for"), true);
        }
        p.hashes[at] = Some(hash);
        if p.fetching.is_empty() {
            self.complete_region(region);
        }
    }

    /// A patched block failed verification: ask for it whole (twice at most).
    pub fn handle_verify_failed(&mut self, index: u64) {
        let Some(g) = self.geometry else { return };
        let region = g.region_of(index);
        if index >= g.block_count() || self.is_done(region) {
            return self.fail(
                ErrorCode::Protocol,
                format!("block {index} failed verification outside a pending region"),
                true,
            );
        }
        if self.plan == Some(Plan::Full) {
            let range = g.region_range(region);
            self.pending.entry(region).or_insert_with(|| Pending::full((range.end - range.start) as usize)).amended =
                true;
        }
        let Some(p) = self.pending.get_mut(&region) else { return };
        let n = p.nacks.entry(index).or_insert(0);
        *n += 1;
        if *n > 2 {
            return self.fail(ErrorCode::HashMismatch, format!("block {index} failed verification 3 times"), true);
        }
        self.transmit.push_back(Message::Nack { index });
    }

    fn complete_region(&mut self, region: u64) {
        let Some(p) = self.pending.remove(&region) else { return };
        self.views.remove(region);
        let full = self.plan == Some(Plan::Full);
        // A full copy's region is every block sent or zeroed: one left out
        // would enter the manifest as zeros over whatever the disk holds.
        if let Some(at) = p.covered.iter().position(|c| !c).filter(|_| full) {
            let index = self.geometry.map_or(0, |g| g.region_range(region).start) + at as u64;
            return self.fail(ErrorCode::Protocol, format!("region {region} ended without block {index}"), true);
        }
        let mut hashes = Vec::with_capacity(p.hashes.len());
        for h in p.hashes {
            match h {
                Some(h) => hashes.push(h),
                None => {
                    return self.fail(
                        ErrorCode::Internal,
                        format!("region {region} completed with unknown blocks"),
                        true,
                    )
                }
            }
        }
        // An amended region's hashes are those of the blocks verified and
        // staged, which is what the manifest must say.
        self.region_completed(region, hashes.into(), if full && !p.amended { p.source_hash } else { None })
    }

    /// Region `region` is complete with `hashes` (`expected`: the region
    /// hash a full copy's source announced, to check).
    fn region_completed(&mut self, region: u64, hashes: RegionHashes, expected: Option<BlockHash>) {
        self.views.remove(region);
        let units = self.in_flight.remove(&region).unwrap_or(0);
        self.units_in_flight = self.units_in_flight.saturating_sub(u64::from(units));
        self.complete.insert(region, (hashes, expected));
        self.regions_done += 1;
        self.transmit.push_back(Message::RegionDone { region, bytes_staged: self.bytes_staged });
        while let Some((hashes, expected)) = self.complete.remove(&self.next_to_emit) {
            self.events.push_back(ReceiverEvent::RegionComplete { region: self.next_to_emit, hashes, expected });
            self.next_to_emit += 1;
        }
        self.maybe_commit();
    }

    fn maybe_commit(&mut self) {
        let Some(g) = self.geometry else { return };
        if self.state == State::Running
            && self.regions_done == g.region_count()
            && self.next_to_emit == g.region_count()
        {
            if let Some(consistency) = self.finish.take() {
                self.state = State::Committing;
                self.events.push_back(ReceiverEvent::Commit { consistency });
            }
        }
    }

    /// The commit succeeded.
    pub fn handle_committed(&mut self, c: Committed) {
        if self.state != State::Committing {
            return;
        }
        self.state = State::Done;
        self.transmit.push_back(Message::Committed(c));
    }

    /// Bytes staged so far.
    pub fn bytes_staged(&self) -> u64 {
        self.bytes_staged
    }
}
