//! Where a push learns which blocks may have changed (`--changes`): a full
//! scan, another tracker's change list, or (with `--snapshot reflink`) the
//! extents the new snapshot no longer shares with the one kept from the
//! last push. The engine decides whether a hint may be used
//! (`diskferry_sync_engine::changes`); this module only produces it.

use std::path::{Path, PathBuf};

use diskferry_protocol::{ErrorCode, Generation};
use diskferry_sync_engine::changes::{ChangeHint, ChangeSource};
use diskferry_sync_engine::Error;
use serde::Deserialize;

/// `--changes`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Changes {
    /// Read and hash every block.
    #[default]
    FullScan,
    /// A change list: `{"since": GENERATION, "ranges": [[offset, length], …]}`.
    Ranges(PathBuf),
    /// The extents a reflink snapshot no longer shares with the one kept
    /// from the last push (`--snapshot reflink`).
    ExtentMap,
    /// The qcow2 image's persistent dirty bitmap started after the last
    /// push (`--format qcow2`).
    DirtyBitmap,
}

impl std::str::FromStr for Changes {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "full-scan" => Ok(Changes::FullScan),
            "extent-map" => Ok(Changes::ExtentMap),
            "dirty-bitmap" => Ok(Changes::DirtyBitmap),
            _ => match s.strip_prefix("ranges:") {
                Some(file) if !file.is_empty() => Ok(Changes::Ranges(PathBuf::from(file))),
                _ => Err("full-scan, dirty-bitmap, extent-map, or ranges:FILE".into()),
            },
        }
    }
}

/// A change list as another tracker writes it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChangeList {
    since: String,
    ranges: Vec<(u64, u64)>,
}

/// Reads a change list; a missing or malformed one fails the push before
/// anything is sent (a list that cannot be read is not a reason to guess).
pub fn read_change_list(path: &Path) -> Result<ChangeHint, Error> {
    let bad = |why: String| {
        Error::new(ErrorCode::Usage, format!("change list {}: {why}", path.display())).hint(
            "write {\"since\": \"<generation the ranges count from>\", \"ranges\": [[offset, length], ...]} (bytes)",
        )
    };
    let text = std::fs::read_to_string(path).map_err(|e| {
        let code = if e.kind() == std::io::ErrorKind::NotFound { ErrorCode::NotFound } else { ErrorCode::Io };
        Error::new(code, format!("change list {}: {e}", path.display()))
    })?;
    let list: ChangeList = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let since: Generation = list.since.parse().map_err(|e| bad(format!("since: {e}")))?;
    if let Some(&(off, len)) = list.ranges.iter().find(|(off, len)| off.checked_add(*len).is_none()) {
        return Err(bad(format!("the range [{off}, {len}] ends past 2^64")));
    }
    Ok(ChangeHint { since, source: ChangeSource::Ranges, ranges: list.ranges, live: None })
}

/// One extent of a file, as FIEMAP reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Extent {
    logical: u64,
    physical: u64,
    len: u64,
    /// Allocated but reads zeros.
    unwritten: bool,
    /// Where its bytes are is not known for sure (delayed allocation,
    /// inline or encoded data): never taken as shared.
    vague: bool,
}

fn extents(path: &Path) -> std::io::Result<Vec<Extent>> {
    use fiemap::FiemapExtentFlags as F;
    let file = std::fs::File::open(path)?;
    let vague = F::UNKNOWN | F::DELALLOC | F::ENCODED | F::DATA_ENCRYPTED | F::NOT_ALIGNED | F::DATA_INLINE;
    let mut out: Vec<Extent> = fiemap::Fiemap::new(file)
        .map(|e| {
            e.map(|e| Extent {
                logical: e.fe_logical,
                physical: e.fe_physical,
                len: e.fe_length,
                unwritten: e.fe_flags.contains(F::UNWRITTEN),
                vague: e.fe_flags.intersects(vague),
            })
        })
        .collect::<std::io::Result<_>>()?;
    out.sort_by_key(|e| e.logical);
    Ok(out)
}

/// The byte ranges of `new` that may differ from `kept`: everywhere except
/// where both map the same physical extent at the same offset (a reflink
/// clone still sharing it) or both have a hole.
pub fn extent_changes(kept: &Path, new: &Path) -> std::io::Result<Vec<(u64, u64)>> {
    let size = std::fs::metadata(kept)?.len().max(std::fs::metadata(new)?.len());
    Ok(diff_extents(&extents(kept)?, &extents(new)?, size))
}

fn diff_extents(a: &[Extent], b: &[Extent], size: u64) -> Vec<(u64, u64)> {
    let mut cuts: Vec<u64> = vec![0, size];
    for e in a.iter().chain(b) {
        cuts.push(e.logical.min(size));
        cuts.push(e.logical.saturating_add(e.len).min(size));
    }
    cuts.sort_unstable();
    cuts.dedup();
    let covering = |list: &[Extent], i: &mut usize, at: u64| -> Option<Extent> {
        while *i < list.len() && list[*i].logical + list[*i].len <= at {
            *i += 1;
        }
        list.get(*i).copied().filter(|e| e.logical <= at)
    };
    let (mut ia, mut ib) = (0, 0);
    let mut dirty: Vec<(u64, u64)> = Vec::new();
    for w in cuts.windows(2) {
        let (start, end) = (w[0], w[1]);
        let same = match (covering(a, &mut ia, start), covering(b, &mut ib, start)) {
            (None, None) => true,
            (Some(x), Some(y)) => {
                !x.vague
                    && !y.vague
                    && x.unwritten == y.unwritten
                    && x.physical.wrapping_sub(x.logical) == y.physical.wrapping_sub(y.logical)
            }
            _ => false,
        };
        if !same {
            match dirty.last_mut() {
                Some((off, len)) if *off + *len == start => *len += end - start,
                _ => dirty.push((start, end - start)),
            }
        }
    }
    dirty
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_flag() {
        assert_eq!("full-scan".parse::<Changes>(), Ok(Changes::FullScan));
        assert_eq!("ranges:/x.json".parse::<Changes>(), Ok(Changes::Ranges("/x.json".into())));
        assert!("ranges:".parse::<Changes>().is_err());
        assert!("bitmap".parse::<Changes>().is_err());
        assert_eq!("extent-map".parse::<Changes>(), Ok(Changes::ExtentMap));
    }

    fn ext(logical: u64, physical: u64, len: u64) -> Extent {
        Extent { logical, physical, len, unwritten: false, vague: false }
    }

    #[test]
    fn shared_extents_are_clean_everything_else_dirty() {
        // a: [0,100) at 1000, [200,300) at 5000; b shares [0,50), moved
        // [50,100), shares [200,300) but split differently, adds [400,450).
        let a = [ext(0, 1000, 100), ext(200, 5000, 100)];
        let b = [ext(0, 1000, 50), ext(50, 9000, 50), ext(200, 5000, 40), ext(240, 5040, 60), ext(400, 7000, 50)];
        assert_eq!(diff_extents(&a, &b, 1000), vec![(50, 50), (400, 50)]);
        // A hole punched in b, a hole filled in b, an unwritten extent, a vague one.
        let b = [ext(0, 1000, 30), ext(120, 3000, 10)];
        assert_eq!(diff_extents(&a, &b, 1000), vec![(30, 70), (120, 10), (200, 100)]);
        let mut u = ext(0, 1000, 100);
        u.unwritten = true;
        assert_eq!(diff_extents(&[ext(0, 1000, 100)], &[u], 100), vec![(0, 100)]);
        let mut v = ext(0, 1000, 100);
        v.vague = true;
        assert_eq!(diff_extents(&[v], &[v], 100), vec![(0, 100)]);
        // Extents past the end are clipped; identical maps give nothing.
        assert_eq!(diff_extents(&a, &a, 250), Vec::<(u64, u64)>::new());
        assert_eq!(diff_extents(&[], &[ext(0, 1, 4096)], 100), vec![(0, 100)]);
    }

    #[test]
    fn change_lists_are_checked() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let p = dir.path().join("c.json");
        let gen = "0123456789abcdef0123456789abcdef";
        let write = |s: &str| std::fs::write(&p, s).unwrap_or_else(|e| panic!("{e}"));
        write(&format!("{{\"since\": \"{gen}\", \"ranges\": [[0, 4096], [65536, 1]]}}"));
        let h = read_change_list(&p).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(h.ranges, vec![(0, 4096), (65536, 1)]);
        assert_eq!(h.since.to_hex(), gen);
        for (text, code) in [
            ("{\"since\": \"xyz\", \"ranges\": []}", ErrorCode::Usage),
            (&format!("{{\"since\": \"{gen}\", \"ranges\": [[1]]}}"), ErrorCode::Usage),
            (&format!("{{\"since\": \"{gen}\", \"ranges\": [[18446744073709551615, 2]]}}"), ErrorCode::Usage),
            (&format!("{{\"since\": \"{gen}\"}}"), ErrorCode::Usage),
            ("not json", ErrorCode::Usage),
        ] {
            write(text);
            let e = read_change_list(&p).err().unwrap_or_else(|| panic!("{text} was accepted"));
            assert_eq!(e.code, code, "{text}: {e}");
        }
        let e = read_change_list(&dir.path().join("missing.json")).err().unwrap_or_else(|| panic!("accepted"));
        assert_eq!(e.code, ErrorCode::NotFound);
    }
}
