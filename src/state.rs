//! The state directory: `state.json` (the base, a [`PersistedState`]), `state.journal`
//! (the changes since the base) and `gateway-id`.
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
//!
//! # The journal
//! A change costs O(its size) on disk: [`StateStore::append`] adds framed, checksummed
//! [`Record`]s to `state.journal` (mode 0600) and fsyncs once per call; the base is not
//! touched. [`StateStore::save`] writes a full base and starts a new, empty journal.
//! Each base names the generation of its journal (`journal_generation`, next to
//! `version`), and each journal's header carries its generation. `save` of generation G+1:
//! 1. the base of G+1 is written to a temp file, fsynced, renamed over `state.json`, and
//!    the directory fsynced;
//! 2. an empty journal of G+1 (its header only) is written the same way over
//!    `state.journal`.
//!
//! A crash before step 1's rename leaves the old base and its journal (G, G); after it,
//! the new base with either the old journal (G+1, G) or the new one (G+1, G+1). A journal
//! whose generation is not the base's is stale, its records already in that base: it is
//! ignored and replaced by an empty one at open. So a crash at any point yields the old
//! base with the old journal or the new base with an empty journal.
//!
//! At open, the records of the journal's valid prefix are read in order; a torn or
//! corrupt tail (a crash mid-append, a flipped bit) is dropped with a warning naming its
//! offset (never its content or checksum: records hold keys), and cut off the file so
//! later appends follow the last good record. Plain-data records are applied to the
//! loaded [`PersistedState`] ([`journal::apply`]); the `Deltas` records are handed to the
//! caller ([`StateStore::take_replay`]) to replay on the base's location.
//!
//! Compaction: the caller does a full `save` when [`StateStore::should_compact`] says
//! so: the journal is larger than the base and larger than [`COMPACT_FLOOR`]. Then no
//! change writes more than about twice what a full save would, amortized, and a restart
//! reads at most about twice the base.

pub mod codec;
pub mod journal;
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

pub use journal::{Buried, Record};
pub use persisted::{
    first_event_seq, HaPersisted, HaSaved, LocationText, PendingEvent, PersistedState, SavedState,
};

/// The state file's name in the state directory.
pub const STATE_FILE: &str = "state.json";
/// The gateway id file's name in the state directory.
pub const GATEWAY_ID_FILE: &str = "gateway-id";
/// The lock file's name in the state directory.
pub const LOCK_FILE: &str = "lock";
/// The journal file's name in the state directory.
pub const JOURNAL_FILE: &str = "state.journal";
/// The format version this agent writes. Version 2 adds the journal: an agent that only
/// knows version 1 would ignore it, so it must refuse the file. Version 1 is still read.
pub const STATE_VERSION: u64 = 2;
/// The journal size under which [`StateStore::should_compact`] never asks for a save.
pub const COMPACT_FLOOR: u64 = 64 * 1024;

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
        "{} has state format version {found}, this agent reads versions 1 to {STATE_VERSION}; \
         it was written by a newer gatehouse (upgrade, or move the file away to start fresh)",
        path.display()
    )]
    UnsupportedVersion { path: PathBuf, found: u64 },
    #[error("state directory {} is in use by another gatehouse process", dir.display())]
    Locked { dir: PathBuf },
    #[error("cannot encode the state: {0}")]
    Encode(#[source] serde_json::Error),
    #[error(
        "{} has journal format version {found}, this agent reads version {}; \
         it was written by a newer gatehouse",
        path.display(), journal::JOURNAL_VERSION
    )]
    UnsupportedJournal { path: PathBuf, found: u32 },
    /// `append` without a journal to append to: no base was written yet (a fresh or
    /// corrupt start), or an earlier append failed and could not be undone. A full
    /// [`StateStore::save`] starts a new journal.
    #[error("the state journal needs a full save first")]
    NeedsSave,
}

/// An open, locked state directory.
#[derive(Debug)]
pub struct StateStore {
    dir: PathBuf,
    gateway_id: String,
    /// The generation of the base on disk; the next `save` writes the one after it.
    generation: u64,
    /// The journal continuing the base; `None` before the first save of a fresh or corrupt
    /// start, and after an append that failed and could not be undone.
    journal: Option<JournalFile>,
    /// Size of the base on disk (for [`StateStore::should_compact`]).
    base_bytes: u64,
    /// The `Deltas` records read at open, for the caller to replay.
    replay: Vec<Record>,
    /// Holds the `flock` until the store is dropped.
    _lock: File,
}

#[derive(Debug)]
struct JournalFile {
    /// Opened for appending.
    file: File,
    /// Bytes of the valid journal (header and whole records).
    len: u64,
}

/// What [`peek`] sees: the base with the plain-data records applied, and the `Deltas`
/// records to replay on its location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peeked {
    pub state: PersistedState,
    pub replay: Vec<Record>,
}

impl StateStore {
    /// Opens (creating it 0700 if missing) and locks the state directory, loads the state
    /// file with its journal and settles the gateway id: the `gateway-id` file, else the
    /// state file's, else a new one; the file is (re)written when it was missing or
    /// unreadable. The journal's plain-data records are applied to the loaded state; its
    /// `Deltas` records wait in [`StateStore::take_replay`].
    pub fn open(dir: impl AsRef<Path>) -> Result<(StateStore, LoadOutcome), StateError> {
        let dir = dir.as_ref().to_path_buf();
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| io_err("creating state directory", &dir, e))?;
        let lock = lock_dir(&dir)?;
        remove_temp_files(&dir)?;

        let mut base_generation = None;
        let mut outcome = match read_state(&dir.join(STATE_FILE))? {
            Read::Missing => LoadOutcome::Fresh,
            Read::Ok(state, generation) => {
                base_generation = Some(generation);
                LoadOutcome::Loaded(state)
            }
            Read::Bad(reason) => {
                let moved_to = move_aside(&dir, STATE_FILE)?;
                tracing::warn!(path = %moved_to.display(), %reason, "state file unreadable, moved aside; starting fresh");
                LoadOutcome::Corrupt { moved_to, reason }
            }
        };

        let (generation, journal, replay, base_bytes) = match (&mut outcome, base_generation) {
            (LoadOutcome::Loaded(state), Some(generation)) => {
                let (journal, replay) = open_journal(&dir, generation, state)?;
                let base_bytes = fs::metadata(dir.join(STATE_FILE)).map_or(0, |m| m.len());
                (generation, Some(journal), replay, base_bytes)
            }
            // No base: a journal left on disk belongs to no state. The first save replaces
            // it, with a generation above its own.
            _ => (stray_generation(&dir), None, Vec::new(), 0),
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
            generation,
            journal,
            base_bytes,
            replay,
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

    /// The `Deltas` records of the journal read at open, oldest first, each on top of the
    /// revision before it (the first on the loaded `applied_revision`): the caller replays
    /// them on the loaded location. Empty after the first call.
    pub fn take_replay(&mut self) -> Vec<Record> {
        std::mem::take(&mut self.replay)
    }

    /// Writes a full base atomically and starts a new, empty journal (the order is in the
    /// module doc). `state` is a [`PersistedState`] or a borrowed view that serializes as
    /// one (the agent's, so that no copy of the state is built to save it); its
    /// `gateway_id` is written as given, the store's id is the one to put there. The JSON
    /// goes to the file as it is produced, through a bounded buffer wiped after use (the
    /// state holds the private key): the text is never held whole.
    pub fn save(&mut self, state: &impl Serialize) -> Result<(), StateError> {
        // Whatever happens below, appends wait for a save that completes: the journal on
        // disk may already be stale.
        self.journal = None;
        self.generation += 1;
        let on_disk = OnDisk {
            version: STATE_VERSION,
            journal_generation: self.generation,
            state,
        };
        let len = write_atomic_with(&self.dir, STATE_FILE, |out| {
            serde_json::to_writer(&mut *out, &on_disk).map_err(|e| match e.is_io() {
                // The file's error, as it was.
                true => WriteError::Io(io::Error::from(e)),
                false => WriteError::Encode(e),
            })?;
            out.write_all(b"\n").map_err(WriteError::Io)
        })?;
        self.base_bytes = len;
        self.journal = Some(create_journal(&self.dir, self.generation)?);
        Ok(())
    }

    /// Appends `records` to the journal and fsyncs it once: O(their size), the base is
    /// not written. Returns the bytes written. [`StateError::NeedsSave`] when there is no
    /// journal to append to (see it); a failed write is cut off again, so a later append
    /// follows the last good record.
    pub fn append(&mut self, records: &[Record]) -> Result<u64, StateError> {
        let Some(journal) = self.journal.as_mut() else {
            return Err(StateError::NeedsSave);
        };
        if records.is_empty() {
            return Ok(0);
        }
        let mut buf = Vec::new();
        if let Err(e) = journal::encode(records, &mut buf) {
            buf.zeroize();
            return Err(StateError::Encode(e));
        }
        let written = journal
            .file
            .write_all(&buf)
            .and_then(|()| journal.file.sync_data());
        let n = buf.len() as u64;
        buf.zeroize();
        let path = self.dir.join(JOURNAL_FILE);
        match written {
            Ok(()) => {
                journal.len += n;
                Ok(n)
            }
            Err(e) => {
                let undone = journal
                    .file
                    .set_len(journal.len)
                    .and_then(|()| journal.file.sync_data());
                if undone.is_err() {
                    self.journal = None;
                }
                Err(io_err("appending to", &path, e))
            }
        }
    }

    /// The journal's size in bytes (its header included; 0 when there is none).
    pub fn journal_bytes(&self) -> u64 {
        self.journal.as_ref().map_or(0, |j| j.len)
    }

    /// The base's size in bytes (0 before the first save of a fresh start).
    pub fn base_bytes(&self) -> u64 {
        self.base_bytes
    }

    /// Whether the caller should do a full [`StateStore::save`] now: there is no journal
    /// to append to, or the journal outgrew both the base and [`COMPACT_FLOOR`].
    pub fn should_compact(&self) -> bool {
        match &self.journal {
            None => true,
            Some(j) => j.len > self.base_bytes.max(COMPACT_FLOOR),
        }
    }
}

/// Reads the state file and its journal without locking or changing anything (for
/// `gatehouse status` while the agent runs). `None` when there is no state file; a corrupt
/// state file is an error here. An incomplete last record is skipped quietly: the agent may
/// be appending it.
pub fn peek(dir: impl AsRef<Path>) -> Result<Option<Peeked>, StateError> {
    let path = dir.as_ref().join(STATE_FILE);
    let (mut state, generation) = match read_state(&path)? {
        Read::Missing => return Ok(None),
        Read::Ok(state, generation) => (*state, generation),
        Read::Bad(reason) => {
            return Err(io_err(
                "reading",
                &path,
                io::Error::new(io::ErrorKind::InvalidData, reason),
            ))
        }
    };
    let replay = match read_journal(&dir.as_ref().join(JOURNAL_FILE))? {
        JournalRead::Current(decoded) if decoded.generation == generation => {
            apply_records(&mut state, decoded.records)
        }
        _ => Vec::new(),
    };
    Ok(Some(Peeked { state, replay }))
}

/// Applies the plain-data records to `state` and returns the `Deltas` ones, in order.
fn apply_records(state: &mut PersistedState, records: Vec<Record>) -> Vec<Record> {
    let mut replay = Vec::new();
    for record in records {
        journal::apply(state, &record);
        if matches!(record, Record::Deltas { .. }) {
            replay.push(record);
        }
    }
    replay
}

enum JournalRead {
    Missing,
    Corrupt(&'static str),
    Current(journal::Decoded),
}

fn read_journal(path: &Path) -> Result<JournalRead, StateError> {
    let mut bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(JournalRead::Missing),
        Err(e) => return Err(io_err("reading", path, e)),
    };
    let decoded = journal::decode(&bytes);
    bytes.zeroize();
    match decoded {
        Ok(d) => Ok(JournalRead::Current(d)),
        Err(journal::HeaderError::Corrupt(reason)) => Ok(JournalRead::Corrupt(reason)),
        Err(journal::HeaderError::Version(found)) => Err(StateError::UnsupportedJournal {
            path: path.to_path_buf(),
            found,
        }),
    }
}

/// The journal continuing a base of `generation`, opened for appending, with its records
/// applied to `state`; returns the `Deltas` records. A missing or stale journal is
/// replaced by an empty one, a journal with a corrupt header is moved aside, and a torn or
/// corrupt tail is cut off.
fn open_journal(
    dir: &Path,
    generation: u64,
    state: &mut PersistedState,
) -> Result<(JournalFile, Vec<Record>), StateError> {
    let path = dir.join(JOURNAL_FILE);
    let decoded = match read_journal(&path)? {
        JournalRead::Missing => return Ok((create_journal(dir, generation)?, Vec::new())),
        JournalRead::Corrupt(reason) => {
            let moved_to = move_aside(dir, JOURNAL_FILE)?;
            tracing::warn!(path = %moved_to.display(), reason, "state journal unreadable, moved aside; the base alone is loaded");
            return Ok((create_journal(dir, generation)?, Vec::new()));
        }
        JournalRead::Current(d) if d.generation != generation => {
            // A save renamed its base in and crashed before its empty journal: the records
            // of this journal are in the base.
            tracing::info!(
                journal = d.generation,
                base = generation,
                "stale state journal replaced"
            );
            return Ok((create_journal(dir, generation)?, Vec::new()));
        }
        JournalRead::Current(d) => d,
    };
    let file = OpenOptions::new()
        .append(true)
        .open(&path)
        .map_err(|e| io_err("opening", &path, e))?;
    let len = decoded.valid_len as u64;
    if let Some(tail) = &decoded.tail {
        let size = file.metadata().map_or(len, |m| m.len());
        tracing::warn!(
            path = %path.display(),
            offset = tail.offset,
            reason = tail.reason,
            dropped_bytes = size.saturating_sub(len),
            kept_records = decoded.records.len(),
            "state journal has a torn or corrupt tail (a crash mid-write?): dropped, the records before it are kept"
        );
        file.set_len(len)
            .and_then(|()| file.sync_all())
            .map_err(|e| io_err("truncating", &path, e))?;
    }
    let replay = apply_records(state, decoded.records);
    Ok((JournalFile { file, len }, replay))
}

/// A new, empty journal of `generation` (written atomically), opened for appending.
fn create_journal(dir: &Path, generation: u64) -> Result<JournalFile, StateError> {
    write_atomic(dir, JOURNAL_FILE, &journal::header(generation))?;
    let path = dir.join(JOURNAL_FILE);
    let file = OpenOptions::new()
        .append(true)
        .open(&path)
        .map_err(|e| io_err("opening", &path, e))?;
    Ok(JournalFile {
        file,
        len: journal::HEADER_LEN as u64,
    })
}

/// The generation of a journal found without a base (0 when none is readable).
fn stray_generation(dir: &Path) -> u64 {
    fs::read(dir.join(JOURNAL_FILE))
        .ok()
        .and_then(|bytes| journal::read_header(&bytes).ok())
        .unwrap_or(0)
}

#[derive(Serialize)]
struct OnDisk<'a, S> {
    version: u64,
    journal_generation: u64,
    #[serde(flatten)]
    state: &'a S,
}

/// The file's own fields, read before the state (the state is read from the same object:
/// [`PersistedState`] skips fields it does not know). Not one struct with the state
/// `#[serde(flatten)]`ed in: serde buffers a flattened object whole as generic content
/// before decoding it (every key and string copied twice), about a fifth of a restart's
/// time at 10,000 peers.
#[derive(Deserialize)]
struct Header {
    version: Option<u64>,
    /// Absent in version 1 (no journal): 0.
    #[serde(default)]
    journal_generation: u64,
}

enum Read {
    Missing,
    /// The state and its journal's generation.
    Ok(Box<PersistedState>, u64),
    Bad(String),
}

/// Decodes the bytes of a state file as [`StateStore::open`] reads them: the state, or why
/// it is unreadable. Public for the fuzz target.
pub fn decode_state(bytes: &[u8]) -> Result<PersistedState, String> {
    match parse_state(Path::new(STATE_FILE), bytes) {
        Ok(Read::Ok(state, _)) => Ok(*state),
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
    let header: Header = match serde_json::from_slice(bytes) {
        Ok(h) => h,
        Err(e) => return Ok(Read::Bad(format!("not valid JSON: {e}"))),
    };
    match header.version {
        None => return Ok(Read::Bad("no format version".into())),
        Some(1..=STATE_VERSION) => {}
        Some(found) => {
            return Err(StateError::UnsupportedVersion {
                path: path.to_path_buf(),
                found,
            })
        }
    }
    Ok(match serde_json::from_slice::<PersistedState>(bytes) {
        Ok(state) => Read::Ok(Box::new(state), header.journal_generation),
        Err(e) => Read::Bad(format!("invalid content: {e}")),
    })
}

/// Renames `name` to `<name>.corrupt-<unix-ts>` (with a counter if taken).
fn move_aside(dir: &Path, name: &str) -> Result<PathBuf, StateError> {
    let ts = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let from = dir.join(name);
    let mut to = dir.join(format!("{name}.corrupt-{ts}"));
    let mut n = 1;
    while to.exists() {
        to = dir.join(format!("{name}.corrupt-{ts}-{n}"));
        n += 1;
    }
    fs::rename(&from, &to).map_err(|e| io_err("moving aside", &from, e))?;
    sync_dir(dir)?;
    Ok(to)
}

/// Writes `name` in `dir` atomically with mode 0600.
fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), StateError> {
    write_atomic_with(dir, name, |out| {
        out.write_all(bytes).map_err(WriteError::Io)
    })
    .map(drop)
}

/// Why [`write_atomic_with`]'s content could not be written.
enum WriteError {
    Io(io::Error),
    Encode(serde_json::Error),
}

/// Writes `name` in `dir` atomically with mode 0600, its content produced by `fill`
/// through a [`Wiped`] buffer; returns the bytes written.
fn write_atomic_with(
    dir: &Path,
    name: &str,
    fill: impl FnOnce(&mut Wiped<File>) -> Result<(), WriteError>,
) -> Result<u64, StateError> {
    let tmp = dir.join(format!("{TEMP_PREFIX}{name}"));
    let target = dir.join(name);
    let written = (|| {
        match fs::remove_file(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("removing stale", &tmp, e)),
        }
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| io_err("creating", &tmp, e))?;
        let mut out = Wiped::new(file);
        fill(&mut out)
            .and_then(|()| out.flush().map_err(WriteError::Io))
            .map_err(|e| match e {
                WriteError::Io(e) => io_err("writing", &tmp, e),
                WriteError::Encode(e) => StateError::Encode(e),
            })?;
        let len = out.written;
        let file = out.into_inner();
        file.sync_all().map_err(|e| io_err("syncing", &tmp, e))?;
        fs::rename(&tmp, &target).map_err(|e| io_err("renaming over", &target, e))?;
        Ok(len)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    let len = written?;
    sync_dir(dir)?;
    Ok(len)
}

/// A write buffer of [`Wiped::CAPACITY`] bytes in front of `W`, zeroed after each flush
/// and when dropped: what passes through it (the state, with the private key) does not
/// stay in freed memory, and a write of any size holds at most this much.
struct Wiped<W: io::Write> {
    inner: W,
    /// Zeroed when dropped too.
    buf: zeroize::Zeroizing<Vec<u8>>,
    /// Bytes passed to `inner` so far.
    written: u64,
}

impl<W: io::Write> Wiped<W> {
    const CAPACITY: usize = 64 * 1024;

    fn new(inner: W) -> Self {
        Wiped {
            inner,
            buf: zeroize::Zeroizing::new(Vec::with_capacity(Self::CAPACITY)),
            written: 0,
        }
    }

    /// The writer, after a [`io::Write::flush`] (what is still buffered is wiped, not
    /// written).
    fn into_inner(self) -> W {
        self.inner
    }

    fn flush_buf(&mut self) -> io::Result<()> {
        let result = self.inner.write_all(&self.buf);
        if result.is_ok() {
            self.written += self.buf.len() as u64;
        }
        // `zeroize` wipes the whole capacity and clears the length.
        self.buf.zeroize();
        result
    }
}

impl<W: io::Write> io::Write for Wiped<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.buf.len() + data.len() > Self::CAPACITY {
            self.flush_buf()?;
        }
        // At most CAPACITY bytes per call: the buffer never grows.
        let n = data.len().min(Self::CAPACITY);
        self.buf.extend_from_slice(&data[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.flush_buf()?;
        self.inner.flush()
    }
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
mod journal_tests;
#[cfg(test)]
mod tests;
