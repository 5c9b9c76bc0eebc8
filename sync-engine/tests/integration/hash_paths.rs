//! STYLE rule 14: every hashing path gives the same hashes. Memory-mapped
//! and `pread` reads of real sparse files and reads through an in-memory
//! filesystem, on pools of 1 and 4 threads, for awkward sizes and three
//! block sizes, must give the same block hashes, region hashes and manifest
//! root as a reference computed straight from the bytes with blake3.

use std::path::Path;
use std::sync::Arc;

use diskferry_protocol::{BlockHash, Consistency, Generation, Geometry};
use diskferry_sync_engine::hash::hash_blocks;
use diskferry_sync_engine::manifest::{Manifest, ManifestMeta, ManifestWriter};
use diskferry_sync_engine::store::{OpenHow, Vfs};
use diskferry_sync_engine::tree::{region_hash, RootHasher};
use diskferry_sync_engine::Disk;
use diskferry_testkit::{write_image, write_sparse_file, DiskGen, MemFs};

use super::util::*;

/// The hashes by definition: blake3 of each block, the zero sentinel for zeros.
fn reference(bytes: &[u8], g: &Geometry) -> Vec<BlockHash> {
    bytes
        .chunks(g.block_size.get() as usize)
        .map(|c| if c.iter().all(|&b| b == 0) { BlockHash::ZERO } else { BlockHash(*blake3::hash(c).as_bytes()) })
        .collect()
}

fn regions(hashes: &[BlockHash], g: &Geometry) -> Vec<BlockHash> {
    (0..g.region_count())
        .map(|r| {
            let range = g.region_range(r);
            region_hash(&hashes[range.start as usize..range.end as usize])
        })
        .collect()
}

fn root(region_hashes: &[BlockHash], g: &Geometry) -> BlockHash {
    let mut h = RootHasher::new(g);
    for r in region_hashes {
        h.update(r);
    }
    h.finish()
}

/// Inputs named by size: tiny, around one block, unaligned, holes, and a
/// sparse disk spanning two 64 MiB regions.
fn inputs(block: u64) -> Vec<(String, Vec<u8>)> {
    let mut g = DiskGen::new(block);
    let b = block;
    let mut holes = vec![0u8; (5 << 20) + 4321];
    for (off, len) in [(3u64, 5000u64), (70_000, 200_000), (1 << 20, 1), ((3 << 20) - 7, 600_000), ((5 << 20), 4321)] {
        let data = g.disk(len);
        holes[off as usize..(off + len) as usize].copy_from_slice(&data);
        holes[off as usize] = 1;
    }
    let mut two_regions = vec![0u8; 70 << 20];
    for off in [0usize, (64 << 20) - 50, (70 << 20) - 10] {
        two_regions[off..off + 10].fill(0xA5);
    }
    vec![
        ("0".into(), Vec::new()),
        ("1".into(), vec![7]),
        ("bs-1".into(), g.disk(b - 1)),
        ("bs".into(), g.disk(b)),
        ("bs+1".into(), g.disk(b + 1)),
        ("3bs+17".into(), g.disk(3 * b + 17)),
        ("5MiB+4321 with holes".into(), holes),
        ("70MiB sparse, two regions".into(), two_regions),
    ]
}

fn manifest_of(hashes: &[BlockHash], g: &Geometry) -> Manifest {
    let fs = MemFs::new();
    let vfs: Arc<dyn Vfs> = Arc::new(fs);
    let path = Path::new("/m.dfm");
    let mut w = ManifestWriter::create(vfs.clone(), path, *g).unwrap();
    for r in 0..g.region_count() {
        let range = g.region_range(r);
        w.push_region(r, &hashes[range.start as usize..range.end as usize]).unwrap();
    }
    let meta =
        ManifestMeta { generation: Generation(9), parent: None, consistency: Consistency::Crash, created_unix_ns: 1 };
    w.finish(meta).unwrap();
    Manifest::open(vfs.as_ref(), path).unwrap()
}

fn check_input(block: u32, name: &str, bytes: &[u8], dir: &Path) {
    let g = Geometry::new(bytes.len() as u64, bs(block));
    let want = reference(bytes, &g);
    let want_regions = regions(&want, &g);
    let want_root = root(&want_regions, &g);

    let file = dir.join(format!("{block}-{}.img", name.replace(' ', "_")));
    write_sparse_file(&file, bytes).unwrap();
    // Allocated zeros (not a hole) must hash like a hole.
    if bytes.len() > 20_000 {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
        let at = bytes.len() / 3;
        f.write_all_at(&bytes[at..at + 10_000], at as u64).unwrap();
    }
    let mem = MemFs::new();
    write_image(&mem, p("/d.img"), bytes).unwrap();

    type Open<'a> = Box<dyn Fn() -> Disk + 'a>;
    let paths: Vec<(&str, Open<'_>)> = vec![
        ("mmap", Box::new(|| Disk::open(&file).unwrap())),
        ("pread", Box::new(|| Disk::open_unmapped(&file).unwrap())),
        ("memfs", Box::new(|| diskferry_sync_engine::Disk::open_on(&mem, p("/d.img")).unwrap())),
    ];
    for (path_name, open) in &paths {
        for threads in [1, 4] {
            let ctx = format!("{name} at block size {block}, {path_name}, {threads} thread(s)");
            let disk = open();
            assert_eq!(disk.len(), bytes.len() as u64, "{ctx}");
            let run = || hash_blocks(&disk, &g, 0..g.block_count()).unwrap();
            let got = if threads == 1 { one_thread(run) } else { four_threads(run) };
            assert_eq!(got.len(), want.len(), "{ctx}");
            if let Some(i) = (0..want.len()).find(|&i| got[i] != want[i]) {
                panic!("{ctx}: block {i} hashes to {:?}, expected {:?}", got[i], want[i]);
            }
            // Region by region (how syncs call it) gives the same hashes.
            for r in 0..g.region_count() {
                let range = g.region_range(r);
                let part = four_threads(|| hash_blocks(&disk, &g, range.clone()).unwrap());
                assert_eq!(part, want[range.start as usize..range.end as usize], "{ctx}: region {r}");
            }
            let m = manifest_of(&got, &g);
            assert_eq!(m.header().root, want_root, "{ctx}: manifest root");
            for (r, h) in want_regions.iter().enumerate() {
                assert_eq!(m.region_hash(r as u64).unwrap(), *h, "{ctx}: region hash {r}");
            }
        }
    }
    // The MemFs really left holes: the hole path was exercised.
    if name.contains("holes") {
        let f = mem.open(p("/d.img"), OpenHow::Read).unwrap();
        let data: u64 = f.data_ranges(0, bytes.len() as u64).unwrap().iter().map(|r| r.1).sum();
        assert!(data < bytes.len() as u64 / 2, "{name}: expected holes");
    }
    std::fs::remove_file(&file).unwrap();
}

fn check_block_size(block: u32) {
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes) in inputs(block as u64) {
        check_input(block, &name, &bytes, dir.path());
    }
}

#[test]
fn hash_paths_agree_4k() {
    check_block_size(4 << 10);
}

#[test]
fn hash_paths_agree_64k() {
    check_block_size(64 << 10);
}

#[test]
fn hash_paths_agree_1m() {
    check_block_size(1 << 20);
}

/// Content, size and block size all reach the root: it is not a constant.
#[test]
fn roots_differ_with_content_size_and_block_size() {
    let bytes = DiskGen::new(5).disk(300_000);
    let root_of = |b: &[u8], block: u32| {
        let g = Geometry::new(b.len() as u64, bs(block));
        root(&regions(&reference(b, &g), &g), &g)
    };
    let base = root_of(&bytes, 4096);
    let mut flipped = bytes.clone();
    flipped[123_456] ^= 1;
    assert_ne!(base, root_of(&flipped, 4096));
    let mut longer = bytes.clone();
    longer.push(0);
    assert_ne!(base, root_of(&longer, 4096));
    assert_ne!(base, root_of(&bytes, 65536));
}
