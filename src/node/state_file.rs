//! How the node opens the files it keeps: its state under the data dir
//! (outbox, status journal, position, deferred bans, spool) and
//! `shared.log`.
//!
//! Contract:
//! - A path is never followed through a symbolic link (`O_NOFOLLOW`): a
//!   link planted at `shared.log` or in the data dir would otherwise make a
//!   root process append to, or replace, whatever file it points at. Such
//!   a path is refused with an error that names it.
//! - Files are created readable by their owner only ([`MODE`]): they hold
//!   the fleet's host names, addresses and reports. An existing state file
//!   that is group- or world-accessible is tightened when opened.
//! - Replacing a file goes through a temporary file created anew
//!   ([`create_tmp`]), so a link or a stale file left at the temporary path
//!   is never written through.
use std::{
    fs::{File, OpenOptions},
    io::{Read, Write},
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::Path,
};

/// Owner read/write only.
pub const MODE: u32 = 0o600;

/// Opens `path` with `options`, never through a symbolic link, creating it
/// (if `options` says so) with [`MODE`] and tightening an existing file
/// that others may read.
pub fn open(path: &Path, options: &mut OpenOptions) -> std::io::Result<File> {
    let file = open_nofollow(path, options)?;
    tighten(&file)?;
    Ok(file)
}

/// Like [`open`] but leaves an existing file's mode alone (`shared.log`,
/// which fail2ban and the operator share).
pub fn open_shared(path: &Path, options: &mut OpenOptions) -> std::io::Result<File> {
    open_nofollow(path, options)
}

fn open_nofollow(path: &Path, options: &mut OpenOptions) -> std::io::Result<File> {
    options
        .custom_flags(libc::O_NOFOLLOW)
        .mode(MODE)
        .open(path)
        .map_err(|e| refused_link(path, e))
}

/// The whole file, or `None` if it does not exist (a link is an error).
pub fn read(path: &Path) -> std::io::Result<Option<Vec<u8>>> {
    match open(path, OpenOptions::new().read(true)) {
        Ok(mut f) => {
            let mut bytes = Vec::new();
            f.read_to_end(&mut bytes)?;
            Ok(Some(bytes))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// A fresh temporary file at `tmp` (whatever was there, link or stale
/// file, is removed first, never written through).
pub fn create_tmp(tmp: &Path) -> std::io::Result<File> {
    match std::fs::remove_file(tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    open(tmp, OpenOptions::new().write(true).create_new(true))
}

/// Replaces `path` with `bytes` through `PATH.tmp`; `durable` fsyncs first.
pub fn replace(path: &Path, bytes: &[u8], durable: bool) -> std::io::Result<()> {
    let mut name = path.as_os_str().to_owned();
    name.push(".tmp");
    let tmp = std::path::PathBuf::from(name);
    let mut f = create_tmp(&tmp)?;
    f.write_all(bytes)?;
    if durable {
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

fn tighten(file: &File) -> std::io::Result<()> {
    let meta = file.metadata()?;
    if meta.permissions().mode() & 0o077 != 0 {
        file.set_permissions(std::fs::Permissions::from_mode(MODE))?;
    }
    Ok(())
}

/// `O_NOFOLLOW` on a link fails with `ELOOP`; say what it means.
fn refused_link(path: &Path, e: std::io::Error) -> std::io::Error {
    if e.raw_os_error() == Some(libc::ELOOP) {
        std::io::Error::new(
            e.kind(),
            format!(
                "{} is a symbolic link; banmesh does not write through links (replace it with the file itself)",
                path.display()
            ),
        )
    } else {
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_are_refused_and_files_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        std::fs::write(&target, "keep").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let err = open(&link, OpenOptions::new().append(true).create(true)).unwrap_err();
        assert!(err.to_string().contains("is a symbolic link"), "{err}");
        assert!(read(&link).is_err());
        replace(&link, b"new", false).unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&link), MODE, "the link itself was replaced");

        let loose = dir.path().join("loose");
        std::fs::write(&loose, "x").unwrap();
        std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
        open(&loose, OpenOptions::new().read(true)).unwrap();
        assert_eq!(mode(&loose), MODE);
        // A link left at the temporary path is removed, not followed.
        std::os::unix::fs::symlink(&target, dir.path().join("loose.tmp")).unwrap();
        replace(&loose, b"y", false).unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
        assert_eq!(std::fs::read_to_string(&loose).unwrap(), "y");
    }
}
