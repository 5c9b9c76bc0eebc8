//! Dirty bitmaps diskferry owns (`--changes dirty-bitmap`), of a running
//! VM's block node or of a qcow2 image at rest served by diskferry's own
//! storage daemon; both through QMP (`running.rs`, `storage_daemon.rs`).
//!
//! A bitmap never misses a write because each pass starts its own before
//! it reads: `diskferry-pending-<id>`, in one QMP `transaction` that also
//! stops the older ones recording. After the
//! commit of generation G' it becomes `diskferry-<G'>` (added, merged,
//! removed in one step) and every older one goes. A pass that fails leaves
//! its pending bitmap: the next pass reads the union of the chain — the
//! bitmap of the target's generation G and every pending one since — which
//! holds every write since G's read began.

use diskferry_protocol::Generation;
use diskferry_sync_engine::Error;

const PREFIX: &str = "diskferry-";
const PENDING: &str = "diskferry-pending-";
/// A pass's union of the chain: temporary, removed after the read.
const UNION: &str = "diskferry-union-";

/// The bitmap that counts the writes since `generation`.
pub fn name_for(generation: Generation) -> String {
    format!("{PREFIX}{}", generation.to_hex())
}

/// A bitmap as its owner lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bitmap {
    pub name: String,
    /// `inconsistent` in QEMU (it was in use when its writer died): it may
    /// have missed writes.
    pub inconsistent: bool,
    /// It records writes now (`recording` in QEMU).
    pub recording: bool,
}

/// Where the bitmaps live: an image at rest, or a running VM's node.
pub trait BitmapStore: Send {
    /// The node's or image's bitmaps.
    fn list(&mut self) -> Result<Vec<Bitmap>, Error>;
    /// Starts `pending` recording, and stops `stop` recording, as one step.
    fn start(&mut self, pending: &str, stop: &[String]) -> Result<(), Error>;
    /// A new bitmap `into`, not recording, holding the union of `from`.
    fn union(&mut self, into: &str, from: &[String]) -> Result<(), Error>;
    /// `to` takes over from `from` (which goes) without losing a write.
    fn rename(&mut self, from: &str, to: &str) -> Result<(), Error>;
    /// `into` takes in every bitmap of `from` (which go) and records.
    fn collapse(&mut self, into: &str, from: &[String]) -> Result<(), Error>;
    fn remove(&mut self, name: &str) -> Result<(), Error>;
}

/// One pass's bitmaps, from before the read to after the commit.
pub struct BitmapPass {
    store: Box<dyn BitmapStore>,
    pending: String,
    /// What to export for this read, and the generation it counts from.
    read: Option<(Generation, String)>,
    /// Made for this pass: removed when it ends.
    union: Option<String>,
    /// Why no bitmap is read (the report says so).
    pub why_not: Option<String>,
}

impl std::fmt::Debug for BitmapPass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BitmapPass").field("pending", &self.pending).field("read", &self.read).finish()
    }
}

impl BitmapPass {
    /// Before the read: removes what an earlier pass left mid-way, starts
    /// this pass's bitmap, and picks what to read for the target's
    /// generation `last` (the disk history's).
    pub fn begin(mut store: Box<dyn BitmapStore>, last: Option<Generation>) -> Result<BitmapPass, Error> {
        let id = format!("{:016x}", rand::random::<u64>());
        let mut chain = Vec::new();
        for b in store.list()? {
            if b.name.starts_with(UNION) {
                // Not part of the chain either way; one still busy goes next time.
                if let Err(e) = store.remove(&b.name) {
                    tracing::warn!("the leftover bitmap {} stays for now: {}", b.name, e.message);
                }
            } else if b.name.starts_with(PREFIX) {
                chain.push(b);
            }
        }
        let why_not = match last {
            None => Some("the disk has no history yet: this push starts its dirty bitmap".to_string()),
            Some(g) => trust(&chain, &name_for(g)),
        };
        let pending = format!("{PENDING}{id}");
        let recording: Vec<String> = chain.iter().filter(|b| b.recording).map(|b| b.name.clone()).collect();
        store.start(&pending, &recording)?;
        let mut pass = BitmapPass { store, pending, read: None, union: None, why_not };
        if let (None, Some(g)) = (&pass.why_not, last) {
            let members: Vec<String> = chain.into_iter().map(|b| b.name).collect();
            let name = if let [only] = members.as_slice() {
                only.clone()
            } else {
                let union = format!("{UNION}{id}");
                pass.union = Some(union.clone());
                pass.store.union(&union, &members)?;
                union
            };
            pass.read = Some((g, name));
        }
        Ok(pass)
    }

    /// The bitmap to export with the source, and the generation it counts from.
    pub fn to_read(&self) -> Option<&(Generation, String)> {
        self.read.as_ref()
    }

    /// This pass's own bitmap (it counts the writes since the read began).
    pub fn pending(&self) -> &str {
        &self.pending
    }

    /// After the commit of `generation`: this pass's bitmap becomes
    /// `diskferry-<generation>` and every older one goes. Not done, the next
    /// push reads in full; never a missed write.
    pub fn commit(mut self, generation: Generation) -> Result<(), Error> {
        self.drop_union();
        let new = name_for(generation);
        let mut have = self.store.list()?;
        if let Some(i) = have.iter().position(|b| b.name == new && b.inconsistent) {
            // G's own bitmap may have missed writes (so this pass read in
            // full): it cannot take the chain in, and QEMU refuses to merge
            // it. This pass's bitmap, started before the read, takes its name.
            self.store.remove(&new)?;
            have.remove(i);
        }
        if have.iter().any(|b| b.name == new) {
            // The target kept generation G (nothing changed): G's bitmap
            // takes in the whole chain since it and records again.
            let rest: Vec<String> =
                have.iter().filter(|b| b.name.starts_with(PREFIX) && b.name != new).map(|b| b.name.clone()).collect();
            return self.store.collapse(&new, &rest);
        }
        self.store.rename(&self.pending, &new)?;
        // The list taken above, less the pending bitmap the rename removed:
        // listing again costs a QMP round trip, and only this pass changes
        // diskferry's bitmaps of a disk at a time.
        for b in have {
            if b.name.starts_with(PREFIX) && b.name != new && b.name != self.pending {
                self.store.remove(&b.name)?;
            }
        }
        Ok(())
    }

    /// After a failed push: the pending bitmap stays in the chain.
    pub fn abandon(mut self) {
        self.drop_union();
    }

    fn drop_union(&mut self) {
        if let Some(u) = self.union.take() {
            if let Err(e) = self.store.remove(&u) {
                tracing::warn!("the bitmap {u} was not removed (the next push removes it): {}", e.message);
            }
        }
    }
}

/// Why the chain cannot stand for every write since `wanted` started, or
/// `None` if it can: `wanted` is there, no member may have missed a write,
/// and one still records (each pass stopped the older ones as it started its own).
fn trust(chain: &[Bitmap], wanted: &str) -> Option<String> {
    if !chain.iter().any(|b| b.name == wanted) {
        return Some(format!("there is no bitmap {wanted} (removed, renamed, or never started)"));
    }
    if let Some(b) = chain.iter().find(|b| b.inconsistent) {
        return Some(format!(
            "the bitmap {} is marked in use or inconsistent (QEMU stopped without closing the image): it may have missed writes",
            b.name
        ));
    }
    if !chain.iter().any(|b| b.recording) {
        return Some(format!("the bitmap {wanted} was disabled: it may have missed writes"));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(name: &str, inconsistent: bool, recording: bool) -> Bitmap {
        Bitmap { name: name.into(), inconsistent, recording }
    }

    #[test]
    fn the_chain_is_trusted_only_whole_and_recording() {
        let g = "diskferry-aa";
        assert!(trust(&[b(g, false, true)], g).is_none());
        // A failed pass stopped G and left its pending bitmap recording.
        assert!(trust(&[b(g, false, false), b("diskferry-pending-1", false, true)], g).is_none());
        assert!(trust(&[b("diskferry-bb", false, true)], g).unwrap().contains("no bitmap"));
        assert!(trust(&[b(g, false, true), b("diskferry-pending-1", true, true)], g).unwrap().contains("in use"));
        assert!(trust(&[b(g, false, false)], g).unwrap().contains("disabled"));
    }

    /// A store in memory that logs what was asked of it.
    #[derive(Default)]
    struct Log {
        have: Vec<Bitmap>,
        ops: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    }

    impl BitmapStore for Log {
        fn list(&mut self) -> Result<Vec<Bitmap>, Error> {
            Ok(self.have.clone())
        }
        fn start(&mut self, p: &str, stop: &[String]) -> Result<(), Error> {
            self.ops.lock().unwrap().push(format!("start {} stop {}", &p[..PENDING.len()], stop.join(",")));
            Ok(())
        }
        fn union(&mut self, into: &str, from: &[String]) -> Result<(), Error> {
            self.ops.lock().unwrap().push(format!("union {} of {}", &into[..UNION.len()], from.join(",")));
            Ok(())
        }
        fn rename(&mut self, from: &str, to: &str) -> Result<(), Error> {
            self.ops.lock().unwrap().push(format!("rename {} to {to}", &from[..PENDING.len()]));
            Ok(())
        }
        fn collapse(&mut self, into: &str, from: &[String]) -> Result<(), Error> {
            self.ops.lock().unwrap().push(format!("collapse {} into {into}", from.len()));
            Ok(())
        }
        fn remove(&mut self, name: &str) -> Result<(), Error> {
            self.ops.lock().unwrap().push(format!("remove {name}"));
            Ok(())
        }
    }

    #[test]
    fn a_pass_reads_the_union_after_a_failed_one_and_leaves_one_bitmap() {
        let g = Generation(0xaa);
        let gn = name_for(g);
        let ops = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let have = vec![
            b(&gn, false, false),
            b("diskferry-pending-0000000000000001", false, true),
            b("diskferry-union-0000000000000002", false, false),
            b("other", false, true),
        ];
        let store = Log { have, ops: ops.clone() };
        let pass = BitmapPass::begin(Box::new(store), Some(g)).unwrap();
        assert!(pass.why_not.is_none(), "{:?}", pass.why_not);
        let (since, read) = pass.to_read().unwrap().clone();
        assert_eq!(since, g);
        assert!(read.starts_with(UNION));
        pass.commit(Generation(0xbb)).unwrap();
        let ops = ops.lock().unwrap().clone();
        assert_eq!(ops[0], "remove diskferry-union-0000000000000002");
        assert_eq!(ops[1], format!("start {PENDING} stop diskferry-pending-0000000000000001"));
        assert_eq!(ops[2], format!("union {UNION} of {gn},diskferry-pending-0000000000000001"));
        assert!(ops[3].starts_with("remove diskferry-union-"), "{ops:?}");
        assert_eq!(ops[4], format!("rename {PENDING} to {}", name_for(Generation(0xbb))));
        // The listing is the stale one here: every diskferry bitmap but the new one goes, others stay.
        assert!(ops.iter().any(|o| o == &format!("remove {gn}")));
        assert!(!ops.iter().any(|o| o == "remove other"));
    }

    #[test]
    fn an_unchanged_commit_folds_the_chain_into_the_kept_generation() {
        let g = Generation(0xaa);
        let ops = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let store = Log { have: vec![b(&name_for(g), false, true)], ops: ops.clone() };
        let pass = BitmapPass::begin(Box::new(store), Some(g)).unwrap();
        pass.commit(g).unwrap();
        let ops = ops.lock().unwrap().clone();
        // The listing is the stale one here (the pending bitmap is not in it).
        assert_eq!(ops.last().unwrap(), &format!("collapse 0 into {}", name_for(g)), "{ops:?}");
        assert!(!ops.iter().any(|o| o.starts_with("rename")), "{ops:?}");
    }

    #[test]
    fn an_unchanged_commit_replaces_a_kept_bitmap_that_may_have_missed_writes() {
        let g = Generation(0xaa);
        let ops = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let store = Log { have: vec![b(&name_for(g), true, true)], ops: ops.clone() };
        let pass = BitmapPass::begin(Box::new(store), Some(g)).unwrap();
        assert!(pass.why_not.as_deref().is_some_and(|w| w.contains("in use")), "{:?}", pass.why_not);
        pass.commit(g).unwrap();
        let ops = ops.lock().unwrap().clone();
        assert_eq!(ops[1], format!("remove {}", name_for(g)), "{ops:?}");
        assert_eq!(ops[2], format!("rename {PENDING} to {}", name_for(g)), "{ops:?}");
        assert!(!ops.iter().any(|o| o.starts_with("collapse")), "{ops:?}");
    }

    #[test]
    fn a_first_pass_reads_nothing_but_starts_its_bitmap() {
        let ops = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let pass = BitmapPass::begin(Box::new(Log { have: vec![], ops: ops.clone() }), None).unwrap();
        assert!(pass.to_read().is_none());
        assert!(pass.why_not.as_deref().unwrap().contains("no history"));
        pass.abandon();
        assert_eq!(ops.lock().unwrap().len(), 1);
    }
}
