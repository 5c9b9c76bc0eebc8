//! End-to-end tests: the real `diskferry` binary run as processes, on real
//! files, loop devices and loop-mounted filesystems (run as root).
//!
//! The slow kill stress test is `#[ignore]`d; run it with
//! `cargo test -p diskferry-agent --test e2e -- --ignored kill_stress`.
//! Random tests print their seed; `DISKFERRY_E2E_SEED=N` replays one.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod util;
mod system;

mod agents;
mod bench;
mod blockdev;
mod bwlimit;
mod changes;
mod cli;
mod corrupt;
mod daemon;
mod diverge;
mod failover;
mod failover_kill;
mod failover_sync;
mod full_download;
mod full_fs;
mod group;
mod guard;
mod jobs_page;
mod keep_points;
mod kill;
mod leftovers;
mod lost_ack;
mod memory;
mod nbd;
mod nbd_direct;
mod net;
mod packaging;
mod plan;
mod points;
mod protect;
mod qmp;
mod restart;
mod snapshot;
mod source_change;
