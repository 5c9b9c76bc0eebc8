//! The harness can fail: the checker guest passes a cleanly written disk and
//! fails the same disk with one flipped byte in one listed file.

use crate::qemu::{assert_passes, check, data_offset, listed_files, make_ext4, one_at_a_time, Vm};
use crate::util::{copy, flip_bit, tempdir};
use std::time::Duration;

#[test]
pub fn checker_fails_on_a_corrupted_replica() {
    let _one = one_at_a_time();
    let tmp = tempdir("vm-checker");
    let disk = tmp.path().join("disk.img");
    make_ext4(&disk, 128, 0);
    let mut vm = Vm::writer(&disk, 3, 32);
    let status = vm.wait_exit(Duration::from_secs(120));
    assert!(status.success() && vm.console().contains("stop=timer"), "{status}: {}", vm.console());
    let good = assert_passes(&disk, "the writer's own disk");
    let files = listed_files(&disk);
    assert!(!files.is_empty() && good.listed() == files.len() as u64, "{files:?} vs {}", good.line);

    let victim = &files[files.len() / 2];
    let bad = tmp.path().join("bad.img");
    copy(&disk, &bad);
    flip_bit(&bad, data_offset(&bad, victim) + 1234, 3);
    let v = check(&bad);
    assert!(!v.pass, "a flipped byte in {victim} passed: {}", v.line);
    assert!(v.line.contains("bad=1"), "{}", v.line);
    assert!(v.console.contains(&format!("VMP bad {victim}")), "{}", v.console);
}
