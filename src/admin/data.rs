//! A hub's data, moved: `banmesh hub migrate` (between stores, e.g. when a
//! fleet outgrows the embedded one) and `banmesh hub import-seed` (the
//! seed's MySQL `ip_table`). The copying itself is `hub::migrate`'s.
use std::{fmt, path::Path};

use super::AdminError;
use crate::hub::{self, migrate::Copied};

/// Copies everything in store `from` to store `to` (URLs as `--db` takes
/// them); a target that holds data needs `force`.
pub async fn migrate(
    from: &str,
    to: &str,
    force: bool,
    progress: bool,
) -> Result<CopyReport, AdminError> {
    let source = hub::store::open(from).await?;
    let target = hub::store::open(to).await?;
    Ok(CopyReport(
        hub::migrate::migrate(&*source, &*target, force, progress).await?,
    ))
}

/// Imports the seed's table at `from` into store `to`, by default the
/// embedded store in `data_dir`.
pub async fn import_seed(
    from: &str,
    to: Option<String>,
    data_dir: &Path,
    force: bool,
    progress: bool,
) -> Result<CopyReport, AdminError> {
    let to = to.unwrap_or_else(|| format!("sqlite:{}", data_dir.join("banmesh.db").display()));
    let target = hub::store::open(&to).await?;
    Ok(CopyReport(
        hub::migrate::import_seed(from, &*target, force, progress).await?,
    ))
}

/// What a copy wrote, and the seed rows it had to leave out.
#[derive(Debug)]
pub struct CopyReport(pub Copied);

impl fmt::Display for CopyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.0;
        writeln!(
            f,
            "copied {} hosts, {} events, {} statuses",
            c.hosts, c.events, c.statuses
        )?;
        if !c.skipped.is_empty() {
            writeln!(
                f,
                "skipped {} seed rows that are not valid bans (ids {:?})",
                c.skipped.len(),
                c.skipped
            )?;
        }
        Ok(())
    }
}
