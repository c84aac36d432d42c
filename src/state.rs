//! The state directory: `state.json` (the [`PersistedState`]) and `gateway-id`.
//!
//! Thin file I/O with the safety rules of design §5:
//! - `state.json` is replaced atomically: written to a temp file in the same directory
//!   (mode 0600, it holds the private key), fsynced, renamed over, and the directory
//!   fsynced. A crash leaves the old or the new file, never a torn one; a leftover temp
//!   file is ignored and removed.
//! - A file that cannot be parsed is moved aside to `state.json.corrupt-<unix-ts>` and the
//!   agent starts fresh ([`LoadOutcome::Corrupt`]), never a crash. A file of an unknown
//!   format version is an error and stays in place (a downgraded agent must not destroy a
//!   newer agent's state).
//! - The gateway id lives in its own small `gateway-id` file too, written once, so a
//!   corrupt state file never changes the gateway's identity.
//! - The directory (created 0700 when missing) is locked (`flock` on `lock`) while a
//!   [`StateStore`] is open: two agents cannot share one state directory by mistake.

pub mod codec;
mod persisted;

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use zeroize::Zeroize;

pub use persisted::{first_event_seq, HaPersisted, PendingEvent, PersistedState};

/// The state file's name in the state directory.
pub const STATE_FILE: &str = "state.json";
/// The gateway id file's name in the state directory.
pub const GATEWAY_ID_FILE: &str = "gateway-id";
/// The lock file's name in the state directory.
pub const LOCK_FILE: &str = "lock";
/// The format version this agent reads and writes.
pub const STATE_VERSION: u64 = 1;

const TEMP_PREFIX: &str = ".tmp-";
const MAX_ID_LEN: usize = 128;

/// What was found at open.
#[derive(Debug)]
pub enum LoadOutcome {
    /// No state file: a first start (the gateway id may still come from `gateway-id`).
    Fresh,
    /// The state of the previous run (its `gateway_id` is the store's).
    Loaded(Box<PersistedState>),
    /// The state file could not be read and was moved aside; start fresh.
    Corrupt { moved_to: PathBuf, reason: String },
}

/// State directory failures. All but `Io` need an operator.
#[derive(Debug, Error)]
pub enum StateError {
    #[error("{context} {}: {source}", path.display())]
    Io {
        context: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{} has state format version {found}, this agent reads version {STATE_VERSION}; \
         it was written by a newer gatehouse (upgrade, or move the file away to start fresh)",
        path.display()
    )]
    UnsupportedVersion { path: PathBuf, found: u64 },
    #[error("state directory {} is in use by another gatehouse process", dir.display())]
    Locked { dir: PathBuf },
    #[error("cannot encode the state: {0}")]
    Encode(#[source] serde_json::Error),
}

/// An open, locked state directory.
#[derive(Debug)]
pub struct StateStore {
    dir: PathBuf,
    gateway_id: String,
    /// Holds the `flock` until the store is dropped.
    _lock: File,
}

impl StateStore {
    /// Opens (creating it 0700 if missing) and locks the state directory, loads the state
    /// file and settles the gateway id: the `gateway-id` file, else the state file's, else
    /// a new one; the file is (re)written when it was missing or unreadable.
    pub fn open(dir: impl AsRef<Path>) -> Result<(StateStore, LoadOutcome), StateError> {
        let dir = dir.as_ref().to_path_buf();
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| io_err("creating state directory", &dir, e))?;
        let lock = lock_dir(&dir)?;
        remove_temp_files(&dir)?;

        let mut outcome = match read_state(&dir.join(STATE_FILE))? {
            Read::Missing => LoadOutcome::Fresh,
            Read::Ok(state) => LoadOutcome::Loaded(state),
            Read::Bad(reason) => {
                let moved_to = move_aside(&dir)?;
                tracing::warn!(path = %moved_to.display(), %reason, "state file unreadable, moved aside; starting fresh");
                LoadOutcome::Corrupt { moved_to, reason }
            }
        };

        let from_file = read_gateway_id(&dir)?;
        let from_state = match &outcome {
            LoadOutcome::Loaded(s) if valid_id(&s.gateway_id) => Some(s.gateway_id.clone()),
            _ => None,
        };
        let gateway_id = match from_file {
            Some(id) => id,
            None => {
                let id = from_state.unwrap_or_else(generate_gateway_id);
                write_atomic(&dir, GATEWAY_ID_FILE, format!("{id}\n").as_bytes())?;
                id
            }
        };
        if let LoadOutcome::Loaded(s) = &mut outcome {
            s.gateway_id.clone_from(&gateway_id);
        }
        let store = StateStore {
            dir,
            gateway_id,
            _lock: lock,
        };
        Ok((store, outcome))
    }

    /// The gateway's stable id.
    pub fn gateway_id(&self) -> &str {
        &self.gateway_id
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Replaces the state file atomically (see the module doc). `state.gateway_id` is
    /// written as given; the store's id is the one to put there.
    pub fn save(&mut self, state: &PersistedState) -> Result<(), StateError> {
        let mut bytes = serde_json::to_vec(&OnDisk {
            version: STATE_VERSION,
            state,
        })
        .map_err(StateError::Encode)?;
        bytes.push(b'\n');
        let result = write_atomic(&self.dir, STATE_FILE, &bytes);
        bytes.zeroize();
        result
    }
}

/// Reads the state file without locking or changing anything (for `gatehouse status`
/// while the agent runs). `None` when there is none; a corrupt file is an error here.
pub fn peek(dir: impl AsRef<Path>) -> Result<Option<PersistedState>, StateError> {
    let path = dir.as_ref().join(STATE_FILE);
    match read_state(&path)? {
        Read::Missing => Ok(None),
        Read::Ok(state) => Ok(Some(*state)),
        Read::Bad(reason) => Err(io_err(
            "reading",
            &path,
            io::Error::new(io::ErrorKind::InvalidData, reason),
        )),
    }
}

#[derive(Serialize)]
struct OnDisk<'a> {
    version: u64,
    #[serde(flatten)]
    state: &'a PersistedState,
}

#[derive(Deserialize)]
struct OnDiskOwned {
    #[serde(rename = "version")]
    _version: u64,
    #[serde(flatten)]
    state: PersistedState,
}

#[derive(Deserialize)]
struct VersionProbe {
    version: Option<u64>,
}

enum Read {
    Missing,
    Ok(Box<PersistedState>),
    Bad(String),
}

/// Decodes the bytes of a state file as [`StateStore::open`] reads them: the state, or why
/// it is unreadable. Public for the fuzz target.
pub fn decode_state(bytes: &[u8]) -> Result<PersistedState, String> {
    match parse_state(Path::new(STATE_FILE), bytes) {
        Ok(Read::Ok(state)) => Ok(*state),
        Ok(Read::Missing) => Err("missing".into()),
        Ok(Read::Bad(reason)) => Err(reason),
        Err(e) => Err(e.to_string()),
    }
}

fn read_state(path: &Path) -> Result<Read, StateError> {
    let mut bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Read::Missing),
        Err(e) => return Err(io_err("reading", path, e)),
    };
    let result = parse_state(path, &bytes);
    bytes.zeroize();
    result
}

fn parse_state(path: &Path, bytes: &[u8]) -> Result<Read, StateError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Read::Bad("empty file".into()));
    }
    let probe: VersionProbe = match serde_json::from_slice(bytes) {
        Ok(p) => p,
        Err(e) => return Ok(Read::Bad(format!("not valid JSON: {e}"))),
    };
    match probe.version {
        None => return Ok(Read::Bad("no format version".into())),
        Some(STATE_VERSION) => {}
        Some(found) => {
            return Err(StateError::UnsupportedVersion {
                path: path.to_path_buf(),
                found,
            })
        }
    }
    Ok(match serde_json::from_slice::<OnDiskOwned>(bytes) {
        Ok(d) => Read::Ok(Box::new(d.state)),
        Err(e) => Read::Bad(format!("invalid content: {e}")),
    })
}

/// Renames the state file to `state.json.corrupt-<unix-ts>` (with a counter if taken).
fn move_aside(dir: &Path) -> Result<PathBuf, StateError> {
    let ts = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let from = dir.join(STATE_FILE);
    let mut to = dir.join(format!("{STATE_FILE}.corrupt-{ts}"));
    let mut n = 1;
    while to.exists() {
        to = dir.join(format!("{STATE_FILE}.corrupt-{ts}-{n}"));
        n += 1;
    }
    fs::rename(&from, &to).map_err(|e| io_err("moving aside", &from, e))?;
    sync_dir(dir)?;
    Ok(to)
}

/// Writes `name` in `dir` atomically with mode 0600.
fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), StateError> {
    let tmp = dir.join(format!("{TEMP_PREFIX}{name}"));
    let target = dir.join(name);
    let written = (|| {
        match fs::remove_file(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("removing stale", &tmp, e)),
        }
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| io_err("creating", &tmp, e))?;
        file.write_all(bytes)
            .map_err(|e| io_err("writing", &tmp, e))?;
        file.sync_all().map_err(|e| io_err("syncing", &tmp, e))?;
        fs::rename(&tmp, &target).map_err(|e| io_err("renaming over", &target, e))
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<(), StateError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err("syncing directory", dir, e))
}

fn remove_temp_files(dir: &Path) -> Result<(), StateError> {
    let entries = fs::read_dir(dir).map_err(|e| io_err("listing", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| io_err("listing", dir, e))?;
        if entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
            let path = entry.path();
            fs::remove_file(&path).map_err(|e| io_err("removing leftover", &path, e))?;
        }
    }
    Ok(())
}

fn lock_dir(dir: &Path) -> Result<File, StateError> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|e| io_err("opening", &path, e))?;
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::WouldBlock {
            return Err(StateError::Locked {
                dir: dir.to_path_buf(),
            });
        }
        return Err(io_err("locking", &path, e));
    }
    Ok(file)
}

/// The id in `gateway-id`, if present and sane.
fn read_gateway_id(dir: &Path) -> Result<Option<String>, StateError> {
    let path = dir.join(GATEWAY_ID_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => {
            let id = text.trim();
            if valid_id(id) {
                Ok(Some(id.to_string()))
            } else {
                tracing::warn!(path = %path.display(), "gateway id file unreadable, replacing it");
                Ok(None)
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::InvalidData => Ok(None),
        Err(e) => Err(io_err("reading", &path, e)),
    }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_ID_LEN && id.bytes().all(|b| b.is_ascii_graphic())
}

/// A random UUID (version 4 layout).
fn generate_gateway_id() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn io_err(context: &'static str, path: &Path, source: io::Error) -> StateError {
    StateError::Io {
        context,
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests;
