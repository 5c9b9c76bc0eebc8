//! The replication groups a target agent knows: `STATE/groups/NAME.members`,
//! one `target-name<TAB>path` line per member, learned from the group's first
//! push (`serve/group.rs`) and read by the group moves (`points`,
//! `failover`, `commit --group`). A target belongs to one group at a time.

use std::path::{Path, PathBuf};

use diskferry_protocol::ErrorCode;
use diskferry_sync_engine::Error;

/// A group and its members.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Membership {
    pub name: String,
    /// `(target name, target path)`, in the order the group was learned.
    pub members: Vec<(String, PathBuf)>,
}

fn dir(state_root: &Path) -> PathBuf {
    state_root.join("groups")
}

fn file(state_root: &Path, name: &str) -> PathBuf {
    dir(state_root).join(format!("{name}.members"))
}

fn io(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::io(diskferry_sync_engine::Place::State, what, path, e)
}

fn parse(name: &str, text: &str, path: &Path) -> Result<Membership, Error> {
    let members = text
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| l.split_once('\t').map(|(n, p)| (n.to_string(), PathBuf::from(p))))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| Error::corrupt(path, "a line is not NAME<TAB>PATH"))?;
    Ok(Membership { name: name.to_string(), members })
}

/// The group `name`, if this agent knows it.
pub fn load(state_root: &Path, name: &str) -> Result<Option<Membership>, Error> {
    let p = file(state_root, name);
    match std::fs::read_to_string(&p) {
        Ok(text) => parse(name, &text, &p).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io("reading", &p, e)),
    }
}

/// Every group this agent knows.
pub fn all(state_root: &Path) -> Result<Vec<Membership>, Error> {
    let d = dir(state_root);
    let entries = match std::fs::read_dir(&d) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io("listing", &d, e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| io("listing", &d, e))?;
        let file_name = entry.file_name();
        if let Some(name) = file_name.to_str().and_then(|n| n.strip_suffix(".members")) {
            if let Some(m) = load(state_root, name)? {
                out.push(m);
            }
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

fn refuse(what: String) -> Error {
    Error::new(ErrorCode::GroupMembers, what).hint(
        "push the group with the disks it was first pushed with; to regroup, forget the group on the target agent \
         first: `diskferry ungroup --group NAME --config FILE` (or, when a member cannot be opened any more, remove \
         groups/NAME.members in its state directory)",
    )
}

/// Forgets the group `name` (its members file goes, durably): its members
/// may then be pushed alone or in another group. The caller has recovered
/// and locked every member, so no group commit of it is in progress.
pub fn forget(state_root: &Path, name: &str) -> Result<(), Error> {
    let p = file(state_root, name);
    std::fs::remove_file(&p).map_err(|e| match e.kind() {
        // Another `ungroup` of it finished meanwhile.
        std::io::ErrorKind::NotFound => {
            Error::new(ErrorCode::NotFound, format!("group {name:?} was forgotten meanwhile ({})", p.display()))
        }
        _ => io("removing", &p, e),
    })?;
    let d = dir(state_root);
    std::fs::File::open(&d).and_then(|f| f.sync_all()).map_err(|e| io("syncing", &d, e))
}

/// Whether `target` may be pushed as a member of `group` in a push of
/// `members` disks: it is in no other group, and the group (if known) lists
/// it and has that many members.
pub fn check_member(state_root: &Path, group: &str, target: &str, members: usize) -> Result<(), Error> {
    for m in all(state_root)? {
        let listed = m.members.iter().any(|(n, _)| n == target);
        if m.name == group && !listed {
            return Err(refuse(format!("target {target:?} is not a member of group {group:?}")));
        }
        if m.name == group && m.members.len() != members {
            let names: Vec<&str> = m.members.iter().map(|(n, _)| n.as_str()).collect();
            return Err(refuse(format!(
                "group {group:?} has {} members ({}), this push has {members}",
                m.members.len(),
                names.join(", ")
            )));
        }
        if m.name != group && listed {
            return Err(refuse(format!("target {target:?} belongs to group {:?}", m.name)));
        }
    }
    Ok(())
}

/// Records the group's members on its first push (durably, before its
/// first group point); a known group must come with the same members.
pub fn learn(state_root: &Path, group: &Membership) -> Result<(), Error> {
    // Two first pushes of one group at once: the second compares with the
    // first's members instead of writing its own.
    static LEARNING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = LEARNING.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(known) = load(state_root, &group.name)? {
        let mut a: Vec<&String> = known.members.iter().map(|(n, _)| n).collect();
        let mut b: Vec<&String> = group.members.iter().map(|(n, _)| n).collect();
        a.sort();
        b.sort();
        return if a == b {
            Ok(())
        } else {
            Err(refuse(format!("group {:?} has the members {a:?}, not {b:?}", group.name)))
        };
    }
    let d = dir(state_root);
    std::fs::create_dir_all(&d).map_err(|e| io("creating", &d, e))?;
    let p = file(state_root, &group.name);
    let tmp = p.with_extension("tmp");
    let text: String = group.members.iter().map(|(n, path)| format!("{n}\t{}\n", path.display())).collect();
    let sync_dir = |d: &Path| std::fs::File::open(d).and_then(|f| f.sync_all()).map_err(|e| io("syncing", d, e));
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).map_err(|e| io("creating", &tmp, e))?;
        f.write_all(text.as_bytes()).and_then(|()| f.sync_all()).map_err(|e| io("writing", &tmp, e))?;
    }
    std::fs::rename(&tmp, &p).map_err(|e| io("renaming", &p, e))?;
    sync_dir(&d)?;
    sync_dir(state_root)
}

/// What a session on `target` keeps when it prunes: for a member of a
/// known group — pushed with the group or alone — the smallest retention
/// of the group's members (`retention_of` names each's), and the group's
/// newest that many consistent group points (generations every member
/// holds) besides its own newest points, so that a member pushed alone
/// too keeps every group point its other members keep. The members'
/// catalogs are read without their locks: they are replaced whole.
///
/// A group push (`group_push`) commits a group point itself: one fewer of
/// the points before it is kept.
pub fn retention(
    state_root: &Path,
    target: &str,
    own: u32,
    group_push: bool,
    retention_of: impl Fn(&str) -> Option<u32>,
) -> (u32, Vec<diskferry_protocol::Generation>) {
    use diskferry_sync_engine::apply::catalog::read_catalog;
    use diskferry_sync_engine::apply::Target;
    let Ok(groups) = all(state_root) else { return (own, Vec::new()) };
    let Some(m) = groups.into_iter().find(|m| m.members.iter().any(|(n, _)| n == target)) else {
        return (own, Vec::new());
    };
    let keep = m.members.iter().filter_map(|(n, _)| retention_of(n)).fold(own, u32::min);
    let fs = diskferry_sync_engine::store::RealFs;
    let catalogs: Vec<_> = m
        .members
        .iter()
        .map(|(_, path)| read_catalog(&fs, &Target::state_dir(state_root, path)).ok().flatten())
        .collect();
    let Some(Some(first)) = catalogs.first() else { return (keep, Vec::new()) };
    let mut shared: Vec<_> = first
        .points
        .iter()
        .filter(|p| p.consistency.is_recovery_point())
        .filter(|p| {
            catalogs.iter().all(|c| c.as_ref().is_some_and(|c| c.points.iter().any(|q| q.generation == p.generation)))
        })
        .collect();
    shared.sort_by_key(|p| std::cmp::Reverse(p.created_unix_ns));
    let older = keep.max(1) - u32::from(group_push);
    (keep, shared.iter().take(older as usize).map(|p| p.generation).collect())
}
