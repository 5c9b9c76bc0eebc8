//! The source side of a session.
//!
//! Polling order for a driver: after any `handle_*` call, drain
//! [`SenderSession::poll_transmit`] (frames for the control stream), then
//! [`SenderSession::poll_event`] (work for the driver). Feed regions with
//! [`SenderSession::handle_region`] only while [`SenderSession::window_open`].

use std::collections::{BTreeMap, VecDeque};

use crate::error::ErrorCode;
use crate::message::{
    Accept, Committed, Message, Open, Plan, WantBlock, CAPABILITIES, CAP_FINE_WINDOW, MAX_FRAME, VERSION,
};
use crate::region_hashes::RegionHashes;
use crate::types::{BlockHash, Consistency, CHUNK_BLOCKS};

/// Regions in flight at most, whatever the target offers (targets offer
/// 2 to 16).
pub const MAX_WINDOW: u32 = 256;

/// Window units a region in flight takes (`Accept.window` is in regions,
/// each [`WINDOW_UNITS`] units), unless both sides speak
/// [`CAP_FINE_WINDOW`].
pub const WINDOW_UNITS: u32 = 16;

/// Units per slot with [`CAP_FINE_WINDOW`]. A 1 TiB sparse disk is 16,384
/// regions, nearly all empty: with 16 empty regions per slot and a window
/// of 20, its hinted delta waited 51 round trips (70–80 ms on loopback,
/// half the push); with 128, seven.
pub const FINE_WINDOW_UNITS: u32 = 128;

/// The units of a window slot once `capabilities` are agreed.
pub fn slot_units(capabilities: u32) -> u32 {
    if capabilities & CAP_FINE_WINDOW != 0 {
        FINE_WINDOW_UNITS
    } else {
        WINDOW_UNITS
    }
}

/// The units a region of hash `hash` takes in the window of slots of
/// `slot` units: an empty region (hash ZERO: every block zero) being
/// compared takes one, since neither side lists its hashes. A full copy's
/// region holds its blocks' state on the target, empty or not, so it
/// takes a whole slot.
pub fn window_units(plan: Option<Plan>, hash: &BlockHash, slot: u32) -> u32 {
    if hash.is_zero() && plan != Some(Plan::Full) {
        1
    } else {
        slot
    }
}

/// A hashed source region, as the engine produced it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceRegion {
    /// Region index.
    pub region: u64,
    /// Block hashes.
    pub blocks: RegionHashes,
    /// Chunk hashes; an empty region's (all ZERO) may be left out, so
    /// that the thousands of them in flight cost no chunk lists.
    pub chunks: Vec<BlockHash>,
    /// Region hash.
    pub hash: BlockHash,
    /// Full copy: block and zero frames already sent for this region.
    pub items: u32,
}

impl SourceRegion {
    /// Its chunk hashes, an empty region's too.
    pub fn chunk_hashes(&self) -> Vec<BlockHash> {
        match &self.blocks {
            RegionHashes::Zero(n) if self.chunks.is_empty() => vec![BlockHash::ZERO; n.div_ceil(CHUNK_BLOCKS as usize)],
            _ => self.chunks.clone(),
        }
    }
}

/// Work for the source's driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SenderEvent {
    /// The target accepted; start hashing (and, for a full copy, sending).
    Accepted(Accept),
    /// Send these blocks on the data streams (only the pages whose hashes
    /// differ, when page hashes are given).
    SendBlocks {
        /// Region index.
        region: u64,
        /// The blocks.
        blocks: Vec<WantBlock>,
    },
    /// A patched block failed verification: send it whole.
    Resend {
        /// Block index.
        index: u64,
    },
    /// The target staged a region (progress).
    RegionDone {
        /// Region index.
        region: u64,
        /// Window units it gives back ([`window_units`]).
        units: u32,
        /// Bytes the target has staged so far.
        bytes_staged: u64,
    },
    /// The target committed.
    Committed(Committed),
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
    AwaitWelcome,
    AwaitAccept,
    Running,
    AwaitCommitted,
    Done,
    Failed,
}

/// Source-side session state machine.
#[derive(Debug)]
pub struct SenderSession {
    state: State,
    open: Open,
    plan: Option<Plan>,
    window: u32,
    capabilities: u32,
    outstanding: BTreeMap<u64, SourceRegion>,
    units_out: u64,
    regions_handed: u64,
    region_count: u64,
    finished: Option<Consistency>,
    transmit: VecDeque<Message>,
    events: VecDeque<SenderEvent>,
}

impl SenderSession {
    /// Starts a session that will ask for `open`; queues the Hello.
    pub fn new(open: Open) -> Self {
        let g = crate::types::Geometry::new(open.disk_bytes, open.block_size);
        let mut s = SenderSession {
            state: State::AwaitWelcome,
            open,
            plan: None,
            window: 1,
            capabilities: 0,
            outstanding: BTreeMap::new(),
            units_out: 0,
            regions_handed: 0,
            region_count: g.region_count(),
            finished: None,
            transmit: VecDeque::new(),
            events: VecDeque::new(),
        };
        s.transmit.push_back(Message::Hello { min_version: VERSION, max_version: VERSION, capabilities: CAPABILITIES });
        s
    }

    /// The accepted plan, once known.
    pub fn plan(&self) -> Option<Plan> {
        self.plan
    }

    /// Capabilities both sides share.
    pub fn capabilities(&self) -> u32 {
        self.capabilities
    }

    /// Units of one window slot ([`slot_units`]).
    pub fn slot_units(&self) -> u32 {
        slot_units(self.capabilities)
    }

    /// Whether another region may be handed in now: room for a region
    /// that is not empty ([`window_units`]).
    pub fn window_open(&self) -> bool {
        self.state == State::Running
            && self.units_out + u64::from(self.slot_units()) <= u64::from(self.window) * u64::from(self.slot_units())
    }

    /// Whether the session ended (committed or failed).
    pub fn is_finished(&self) -> bool {
        matches!(self.state, State::Done | State::Failed)
    }

    /// Next frame for the control stream.
    pub fn poll_transmit(&mut self) -> Option<Message> {
        self.transmit.pop_front()
    }

    /// Next piece of work for the driver.
    pub fn poll_event(&mut self) -> Option<SenderEvent> {
        self.events.pop_front()
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
        self.events.push_back(SenderEvent::Failed { code, message });
    }

    /// Aborts locally (e.g. the source could not be read), telling the peer.
    pub fn abort(&mut self, code: ErrorCode, message: impl Into<String>) {
        self.fail(code, message, true);
    }

    /// A control message from the target.
    pub fn handle_message(&mut self, m: Message) {
        match (self.state, m) {
            (_, Message::Error { code, message }) => self.fail(code, message, false),
            (State::AwaitWelcome, Message::Welcome { version, capabilities, max_frame }) => {
                if version != VERSION {
                    return self.fail(ErrorCode::Version, format!("the target chose unknown version {version}"), true);
                }
                if max_frame < MAX_FRAME {
                    return self.fail(ErrorCode::Protocol, "the target's frame limit is too small", true);
                }
                self.capabilities = capabilities & CAPABILITIES;
                self.state = State::AwaitAccept;
                self.transmit.push_back(Message::Open(self.open.clone()));
            }
            (State::AwaitAccept, Message::Accept(a)) => {
                if a.window == 0 {
                    return self.fail(ErrorCode::Protocol, "the target offered an empty window", true);
                }
                // Each region in flight holds its hashes here: a larger
                // offer than any target makes is not taken up.
                let a = Accept { window: a.window.min(MAX_WINDOW), ..a };
                self.plan = Some(a.plan);
                self.window = a.window;
                self.state = State::Running;
                self.events.push_back(SenderEvent::Accepted(a));
                self.maybe_finish();
            }
            (State::Running | State::AwaitCommitted, m) => self.handle_running(m),
            (_, m) => {
                let ty = m.type_byte();
                self.fail(ErrorCode::Protocol, format!("unexpected message type {ty:#04x}"), true)
            }
        }
    }

    fn handle_running(&mut self, m: Message) {
        match m {
            Message::NeedChunks { region } => match self.outstanding.get(&region) {
                Some(r) => {
                    let hashes = r.chunk_hashes();
                    self.transmit.push_back(Message::Chunks { region, hashes });
                }
                None => {
                    self.fail(ErrorCode::Protocol, format!("chunks asked for region {region}, not in flight"), true)
                }
            },
            Message::NeedBlocks { region, chunks } => {
                let Some(r) = self.outstanding.get(&region) else {
                    return self.fail(
                        ErrorCode::Protocol,
                        format!("blocks asked for region {region}, not in flight"),
                        true,
                    );
                };
                let asked = chunks.len();
                let chunks: std::collections::BTreeSet<u32> = chunks.into_iter().collect();
                if chunks.len() != asked {
                    return self.fail(ErrorCode::Protocol, format!("a chunk of region {region} asked twice"), true);
                }
                let mut out = Vec::with_capacity(chunks.len());
                for c in chunks {
                    let start = c as u64 * CHUNK_BLOCKS;
                    if start >= r.blocks.len() as u64 {
                        return self.fail(ErrorCode::Protocol, format!("chunk {c} is outside region {region}"), true);
                    }
                    let end = (start + CHUNK_BLOCKS).min(r.blocks.len() as u64);
                    out.push(Message::BlockHashes {
                        region,
                        chunk: c,
                        hashes: r.blocks.slice(start as usize..end as usize),
                    });
                }
                self.transmit.extend(out);
            }
            Message::Want { region, blocks } => {
                if !self.outstanding.contains_key(&region) {
                    return self.fail(
                        ErrorCode::Protocol,
                        format!("blocks wanted from region {region}, not in flight"),
                        true,
                    );
                }
                let g = crate::types::Geometry::new(self.open.disk_bytes, self.open.block_size);
                let range = g.region_range(region);
                if let Some(w) = blocks.iter().find(|w| !range.contains(&w.index)) {
                    let index = w.index;
                    return self.fail(ErrorCode::Protocol, format!("block {index} wanted from region {region}"), true);
                }
                self.events.push_back(SenderEvent::SendBlocks { region, blocks });
            }
            Message::Nack { index } => {
                let g = crate::types::Geometry::new(self.open.disk_bytes, self.open.block_size);
                if index >= g.block_count() {
                    return self.fail(ErrorCode::Protocol, format!("block {index} is outside the disk"), true);
                }
                self.events.push_back(SenderEvent::Resend { index })
            }
            Message::RegionDone { region, bytes_staged } => {
                let Some(r) = self.outstanding.remove(&region) else {
                    return self.fail(ErrorCode::Protocol, format!("region {region} done twice or never sent"), true);
                };
                let units = window_units(self.plan, &r.hash, self.slot_units());
                self.units_out = self.units_out.saturating_sub(u64::from(units));
                self.events.push_back(SenderEvent::RegionDone { region, units, bytes_staged });
                self.maybe_finish();
            }
            Message::Committed(c) if self.state == State::AwaitCommitted => {
                self.state = State::Done;
                self.events.push_back(SenderEvent::Committed(c));
            }
            m => {
                let ty = m.type_byte();
                self.fail(ErrorCode::Protocol, format!("unexpected message type {ty:#04x}"), true)
            }
        }
    }

    /// The next hashed region, in order.
    pub fn handle_region(&mut self, r: SourceRegion) {
        if self.state != State::Running {
            return;
        }
        if r.region != self.regions_handed {
            return self.fail(ErrorCode::Internal, "regions handed out of order", true);
        }
        self.regions_handed += 1;
        let msg = match self.plan {
            Some(Plan::Full) => Message::RegionEnd { region: r.region, hash: r.hash, items: r.items },
            _ => Message::Region { region: r.region, hash: r.hash },
        };
        self.transmit.push_back(msg);
        self.units_out += u64::from(window_units(self.plan, &r.hash, self.slot_units()));
        self.outstanding.insert(r.region, r);
    }

    /// Every region was handed; `consistency` says how stable the source was.
    pub fn handle_source_done(&mut self, consistency: Consistency) {
        self.finished = Some(consistency);
        self.maybe_finish();
    }

    fn maybe_finish(&mut self) {
        if self.state != State::Running || self.regions_handed < self.region_count {
            return;
        }
        if let Some(consistency) = self.finished.take() {
            self.transmit.push_back(Message::Finish { consistency });
            self.state = State::AwaitCommitted;
        }
    }

    /// Regions the target has not confirmed yet.
    pub fn outstanding(&self) -> usize {
        self.outstanding.len()
    }

    /// The source's block hashes of an in-flight region.
    pub fn region_blocks(&self, region: u64) -> Option<&RegionHashes> {
        self.outstanding.get(&region).map(|r| &r.blocks)
    }
}
