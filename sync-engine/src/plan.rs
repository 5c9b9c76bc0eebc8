//! The delta planner: pure functions from source and target hashes to
//! operations, one region at a time, so a plan never has to fit in memory.
//!
//! ```
//! use diskferry_protocol::BlockHash;
//! use diskferry_sync_engine::plan::{plan_region, Op};
//! let a = BlockHash([1; 32]);
//! let b = BlockHash([2; 32]);
//! let plan = plan_region(0, &[a, b, BlockHash::ZERO], &[Some(a), Some(a), Some(b)], &mut |_| None);
//! assert_eq!(plan.ops, vec![Op::Send { block: 1 }, Op::Zero { first: 2, count: 1 }]);
//! ```

use diskferry_protocol::BlockHash;

/// One thing to do to the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// The source's block must travel (whole, or the pages that differ).
    Send {
        /// Block index.
        block: u64,
    },
    /// The target already holds this content at block `from`: copy it locally.
    Copy {
        /// Block index to write.
        block: u64,
        /// Target block holding the same content before this apply.
        from: u64,
    },
    /// Blocks `first..first+count` become zeros (a hole where possible).
    Zero {
        /// First block.
        first: u64,
        /// Number of blocks.
        count: u64,
    },
}

/// Counts of what a plan does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PlanStats {
    /// Blocks compared.
    pub blocks: u64,
    /// Blocks to send.
    pub send: u64,
    /// Blocks copied inside the target.
    pub copy: u64,
    /// Blocks zeroed.
    pub zero: u64,
}

impl PlanStats {
    /// Blocks whose content changes.
    pub fn changed(&self) -> u64 {
        self.send + self.copy + self.zero
    }

    /// Adds another region's counts.
    pub fn add(&mut self, o: &PlanStats) {
        self.blocks += o.blocks;
        self.send += o.send;
        self.copy += o.copy;
        self.zero += o.zero;
    }
}

/// The operations for one region.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegionPlan {
    /// Operations in block order.
    pub ops: Vec<Op>,
    /// Their counts.
    pub stats: PlanStats,
}

impl RegionPlan {
    fn push_zero(&mut self, block: u64) {
        self.stats.zero += 1;
        if let Some(Op::Zero { first, count }) = self.ops.last_mut() {
            if *first + *count == block {
                *count += 1;
                return;
            }
        }
        self.ops.push(Op::Zero { first: block, count: 1 });
    }
}

/// Plans a region starting at block `first`. `target[i]` is what the target
/// holds at that block (`None`: unknown, never equal). `lookup` finds a
/// target block that already holds a hash, for a local copy.
pub fn plan_region(
    first: u64,
    source: &[BlockHash],
    target: &[Option<BlockHash>],
    lookup: &mut dyn FnMut(&BlockHash) -> Option<u64>,
) -> RegionPlan {
    let mut plan = RegionPlan::default();
    plan.stats.blocks = source.len() as u64;
    for (i, s) in source.iter().enumerate() {
        plan.block(first + i as u64, s, target.get(i).copied().flatten(), lookup);
    }
    plan
}

/// Plans only the blocks a comparison found different, given as
/// `(block, source hash, what the target holds)` in block order (the
/// network compare finds them chunk by chunk, `docs/design.md` §10.3).
pub fn plan_differing(
    blocks: &[(u64, BlockHash, Option<BlockHash>)],
    lookup: &mut dyn FnMut(&BlockHash) -> Option<u64>,
) -> RegionPlan {
    let mut plan = RegionPlan::default();
    plan.stats.blocks = blocks.len() as u64;
    for (block, s, t) in blocks {
        plan.block(*block, s, *t, lookup);
    }
    plan
}

impl RegionPlan {
    /// The one rule: equal is skipped, zeros become a zero range, content
    /// the target holds elsewhere is copied there, the rest is sent.
    fn block(
        &mut self,
        block: u64,
        s: &BlockHash,
        t: Option<BlockHash>,
        lookup: &mut dyn FnMut(&BlockHash) -> Option<u64>,
    ) {
        if t == Some(*s) {
            return;
        }
        if s.is_zero() {
            self.push_zero(block);
        } else if let Some(from) = lookup(s) {
            self.stats.copy += 1;
            self.ops.push(Op::Copy { block, from });
        } else {
            self.stats.send += 1;
            self.ops.push(Op::Send { block });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(n: u8) -> BlockHash {
        BlockHash([n; 32])
    }
    const Z: BlockHash = BlockHash::ZERO;

    struct Case {
        name: &'static str,
        source: Vec<BlockHash>,
        target: Vec<Option<BlockHash>>,
        holds: Vec<(BlockHash, u64)>,
        want: Vec<Op>,
    }

    #[test]
    fn table() {
        let cases = vec![
            Case {
                name: "equal",
                source: vec![h(1), h(2)],
                target: vec![Some(h(1)), Some(h(2))],
                holds: vec![],
                want: vec![],
            },
            Case {
                name: "one changed",
                source: vec![h(1), h(3)],
                target: vec![Some(h(1)), Some(h(2))],
                holds: vec![],
                want: vec![Op::Send { block: 11 }],
            },
            Case {
                name: "zero run merges",
                source: vec![Z, Z, h(1), Z],
                target: vec![Some(h(5)), Some(h(6)), Some(h(1)), Some(h(7))],
                holds: vec![],
                want: vec![Op::Zero { first: 10, count: 2 }, Op::Zero { first: 13, count: 1 }],
            },
            Case {
                name: "already zero",
                source: vec![Z, Z],
                target: vec![Some(Z), Some(Z)],
                holds: vec![],
                want: vec![],
            },
            Case {
                name: "unknown target block is never equal",
                source: vec![h(1), Z],
                target: vec![None, None],
                holds: vec![],
                want: vec![Op::Send { block: 10 }, Op::Zero { first: 11, count: 1 }],
            },
            Case {
                name: "moved block is copied",
                source: vec![h(2), h(1)],
                target: vec![Some(h(1)), Some(h(2))],
                holds: vec![(h(1), 10), (h(2), 11)],
                want: vec![Op::Copy { block: 10, from: 11 }, Op::Copy { block: 11, from: 10 }],
            },
            Case {
                name: "target shorter",
                source: vec![h(1), h(2), h(3)],
                target: vec![Some(h(1))],
                holds: vec![],
                want: vec![Op::Send { block: 11 }, Op::Send { block: 12 }],
            },
        ];
        for c in cases {
            let mut lookup = |x: &BlockHash| c.holds.iter().find(|(hh, _)| hh == x).map(|(_, b)| *b);
            let plan = plan_region(10, &c.source, &c.target, &mut lookup);
            assert_eq!(plan.ops, c.want, "{}", c.name);
            assert_eq!(plan.stats.blocks, c.source.len() as u64);
        }
    }

    #[test]
    fn differing_blocks_follow_the_same_rule() {
        let blocks = [(4, h(1), Some(h(2))), (5, Z, Some(h(3))), (6, Z, None), (9, h(7), None), (12, h(2), Some(h(2)))];
        let mut lookup = |x: &BlockHash| (*x == h(7)).then_some(40);
        let plan = plan_differing(&blocks, &mut lookup);
        assert_eq!(
            plan.ops,
            vec![Op::Send { block: 4 }, Op::Zero { first: 5, count: 2 }, Op::Copy { block: 9, from: 40 }]
        );
        assert_eq!(plan.stats, PlanStats { blocks: 5, send: 1, copy: 1, zero: 2 });
    }
}
