//! A full copy's part of the receiver: zero ranges, the count of a
//! region's frames, and the rule that a region once done stays done.

use super::{Pending, ReceiverSession};
use crate::error::ErrorCode;
use crate::message::Plan;

impl ReceiverSession {
    /// Whether `region` completed: its hashes are final, and nothing may
    /// change it again in this session.
    pub(super) fn is_done(&self, region: u64) -> bool {
        region < self.next_to_emit || self.complete.contains_key(&region)
    }

    /// A zero frame `first..first+count` was staged (full copy).
    pub fn handle_zeroed(&mut self, first: u64, count: u64) {
        let Some(g) = self.geometry else { return };
        if self.plan != Some(Plan::Full) || count == 0 || first.checked_add(count).is_none_or(|e| e > g.block_count()) {
            return self.fail(ErrorCode::Protocol, "zero range outside the disk or outside a full copy", true);
        }
        let region = g.region_of(first);
        if g.region_of(first + count - 1) != region {
            return self.fail(ErrorCode::Protocol, "zero range spans regions", true);
        }
        if self.is_done(region) {
            return self.fail(ErrorCode::Protocol, format!("zero range in region {region}, already done"), true);
        }
        let range = g.region_range(region);
        let p = self.pending.entry(region).or_insert_with(|| Pending::full((range.end - range.start) as usize));
        for b in first..first + count {
            if std::mem::replace(&mut p.covered[(b - range.start) as usize], true) {
                return self.fail(
                    ErrorCode::Protocol,
                    format!("zero range over block {b}, which was already sent"),
                    true,
                );
            }
        }
        p.items_seen += 1;
        self.check_full_region(region);
    }
    pub(super) fn check_full_region(&mut self, region: u64) {
        let Some(p) = self.pending.get(&region) else { return };
        match p.items_expected {
            Some(n) if p.items_seen == n => self.complete_region(region),
            Some(n) if p.items_seen > n => {
                self.fail(ErrorCode::Protocol, format!("region {region}: more frames than announced"), true)
            }
            _ => {}
        }
    }
}
