//! Packaging stays consistent with the code: every file the deb and rpm metadata install
//! exists, the systemd unit starts the binary with the example config, and the container
//! compose file's `GATEHOUSE_*` settings are accepted by `gatehouse check-config`.

use std::path::Path;
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn manifest() -> toml::Table {
    std::fs::read_to_string(root().join("Cargo.toml"))
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn every_packaged_file_exists() {
    let m = manifest();
    let meta = &m["package"]["metadata"];
    let mut sources: Vec<String> = meta["deb"]["assets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a[0].as_str().unwrap().to_owned())
        .collect();
    sources.extend(
        meta["generate-rpm"]["assets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["source"].as_str().unwrap().to_owned()),
    );
    sources.push(
        meta["deb"]["maintainer-scripts"]
            .as_str()
            .unwrap()
            .to_owned(),
    );
    for key in ["post_install_script", "pre_uninstall_script"] {
        sources.push(meta["generate-rpm"][key].as_str().unwrap().to_owned());
    }
    for s in sources {
        if s.starts_with("target/") {
            continue; // built by `cargo build --release` before packaging
        }
        assert!(root().join(&s).exists(), "packaged file missing: {s}");
    }
}

#[test]
fn the_systemd_unit_runs_the_agent_with_the_packaged_config() {
    let unit = std::fs::read_to_string(root().join("packaging/systemd/gatehouse.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/gatehouse run --config /etc/gatehouse/gateway.toml"));
    assert!(
        unit.contains("LoadCredential=token:"),
        "token as a credential"
    );
    assert!(
        unit.contains("KillMode=process"),
        "wireguard-go survives agent restarts"
    );
    assert!(unit.contains("CapabilityBoundingSet=CAP_NET_ADMIN"));
    assert!(!unit.contains("User=root"));
}

#[test]
fn the_compose_gateway_settings_are_valid_configuration() {
    let compose = std::fs::read_to_string(root().join("docker-compose.yml")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "t").unwrap();
    // The `environment:` entries of gateway-a.
    let env: Vec<(String, String)> = compose
        .split("gateway-a:")
        .nth(1)
        .unwrap()
        .split("environment:")
        .nth(1)
        .unwrap()
        .lines()
        .skip(1)
        .take_while(|l| l.trim_start().starts_with("GATEHOUSE_"))
        .map(|l| {
            let (k, v) = l.trim().split_once(':').unwrap();
            let v = v.split('#').next().unwrap().trim().trim_matches('"');
            (k.to_owned(), v.to_owned())
        })
        .collect();
    assert!(env.len() >= 5, "{env:?}");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gatehouse"));
    cmd.args(["check-config", "--config"])
        .arg(root().join("config/gateway.toml"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    for (k, v) in &env {
        cmd.env(k, v);
    }
    cmd.env("GATEHOUSE_CORE_TOKEN_FILE", &token);
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains("url = \"http://core:50055\""), "{printed}");
    assert!(printed.contains("backend = \"userspace\""), "{printed}");
}
