//! The failover moves proven by booting real guests: a busybox Linux under
//! QEMU (software emulation) writes checksummed files to an ext4 disk while
//! diskferry replicates it; a checker guest boots each replica (e2fsck,
//! journal replay, every listed file's checksum) and must say PASS — and
//! must say FAIL on a replica with one flipped byte, so the harness itself
//! can fail.
//!
//! One test per move, run one at a time (each guest takes a core):
//! `cargo test -p diskferry-agent --test vm`. As root the tests install
//! QEMU and the guest kernel if missing (`tests/vm/guest.sh install`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
#[path = "../e2e/util.rs"]
mod util;
#[path = "../e2e/system.rs"]
mod system;

#[path = "../e2e/agents.rs"]
mod agents;

mod bitmaps;
mod checker;
mod group;
mod moves;
mod qemu;
