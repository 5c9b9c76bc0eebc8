//! The sync engine's integration tests (one binary): hashing paths agree,
//! manifests round-trip and refuse damage, syncs converge, and the apply
//! keeps invariants I1 (crash consistency) and I2 (integrity) under power
//! cuts at every sync point, injected I/O errors and damaged state files.

// Helpers outside `#[test]` functions panic on purpose too.
#![allow(clippy::unwrap_used)]

mod integration {
    mod util;

    mod corrupt;
    mod crash;
    mod direct;
    mod faults;
    mod group;
    mod hash_paths;
    mod hints;
    mod lineage;
    mod manifest;
    mod moves;
    mod net_apply;
    mod points;
    mod receive;
    mod scenarios;
    mod sync_props;
}
