//! Checking a target's bytes against its committed manifest (and, when
//! they match, refreshing its stamp).

use crate::apply::Target;
pub use crate::apply::VerifyReport;
use crate::error::Result;
use crate::progress::Progress;
/// Hashes the target and compares every block with the committed manifest.
/// A target whose bytes match has its stamp refreshed (its times may have
/// changed without its content).
pub fn verify(target: &mut Target, progress: &dyn Progress) -> Result<VerifyReport> {
    let report = target.check(progress)?;
    if report.ok {
        target.restamp()?;
    }
    Ok(report)
}
