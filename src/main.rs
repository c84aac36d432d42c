//! `gatehouse`: parses the command line and hands over to [`gatehouse::app`].

use std::collections::BTreeMap;
use std::process::ExitCode;

use clap::Parser;
use gatehouse::app;
use gatehouse::cli::{self, Cli, Command};

fn main() -> ExitCode {
    gatehouse::heap::one_arena();
    let cli = Cli::parse();
    let env: BTreeMap<String, String> = std::env::vars().collect();
    // Capabilities are per thread: raised before the runtime starts its worker threads.
    let caps = matches!(cli.action(), Command::Run).then(gatehouse::caps::raise_net_admin);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = match cli.action() {
        Command::CheckConfig => {
            cli::check_config(&cli, &env, &mut std::io::stdout(), &mut std::io::stderr())
        }
        action @ (Command::Status(_)
        | Command::Diff(_)
        | Command::Drain(_)
        | Command::Undrain(_)
        | Command::Activate(_)
        | Command::Deactivate(_)) => {
            let base = action
                .agent_args()
                .and_then(|a| a.http.clone())
                .or_else(|| cli::load(&cli, &env).ok().and_then(|c| c.http.local_url()));
            let base = base.unwrap_or_else(|| "http://127.0.0.1:9180".into());
            let json = action.agent_args().is_some_and(|a| a.json);
            match (&action, action.ha_command()) {
                (_, Some(command)) => runtime.block_on(app::ha_command(&base, command)),
                (Command::Status(_), None) => runtime.block_on(app::status(&base, json)),
                _ => runtime.block_on(app::diff(&base, json)),
            }
        }
        Command::Run => {
            let config = match cli::load(&cli, &env) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(cli::EXIT_CONFIG_ERROR as u8);
                }
            };
            app::init_logging(&config.log.level, config.log.format);
            match caps {
                Some(Ok(raised)) => tracing::debug!(?raised, "CAP_NET_ADMIN"),
                Some(Err(e)) => tracing::warn!("cannot raise the permitted CAP_NET_ADMIN: {e}"),
                None => {}
            }
            for name in gatehouse::config::unknown_env_vars(&env) {
                tracing::warn!(variable = %name, "environment variable names no configuration key");
            }
            match runtime.block_on(app::run(config)) {
                Ok(()) => 0,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("error: {e:#}");
                    1
                }
            }
        }
    };
    ExitCode::from(code.clamp(0, 255) as u8)
}
