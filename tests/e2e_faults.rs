//! Staying up (issue 5), with a real client pinging through the tunnel: the Core away
//! for minutes, the agent SIGKILLed and restarted while the Core is away, drift made by
//! hand (peer removed, peer added, link deleted), a truncated state file, the hooks at
//! their documented moments, and SIGTERM leaving the tunnel in place with a churn-free
//! restart. The agent runs as a real process (userspace backend) in a gateway namespace.
//!
//! Root only: `tests/netns/run-root-tests.sh e2e_faults`. The outage lasts
//! `GATEHOUSE_E2E_OUTAGE_SECS` seconds (default 120).

#[path = "e2e/mod.rs"]
mod e2e;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use e2e::{cmd, cmd_ok, eventually, ClientOptions, Site, CONVERGE};

/// Location, client and agent up, synced, and a ping through the tunnel answered.
async fn up(site: &mut Site) {
    let name = format!("loc-{}", site.tag);
    site.create_location(Site::default_location(&name)).await;
    site.add_client(ClientOptions::default()).await;
    site.start_agent().await;
    site.wait_synced().await;
    site.wait_ping().await;
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn outage() -> Duration {
    let secs = std::env::var("GATEHOUSE_E2E_OUTAGE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    Duration::from_secs(secs)
}

/// A fresh public key (from `wg genkey | wg pubkey`).
async fn random_public_key() -> String {
    let private = cmd_ok("wg", &["genkey"]).await;
    let out = cmd_ok(
        "sh",
        &["-c", &format!("echo '{}' | wg pubkey", private.trim())],
    )
    .await;
    out.trim().to_string()
}

/// How long the Core reconnect may take after an outage: the agent's backoff ceiling is
/// 30 s, plus the snapshot and apply.
const RECONNECT: Duration = Duration::from_secs(60);

#[test]
#[ignore = "root + wireguard-go: tests/netns/run-root-tests.sh e2e_userspace e2e_faults"]
fn core_outage_loses_no_ping_and_changes_no_peer() {
    e2e::run("fo", async |mut site: Site| {
        up(&mut site).await;
        let outage = outage();
        let before = site.gw_dump().await;
        let writes_before = site.status().await.device_writes;

        // Pings every 0.2 s from 1 s before the Core stops until about 3 s after it is back.
        let count = ((outage.as_secs_f64() + 4.0) * 5.0) as u32;
        let pinger = site.start_pinger(count, "0.2");
        tokio::time::sleep(Duration::from_secs(1)).await;
        let stopped_ms = now_ms();
        site.stop_core().await;
        let t = Instant::now();
        let mut checks = 0;
        while t.elapsed() < outage {
            let (code, body) = site.readyz().await.expect("/readyz answers");
            assert_eq!(code, 200, "not ready during the outage: {body}");
            let s = site.status().await;
            if t.elapsed() > Duration::from_secs(5) {
                assert!(!s.core.connected, "the Core is down");
                let since = s.core.since_unix_ms.expect("unreachable since");
                assert!(
                    since >= stopped_ms - 1000 && since <= now_ms(),
                    "unreachable since {since}, stopped at {stopped_ms}"
                );
                assert!(s.core.last_error.is_some());
                assert!(s.ready_reason.contains("unreachable"), "{}", s.ready_reason);
                checks += 1;
            }
            let dump = site.gw_dump().await;
            assert_eq!(
                dump.config(),
                before.config(),
                "a peer changed during the outage"
            );
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        assert!(checks > 0);
        site.start_core().await;
        let back = Instant::now();
        let status = site.wait_synced_within(RECONNECT).await;
        let resync = back.elapsed();
        let pings = pinger.finish().await;
        eprintln!("outage {outage:?}: {pings:?}, synced {resync:?} after the Core returned");
        assert_eq!(
            pings.lost(),
            0,
            "pings lost during the Core outage: {pings:?}"
        );
        assert!(pings.transmitted >= outage.as_secs() * 5);
        assert_eq!(site.gw_dump().await.config(), before.config());
        assert_eq!(
            status.device_writes, writes_before,
            "peer writes after the outage"
        );
        let gw = site
            .gateway_in_core()
            .await
            .expect("the gateway in the Core");
        assert!(gw.connected);
        assert_eq!(gw.applied_revision, site.revision().await);
    });
}

#[test]
#[ignore = "root + wireguard-go: tests/netns/run-root-tests.sh e2e_userspace e2e_faults"]
fn sigkilled_agent_restarts_from_its_state_while_the_core_is_down() {
    e2e::run("fk", async |mut site: Site| {
        up(&mut site).await;
        let before = site.gw_dump().await;
        let wg_pid = site.gw_wireguard_go_pid().expect("wireguard-go");
        let first = site.status().await;
        let stopped_ms = now_ms();
        site.stop_core().await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        site.kill_agent();
        site.start_agent().await;

        let status = eventually("ready from the state file", CONVERGE, || async {
            site.try_status().await.filter(|s| s.ready)
        })
        .await;
        assert!(!status.core.connected);
        assert_eq!(status.gateway_id, first.gateway_id);
        assert_eq!(status.applied_revision, first.applied_revision);
        // Unreachable since before the restart, not since the agent started again.
        let since = eventually("unreachable since", CONVERGE, || async {
            site.try_status().await.and_then(|s| s.core.since_unix_ms)
        })
        .await;
        assert!(
            since <= stopped_ms + 500,
            "unreachable since {since}, but the Core stopped at {stopped_ms}"
        );
        let (code, body) = site.readyz().await.expect("/readyz");
        assert_eq!(code, 200, "{body}");
        assert!(site
            .agent_log()
            .contains("restored the last applied location"));
        // The interface as it was: same wireguard-go, same peers, no writes.
        assert_eq!(site.gw_wireguard_go_pid(), Some(wg_pid));
        assert_eq!(site.gw_dump().await.config(), before.config());
        assert_eq!((status.device_writes, status.link_writes), (0, 0));
        site.wait_ping().await;

        site.start_core().await;
        let synced = site.wait_synced_within(RECONNECT).await;
        assert_eq!((synced.device_writes, synced.link_writes), (0, 0));
        assert_eq!(site.gw_dump().await.config(), before.config());
        let gw = site
            .gateway_in_core()
            .await
            .expect("the gateway in the Core");
        assert_eq!(gw.gateway_id, first.gateway_id);
    });
}

#[test]
#[ignore = "root + wireguard-go: tests/netns/run-root-tests.sh e2e_userspace e2e_faults"]
fn drift_made_by_hand_is_repaired() {
    e2e::run("fd", async |mut site: Site| {
        up(&mut site).await;
        let before = site.gw_dump().await;
        let client = site.client().public_key.clone();

        // A peer removed by hand comes back.
        site.gw_wg_set(&["peer", &client, "remove"]).await;
        eventually("the removed peer back", CONVERGE, || async {
            site.try_gw_dump()
                .await
                .filter(|d| d.config() == before.config())
        })
        .await;
        let s = eventually("one drift repair in the status", CONVERGE, || async {
            site.try_status().await.filter(|s| s.drift_repairs >= 1)
        })
        .await;
        assert_eq!(s.drift_repairs, 1);
        site.wait_ping().await;

        // A peer added by hand goes away.
        let stranger = random_public_key().await;
        site.gw_wg_set(&["peer", &stranger, "allowed-ips", "10.77.0.50/32"])
            .await;
        eventually("the stranger removed", CONVERGE, || async {
            site.try_gw_dump()
                .await
                .filter(|d| d.config() == before.config())
        })
        .await;
        eventually("two drift repairs in the status", CONVERGE, || async {
            site.try_status().await.filter(|s| s.drift_repairs == 2)
        })
        .await;
        let removal = format!("subject=peer {stranger} field=\"peer\" old=present new=absent");
        assert!(
            site.agent_log().contains(&removal),
            "the stranger's removal not logged"
        );

        // The link deleted by hand (wireguard-go ends with it) is re-created with its peers.
        let old_pid = site.gw_wireguard_go_pid().expect("wireguard-go");
        cmd_ok("ip", &["link", "del", site.interface()]).await;
        eventually("the link and its peers re-created", CONVERGE, || async {
            site.try_gw_dump()
                .await
                .filter(|d| d.config() == before.config())
        })
        .await;
        let new_pid = site.gw_wireguard_go_pid().expect("wireguard-go again");
        assert_ne!(new_pid, old_pid);
        let addr = cmd_ok("ip", &["-o", "addr", "show", "dev", site.interface()]).await;
        assert!(addr.contains("10.77.0.1/24"), "{addr}");
        site.wait_ping().await;
        let s = eventually("the link repair in the status", CONVERGE, || async {
            site.try_status()
                .await
                .filter(|s| s.drift_repairs >= 3 && s.ready && s.backend_error.is_none())
        })
        .await;
        eprintln!("drift repairs: {}", s.drift_repairs);
        let log = site.agent_log();
        assert!(
            log.matches("drift repaired").count() >= 3,
            "repairs not logged"
        );
        assert!(
            log.contains("restarting it"),
            "wireguard-go restart not logged"
        );
    });
}

#[test]
#[ignore = "root + wireguard-go: tests/netns/run-root-tests.sh e2e_userspace e2e_faults"]
fn truncated_state_file_is_moved_aside_and_the_core_resyncs() {
    e2e::run("ft", async |mut site: Site| {
        up(&mut site).await;
        let id = site.status().await.gateway_id;
        site.stop_agent();
        let path = site.state_file();
        let full = std::fs::read(&path).expect("the state file");
        std::fs::write(&path, &full[..full.len() / 2]).expect("truncate the state file");

        site.start_agent().await;
        let status = site.wait_synced().await;
        assert_eq!(status.gateway_id, id, "the gateway id changed");
        let log = site.agent_log();
        assert!(
            log.contains("state file unreadable: moved aside"),
            "no clear log line about the state file"
        );
        let aside: Vec<_> = std::fs::read_dir(&site.paths.state_dir)
            .expect("state dir")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("state.json.corrupt-"))
            .collect();
        assert_eq!(aside.len(), 1, "{aside:?}");
        let moved = std::fs::read(site.paths.state_dir.join(&aside[0])).expect("moved file");
        assert_eq!(
            moved,
            full[..full.len() / 2],
            "the moved file is not the broken one"
        );
        // A good state file again.
        eventually("a readable state file", CONVERGE, || async {
            let text = std::fs::read_to_string(site.state_file()).ok()?;
            serde_json::from_str::<serde_json::Value>(&text).ok()
        })
        .await;
        let gateways = site
            .admin()
            .gateways(site.location().id)
            .await
            .expect("gateways");
        assert_eq!(gateways.len(), 1, "a second gateway identity: {gateways:?}");
        assert_eq!(gateways[0].gateway_id, id);
        site.wait_ping().await;
    });
}

/// Hook lines: (hook, link existed, peers on the interface).
fn hook_lines(text: &str) -> Vec<(String, bool, usize)> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            match f.as_slice() {
                [hook, _date, link, peers] => Some((
                    hook.to_string(),
                    *link == "link=yes",
                    peers.trim_start_matches("peers=").parse().ok()?,
                )),
                _ => None,
            }
        })
        .collect()
}

#[test]
#[ignore = "root + wireguard-go: tests/netns/run-root-tests.sh e2e_userspace e2e_faults"]
fn hooks_run_at_their_documented_moments() {
    e2e::run("fh", async |mut site: Site| {
        let record = site.dir.path().join("hooks.log");
        let command = format!(
            "echo \"$GATEHOUSE_HOOK $(date +%s.%N) \
             link=$(ip link show dev \"$GATEHOUSE_INTERFACE\" >/dev/null 2>&1 && echo yes || echo no) \
             peers=$(wg show \"$GATEHOUSE_INTERFACE\" peers 2>/dev/null | wc -l)\" >> '{}'",
            record.display()
        );
        for hook in ["pre_up", "post_up", "pre_down", "post_down"] {
            site.options.hooks.insert(hook.into(), command.clone());
        }
        up(&mut site).await;
        let read = || std::fs::read_to_string(&record).unwrap_or_default();
        // post_up may still run when the Core already shows the revision applied.
        eventually("post_up ran", CONVERGE, || async {
            (hook_lines(&read()).len() >= 2).then_some(())
        })
        .await;
        let lines = hook_lines(&read());
        assert_eq!(
            lines,
            vec![("pre_up".into(), false, 0), ("post_up".into(), true, 1)],
            "pre_up before the interface exists, post_up after the first apply"
        );

        site.stop_agent();
        let lines = hook_lines(&read());
        assert_eq!(
            lines[2..],
            [("pre_down".into(), true, 1), ("post_down".into(), true, 1)],
            "down hooks on SIGTERM, the interface kept"
        );

        // A restart adopts the interface: pre_up sees it, post_up follows the first apply.
        site.start_agent().await;
        eventually("post_up after the restart", CONVERGE, || async {
            (hook_lines(&read()).len() >= 6).then_some(())
        })
        .await;
        let lines = hook_lines(&read());
        assert_eq!(
            lines[4..],
            [("pre_up".into(), true, 1), ("post_up".into(), true, 1)]
        );
        // In time order.
        let dates: Vec<f64> = read()
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
            .collect();
        assert!(dates.windows(2).all(|w| w[0] <= w[1]), "{dates:?}");
        assert!(site.agent_log().contains("running hook"));
    });
}

#[test]
#[ignore = "root + wireguard-go: tests/netns/run-root-tests.sh e2e_userspace e2e_faults"]
fn sigterm_keeps_the_tunnel_and_the_restart_writes_nothing() {
    e2e::run("fs", async |mut site: Site| {
        up(&mut site).await;
        let before = site.gw_dump().await;
        let wg_pid = site.gw_wireguard_go_pid().expect("wireguard-go");
        let took = site.stop_agent();
        eprintln!("the agent exited {took:?} after SIGTERM");
        assert!(site
            .agent_log()
            .contains("the interface and its peers stay in place"));
        // The tunnel works without the agent.
        assert_eq!(site.gw_wireguard_go_pid(), Some(wg_pid));
        assert_eq!(site.gw_dump().await.config(), before.config());
        let r = site.ping(5, "0.2", None).await;
        assert_eq!(r.lost(), 0, "{r:?}");

        site.start_agent().await;
        let status = site.wait_synced().await;
        // A few reconciles later, still nothing written.
        tokio::time::sleep(site.options.resync_interval * 2).await;
        let status2 = site.status().await;
        for s in [&status, &status2] {
            assert_eq!(
                (s.device_writes, s.link_writes, s.last_reconcile_ops),
                (0, 0, 0),
                "the restart wrote to the interface"
            );
        }
        assert_eq!(site.gw_wireguard_go_pid(), Some(wg_pid));
        assert_eq!(site.gw_dump().await.config(), before.config());
        let out = cmd("wg", &["show", site.interface(), "latest-handshakes"]).await;
        assert!(out.status.success());
        site.wait_ping().await;
    });
}

#[test]
#[ignore = "root + wireguard-go: tests/netns/run-root-tests.sh e2e_userspace e2e_faults"]
fn reboot_while_the_core_is_down_restores_the_tunnel_from_the_state_file() {
    e2e::run("fb", async |mut site: Site| {
        up(&mut site).await;
        let before = site.gw_dump().await;
        let first = site.status().await;
        site.stop_core().await;
        // A reboot: the agent and wireguard-go die, the TUN device goes with them.
        site.kill_agent();
        let wg_pid = site.gw_wireguard_go_pid().expect("wireguard-go");
        e2e::procs::signal(wg_pid, libc::SIGKILL);
        assert!(e2e::procs::wait_gone(wg_pid, Duration::from_secs(10)));
        eventually("the link gone", CONVERGE, || async {
            let out = cmd("ip", &["link", "show", "dev", site.interface()]).await;
            (!out.status.success()).then_some(())
        })
        .await;

        site.start_agent().await;
        let status = eventually("ready from the state file", CONVERGE, || async {
            site.try_status().await.filter(|s| s.ready)
        })
        .await;
        assert!(!status.core.connected);
        assert_eq!(status.applied_revision, first.applied_revision);
        assert_eq!(site.gw_dump().await.config(), before.config());
        site.wait_ping().await;
        assert_ne!(site.gw_wireguard_go_pid(), Some(wg_pid));

        // SIGTERM while the Core is still away ends the agent promptly too.
        let took = site.stop_agent();
        eprintln!("SIGTERM with the Core away: exited after {took:?}");
        site.start_agent().await;
        site.start_core().await;
        let synced = site.wait_synced_within(RECONNECT).await;
        assert_eq!(synced.gateway_id, first.gateway_id);
        assert_eq!(synced.device_writes, 0, "writes after the Core returned");
        assert_eq!(site.gw_dump().await.config(), before.config());
    });
}

#[test]
#[ignore = "root + wireguard-go: tests/netns/run-root-tests.sh e2e_userspace e2e_faults"]
fn offline_allowance_removes_peers_and_the_core_brings_them_back() {
    e2e::run("fa", async |mut site: Site| {
        let allowance = Duration::from_secs(8);
        site.options.offline_policy = "8s".into();
        up(&mut site).await;
        let before = site.gw_dump().await;
        let wg_pid = site.gw_wireguard_go_pid().expect("wireguard-go");
        // Connected but idle (nothing from the Core) for longer than the allowance: the
        // allowance counts from when the Core went away, not from its last message.
        tokio::time::sleep(allowance + Duration::from_secs(2)).await;
        site.stop_core().await;
        let stopped = Instant::now();
        while stopped.elapsed() < allowance / 2 {
            let s = site.status().await;
            assert!(
                !s.offline_removed && s.ready,
                "peers removed {:?} after the Core went away, allowance {allowance:?}: {}",
                stopped.elapsed(),
                s.ready_reason
            );
            assert_eq!(site.gw_dump().await.config(), before.config());
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let status = eventually("peers removed by the offline policy", CONVERGE, || async {
            site.try_status().await.filter(|s| s.offline_removed)
        })
        .await;
        // A Core outage is a reason, never a 503, also past the allowance (design §8).
        assert!(status.ready, "{}", status.ready_reason);
        eventually("no peer on the interface", CONVERGE, || async {
            site.try_gw_dump().await.filter(|d| d.peers.is_empty())
        })
        .await;
        let (code, body) = site.readyz().await.expect("/readyz");
        assert_eq!(code, 200, "{body}");
        assert!(body.contains("beyond the offline allowance"), "{body}");
        // Identity and interface stay.
        let dump = site.gw_dump().await;
        assert_eq!(dump.public_key, before.public_key);
        assert_eq!(site.gw_wireguard_go_pid(), Some(wg_pid));
        assert!(site.state_file().exists());

        site.start_core().await;
        let synced = site.wait_synced_within(RECONNECT).await;
        eventually("the peers back", CONVERGE, || async {
            site.try_gw_dump()
                .await
                .filter(|d| d.config() == before.config())
        })
        .await;
        let status = site.status().await;
        assert!(!status.offline_removed);
        assert!(status.ready, "{}", status.ready_reason);
        assert_eq!(synced.gateway_id, site.status().await.gateway_id);
        site.wait_ping().await;
    });
}
