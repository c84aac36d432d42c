//! Operator hooks: `pre_up`, `post_up`, `pre_down`, `post_down` shell commands.
//!
//! When the agent's event loop runs them:
//! - `pre_up`: on start, before the interface is created or adopted.
//! - `post_up`: after the first successful apply after start (once per start).
//! - `pre_down`: on shutdown, before anything is removed; also when the interface is kept
//!   (`gateway.remove_on_shutdown = false`, the default).
//! - `post_down`: after shutdown has finished (interface removed or left in place).
//!
//! Each hook runs as `/bin/sh -c <command>` in its own process group, stdin from
//! `/dev/null`, with the agent's environment minus every `GATEHOUSE_*` variable (so a
//! `GATEHOUSE_CORE_TOKEN` never reaches a hook) plus `GATEHOUSE_INTERFACE=<interface>` and
//! `GATEHOUSE_HOOK=<pre_up|post_up|pre_down|post_down>`. Its stdout and stderr go to the
//! log line by line (target `gatehouse::hooks`). After `hooks.timeout` the whole process
//! group is killed. A failure or timeout is logged with the exit status and returned as a
//! [`HookError`] the caller may ignore: a hook never stops the agent. A command started in
//! the background by a hook (`daemon &`) should redirect its output: the agent stops
//! reading the hook's output shortly after the hook's shell exits.

use std::fmt;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncBufReadExt as _, AsyncRead, BufReader};
use tokio::process::Command;

use crate::config::HooksConfig;

/// The variables the agent sets for hooks (not configuration keys).
pub const HOOK_ENV_VARS: &[&str] = &["GATEHOUSE_INTERFACE", "GATEHOUSE_HOOK"];

/// Which hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Hook {
    PreUp,
    PostUp,
    PreDown,
    PostDown,
}

impl Hook {
    /// The key name (`pre_up`), also the value of `GATEHOUSE_HOOK`.
    pub fn name(self) -> &'static str {
        match self {
            Hook::PreUp => "pre_up",
            Hook::PostUp => "post_up",
            Hook::PreDown => "pre_down",
            Hook::PostDown => "post_down",
        }
    }
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What happened when a hook was due.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HookOutcome {
    /// No command configured: nothing ran.
    NotConfigured,
    /// The command ran and exited with status 0.
    Succeeded,
}

/// A hook that did not succeed (already logged by [`Hooks::run`]).
#[derive(Debug, Error)]
pub enum HookError {
    #[error("hook {hook}: cannot start /bin/sh: {source}")]
    Spawn {
        hook: Hook,
        #[source]
        source: std::io::Error,
    },
    #[error("hook {hook}: waiting for it failed: {source}")]
    Wait {
        hook: Hook,
        #[source]
        source: std::io::Error,
    },
    #[error("hook {hook}: {status}")]
    Failed { hook: Hook, status: ExitStatus },
    #[error("hook {hook}: timed out after {}, process group killed", humantime::format_duration(*timeout))]
    TimedOut { hook: Hook, timeout: Duration },
}

/// The configured hooks of one interface.
#[derive(Clone, Debug)]
pub struct Hooks {
    config: HooksConfig,
    interface: String,
}

/// How long output is still read after the hook's shell exited (background children may
/// hold the pipes open).
const OUTPUT_GRACE: Duration = Duration::from_millis(500);

/// Longest output line logged; the rest of the line is cut.
const MAX_LINE: usize = 4096;

impl Hooks {
    pub fn new(config: HooksConfig, interface: impl Into<String>) -> Self {
        Hooks {
            config,
            interface: interface.into(),
        }
    }

    /// Runs `hook` if configured, waits for it (at most `hooks.timeout`) and logs the result.
    pub async fn run(&self, hook: Hook) -> Result<HookOutcome, HookError> {
        let Some(command) = self.config.command(hook).filter(|c| !c.trim().is_empty()) else {
            return Ok(HookOutcome::NotConfigured);
        };
        tracing::info!(target: "gatehouse::hooks", hook = hook.name(), "running hook");
        let result = run_command(hook, command, &self.interface, self.config.timeout).await;
        match &result {
            Ok(_) => {
                tracing::info!(target: "gatehouse::hooks", hook = hook.name(), "hook succeeded")
            }
            Err(e) => tracing::warn!(target: "gatehouse::hooks", hook = hook.name(), "{e}"),
        }
        result
    }
}

async fn run_command(
    hook: Hook,
    command: &str,
    interface: &str,
    timeout: Duration,
) -> Result<HookOutcome, HookError> {
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(command)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    for (name, _) in std::env::vars_os() {
        if name
            .to_string_lossy()
            .starts_with(crate::config::ENV_PREFIX)
        {
            cmd.env_remove(name);
        }
    }
    cmd.env("GATEHOUSE_INTERFACE", interface)
        .env("GATEHOUSE_HOOK", hook.name());

    let mut child = cmd
        .spawn()
        .map_err(|source| HookError::Spawn { hook, source })?;
    let pid = child.id();
    let readers = [
        child
            .stdout
            .take()
            .map(|s| tokio::spawn(forward(s, hook, "stdout"))),
        child
            .stderr
            .take()
            .map(|s| tokio::spawn(forward(s, hook, "stderr"))),
    ];

    let waited = tokio::time::timeout(timeout, child.wait()).await;
    let result = match waited {
        Ok(Ok(status)) if status.success() => Ok(HookOutcome::Succeeded),
        Ok(Ok(status)) => Err(HookError::Failed { hook, status }),
        Ok(Err(source)) => Err(HookError::Wait { hook, source }),
        Err(_elapsed) => {
            if let Some(pid) = pid {
                kill_process_group(pid);
            }
            // Reaps the shell (and kills it, should the group kill have failed).
            let _ = child.kill().await;
            Err(HookError::TimedOut { hook, timeout })
        }
    };
    for mut reader in readers.into_iter().flatten() {
        if tokio::time::timeout(OUTPUT_GRACE, &mut reader)
            .await
            .is_err()
        {
            reader.abort();
        }
    }
    result
}

/// Sends SIGKILL to the process group the hook leads (its pgid is its pid).
fn kill_process_group(pid: u32) {
    // Never signal group 0 (our own) or 1; a pid that does not fit is not ours.
    let Ok(pgid) = libc::pid_t::try_from(pid) else {
        return;
    };
    if pgid <= 1 {
        return;
    }
    // SAFETY: kill(2) takes plain integers and touches no memory of ours; a negative pid
    // addresses the process group created for the hook by `process_group(0)`.
    let rc = unsafe { libc::kill(-pgid, libc::SIGKILL) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        tracing::debug!(target: "gatehouse::hooks", pgid, "killing hook process group: {e}");
    }
}

/// Logs a hook's output line by line (lossy UTF-8, long lines cut).
async fn forward(stream: impl AsyncRead + Unpin, hook: Hook, name: &'static str) {
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let end = line.len().min(MAX_LINE);
                let text = String::from_utf8_lossy(&line[..end]);
                let text = text.trim_end();
                if name == "stderr" {
                    tracing::warn!(target: "gatehouse::hooks", hook = hook.name(), stream = name, "{text}");
                } else {
                    tracing::info!(target: "gatehouse::hooks", hook = hook.name(), stream = name, "{text}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hooks(hook: Hook, command: &str, timeout: Duration) -> Hooks {
        let mut config = HooksConfig {
            timeout,
            ..HooksConfig::default()
        };
        let slot = match hook {
            Hook::PreUp => &mut config.pre_up,
            Hook::PostUp => &mut config.post_up,
            Hook::PreDown => &mut config.pre_down,
            Hook::PostDown => &mut config.post_down,
        };
        *slot = Some(command.to_owned());
        Hooks::new(config, "gh-test0")
    }

    fn sh_quote(path: &std::path::Path) -> String {
        format!("'{}'", path.display().to_string().replace('\'', r"'\''"))
    }

    #[tokio::test]
    async fn runs_with_interface_and_hook_in_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("env");
        let cmd = format!(
            "echo \"$GATEHOUSE_INTERFACE $GATEHOUSE_HOOK token=${{GATEHOUSE_CORE_TOKEN:-unset}}\" > {}",
            sh_quote(&out)
        );
        let result = hooks(Hook::PostUp, &cmd, Duration::from_secs(30))
            .run(Hook::PostUp)
            .await;
        assert!(matches!(result, Ok(HookOutcome::Succeeded)), "{result:?}");
        let seen = std::fs::read_to_string(&out).unwrap();
        assert_eq!(seen.trim(), "gh-test0 post_up token=unset");
    }

    #[tokio::test]
    async fn only_the_named_hook_runs() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("ran");
        let h = hooks(
            Hook::PreDown,
            &format!("touch {}", sh_quote(&out)),
            Duration::from_secs(30),
        );
        for other in [Hook::PreUp, Hook::PostUp, Hook::PostDown] {
            assert!(matches!(h.run(other).await, Ok(HookOutcome::NotConfigured)));
        }
        assert!(!out.exists());
        assert!(matches!(
            h.run(Hook::PreDown).await,
            Ok(HookOutcome::Succeeded)
        ));
        assert!(out.exists());
    }

    #[tokio::test]
    async fn empty_command_runs_nothing() {
        let h = hooks(Hook::PreUp, "   ", Duration::from_secs(30));
        assert!(matches!(
            h.run(Hook::PreUp).await,
            Ok(HookOutcome::NotConfigured)
        ));
    }

    #[tokio::test]
    async fn non_zero_exit_is_reported_with_its_status() {
        let h = hooks(
            Hook::PreUp,
            "echo failing >&2; exit 3",
            Duration::from_secs(30),
        );
        match h.run(Hook::PreUp).await {
            Err(HookError::Failed { hook, status }) => {
                assert_eq!(hook, Hook::PreUp);
                assert_eq!(status.code(), Some(3));
            }
            other => panic!("expected Failed, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("bg.pid");
        // A background child in the hook's group, then the shell itself blocks.
        let cmd = format!("sleep 300 & echo $! > {}; wait", sh_quote(&pidfile));
        let h = hooks(Hook::PreUp, &cmd, Duration::from_secs(2));
        match h.run(Hook::PreUp).await {
            Err(HookError::TimedOut { hook, .. }) => assert_eq!(hook, Hook::PreUp),
            other => panic!("expected TimedOut, got {other:?}"),
        }
        let pid: u32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The background sleep was killed with the group: gone, or a zombie awaiting its
        // reaper. Poll until the kernel shows that; the bound only keeps a broken kill
        // from hanging the test.
        for _ in 0..1500 {
            match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                Err(_) => return,
                Ok(stat) => {
                    let state = stat
                        .rsplit(')')
                        .next()
                        .and_then(|s| s.split_whitespace().next());
                    if state == Some("Z") || state == Some("X") {
                        return;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("background child {pid} of the timed-out hook is still running");
    }
}
