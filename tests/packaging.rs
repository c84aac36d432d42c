//! Packaging stays consistent with the code and with §13 of the contract.
//!
//! Always run (no root, no built packages): every file the deb and rpm metadata of both
//! packages install exists; the units start the binaries with the packaged config, never
//! on the shipped example, hardened to an exposure of at most 2.0 (`systemd-analyze
//! security --offline`); the compose file's and the image's `GATEHOUSE_*` settings are
//! accepted by `gatehouse check-config`.
//!
//! Ignored (run by scripts/test.sh after `scripts/package.sh` built target/packages):
//! lintian and rpmlint report nothing (each remaining finding is overridden with its
//! reason in packaging/deb/*.lintian-overrides and packaging/rpm/rpmlint.toml), and the
//! built packages' file lists, modes, conffiles, dependencies and scripts as `dpkg-deb`
//! and `rpm -qp` show them.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn manifest(dir: &str) -> toml::Table {
    std::fs::read_to_string(root().join(dir).join("Cargo.toml"))
        .unwrap()
        .parse()
        .unwrap()
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Runs a command, returning stdout; panics with its output when it fails.
fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn every_packaged_file_exists() {
    for dir in [".", "examples/core"] {
        let m = manifest(dir);
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
        for key in ["maintainer-scripts", "changelog"] {
            sources.push(meta["deb"][key].as_str().unwrap().to_owned());
        }
        for key in [
            "pre_install_script",
            "post_install_script",
            "pre_uninstall_script",
            "post_uninstall_script",
        ] {
            sources.push(meta["generate-rpm"][key].as_str().unwrap().to_owned());
        }
        for s in sources {
            if s.starts_with("target/") {
                continue; // built by `cargo build --release` before packaging
            }
            assert!(
                root().join(dir).join(&s).exists(),
                "{dir}: packaged file missing: {s}"
            );
        }
    }
}

#[test]
fn the_units_run_the_packaged_binaries_only_once_configured() {
    let unit = read("packaging/systemd/gatehouse.service");
    assert!(unit.contains("ExecStart=/usr/bin/gatehouse run --config /etc/gatehouse/gateway.toml"));
    // Nothing runs on the shipped example: the token is what the operator writes.
    assert!(unit.contains("ConditionPathExists=/etc/gatehouse/token"));
    // The credential never fails the unit: it loads the file the condition requires.
    assert!(unit.contains("LoadCredential=token:/etc/gatehouse/token"));
    assert!(
        unit.contains("KillMode=process"),
        "wireguard-go survives agent restarts"
    );
    assert!(unit.contains("CapabilityBoundingSet=CAP_NET_ADMIN\n"));
    assert!(unit.contains("AmbientCapabilities=CAP_NET_ADMIN\n"));
    assert!(unit.contains("User=gatehouse\n"));

    let template = read("packaging/systemd/gatehouse@.service");
    for line in [
        "ExecStart=/usr/bin/gatehouse run --config /etc/gatehouse/%i.toml",
        "ConditionPathExists=/etc/gatehouse/%i.token",
        "LoadCredential=token:/etc/gatehouse/%i.token",
        "StateDirectory=gatehouse/%i",
        "Environment=GATEHOUSE_GATEWAY_STATE_DIR=/var/lib/gatehouse/%i",
    ] {
        assert!(template.contains(line), "gatehouse@.service lacks {line}");
    }

    let core = read("packaging/systemd/gatehouse-core.service");
    assert!(
        core.contains("ExecStart=/usr/bin/gatehouse-core --config /etc/gatehouse-core/core.toml")
    );
    assert!(core.contains("ConditionPathExists=/etc/gatehouse-core/admin-token"));
    assert!(core.contains("CapabilityBoundingSet=\n"));
    // The packaged Core config reads the admin token from the unit's credential.
    let toml = read("packaging/core/core.toml");
    assert!(toml.contains("/run/credentials/gatehouse-core.service/admin_token"));
    assert!(core.contains("LoadCredential=admin_token:"));
}

/// `systemd-analyze security --offline` exposure of a unit file (systemd 252).
fn exposure(unit: &str) -> f64 {
    let out = run(Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(root().join("packaging/systemd").join(unit)));
    let line = out
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure in:\n{out}"));
    line.split(':')
        .nth(1)
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("cannot parse {line}"))
}

#[test]
fn the_units_are_hardened_to_at_most_2_0() {
    for unit in [
        "gatehouse.service",
        "gatehouse@.service",
        "gatehouse-core.service",
    ] {
        let e = exposure(unit);
        assert!(e <= 2.0, "{unit}: exposure {e} > 2.0");
    }
}

#[test]
fn the_compose_gateway_settings_are_valid_configuration() {
    let compose = read("docker-compose.yml");
    let dockerfile = read("packaging/container/Dockerfile");
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "t").unwrap();
    // The image's `ENV` of the gateway stage, then the `environment:` of gateway-a.
    let mut env: Vec<(String, String)> = dockerfile
        .split("AS gateway")
        .nth(1)
        .unwrap()
        .lines()
        .skip_while(|l| !l.starts_with("ENV "))
        .take_while(|l| l.starts_with("ENV ") || l.starts_with("    GATEHOUSE_"))
        .map(|l| {
            let kv = l
                .trim_start_matches("ENV ")
                .trim()
                .trim_end_matches('\\')
                .trim();
            let (k, v) = kv.split_once('=').unwrap();
            (k.to_owned(), v.to_owned())
        })
        .collect();
    assert!(env.len() >= 3, "{env:?}");
    env.extend(
        compose
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
            }),
    );
    assert!(env.len() >= 8, "{env:?}");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gatehouse"));
    cmd.args(["check-config", "--config"])
        .arg(root().join("config/gateway.toml"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    for (k, v) in &env {
        cmd.env(k, v);
    }
    cmd.env("GATEHOUSE_CORE_TOKEN_FILE", &token);
    let printed = run(&mut cmd);
    assert!(printed.contains("url = \"http://core:50055\""), "{printed}");
    assert!(printed.contains("backend = \"userspace\""), "{printed}");
    assert!(printed.contains("listen = \"0.0.0.0:9180\""), "{printed}");
}

// ------------------------------------------------------- the built packages ----

fn packages() -> PathBuf {
    root().join("target/packages")
}

/// The one package file of `name` at revision 1 with the extension `ext`.
fn package(name: &str, ext: &str) -> PathBuf {
    let found: Vec<PathBuf> = std::fs::read_dir(packages())
        .expect("target/packages: run scripts/package.sh first")
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let f = p.file_name().unwrap().to_string_lossy().into_owned();
            let rest = f.strip_prefix(name).unwrap_or("");
            f.ends_with(ext)
                && (rest.starts_with('_') || rest.starts_with('-'))
                && !rest.starts_with("-core")
                && (f.contains("-1_") || f.contains("-1."))
        })
        .collect();
    assert_eq!(found.len(), 1, "{name} {ext}: {found:?}");
    found.into_iter().next().unwrap()
}

#[test]
#[ignore = "needs target/packages (scripts/package.sh) and lintian"]
fn lintian_reports_nothing_on_the_debs() {
    for name in ["gatehouse", "gatehouse-core"] {
        let deb = package(name, ".deb");
        let out = run(Command::new("lintian")
            .args(["--fail-on", "error,warning", "--no-tag-display-limit"])
            .arg(&deb));
        let findings: Vec<&str> = out
            .lines()
            .filter(|l| l.starts_with("E:") || l.starts_with("W:"))
            .collect();
        assert!(findings.is_empty(), "{}: {findings:#?}", deb.display());
    }
}

#[test]
#[ignore = "needs target/packages (scripts/package.sh)"]
fn the_debs_install_what_the_contract_says() {
    let deb = package("gatehouse", ".deb");
    let list = run(Command::new("dpkg-deb").arg("-c").arg(&deb));
    for (mode, path) in [
        ("-rwxr-xr-x", "./usr/bin/gatehouse"),
        ("-rw-r-----", "./etc/gatehouse/gateway.toml"),
        ("-rw-r--r--", "./lib/systemd/system/gatehouse.service"),
        ("-rw-r--r--", "./lib/systemd/system/gatehouse@.service"),
    ] {
        assert!(
            list.lines()
                .any(|l| l.starts_with(mode) && l.ends_with(path)),
            "{path} {mode} not in:\n{list}"
        );
    }
    let depends = run(Command::new("dpkg-deb")
        .args(["-f"])
        .arg(&deb)
        .arg("Depends"));
    assert!(depends.contains("adduser"), "{depends}");
    let dir = tempfile::tempdir().unwrap();
    run(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(dir.path()));
    let conffiles = std::fs::read_to_string(dir.path().join("conffiles")).unwrap();
    assert_eq!(conffiles.trim(), "/etc/gatehouse/gateway.toml");
    let postinst = std::fs::read_to_string(dir.path().join("postinst")).unwrap();
    assert!(postinst.contains("chown root:gatehouse \"$f\""));
    assert!(postinst.contains("try-restart gatehouse.service 'gatehouse@*.service'"));

    let core = package("gatehouse-core", ".deb");
    let list = run(Command::new("dpkg-deb").arg("-c").arg(&core));
    assert!(list.contains("./usr/bin/gatehouse-core"));
    assert!(list
        .lines()
        .any(|l| l.starts_with("-rw-r-----") && l.ends_with("./etc/gatehouse-core/core.toml")));
    assert!(list.contains("./lib/systemd/system/gatehouse-core.service"));
}

#[test]
#[ignore = "needs target/packages (scripts/package.sh) and rpmlint"]
fn rpmlint_reports_nothing_on_the_rpms() {
    for name in ["gatehouse", "gatehouse-core"] {
        let rpm = package(name, ".rpm");
        let out = run(Command::new("rpmlint")
            .arg("-c")
            .arg(root().join("packaging/rpm/rpmlint.toml"))
            .arg(&rpm));
        assert!(
            out.contains("0 errors, 0 warnings"),
            "{}:\n{out}",
            rpm.display()
        );
    }
}

fn rpm_q(rpm: &Path, args: &[&str]) -> String {
    run(Command::new("rpm")
        .args(["-qp", "--nosignature"])
        .args(args)
        .arg(rpm))
}

#[test]
#[ignore = "needs target/packages (scripts/package.sh) and rpm"]
fn the_rpms_install_what_the_contract_says() {
    let rpm = package("gatehouse", ".rpm");
    let files = rpm_q(
        &rpm,
        &[
            "--qf",
            "[%{FILEMODES:perms} %{FILEUSERNAME}:%{FILEGROUPNAME} %{FILENAMES}\n]",
        ],
    );
    let want = "-rw-r----- root:gatehouse /etc/gatehouse/gateway.toml\n\
                -rwxr-xr-x root:root /usr/bin/gatehouse\n\
                -rw-r--r-- root:root /usr/lib/systemd/system/gatehouse.service\n\
                -rw-r--r-- root:root /usr/lib/systemd/system/gatehouse@.service\n\
                -rw-r--r-- root:root /usr/share/doc/gatehouse/README.md\n";
    let mut got: Vec<&str> = files.lines().collect();
    got.sort_by_key(|l| l.rsplit(' ').next().unwrap_or(""));
    assert_eq!(got.join("\n") + "\n", want);
    // config(noreplace): an edited config survives upgrades.
    let config = rpm_q(&rpm, &["--qf", "[%{FILEFLAGS:fflags} %{FILENAMES}\n]"]);
    assert!(
        config.contains("cn /etc/gatehouse/gateway.toml"),
        "{config}"
    );
    let requires = rpm_q(&rpm, &["--requires"]);
    for dep in ["systemd >= 250", "shadow-utils", "libc.so.6()(64bit)"] {
        assert!(
            requires.lines().any(|l| l.trim() == dep),
            "{dep} not in:\n{requires}"
        );
    }
    // The targets (README): glibc 2.34 is RHEL 9's; a newer symbol would exclude it.
    for l in requires
        .lines()
        .filter(|l| l.starts_with("libc.so.6(GLIBC_"))
    {
        let v = &l["libc.so.6(GLIBC_".len()..l.find(')').unwrap()];
        let parts: Vec<u32> = v.split('.').map(|p| p.parse().unwrap()).collect();
        assert!(
            parts <= vec![2, 34],
            "needs glibc {v}, newer than RHEL 9's 2.34"
        );
    }
    let scripts = rpm_q(&rpm, &["--scripts"]);
    for part in [
        "preinstall scriptlet",
        "useradd --system --gid gatehouse",
        "postinstall scriptlet",
        "chown root:gatehouse \"$f\"",
        "systemctl try-restart gatehouse.service 'gatehouse@*.service'",
        "preuninstall scriptlet",
        "disable --now gatehouse.service",
        "postuninstall scriptlet",
    ] {
        assert!(scripts.contains(part), "{part} not in:\n{scripts}");
    }

    let core = package("gatehouse-core", ".rpm");
    let files = rpm_q(
        &core,
        &[
            "--qf",
            "[%{FILEMODES:perms} %{FILEUSERNAME}:%{FILEGROUPNAME} %{FILENAMES}\n]",
        ],
    );
    assert!(
        files.contains("-rw-r----- root:gatehouse-core /etc/gatehouse-core/core.toml"),
        "{files}"
    );
    assert!(
        files.contains("/usr/lib/systemd/system/gatehouse-core.service"),
        "{files}"
    );
}
