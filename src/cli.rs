//! The command line: `gatehouse [run] | check-config | status | diff | drain | undrain |
//! activate | deactivate`, `--version`, and the flags that override configuration keys.
//!
//! Configuration flags are global: `gatehouse --interface wg1 run` and
//! `gatehouse run --interface wg1` mean the same, and `run` is the default command.
//! `--token` is visible to every local user in the process list; prefer `--token-file` or a
//! systemd credential.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{self, Config, ConfigError, Flags, Secret};

/// Exit status of `check-config` for an invalid configuration.
pub const EXIT_CONFIG_ERROR: i32 = 2;

/// `gatehouse`: WireGuard gateway agent managed by a central Core.
#[derive(Debug, Parser)]
#[command(name = "gatehouse", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub config: ConfigArgs,
}

/// What to do.
#[derive(Clone, Debug, PartialEq, Eq, Subcommand)]
pub enum Command {
    /// Run the agent (the default command).
    Run,
    /// Validate the configuration and print it with secrets redacted (exit 2 on error).
    CheckConfig,
    /// Show the running agent's interface and peers as `wg show` does, then its revision,
    /// Core connection, readiness, firewall and HA role (`--json` for scripts).
    Status(AgentArgs),
    /// Show differences between the desired state and the kernel in the running agent.
    Diff(AgentArgs),
    /// Take the running agent out of service: /readyz answers 503, every peer stays (kept
    /// across restarts until `undrain`).
    Drain(AgentArgs),
    /// End a drain.
    Undrain(AgentArgs),
    /// Make the running agent active and initiate the handshake towards recently active
    /// clients (e.g. from a keepalived notify script).
    Activate(AgentArgs),
    /// End the active role (until the floating address next appears here).
    Deactivate(AgentArgs),
}

impl Command {
    /// How an agent command reaches the running agent; None for `run` and `check-config`.
    pub fn agent_args(&self) -> Option<&AgentArgs> {
        match self {
            Command::Status(a)
            | Command::Diff(a)
            | Command::Drain(a)
            | Command::Undrain(a)
            | Command::Activate(a)
            | Command::Deactivate(a) => Some(a),
            Command::Run | Command::CheckConfig => None,
        }
    }

    /// The HA command this is, if any.
    pub fn ha_command(&self) -> Option<crate::ha::Command> {
        use crate::ha::Command as Ha;
        match self {
            Command::Drain(_) => Some(Ha::Drain),
            Command::Undrain(_) => Some(Ha::Undrain),
            Command::Activate(_) => Some(Ha::Activate),
            Command::Deactivate(_) => Some(Ha::Deactivate),
            _ => None,
        }
    }
}

/// How `status`, `diff` and the HA commands reach the running agent.
#[derive(Clone, Debug, PartialEq, Eq, Args)]
pub struct AgentArgs {
    /// Base URL of the agent's HTTP server (default: from `http.listen` of the configuration).
    #[arg(long, value_name = "URL")]
    pub http: Option<String>,
    /// `status` and `diff`: print the agent's answer as JSON (for scripts).
    #[arg(long)]
    pub json: bool,
}

/// The configuration file and the flags that override configuration keys.
#[derive(Clone, Debug, Default, Args)]
pub struct ConfigArgs {
    /// Configuration file (default: /etc/gatehouse/gateway.toml if it exists).
    #[arg(long, short = 'c', value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,
    /// core.url: the Core's gRPC URL, e.g. https://core.example.net:50055.
    #[arg(long, value_name = "URL", global = true)]
    pub core_url: Option<String>,
    /// core.token (visible in the process list: prefer --token-file).
    #[arg(long, value_name = "TOKEN", global = true)]
    pub token: Option<Secret>,
    /// core.token_file: file holding the location token.
    #[arg(long, value_name = "FILE", global = true)]
    pub token_file: Option<PathBuf>,
    /// gateway.interface: WireGuard interface name.
    #[arg(long, value_name = "NAME", global = true)]
    pub interface: Option<String>,
    /// gateway.backend: kernel, userspace or memory.
    #[arg(long, value_name = "BACKEND", global = true)]
    pub backend: Option<String>,
    /// gateway.state_dir: where the state file is kept.
    #[arg(long, value_name = "DIR", global = true)]
    pub state_dir: Option<PathBuf>,
    /// http.listen: address of /healthz, /readyz, /metrics ("" disables).
    #[arg(long, value_name = "ADDR", global = true)]
    pub http_listen: Option<String>,
    /// log.level: a level or a tracing filter.
    #[arg(long, value_name = "LEVEL", global = true)]
    pub log_level: Option<String>,
    /// log.format: text or json.
    #[arg(long, value_name = "FORMAT", global = true)]
    pub log_format: Option<String>,
}

impl Cli {
    /// The command to run (`run` when none is given).
    pub fn action(&self) -> Command {
        self.command.clone().unwrap_or(Command::Run)
    }
}

impl ConfigArgs {
    /// The flags as a configuration layer.
    pub fn flags(&self) -> Flags {
        Flags {
            core_url: self.core_url.clone(),
            token: self.token.clone(),
            token_file: self.token_file.clone(),
            interface: self.interface.clone(),
            backend: self.backend.clone(),
            state_dir: self.state_dir.clone(),
            http_listen: self.http_listen.clone(),
            log_level: self.log_level.clone(),
            log_format: self.log_format.clone(),
        }
    }
}

/// Loads the configuration: defaults, the file, `env` (the process environment as a map),
/// then the flags of `cli`.
pub fn load(cli: &Cli, env: &BTreeMap<String, String>) -> Result<Config, ConfigError> {
    config::load(cli.config.config.as_deref(), env, &cli.config.flags())
}

/// `gatehouse check-config`: prints the effective configuration to `out` and returns 0, or
/// prints `error: <key>: <message>` to `err` and returns [`EXIT_CONFIG_ERROR`]. Unknown
/// `GATEHOUSE_*` variables are reported as warnings on `err`.
pub fn check_config(
    cli: &Cli,
    env: &BTreeMap<String, String>,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> i32 {
    for name in config::unknown_env_vars(env) {
        let _ = writeln!(
            err,
            "warning: {name}: environment variable names no configuration key"
        );
    }
    match load(cli, env) {
        Ok(config) => {
            if config.core.token == config::TokenSource::Missing {
                let _ = writeln!(
                    err,
                    "warning: core.token: {} (`gatehouse run` will refuse to start)",
                    config::MISSING_TOKEN
                );
            }
            let _ = out.write_all(config.effective_toml().as_bytes());
            0
        }
        Err(e) => {
            let _ = writeln!(err, "error: {e}");
            EXIT_CONFIG_ERROR
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("gatehouse").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_is_the_default_command() {
        assert_eq!(parse(&[]).action(), Command::Run);
        assert_eq!(parse(&["--interface", "wg1"]).action(), Command::Run);
        assert_eq!(parse(&["run"]).action(), Command::Run);
        assert_eq!(parse(&["check-config"]).action(), Command::CheckConfig);
    }

    #[test]
    fn flags_work_before_and_after_the_subcommand() {
        let a = parse(&["--interface", "wg1", "check-config", "--config", "/x.toml"]);
        let b = parse(&["check-config", "--interface", "wg1", "-c", "/x.toml"]);
        for cli in [a, b] {
            assert_eq!(cli.config.interface.as_deref(), Some("wg1"));
            assert_eq!(
                cli.config.config.as_deref(),
                Some(std::path::Path::new("/x.toml"))
            );
        }
    }

    #[test]
    fn status_and_diff_take_an_http_url() {
        let cli = parse(&["status", "--http", "http://127.0.0.1:9180"]);
        assert_eq!(
            cli.action(),
            Command::Status(AgentArgs {
                http: Some("http://127.0.0.1:9180".into()),
                json: false,
            })
        );
        assert_eq!(
            parse(&["diff"]).action(),
            Command::Diff(AgentArgs {
                http: None,
                json: false
            })
        );
        assert!(
            parse(&["status", "--json"])
                .action()
                .agent_args()
                .unwrap()
                .json
        );
    }

    #[test]
    fn ha_commands_take_an_http_url_and_the_config() {
        use crate::ha::Command as Ha;
        for (word, want) in [
            ("drain", Ha::Drain),
            ("undrain", Ha::Undrain),
            ("activate", Ha::Activate),
            ("deactivate", Ha::Deactivate),
        ] {
            let cli = parse(&[word, "--http", "http://127.0.0.1:1", "-c", "/x.toml"]);
            assert_eq!(cli.action().ha_command(), Some(want), "{word}");
            assert_eq!(
                cli.action().agent_args().unwrap().http.as_deref(),
                Some("http://127.0.0.1:1")
            );
            assert!(cli.config.config.is_some());
        }
        assert_eq!(parse(&["status"]).action().ha_command(), None);
    }

    #[test]
    fn token_flag_is_not_in_debug_output() {
        let cli = parse(&["--token", "sekrit-value", "run"]);
        assert!(!format!("{cli:?}").contains("sekrit-value"));
        assert_eq!(cli.config.flags().token.unwrap().expose(), "sekrit-value");
    }

    #[test]
    fn version_flag_is_handled_by_clap() {
        let e = Cli::try_parse_from(["gatehouse", "--version"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::DisplayVersion);
    }

    #[test]
    fn check_config_prints_key_and_exits_2_on_error() {
        let cli = parse(&["check-config", "--core-url", "ftp://x:1", "--token", "t"]);
        let env = BTreeMap::from([("GATEHOUSE_NOPE".to_owned(), "1".to_owned())]);
        let (mut out, mut err) = (Vec::new(), Vec::new());
        // The default config file may exist on a host; pass an empty one explicitly.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("g.toml");
        std::fs::write(&file, "").unwrap();
        let mut cli = cli;
        cli.config.config = Some(file);
        assert_eq!(
            check_config(&cli, &env, &mut out, &mut err),
            EXIT_CONFIG_ERROR
        );
        let err = String::from_utf8(err).unwrap();
        assert!(err.contains("warning: GATEHOUSE_NOPE"), "{err}");
        assert!(err.contains("error: core.url: "), "{err}");
        assert!(out.is_empty());
    }

    #[test]
    fn check_config_prints_the_effective_config_redacted() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("g.toml");
        std::fs::write(&file, "[core]\nurl = \"https://[2001:db8::1]:50055\"\n").unwrap();
        let cli = parse(&[
            "check-config",
            "-c",
            file.to_str().unwrap(),
            "--token",
            "sekrit",
        ]);
        let (mut out, mut err) = (Vec::new(), Vec::new());
        assert_eq!(check_config(&cli, &BTreeMap::new(), &mut out, &mut err), 0);
        let out = String::from_utf8(out).unwrap();
        assert!(!out.contains("sekrit"), "{out}");
        assert!(
            out.contains("token = \"<redacted>\"  # flag --token"),
            "{out}"
        );
        assert!(
            out.contains("url = \"https://[2001:db8::1]:50055\"  # config file"),
            "{out}"
        );
    }
}
