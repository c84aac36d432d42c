//! The `gatehouse` binary's command line: `check-config` on the example configurations and
//! on broken ones, `run` refusing to start without a token, `--version`.

use std::path::Path;
use std::process::{Command, Output};

fn gatehouse(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gatehouse"));
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run gatehouse")
}

fn check(toml: &str) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gateway.toml");
    std::fs::write(&file, toml).unwrap();
    gatehouse(&["check-config", "--config", file.to_str().unwrap()], &[])
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn check_config_accepts_every_example_configuration() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.starts_with("gateway") || !name.ends_with(".toml") {
            continue;
        }
        let out = gatehouse(&["check-config", "--config", path.to_str().unwrap()], &[]);
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        let printed = String::from_utf8_lossy(&out.stdout);
        assert!(
            printed.contains("[core]") && printed.contains("[gateway]"),
            "{printed}"
        );
        checked += 1;
    }
    assert!(checked >= 1, "no example gateway configuration found");
}

#[test]
fn check_config_names_the_key_of_each_error() {
    let cases = [
        ("[gateway]\nstats_interval = 5\n", "gateway.stats_interval"),
        ("[gateway]\ninterfce = \"wg0\"\n", "gateway.interfce"),
        (
            "[core]\nurl = \"ftp://core.example.net:50055\"\n",
            "core.url",
        ),
        ("[core]\nurl = \"not a url\"\n", "core.url"),
        ("[gatway]\ninterface = \"wg0\"\n", "gatway"),
        ("[http]\nlisten = \"nowhere\"\n", "http.listen"),
        ("[gateway]\nbackend = \"magic\"\n", "gateway.backend"),
        (
            "[gateway]\ninterface = \"a-very-long-interface-name\"\n",
            "gateway.interface",
        ),
    ];
    for (toml, key) in cases {
        // Every other key valid, so the error is the one under test.
        let core = if toml.starts_with("[core]") {
            String::new()
        } else {
            "[core]\nurl = \"https://core.example.net:50055\"\ntoken = \"t\"\n".into()
        };
        let out = check(&format!("{core}{toml}"));
        assert_eq!(out.status.code(), Some(2), "{toml}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains(&format!("error: {key}")), "{toml}: {err}");
    }
}

#[test]
fn environment_and_flags_layer_over_the_file_key_by_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gateway.toml");
    std::fs::write(
        &file,
        "[core]\nurl = \"https://core.example.net:50055\"\ntoken = \"file-token\"\n\
         [gateway]\ninterface = \"wg-file\"\nstats_interval = \"10s\"\n",
    )
    .unwrap();
    let out = gatehouse(
        &[
            "check-config",
            "--config",
            file.to_str().unwrap(),
            "--state-dir",
            "/srv/gh",
        ],
        &[("GATEHOUSE_GATEWAY_INTERFACE", "wg-env")],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains("interface = \"wg-env\""), "{printed}");
    assert!(printed.contains("stats_interval = \"10s\""), "{printed}");
    assert!(printed.contains("state_dir = \"/srv/gh\""), "{printed}");
    assert!(!printed.contains("file-token"), "secret printed: {printed}");
}

#[test]
fn run_refuses_to_start_without_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gateway.toml");
    std::fs::write(
        &file,
        format!(
            "[core]\nurl = \"http://127.0.0.1:1\"\n[gateway]\nbackend = \"memory\"\nstate_dir = \"{}\"\n[http]\nlisten = \"\"\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let out = gatehouse(&["run", "--config", file.to_str().unwrap()], &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("core.token"), "{}", stderr(&out));
}

#[test]
fn version_is_printed() {
    let out = gatehouse(&["--version"], &[]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
}

/// Every duration key is bounded: a huge or tiny value is an error naming the key (exit 2),
/// never a panic, in `check-config` and in `run` alike.
#[test]
fn out_of_range_durations_and_interface_names_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let base = format!(
        "[core]\nurl = \"http://127.0.0.1:1\"\ntoken = \"t\"\n\
         connect_timeout = \"{{connect}}\"\n\
         [gateway]\nbackend = \"memory\"\nstate_dir = \"{}\"\n[http]\nlisten = \"\"\n",
        dir.path().display()
    );
    let cases = [
        ("core", "connect_timeout", "500000000y"),
        ("core", "keepalive_interval", "100000y"),
        ("core", "reconnect_max", "1ns"),
        ("gateway", "stats_interval", "584942417355y"),
        ("gateway", "resync_interval", "100000000000h"),
        ("gateway", "offline_policy", "1000000y"),
        ("hooks", "timeout", "1000y"),
        ("gateway", "interface", "wg%d"),
        ("gateway", "interface", "wg0 "),
    ];
    for (section, key, value) in cases {
        let text = base.replace("{connect}", "2s");
        // The key is set in its own section, after the base (TOML allows a section once).
        let text = match section {
            "core" => text.replacen("[core]\n", &format!("[core]\n{key} = \"{value}\"\n"), 1),
            "gateway" => text.replacen(
                "[gateway]\n",
                &format!("[gateway]\n{key} = \"{value}\"\n"),
                1,
            ),
            _ => format!("{text}[{section}]\n{key} = \"{value}\"\n"),
        };
        let text = if key == "connect_timeout" {
            text.replace("connect_timeout = \"2s\"\n", "")
        } else {
            text
        };
        let file = dir.path().join("gateway.toml");
        std::fs::write(&file, &text).unwrap();
        for command in ["check-config", "run"] {
            let out = gatehouse(&[command, "--config", file.to_str().unwrap()], &[]);
            let err = stderr(&out);
            assert_eq!(out.status.code(), Some(2), "{command} {key}={value}: {err}");
            assert!(
                err.contains(&format!("error: {section}.{key}")),
                "{command} {key}={value}: {err}"
            );
            assert!(!err.contains("panicked"), "{err}");
        }
    }
}
