//! The database files hold every location's private key and every preshared key: they
//! are readable by their owner only (0600), whatever the umask and however the Core is
//! started. The database file is created 0600 before SQLite first opens it, and SQLite
//! gives its `-wal` and `-shm` files the database file's mode; files of an older Core that
//! are group- or world-accessible are tightened at start, with a warning.

use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::CoreError;

/// The mode of every database file.
pub const DB_MODE: u32 = 0o600;

/// Creates the database file 0600 when it does not exist yet.
pub fn prepare(path: &Path) -> Result<(), CoreError> {
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(DB_MODE)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io_error("creating", path, e)),
    }
}

/// Sets 0600 on the database, `-wal` and `-shm` files that are more open than that.
pub fn restrict(path: &Path) -> Result<(), CoreError> {
    for file in [
        path.to_owned(),
        suffixed(path, "-wal"),
        suffixed(path, "-shm"),
    ] {
        let mode = match fs::metadata(&file) {
            Ok(m) => m.permissions().mode() & 0o777,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_error("reading the mode of", &file, e)),
        };
        if mode & 0o077 != 0 {
            fs::set_permissions(&file, fs::Permissions::from_mode(DB_MODE))
                .map_err(|e| io_error("restricting", &file, e))?;
            tracing::warn!(file = %file.display(), was = format!("{mode:o}"),
                "database file was readable by others: mode set to 600");
        }
    }
    Ok(())
}

fn suffixed(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn io_error(what: &str, path: &Path, e: io::Error) -> CoreError {
    CoreError::Internal(format!("{what} {}: {e}", path.display()))
}
