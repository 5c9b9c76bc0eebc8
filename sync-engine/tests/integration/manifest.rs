//! Manifests: a round trip gives back every hash, the index finds data
//! blocks, the spill path writes the same file, and damage is refused.

use std::path::Path;
use std::sync::Arc;

use diskferry_protocol::{BlockHash, Consistency, ErrorCode, Generation, Geometry, RegionHashes};
use diskferry_sync_engine::manifest::{Manifest, ManifestHeader, ManifestMeta, ManifestWriter};
use diskferry_sync_engine::store::{OpenHow, Vfs};
use diskferry_sync_engine::tree::{region_hash, RootHasher};
use diskferry_testkit::{read_image, MemFs};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::util::*;

const META: ManifestMeta = ManifestMeta {
    generation: Generation(0xfeed),
    parent: Some(Generation(0xbeef)),
    consistency: Consistency::App,
    created_unix_ns: 1_700_000_000_123,
};

/// Hashes with zero runs, data runs and repeated content.
fn synthetic(count: u64, seed: u64) -> Vec<BlockHash> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut v = Vec::with_capacity(count as usize);
    while (v.len() as u64) < count {
        let n = rng.random_range(1..=(count - v.len() as u64).min(3000));
        let kind = rng.random_range(0..3);
        for _ in 0..n {
            v.push(match kind {
                0 => BlockHash::ZERO,
                1 if !v.is_empty() && rng.random_bool(0.2) => v[rng.random_range(0..v.len())],
                _ => BlockHash(rng.random()),
            });
        }
    }
    v
}

fn write(vfs: &Arc<dyn Vfs>, path: &Path, g: &Geometry, hashes: &[BlockHash], spill: Option<usize>) -> ManifestHeader {
    let mut w = ManifestWriter::create(vfs.clone(), path, *g).unwrap();
    if let Some(n) = spill {
        w = w.with_index_spill(n);
    }
    for r in 0..g.region_count() {
        let range = g.region_range(r);
        w.push_region(r, &hashes[range.start as usize..range.end as usize]).unwrap();
    }
    w.finish(META).unwrap()
}

/// About 100 MiB at 4 KiB blocks: two regions and a short last block.
fn geometry() -> Geometry {
    Geometry::new((100 << 20) + 123, bs(4096))
}

fn check_contents(m: &Manifest, g: &Geometry, hashes: &[BlockHash]) {
    let h = m.header();
    assert_eq!(h.geometry, *g);
    assert_eq!(
        (h.generation, h.parent, h.consistency, h.created_unix_ns),
        (META.generation, META.parent, META.consistency, META.created_unix_ns)
    );
    let data = hashes.iter().filter(|h| !h.is_zero()).count() as u64;
    assert_eq!((h.data_blocks, h.zero_blocks), (data, g.block_count() - data));
    // The cursor, read in uneven steps, gives back every hash.
    let mut c = m.cursor();
    let mut got = Vec::new();
    for step in [1u64, 7, 1000, 4095, 1 << 40].iter().cycle() {
        let part = c.next_blocks(*step).unwrap();
        if part.is_empty() {
            break;
        }
        got.extend(part);
    }
    assert_eq!(got.len(), hashes.len());
    assert!(got == hashes, "cursor hashes differ");
    // Read as region hashes, mixing both reads: zero runs come as counts
    // where one run covers the step, and every hash is as written.
    let mut c = m.cursor();
    let mut got = Vec::new();
    let mut counted = 0;
    for (i, step) in [1u64, 7, 1000, 4095, 300, 64].iter().cycle().enumerate() {
        let part = if i % 3 == 2 { c.next_blocks(*step).unwrap().into() } else { c.next_hashes(*step).unwrap() };
        if part.is_empty() {
            break;
        }
        if matches!(part, RegionHashes::Zero(_)) {
            counted += 1;
        }
        got.extend(part.into_vec());
    }
    assert!(got == hashes, "region hashes differ");
    // Skipping lands where reading would have.
    let mut c = m.cursor();
    let mut at = 0usize;
    for step in [0u64, 1, 7, 1000, 4095, 300, 64].iter().cycle() {
        c.skip(*step).unwrap();
        at += *step as usize;
        let next = c.next_blocks(1).unwrap();
        if at >= hashes.len() {
            assert!(next.is_empty());
            break;
        }
        assert_eq!(next, vec![hashes[at]], "block {at} after a skip");
        at += 1;
    }
    if hashes.windows(1000).any(|w| w.iter().all(BlockHash::is_zero)) {
        assert!(counted > 0, "a long zero run never came as a count");
    }
    // Region hashes and root follow the tree.
    let mut root = RootHasher::new(g);
    for r in 0..g.region_count() {
        let range = g.region_range(r);
        let rh = region_hash(&hashes[range.start as usize..range.end as usize]);
        assert_eq!(m.region_hash(r).unwrap(), rh, "region {r}");
        root.update(&rh);
    }
    assert_eq!(h.root, root.finish());
    // The index finds every data block (some block with the same content).
    for (i, want) in hashes.iter().enumerate().filter(|(_, h)| !h.is_zero()) {
        let found = m.lookup(want).unwrap().unwrap_or_else(|| panic!("block {i} not in the index"));
        assert_eq!(hashes[found as usize], *want, "lookup of block {i}");
    }
    let mut rng = StdRng::seed_from_u64(99);
    for _ in 0..200 {
        assert_eq!(m.lookup(&BlockHash(rng.random())).unwrap(), None);
    }
}

#[test]
fn manifest_round_trip() {
    let vfs: Arc<dyn Vfs> = Arc::new(MemFs::new());
    let g = geometry();
    assert_eq!(g.region_count(), 2);
    let hashes = synthetic(g.block_count(), 1);
    let header = write(&vfs, p("/m.dfm"), &g, &hashes, None);
    let m = Manifest::open(vfs.as_ref(), p("/m.dfm")).unwrap();
    assert_eq!(*m.header(), header);
    check_contents(&m, &g, &hashes);
}

#[test]
fn manifest_of_empty_and_all_zero_disks() {
    let vfs: Arc<dyn Vfs> = Arc::new(MemFs::new());
    for (name, g) in [("empty", Geometry::new(0, bs(65536))), ("zeros", Geometry::new(10 << 20, bs(65536)))] {
        let hashes = vec![BlockHash::ZERO; g.block_count() as usize];
        let path = format!("/{name}.dfm");
        write(&vfs, p(&path), &g, &hashes, None);
        let m = Manifest::open(vfs.as_ref(), p(&path)).unwrap();
        check_contents(&m, &g, &hashes);
        assert_eq!(m.header().data_blocks, 0);
    }
}

#[test]
fn index_spill_writes_the_same_manifest() {
    let fs = MemFs::new();
    let vfs: Arc<dyn Vfs> = Arc::new(fs.clone());
    fs.create_dir_all(p("/a")).unwrap();
    let g = geometry();
    let hashes = synthetic(g.block_count(), 2);
    write(&vfs, p("/a/plain.dfm"), &g, &hashes, None);
    let plain = read_image(&fs, p("/a/plain.dfm")).unwrap().unwrap();
    for cap in [1, 7, 1000] {
        let path = format!("/a/spill{cap}.dfm");
        write(&vfs, p(&path), &g, &hashes, Some(cap));
        let spilled = read_image(&fs, p(&path)).unwrap().unwrap();
        assert!(spilled == plain, "spill cap {cap}: a different file");
        check_contents(&Manifest::open(vfs.as_ref(), p(&path)).unwrap(), &g, &hashes);
    }
    // The spill runs are cleaned up.
    assert_eq!(fs.list_dir(p("/a")).unwrap(), ["plain.dfm", "spill1.dfm", "spill1000.dfm", "spill7.dfm"]);
}

fn open_code(vfs: &dyn Vfs, path: &Path) -> Option<ErrorCode> {
    Manifest::open(vfs, path).err().map(|e| e.code)
}

#[test]
fn damaged_manifests_are_refused() {
    let fs = MemFs::new();
    let vfs: Arc<dyn Vfs> = Arc::new(fs.clone());
    let g = Geometry::new(3 << 20, bs(4096));
    let hashes = synthetic(g.block_count(), 3);
    write(&vfs, p("/m.dfm"), &g, &hashes, None);
    let good = read_image(&fs, p("/m.dfm")).unwrap().unwrap();
    let put = |bytes: &[u8]| {
        let f = fs.open(p("/bad.dfm"), OpenHow::Truncate).unwrap();
        f.write_at(0, bytes).unwrap();
    };
    // Bit flips everywhere: sampled through the body, every byte of the footer.
    let n = good.len();
    let mut offsets: Vec<usize> = (0..n - 192).step_by(97).collect();
    offsets.extend(n - 192..n);
    for off in offsets {
        for bit in [0, 7] {
            let mut bad = good.clone();
            bad[off] ^= 1 << bit;
            put(&bad);
            assert_eq!(open_code(vfs.as_ref(), p("/bad.dfm")), Some(ErrorCode::StateCorrupt), "flip at {off}");
        }
    }
    // Truncated, or with bytes appended.
    for len in [0, 1, 191, 192, n / 2, n - 193, n - 192, n - 1] {
        put(&good[..len]);
        assert_eq!(open_code(vfs.as_ref(), p("/bad.dfm")), Some(ErrorCode::StateCorrupt), "cut to {len}");
    }
    let mut longer = good.clone();
    longer.extend_from_slice(&[0; 16]);
    put(&longer);
    assert_eq!(open_code(vfs.as_ref(), p("/bad.dfm")), Some(ErrorCode::StateCorrupt), "appended");
    // The intact copy still opens.
    put(&good);
    assert_eq!(open_code(vfs.as_ref(), p("/bad.dfm")), None);
}

/// Lookups read the index by the page and keep the first pages they read:
/// a block looked up no longer costs a read per step of its binary search
/// (about 18 on this disk), and past the pages kept every block is still
/// found.
#[test]
fn lookups_read_the_index_by_the_page() {
    let g = Geometry::new(1 << 30, bs(4096));
    let fs = diskferry_testkit::FaultyFs::unlimited(Arc::new(MemFs::new()));
    let vfs: Arc<dyn Vfs> = Arc::new(fs.clone());
    let hashes = synthetic(g.block_count(), 3);
    write(&vfs, p("/m.dfm"), &g, &hashes, None);
    let m = Manifest::open(vfs.as_ref(), p("/m.dfm")).unwrap();
    let data: Vec<usize> = (0..hashes.len()).filter(|&i| !hashes[i].is_zero()).collect();
    assert!(data.len() * 16 > 600 * 4096, "the index must outgrow the pages kept: {} entries", data.len());
    let sample: Vec<usize> = data.iter().copied().step_by(data.len() / 1000).collect();
    let before = fs.ops();
    for &i in &sample {
        let found = m.lookup(&hashes[i]).unwrap().unwrap_or_else(|| panic!("block {i} not in the index"));
        assert_eq!(hashes[found as usize], hashes[i]);
    }
    let reads = fs.ops() - before;
    // A read per step was ~18 per lookup; the kept pages and the last
    // page read leave about 4 on this index of ~680 pages.
    assert!(reads < 5 * sample.len() as u64, "{reads} reads for {} lookups", sample.len());
    check_contents(&m, &g, &hashes);
}
