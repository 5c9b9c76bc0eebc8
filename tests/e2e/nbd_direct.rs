//! Images at rest read straight from the files QEMU maps their plain data
//! to (`agent/src/nbd/direct.rs`): the same bytes as through NBD wherever
//! the data lies, and a map that lies is caught by its sample.

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::nbd::{need_qemu, qcow2, qemu_io, raw_of, sh};
use crate::util::{self, tempdir, MIB};

fn root(image: &Path, env: &[(&str, &OsStr)]) -> (String, String) {
    let mut args: Vec<&OsStr> = vec!["hash".as_ref(), image.as_os_str()];
    if image.extension().is_some_and(|e| e == "qcow2") {
        args.extend(["--format", "qcow2"].map(OsStr::new));
    }
    args.push("--json".as_ref());
    let out = util::run_env(&args, env);
    let stderr = out.stderr.clone();
    let json = out.ok_json();
    (json["root"].as_str().expect("a root").to_string(), stderr)
}

#[test]
fn plain_data_is_read_from_the_files_qemu_maps_it_to() {
    need_qemu();
    let dir = tempdir("nbd-direct");
    let size = 48 * MIB;
    // A raw backing file under qcow2s holding its own clusters (some
    // written compressed: `qemu-img map` then names no files, and only the
    // image's own plain clusters are read directly), and a qcow2 keeping
    // its data in an external file.
    let base = dir.path().join("base.img");
    sh("qemu-img", &["create", "-q", "-f", "raw", base.to_str().unwrap(), &size.to_string()]);
    sh(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x42 3M 5M", "-c", "write -P 0x17 40M 123457", base.to_str().unwrap()],
    );
    let top = dir.path().join("top.qcow2");
    let backing = format!("backing_file={},backing_fmt=raw", base.display());
    sh("qemu-img", &["create", "-q", "-f", "qcow2", "-o", &backing, top.to_str().unwrap(), &size.to_string()]);
    qemu_io(&top, &[(12345, 70_000, 0xa1), (5 * MIB + 1, MIB, 0x5c), (47 * MIB, 77, 0x01)]);
    let over = dir.path().join("over.qcow2");
    sh("qemu-img", &["create", "-q", "-f", "qcow2", "-o", &backing, over.to_str().unwrap(), &size.to_string()]);
    qemu_io(&over, &[(4 * MIB + 17, 2 * MIB, 0x5d)]);
    sh("qemu-io", &["-f", "qcow2", "-c", "write -c -P 0x33 20M 128k", top.to_str().unwrap()]);
    let external = dir.path().join("ext.qcow2");
    let data_file = format!("data_file={}", dir.path().join("ext-data.bin").display());
    sh("qemu-img", &["create", "-q", "-f", "qcow2", "-o", &data_file, external.to_str().unwrap(), &size.to_string()]);
    qemu_io(&external, &[(0, 2 * MIB + 3, 0x61), (30 * MIB - 1, 4097, 0x62)]);
    // Random bytes too: a map a little off would still read right inside
    // a run of one pattern.
    let plain = dir.path().join("plain.qcow2");
    qcow2(&plain, size + 4096, &[(MIB, 9 * MIB, 0x71)]);
    let noise = dir.path().join("noise");
    util::random_disk(&noise, 3 * MIB, &mut util::rng("nbd-direct"));
    let write = format!("write -s {} 20M 3M", noise.display());
    sh("qemu-io", &["-f", "qcow2", "-c", &write, plain.to_str().unwrap()]);

    for image in [&top, &over, &external, &plain] {
        let want = root(&raw_of(image), &[]).0;
        let (direct, log) = root(image, &[("RUST_LOG", "diskferry_agent::nbd=debug".as_ref())]);
        assert!(log.contains("reading plain data from the image's files"), "{}: {log}", image.display());
        let (through_nbd, _) = root(image, &[("DISKFERRY_NBD_DIRECT", "0".as_ref())]);
        assert_eq!(direct, want, "{}: read from its files", image.display());
        assert_eq!(through_nbd, want, "{}: read through NBD", image.display());
    }

    // A `qemu-img map` that points every range a page off: the sample
    // catches it, NBD reads the image, the root is still right.
    let fakebin = dir.path().join("fakebin");
    std::fs::create_dir(&fakebin).unwrap();
    let real = String::from_utf8(std::process::Command::new("which").arg("qemu-img").output().unwrap().stdout).unwrap();
    let fake = fakebin.join("qemu-img");
    std::fs::write(
        &fake,
        format!(
            "#!/bin/bash\nif [ \"$1\" != map ]; then exec {} \"$@\"; fi\n{} \"$@\" | {{ read -r h; echo \"$h\"; \
             while read -r a b c d; do printf '%s %s 0x%x %s\\n' $a $b $((c + 4096)) \"$d\"; done; }}\n",
            real.trim(),
            real.trim()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", fakebin.display(), std::env::var("PATH").unwrap_or_default());
    let want = root(&raw_of(&plain), &[]).0;
    let (got, stderr) = root(&plain, &[("PATH", path.as_ref())]);
    assert_eq!(got, want, "a lying map must not be used");
    assert!(stderr.contains("differ from what NBD serves"), "the turn-down is reported: {stderr}");
}
