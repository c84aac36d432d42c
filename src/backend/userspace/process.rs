//! Starting, watching and stopping one `wireguard-go` process, and forwarding its log
//! into `tracing`.
//!
//! wireguard-go runs in the foreground (`-f`, `WG_PROCESS_FOREGROUND=1`) as our child, in
//! its own process group, in the network namespace the backend was created in, with a
//! cleared environment (only `WG_PROCESS_FOREGROUND`, `LOG_LEVEL` and `PATH`). Its
//! output goes to a log file, not a pipe: a Go program dies of SIGPIPE when it writes to a
//! closed stdout, so a pipe would kill the tunnel whenever the agent stops. A thread
//! follows the file and forwards each line to `tracing`.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use super::socket;
use crate::backend::BackendError;

/// A wireguard-go we started.
#[derive(Debug)]
pub(super) struct Process {
    child: Child,
}

impl Process {
    /// Starts `binary -f <interface>` and waits until its UAPI socket answers.
    pub(super) fn start(
        binary: &Path,
        interface: &str,
        log_level: &str,
        netns: &File,
        log_path: &Path,
        socket_path: &Path,
        timeout: Duration,
    ) -> Result<Process, BackendError> {
        let log = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(log_path)
            .map_err(|e| BackendError::io(format!("open {}", log_path.display()), e))?;
        let log_err = log
            .try_clone()
            .map_err(|e| BackendError::io("duplicate the log file", e))?;
        let netns_fd = netns.as_raw_fd();
        let mut command = Command::new(binary);
        // A cleared environment: wireguard-go needs only these, and the agent's own (a
        // token given as GATEHOUSE_CORE_TOKEN, credential paths) is none of its business.
        // PATH stays: the binary is looked up with it, as before.
        command
            .arg("-f")
            .arg(interface)
            .env_clear()
            .env("WG_PROCESS_FOREGROUND", "1")
            .env("LOG_LEVEL", log_level)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            // Its own process group: a Ctrl-C meant for the agent leaves the tunnel up.
            .process_group(0);
        if let Some(path) = std::env::var_os("PATH") {
            command.env("PATH", path);
        }
        // The child enters the backend's namespace only when it is not already in it:
        // setns(2) needs CAP_SYS_ADMIN, which a container (CAP_NET_ADMIN only) lacks.
        if !same_namespace(netns) {
            // SAFETY: the closure runs in the child between fork and exec and only calls
            // setns(2), which is async-signal-safe; `netns_fd` stays open in the parent
            // (and so in the child) until spawn returns.
            unsafe {
                command.pre_exec(move || {
                    if libc::setns(netns_fd, libc::CLONE_NEWNET) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = command.spawn().map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => BackendError::Config(format!(
                "{} not found in PATH (install wireguard-go or set its path in the \
                 userspace backend configuration)",
                binary.display()
            )),
            io::ErrorKind::PermissionDenied => {
                BackendError::Config(format!("{} cannot be executed: {e}", binary.display()))
            }
            _ => BackendError::io(format!("start {}", binary.display()), e),
        })?;
        let mut process = Process { child };
        tracing::info!(interface, pid = process.pid(), "started wireguard-go");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = process.exited()? {
                return Err(BackendError::Operation {
                    op: format!("start wireguard-go for {interface}"),
                    message: format!(
                        "it exited ({status}) before its UAPI socket answered: {}",
                        last_lines(log_path, 5)
                    ),
                });
            }
            if socket::answers(socket_path, Duration::from_millis(500)) {
                return Ok(process);
            }
            if Instant::now() >= deadline {
                process.stop(Duration::from_secs(1));
                return Err(BackendError::Operation {
                    op: format!("start wireguard-go for {interface}"),
                    message: format!(
                        "its UAPI socket {} did not answer within {timeout:?}: {}",
                        socket_path.display(),
                        last_lines(log_path, 5)
                    ),
                });
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status when the process has ended (it is reaped then).
    pub(super) fn exited(&mut self) -> Result<Option<ExitStatus>, BackendError> {
        self.child
            .try_wait()
            .map_err(|e| BackendError::io("check the wireguard-go process", e))
    }

    /// Waits up to `limit` for the process to end; its status when it did.
    pub(super) fn wait_exit(
        &mut self,
        limit: Duration,
    ) -> Result<Option<ExitStatus>, BackendError> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.exited()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then SIGKILL after `grace`; reaps the process.
    pub(super) fn stop(&mut self, grace: Duration) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: kill has no memory preconditions; the pid is our unreaped child.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Follows a log file and forwards new lines to `tracing` until dropped.
#[derive(Debug)]
pub(super) struct LogFollower {
    stop: Arc<AtomicBool>,
}

impl LogFollower {
    /// Follows `path` from its current end (`from_start`: from its beginning).
    pub(super) fn new(path: PathBuf, interface: String, from_start: bool) -> LogFollower {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let spawned = thread::Builder::new()
            .name(format!("wg-go-log-{interface}"))
            .spawn(move || follow(&path, &interface, from_start, &flag));
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the wireguard-go log follower");
        }
        LogFollower { stop }
    }
}

impl Drop for LogFollower {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn follow(path: &Path, interface: &str, from_start: bool, stop: &AtomicBool) {
    let Ok(file) = File::open(path) else {
        return;
    };
    let mut reader = BufReader::new(file);
    if !from_start && reader.seek(SeekFrom::End(0)).is_err() {
        return;
    }
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        match reader.read_line(&mut line) {
            Ok(0) => {
                // Truncated by a new start: follow from the beginning again.
                if let (Ok(pos), Ok(meta)) = (reader.stream_position(), reader.get_ref().metadata())
                {
                    if meta.len() < pos {
                        let _ = reader.seek(SeekFrom::Start(0));
                    }
                }
                thread::sleep(Duration::from_millis(200));
            }
            Ok(_) if !line.ends_with('\n') => {
                // A partial line: wait for its end.
                thread::sleep(Duration::from_millis(50));
                continue;
            }
            Ok(_) => {
                forward(interface, line.trim_end());
                line.clear();
            }
            Err(_) => return,
        }
    }
}

/// wireguard-go prefixes its lines with `DEBUG: (wg0) `, `INFO: (wg0) ` or `ERROR: (wg0) `.
fn forward(interface: &str, line: &str) {
    let (level, text) = match line.split_once(": ") {
        Some(("DEBUG", rest)) => ("debug", rest),
        Some(("ERROR", rest)) => ("error", rest),
        Some(("INFO", rest)) => ("info", rest),
        _ => ("info", line),
    };
    let prefix = format!("({interface}) ");
    let text = text.strip_prefix(&prefix).unwrap_or(text);
    match level {
        "debug" => tracing::debug!(target: "wireguard_go", interface, "{text}"),
        "error" => tracing::warn!(target: "wireguard_go", interface, "{text}"),
        _ => tracing::info!(target: "wireguard_go", interface, "{text}"),
    }
}

/// The last `n` lines of a log file, joined, for error messages.
pub(super) fn last_lines(path: &Path, n: usize) -> String {
    let Ok(text) = std::fs::read_to_string(path) else {
        return "(no log)".into();
    };
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = &lines[lines.len().saturating_sub(n)..];
    if tail.is_empty() {
        "(empty log)".into()
    } else {
        tail.join(" | ")
    }
}

/// Whether `netns` is the network namespace of the calling thread (whose child a spawn
/// forks). When unsure, false: the child then enters `netns` explicitly.
fn same_namespace(netns: &File) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (
        netns.metadata(),
        std::fs::metadata("/proc/thread-self/ns/net"),
    ) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}
