//! Change tracking on a running VM: the guest writes to a qcow2 disk while
//! diskferry pushes, reading only what QEMU's dirty bitmap (kept over QMP)
//! marks; after the power-down the last pass reads the persistent bitmap
//! at rest, and the replica boots.

use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::agents::Hosts;
use crate::qemu::{assert_passes, listed_files, make_ext4, one_at_a_time, Vm};
use crate::util::{compare, uint, MIB};

const DISK_MIB: u64 = 256;
const GUEST_WAIT: Duration = Duration::from_secs(180);

/// What a hinted push may read: twice the blocks the bitmap named, the spot
/// check, and 1 % of the disk.
#[track_caller]
fn assert_read_only_dirty(r: &Value) {
    assert_eq!(r["change_source"], "dirty-bitmap", "{r}");
    let block = uint(r, "disk_bytes").div_ceil(uint(r, "blocks_total"));
    let bound = (2 * uint(r, "hinted_blocks") + uint(r, "spot_checked_blocks")) * block + uint(r, "disk_bytes") / 100;
    assert!(uint(r, "source_bytes_read") <= bound, "read more than {bound}: {r}");
    assert!(uint(r, "source_bytes_read") < uint(r, "disk_bytes") / 4, "{r}");
}

fn convert(from: &std::path::Path, format: &str, to: &std::path::Path) {
    let s = Command::new("qemu-img").args(["convert", "-O", format]).arg(from).arg(to).status().unwrap();
    assert!(s.success(), "qemu-img convert {}", from.display());
}

#[test]
fn a_running_vms_dirty_bitmap_over_qmp() {
    let _one = one_at_a_time();
    let dir = crate::util::tempdir("vm-bitmap-disk");
    let image = dir.path().join("vm.qcow2");
    let h = Hosts::start_with("vm-bitmap", 3, Some(image.clone()));
    let raw = dir.path().join("made.raw");
    make_ext4(&raw, DISK_MIB, 96);
    convert(&raw, "qcow2", &image);
    let mut vm = Vm::writer_as(&image, "qcow2", 900, 64);
    let qmp = vm.agent_qmp.to_str().unwrap().to_string();
    let args = ["--format", "qcow2", "--changes", "dirty-bitmap", "--qmp", &qmp, "--node", "disk0"];

    vm.wait_listed(2, GUEST_WAIT);
    let first = h.push(true, &args).ok_json();
    assert_eq!((&first["read_through"], &first["change_source"]), (&"qmp".into(), &"full-scan".into()), "{first}");
    let mut hinted = Vec::new();
    for _ in 0..3 {
        let n = vm.listed();
        vm.wait_listed(n + 3, GUEST_WAIT);
        let r = h.push(true, &args).ok_json();
        assert_eq!(r["read_through"], "qmp", "{r}");
        assert_read_only_dirty(&r);
        hinted.push(r);
    }
    // The guest goes on writing after the last pass, then powers down:
    // QEMU stores the bitmap in the image as it exits.
    let n = vm.listed();
    vm.wait_listed(n + 2, GUEST_WAIT);
    vm.powerdown(Duration::from_secs(120));
    let last = h.push(true, &args).ok_json();
    assert_eq!(last["read_through"], "qemu-storage-daemon", "at rest: {last}");
    assert_read_only_dirty(&last);
    assert_eq!(last["consistency"], "crash-consistent", "{last}");
    for r in hinted.iter().chain([&last]) {
        eprintln!(
            "pass: {} through {}, {} hinted blocks, {} changed, {} MiB read of {} MiB, {} s",
            r["consistency"],
            r["read_through"],
            r["hinted_blocks"],
            r["blocks_changed"],
            uint(r, "source_bytes_read") / MIB,
            uint(r, "disk_bytes") / MIB,
            r["seconds"]
        );
    }

    let guest_view = dir.path().join("after.raw");
    convert(&image, "raw", &guest_view);
    compare(&guest_view, &h.disk_b).unwrap();
    let v = assert_passes(&h.disk_b, "the replica of the qcow2 disk");
    assert_eq!(v.listed(), listed_files(&guest_view).len() as u64, "{}", v.line);
    assert!(v.listed() >= 11, "every file the guest listed is on the replica: {}", v.line);
}
