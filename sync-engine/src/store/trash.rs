//! [`Vfs::remove_later`](super::Vfs::remove_later) on a real filesystem:
//! the name goes at once (a rename within the directory), the blocks are
//! freed by a background thread. On ext4 the `unlink` of a delta's 41 MiB
//! redo log took 40–80 ms of its commit.

use std::fs;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::thread::JoinHandle;

use super::TRASH_PREFIX;

/// Unlinks left to threads, until they end.
static PENDING: Mutex<Vec<JoinHandle<()>>> = Mutex::new(Vec::new());

/// Renames a regular file at `path` to a trash name beside it and unlinks
/// it on a thread; anything else is removed (or refused) at once.
pub(super) fn remove_later(path: &Path) -> io::Result<()> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let remove_now = |p: &Path| match fs::remove_file(p) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r,
    };
    match fs::symlink_metadata(path) {
        // Only a regular file's freeing waits on a thread: anything else
        // fails (or goes) here as `remove_file` has it.
        Ok(md) if md.is_file() => {}
        _ => return remove_now(path),
    }
    let is_trash = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(TRASH_PREFIX));
    let trash = if is_trash {
        path.to_path_buf()
    } else {
        // A name no other file takes: renaming over a file would free
        // that file's blocks right here.
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let t = path.with_file_name(format!("{TRASH_PREFIX}{}-{n}", std::process::id()));
        match fs::rename(path, &t) {
            Ok(()) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        }
    };
    unlink_in_background(&trash)
}

/// Unlinks `path` on a thread that [`wait_for_removals`] waits for. The
/// caller has given the file a name nothing else will take while it waits
/// (else the thread may remove whatever has the name by then).
pub fn unlink_in_background(path: &Path) -> io::Result<()> {
    let unlink = {
        let path = path.to_path_buf();
        move || {
            #[cfg(test)]
            let _gate = tests::UNLINK_GATE.read().unwrap_or_else(|p| p.into_inner());
            let _ = fs::remove_file(&path);
        }
    };
    match std::thread::Builder::new().name("df-unlink".into()).spawn(unlink) {
        Ok(thread) => {
            let mut pending = PENDING.lock().unwrap_or_else(|p| p.into_inner());
            pending.retain(|t| !t.is_finished());
            pending.push(thread);
            Ok(())
        }
        Err(_) => match fs::remove_file(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r,
        },
    }
}

/// Waits for the files [`Vfs::remove_later`](super::Vfs::remove_later)
/// left to background threads to be freed: a command calls it before it
/// exits, so it leaves no trash behind (a daemon's threads finish on their
/// own).
pub fn wait_for_removals() {
    // Until none is left: another thread may add one meanwhile.
    loop {
        let pending = std::mem::take(&mut *PENDING.lock().unwrap_or_else(|p| p.into_inner()));
        if pending.is_empty() {
            return;
        }
        for t in pending {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Held for writing, it keeps [`super::remove_later`]'s threads from unlinking.
    pub(super) static UNLINK_GATE: std::sync::RwLock<()> = std::sync::RwLock::new(());

    #[test]
    fn a_file_removed_later_loses_its_name_at_once_and_its_blocks_in_the_background() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("redo.log");
        std::fs::write(&big, vec![7u8; 4 << 20]).unwrap();
        let held = std::fs::File::open(&big).unwrap();
        let names = || -> Vec<String> {
            let mut v: Vec<String> =
                std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
            v.sort();
            v
        };
        {
            let _stop = UNLINK_GATE.write().unwrap();
            remove_later(&big).unwrap();
            // The name is free at once; the file lives on under a trash
            // name beside it until the thread unlinks it.
            assert!(!big.exists());
            assert_eq!(held.metadata().unwrap().nlink(), 1);
            let left = names();
            assert_eq!(left.len(), 1, "{left:?}");
            assert!(left[0].starts_with(&format!("{}{}-", super::super::TRASH_PREFIX, std::process::id())), "{left:?}");
            std::fs::write(&big, b"next").unwrap();
        }
        // A leftover of an earlier process goes when it is passed again.
        let leftover = dir.path().join(format!("{}1-0", super::super::TRASH_PREFIX));
        std::fs::write(&leftover, b"old").unwrap();
        remove_later(&leftover).unwrap();
        // Removing what is not there is no error, as for remove_file; a
        // directory is refused as remove_file refuses it.
        remove_later(&dir.path().join("gone")).unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        assert!(remove_later(&dir.path().join("sub")).is_err());
        std::fs::remove_dir(dir.path().join("sub")).unwrap();
        wait_for_removals();
        assert_eq!(held.metadata().unwrap().nlink(), 0);
        assert_eq!(names(), ["redo.log"]);
        assert_eq!(std::fs::read(&big).unwrap(), b"next");
    }
}
