//! The `gatehouse` binary's command line: `check-config` on the example configurations and
//! on broken ones, `run` refusing to start without a token, `--version`, the HA commands.

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

/// `gatehouse drain|undrain|activate|deactivate` POST to the agent named by `--http` or by
/// the configuration's `http.listen`, print its one-line answer and exit 0; 1 when it
/// refuses, 3 when nothing answers.
#[test]
fn ha_commands_post_to_the_agent_and_print_its_answer() {
    use std::io::{Read as _, Write as _};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    // A stand-in agent: answers two requests, the first with the state, the second refuses.
    let server = std::thread::spawn(move || {
        let mut paths = Vec::new();
        for (status, body) in [
            ("200 OK", r#"{"role":"standby","draining":true}"#),
            ("403 Forbidden", "loopback only"),
        ] {
            let (mut conn, _) = listener.accept().unwrap();
            let mut buf = [0u8; 4096];
            let n = conn.read(&mut buf).unwrap();
            let head = String::from_utf8_lossy(&buf[..n]).into_owned();
            paths.push(head.lines().next().unwrap_or("").to_owned());
            let _ = write!(
                conn,
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
        paths
    });
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gateway.toml");
    let config = format!(
        "[core]\nurl = \"https://core.example.net:50055\"\ntoken = \"t\"\n\
         [http]\nlisten = \"127.0.0.1:{port}\"\n"
    );
    std::fs::write(&file, config).unwrap();
    let out = gatehouse(&["drain", "--config", file.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "drain: standby, DRAINING (/readyz 503)\n"
    );
    let url = format!("http://127.0.0.1:{port}");
    let out = gatehouse(&["activate", "--http", &url], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("403"), "{}", stderr(&out));
    assert_eq!(
        server.join().unwrap(),
        vec!["POST /drain HTTP/1.1", "POST /activate HTTP/1.1"]
    );
    // Nothing listens any more.
    let out = gatehouse(&["undrain", "--http", &url], &[]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
}
