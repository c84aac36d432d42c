//! Unit tests of layering and validation (pure: no process environment, no files unless
//! a test creates them in a temporary directory).

use std::collections::BTreeMap;
use std::time::Duration;

use super::*;

const MINIMAL: &str = "[core]\nurl = \"https://core.example.net:50055\"\ntoken = \"file-token\"\n";

fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn ok(file: &str) -> Config {
    resolve(Some(file), &BTreeMap::new(), &Flags::default()).unwrap()
}

fn err(file: &str) -> ConfigError {
    resolve(Some(file), &BTreeMap::new(), &Flags::default()).unwrap_err()
}

fn err_key(file: &str) -> String {
    err(file).key()
}

#[test]
fn defaults_fill_every_key_not_given() {
    let c = ok(MINIMAL);
    assert_eq!(c.gateway.interface, "wg0");
    assert_eq!(c.gateway.backend, BackendKind::Kernel);
    assert_eq!(c.gateway.state_dir, PathBuf::from("/var/lib/gatehouse"));
    assert_eq!(c.gateway.stats_interval, Duration::from_secs(30));
    assert_eq!(c.gateway.resync_interval, Duration::from_secs(60));
    assert_eq!(c.gateway.offline_policy, OfflinePolicy::Keep);
    assert!(!c.gateway.remove_on_shutdown);
    assert_eq!(c.gateway.wireguard_go, "wireguard-go");
    assert_eq!(c.core.connect_timeout, Duration::from_secs(10));
    assert_eq!(c.core.keepalive_interval, Duration::from_secs(10));
    assert_eq!(c.hooks.timeout, Duration::from_secs(30));
    assert_eq!(c.http.listen, Some("127.0.0.1:9180".parse().unwrap()));
    assert_eq!(c.log.format, LogFormat::Text);
    assert!(c.firewall.enabled && !c.firewall.masquerade);
    assert_eq!(
        c.core.token,
        TokenSource::Inline(Secret::new("file-token".into()))
    );
    assert_eq!(c.origin("core.url"), Origin::File);
    assert_eq!(c.origin("gateway.interface"), Origin::Default);
}

#[test]
fn env_and_flags_layer_key_by_key() {
    let file = format!("{MINIMAL}[gateway]\ninterface = \"wg-file\"\nstate_dir = \"/srv/file\"\nstats_interval = \"5s\"\n");
    let e = env(&[
        ("GATEHOUSE_GATEWAY_INTERFACE", "wg-env"),
        ("GATEHOUSE_GATEWAY_STATS_INTERVAL", "7s"),
        ("GATEHOUSE_FIREWALL_MASQUERADE", "true"),
    ]);
    let flags = Flags {
        interface: Some("wg-flag".into()),
        ..Flags::default()
    };
    let c = resolve(Some(&file), &e, &flags).unwrap();
    assert_eq!(c.gateway.interface, "wg-flag");
    assert_eq!(c.origin("gateway.interface"), Origin::Flag("interface"));
    assert_eq!(c.gateway.stats_interval, Duration::from_secs(7));
    assert_eq!(
        c.origin("gateway.stats_interval"),
        Origin::Env("GATEHOUSE_GATEWAY_STATS_INTERVAL".into())
    );
    // Keys only the file sets survive the higher layers.
    assert_eq!(c.gateway.state_dir, PathBuf::from("/srv/file"));
    assert_eq!(c.core.url.as_str(), "https://core.example.net:50055/");
    assert!(c.firewall.masquerade);
}

#[test]
fn no_file_still_layers_env_and_flags() {
    let e = env(&[("GATEHOUSE_CORE_URL", "http://127.0.0.1:50055")]);
    let flags = Flags {
        token: Some(Secret::new("t".into())),
        ..Flags::default()
    };
    let c = resolve(None, &e, &flags).unwrap();
    assert!(!c.core.is_tls());
}

#[test]
fn unknown_keys_and_sections_are_named() {
    let e = err(&format!("{MINIMAL}[gateway]\ninterfce = \"wg0\"\n"));
    assert_eq!(e.key(), "gateway.interfce");
    assert!(
        e.to_string().contains("unknown key in section [gateway]"),
        "{e}"
    );
    assert_eq!(err_key(&format!("{MINIMAL}[gatway]\n")), "gatway");
    assert_eq!(err_key(&format!("stray = 1\n{MINIMAL}")), "stray");
}

#[test]
fn wrong_types_are_named() {
    let e = err("[core]\nurl = 5\n");
    assert_eq!(
        e.to_string(),
        "core.url: expected a string, found integer 5"
    );
    let e = err(&format!("{MINIMAL}[gateway]\nstats_interval = 30\n"));
    assert!(
        e.to_string()
            .starts_with("gateway.stats_interval: expected a duration string"),
        "{e}"
    );
    assert_eq!(
        err_key(&format!("{MINIMAL}[firewall]\nenabled = \"yes\"\n")),
        "firewall.enabled"
    );
    let e = resolve(
        Some(MINIMAL),
        &env(&[("GATEHOUSE_FIREWALL_ENABLED", "maybe")]),
        &Flags::default(),
    )
    .unwrap_err();
    assert_eq!(e.key(), "firewall.enabled");
    assert!(e.to_string().contains("GATEHOUSE_FIREWALL_ENABLED"), "{e}");
}

#[test]
fn toml_syntax_errors_give_a_place_but_not_the_line() {
    let e = err("[core]\ntoken = \"unterminated-secret\n");
    let text = e.to_string();
    assert!(text.contains("line 2"), "{text}");
    assert!(!text.contains("unterminated-secret"), "{text}");
}

#[test]
fn core_url_rules() {
    let with_url = |url: &str, extra: &str| {
        resolve(
            Some(&format!("[core]\nurl = \"{url}\"\ntoken = \"t\"\n{extra}")),
            &BTreeMap::new(),
            &Flags::default(),
        )
    };
    for good in [
        "https://core.example.net:50055",
        "https://[2001:db8::1]:50055",
        "https://192.0.2.1:443",
        "http://127.0.0.1:50055",
        "http://[::1]:50055",
        "http://localhost:50055",
        "https://core.example.net",
    ] {
        assert!(
            with_url(good, "").is_ok(),
            "{good}: {:?}",
            with_url(good, "")
        );
    }
    for bad in [
        "",
        "core.example.net:50055",
        "ftp://core.example.net:21",
        "https://user:pw@core.example.net:1",
        "https://core.example.net:50055/path",
        "https://core.example.net:99999",
        "https://[2001:db8::1:50055",
        "http://core.example.net:50055",
        "http://[2001:db8::1]:50055",
    ] {
        let e = with_url(bad, "").unwrap_err();
        assert_eq!(e.key(), "core.url", "{bad}: {e}");
    }
    assert!(with_url("http://core:50055", "allow_insecure = true\n").is_ok());
    let e = with_url("https://user:hunter2@h:1", "").unwrap_err();
    assert!(!e.to_string().contains("hunter2"), "{e}");
}

#[test]
fn token_sources() {
    let e = err("[core]\nurl = \"https://h:1\"\ntoken = \"a\"\ntoken_file = \"/b\"\n");
    assert_eq!(e.key(), "core.token");
    assert!(e.to_string().contains("both set"), "{e}");

    // No token validates (check-config warns) but cannot be read (run refuses).
    let c = ok("[core]\nurl = \"https://h:1\"\n");
    assert_eq!(c.core.token, TokenSource::Missing);
    assert_eq!(c.core.token.read().unwrap_err().key(), "core.token");

    // A higher layer's token replaces a lower layer's token_file, and the other way round.
    let file = "[core]\nurl = \"https://h:1\"\ntoken_file = \"/from/file\"\n";
    let flags = Flags {
        token: Some(Secret::new("flag".into())),
        ..Flags::default()
    };
    let c = resolve(Some(file), &BTreeMap::new(), &flags).unwrap();
    assert_eq!(
        c.core.token,
        TokenSource::Inline(Secret::new("flag".into()))
    );

    // systemd credentials when nothing else is set.
    let e = env(&[(
        "CREDENTIALS_DIRECTORY",
        "/run/credentials/gatehouse.service",
    )]);
    let c = resolve(
        Some("[core]\nurl = \"https://h:1\"\n"),
        &e,
        &Flags::default(),
    )
    .unwrap();
    assert_eq!(
        c.core.token,
        TokenSource::File("/run/credentials/gatehouse.service/token".into())
    );
    assert_eq!(c.origin("core.token_file"), Origin::Credentials);
    // ...but an explicit token wins over the credential.
    let c = resolve(Some(MINIMAL), &e, &Flags::default()).unwrap();
    assert!(matches!(c.core.token, TokenSource::Inline(_)));
}

#[test]
fn secrets_never_appear_in_debug_or_effective_toml() {
    let c = ok(MINIMAL);
    assert!(!format!("{c:?}").contains("file-token"));
    let shown = c.effective_toml();
    assert!(!shown.contains("file-token"), "{shown}");
    assert!(
        shown.contains("token = \"<redacted>\"  # config file"),
        "{shown}"
    );
}

#[test]
fn interface_names() {
    for good in ["wg0", "a", "gatehouse-01234"] {
        assert!(validate_interface_name(good).is_ok(), "{good}");
    }
    for bad in [
        "",
        "gatehouse-012345",
        "wg%d",
        "wg/0",
        "wg 0",
        "wg:0",
        ".",
        "..",
        "wg\t",
    ] {
        assert!(validate_interface_name(bad).is_err(), "{bad:?}");
        let e = err(&format!("{MINIMAL}[gateway]\ninterface = {bad:?}\n"));
        assert_eq!(e.key(), "gateway.interface", "{bad:?}");
    }
}

#[test]
fn durations_and_offline_policy() {
    let c = ok(&format!("{MINIMAL}[gateway]\noffline_policy = \"24h\"\n"));
    assert_eq!(
        c.gateway.offline_policy,
        OfflinePolicy::RemoveAfter(Duration::from_secs(86400))
    );
    for bad in ["\"forever\"", "\"0s\"", "\"\""] {
        assert_eq!(
            err_key(&format!("{MINIMAL}[gateway]\noffline_policy = {bad}\n")),
            "gateway.offline_policy"
        );
    }
    for bad in ["\"30\"", "\"0s\"", "\"-1s\"", "\"soon\""] {
        assert_eq!(
            err_key(&format!("{MINIMAL}[hooks]\ntimeout = {bad}\n")),
            "hooks.timeout",
            "{bad}"
        );
    }
    // A section given twice is a TOML error, not a silent override.
    assert!(matches!(
        err(&format!("{MINIMAL}[core]\n")),
        ConfigError::File { .. }
    ));
}

#[test]
fn listen_addresses() {
    let c = ok(&format!("{MINIMAL}[http]\nlisten = \"[::]:9180\"\n"));
    assert_eq!(c.http.local_url().as_deref(), Some("http://[::1]:9180"));
    let c = ok(&format!("{MINIMAL}[http]\nlisten = \"\"\n"));
    assert_eq!(c.http.listen, None);
    for bad in ["localhost:9180", "127.0.0.1", "1.2.3.4:99999", ":9180"] {
        assert_eq!(
            err_key(&format!("{MINIMAL}[http]\nlisten = {bad:?}\n")),
            "http.listen",
            "{bad}"
        );
    }
}

#[test]
fn enums_and_log_levels() {
    assert_eq!(
        ok(&format!("{MINIMAL}[gateway]\nbackend = \"userspace\"\n"))
            .gateway
            .backend,
        BackendKind::Userspace
    );
    assert_eq!(
        err_key(&format!("{MINIMAL}[gateway]\nbackend = \"kernal\"\n")),
        "gateway.backend"
    );
    assert_eq!(
        ok(&format!("{MINIMAL}[log]\nformat = \"json\"\n"))
            .log
            .format,
        LogFormat::Json
    );
    assert_eq!(
        err_key(&format!("{MINIMAL}[log]\nformat = \"xml\"\n")),
        "log.format"
    );
    assert!(resolve(
        Some(&format!(
            "{MINIMAL}[log]\nlevel = \"info,gatehouse=debug\"\n"
        )),
        &BTreeMap::new(),
        &Flags::default()
    )
    .is_ok());
    assert_eq!(
        err_key(&format!("{MINIMAL}[log]\nlevel = \"verbose\"\n")),
        "log.level"
    );
}

#[test]
fn tls_file_rules() {
    let e = err(&format!("{MINIMAL}client_cert_file = \"/c.pem\"\n"));
    assert_eq!(e.key(), "core.client_key_file");
    let e = err(&format!("{MINIMAL}client_key_file = \"/k.pem\"\n"));
    assert_eq!(e.key(), "core.client_cert_file");
    let e = err("[core]\nurl = \"http://127.0.0.1:1\"\ntoken = \"t\"\nca_file = \"/ca.pem\"\n");
    assert_eq!(e.key(), "core.ca_file");
}

#[test]
fn check_files_reports_unreadable_and_empty_files() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "  \n").unwrap();
    let file = format!(
        "[core]\nurl = \"https://h:1\"\ntoken_file = {:?}\n",
        token.to_str().unwrap()
    );
    let c = ok(&file);
    let e = c.check_files(&BTreeMap::new()).unwrap_err();
    assert_eq!(e.key(), "core.token_file");
    std::fs::write(&token, "tok-123\n").unwrap();
    c.check_files(&BTreeMap::new()).unwrap();
    assert_eq!(c.core.token.read().unwrap().expose(), "tok-123");

    let missing = dir.path().join("missing-ca.pem");
    let c = ok(&format!(
        "{MINIMAL}ca_file = {:?}\n",
        missing.to_str().unwrap()
    ));
    assert_eq!(
        c.check_files(&BTreeMap::new()).unwrap_err().key(),
        "core.ca_file"
    );
    let not_pem = dir.path().join("ca.pem");
    std::fs::write(&not_pem, "hello").unwrap();
    let c = ok(&format!(
        "{MINIMAL}ca_file = {:?}\n",
        not_pem.to_str().unwrap()
    ));
    assert_eq!(
        c.check_files(&BTreeMap::new()).unwrap_err().key(),
        "core.ca_file"
    );

    let c = ok(&format!(
        "{MINIMAL}[gateway]\nbackend = \"userspace\"\nwireguard_go = \"no-such-wg-binary\"\n"
    ));
    let e = c
        .check_files(&env(&[("PATH", dir.path().to_str().unwrap())]))
        .unwrap_err();
    assert_eq!(e.key(), "gateway.wireguard_go");
}

#[test]
fn effective_toml_parses_back_to_the_same_config() {
    let file = "[core]\nurl = \"https://[2001:db8::1]:50055\"\ntoken_file = \"/run/t\"\n\
                ca_file = \"/ca.pem\"\nconnect_timeout = \"3s\"\n\
                [gateway]\nid = \"gw-1\"\nname = \"edge\"\ninterface = \"wg7\"\n\
                backend = \"memory\"\noffline_policy = \"1day 2h\"\nremove_on_shutdown = true\n\
                [http]\nlisten = \"\"\n[log]\nlevel = \"info,gatehouse=trace\"\nformat = \"json\"\n\
                [hooks]\npre_up = \"echo 'up'\"\npost_down = \"logger \\\"down\\\"\"\ntimeout = \"1m\"\n\
                [firewall]\nenabled = true\nmasquerade = true\n\
                [ha]\nvip = [\"192.0.2.10\", \"2001:db8::10\"]\ntakeover_window = \"2m\"\n\
                takeover_rate = 500\nroute_table = 100\n";
    let c = ok(file);
    let shown = c.effective_toml();
    assert!(!shown.contains("<unknown key>"), "{shown}");
    let again = ok(&shown);
    assert_eq!(again.core, c.core);
    assert_eq!(again.gateway, c.gateway);
    assert_eq!(again.http, c.http);
    assert_eq!(again.log, c.log);
    assert_eq!(again.hooks, c.hooks);
    assert_eq!(again.firewall, c.firewall);
    assert_eq!(again.ha, c.ha);
    assert_eq!(c.ha.vip.len(), 2);
}

#[test]
fn ha_keys_defaults_env_and_errors() {
    let c = ok(MINIMAL);
    assert!(c.ha.vip.is_empty());
    assert_eq!(c.ha.takeover_window, Duration::from_secs(300));
    assert_eq!(c.ha.takeover_rate, 2000);
    assert_eq!(c.ha.route_table, 51820);

    let e = env(&[
        ("GATEHOUSE_HA_VIP", "192.0.2.10, 2001:db8::10"),
        ("GATEHOUSE_HA_TAKEOVER_WINDOW", "90s"),
        ("GATEHOUSE_HA_TAKEOVER_RATE", "50"),
        ("GATEHOUSE_HA_ROUTE_TABLE", "7"),
    ]);
    let c = resolve(Some(MINIMAL), &e, &Flags::default()).unwrap();
    assert_eq!(
        c.ha.vip,
        vec![
            "192.0.2.10".parse::<std::net::IpAddr>().unwrap(),
            "2001:db8::10".parse().unwrap()
        ]
    );
    assert_eq!(c.ha.takeover_window, Duration::from_secs(90));
    assert_eq!((c.ha.takeover_rate, c.ha.route_table), (50, 7));
    assert!(c
        .effective_toml()
        .contains("vip = [\"192.0.2.10\", \"2001:db8::10\"]  # environment GATEHOUSE_HA_VIP"));

    // A bad VIP names the key and the entry.
    let e = err(&format!("{MINIMAL}[ha]\nvip = [\"192.0.2.10/24\"]\n"));
    assert_eq!(e.key(), "ha.vip");
    assert!(e.to_string().contains("192.0.2.10/24"), "{e}");
    for bad in [
        "[\"not-an-ip\"]",
        "[\"0.0.0.0\"]",
        "[\"127.0.0.1\"]",
        "[\"ff02::1\"]",
        "[\"192.0.2.1\", \"192.0.2.1\"]",
        "\"192.0.2.1\"",
        "[1]",
    ] {
        assert_eq!(
            err_key(&format!("{MINIMAL}[ha]\nvip = {bad}\n")),
            "ha.vip",
            "{bad}"
        );
    }
    let e = resolve(
        Some(MINIMAL),
        &env(&[("GATEHOUSE_HA_VIP", "192.0.2.1,nope")]),
        &Flags::default(),
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("(set by environment GATEHOUSE_HA_VIP)"),
        "{e}"
    );
    // Durations and integers within their documented ranges.
    for bad in ["\"5s\"", "\"2h\"", "\"soon\""] {
        assert_eq!(
            err_key(&format!("{MINIMAL}[ha]\ntakeover_window = {bad}\n")),
            "ha.takeover_window",
            "{bad}"
        );
    }
    for bad in ["0", "100001", "\"fast\""] {
        assert_eq!(
            err_key(&format!("{MINIMAL}[ha]\ntakeover_rate = {bad}\n")),
            "ha.takeover_rate",
            "{bad}"
        );
    }
    for bad in ["0", "253", "254", "255", "4294967296"] {
        assert_eq!(
            err_key(&format!("{MINIMAL}[ha]\nroute_table = {bad}\n")),
            "ha.route_table",
            "{bad}"
        );
    }
    let e = resolve(
        Some(MINIMAL),
        &env(&[("GATEHOUSE_HA_TAKEOVER_RATE", "lots")]),
        &Flags::default(),
    )
    .unwrap_err();
    assert_eq!(e.key(), "ha.takeover_rate");
}
