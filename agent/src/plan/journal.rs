//! What a planned or unplanned run of a plan got done, VM by VM
//! (`STATE/plans/NAME.MODE.json`): run again after an error, the plan
//! skips the VMs already failed over and started, and starts those whose
//! failover went through but whose start command failed — never a VM
//! twice, never a second failover-sync into a target it promoted. A run
//! that ends without an error removes it; `--restart` ignores it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::step::StepError;
use diskferry_protocol::ErrorCode;

/// One VM's progress.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Done {
    /// The point it was failed over to.
    pub generation: String,
    pub consistency: String,
    /// Its start command ran (or it has none).
    pub started: bool,
}

/// The journal of one plan in one mode.
pub struct Journal {
    path: PathBuf,
    vms: Mutex<BTreeMap<String, Done>>,
}

impl Journal {
    /// The journal of `plan` in `mode` under `state_root`; `fresh` starts over.
    pub fn open(state_root: &Path, plan: &str, mode: &str, fresh: bool) -> Result<Journal, StepError> {
        let path = state_root.join("plans").join(format!("{plan}.{mode}.json"));
        let vms = match std::fs::read(&path) {
            Ok(_) if fresh => BTreeMap::new(),
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                StepError::new(
                    ErrorCode::StateCorrupt,
                    format!("{} is not a plan journal: {e}", path.display()),
                    "remove it, or run with --restart",
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(io("reading", &path, e)),
        };
        Ok(Journal { path, vms: Mutex::new(vms) })
    }

    pub fn get(&self, vm: &str) -> Option<Done> {
        self.vms.lock().unwrap_or_else(|p| p.into_inner()).get(vm).cloned()
    }

    /// Records `vm`'s progress, durably before the run goes on.
    pub fn record(&self, vm: &str, done: Done) -> Result<(), StepError> {
        let mut vms = self.vms.lock().unwrap_or_else(|p| p.into_inner());
        vms.insert(vm.to_string(), done);
        let text = serde_json::to_vec_pretty(&*vms).unwrap_or_default();
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| io("creating", dir, e))?;
        let tmp = self.path.with_extension("tmp");
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&text)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)?;
            std::fs::File::open(dir)?.sync_all()
        };
        write().map_err(|e| io("writing", &self.path, e))
    }

    /// The run ended without an error: the next one starts over.
    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn io(what: &str, path: &Path, e: std::io::Error) -> StepError {
    StepError::new(
        ErrorCode::StateDir,
        format!("{what} {}: {e}", path.display()),
        "check the state directory (--state-dir, or the config's state_dir)",
    )
}
