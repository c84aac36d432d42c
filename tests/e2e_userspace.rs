//! Userspace acceptance at agent level (issue 3): the agent as a real process with the
//! userspace backend (wireguard-go) in a gateway namespace, a real WireGuard client in a
//! client namespace, everything driven through the reference Core's admin API.
//!
//! Root only: `tests/netns/run-root-tests.sh e2e_userspace`.

#[path = "e2e/mod.rs"]
mod e2e;

use std::time::Duration;

use e2e::{eventually, ClientOptions, Site, CLIENT_TUNNEL, CONVERGE};

/// Location, client and agent up, synced, and a ping through the tunnel answered.
async fn up(site: &mut Site, client: ClientOptions) {
    let name = format!("loc-{}", site.tag);
    site.create_location(Site::default_location(&name)).await;
    site.add_client(client).await;
    site.start_agent().await;
    site.wait_synced().await;
    site.wait_ping().await;
}

#[test]
#[ignore = "root + wireguard-go: tests/netns/run-root-tests.sh e2e_userspace e2e_faults"]
fn ping_through_the_tunnel() {
    e2e::run("ut", async |mut site: Site| {
        up(&mut site, ClientOptions::default()).await;
        let dump = site.gw_dump().await;
        assert_eq!(dump.public_key, site.location().public_key);
        assert_eq!(dump.listen_port, e2e::LISTEN_PORT);
        assert_eq!(
            dump.allowed_ips(&site.client().public_key),
            vec![format!("{CLIENT_TUNNEL}/32")]
        );
        let r = site.ping(20, "0.2", None).await;
        assert_eq!(r.lost(), 0, "{r:?}");
        assert!(dump.peers[&site.client().public_key].latest_handshake > 0);
        let status = site.status().await;
        assert!(status.ready, "{}", status.ready_reason);
        assert_eq!(status.backend, "userspace");
        assert_eq!(status.kernel_peers, 1);
    });
}

#[test]
#[ignore = "root + wireguard-go: tests/netns/run-root-tests.sh e2e_userspace e2e_faults"]
fn changed_allowed_ips_take_effect() {
    e2e::run("ua", async |mut site: Site| {
        up(&mut site, ClientOptions::default()).await;
        let iface = site.client().interface.clone();
        site.client_ip(&["addr", "add", "10.77.0.3/24", "dev", &iface])
            .await;
        // Before the change: only the old address gets through.
        assert!(!site.ping_once(Some("10.77.0.3")).await);

        let revision = site.set_client_allowed_ips(&["10.77.0.3/32"]).await;
        site.wait_applied(revision).await;
        let dump = site.gw_dump().await;
        assert_eq!(
            dump.allowed_ips(&site.client().public_key),
            vec!["10.77.0.3/32".to_string()]
        );
        eventually("a ping from the new address", CONVERGE, || async {
            site.ping_once(Some("10.77.0.3")).await.then_some(())
        })
        .await;
        let old = site.ping(3, "0.2", Some(CLIENT_TUNNEL)).await;
        assert_eq!(
            old.received, 0,
            "the old address still gets through: {old:?}"
        );
        // The session survived the change: an update, not a re-add.
        let status = site.status().await;
        assert_eq!(status.applied_revision, revision);
    });
}

#[test]
#[ignore = "root + wireguard-go: tests/netns/run-root-tests.sh e2e_userspace e2e_faults"]
fn removed_peer_loses_its_traffic() {
    e2e::run("ur", async |mut site: Site| {
        up(&mut site, ClientOptions::default()).await;
        let removed = site
            .admin()
            .delete_peer(site.location().id, site.client().peer_id)
            .await
            .expect("delete the peer");
        site.wait_applied(removed.revision).await;
        let dump = site.gw_dump().await;
        assert!(dump.peers.is_empty(), "{dump:?}");
        let r = site.ping(5, "0.2", None).await;
        assert_eq!(r.received, 0, "traffic of a removed peer: {r:?}");
        assert_eq!(site.status().await.kernel_peers, 0);
    });
}

#[test]
#[ignore = "root + wireguard-go: tests/netns/run-root-tests.sh e2e_userspace e2e_faults"]
fn killed_wireguard_go_is_restarted_with_its_peers() {
    e2e::run("uk", async |mut site: Site| {
        up(&mut site, ClientOptions::default()).await;
        let before = site.gw_dump().await;
        let old = site
            .gw_wireguard_go_pid()
            .expect("the gateway's wireguard-go");
        e2e::procs::signal(old, libc::SIGKILL);
        assert!(e2e::procs::wait_gone(old, Duration::from_secs(10)));

        let t = std::time::Instant::now();
        let new = eventually("a new wireguard-go", CONVERGE, || async {
            site.gw_wireguard_go_pid().filter(|&p| p != old)
        })
        .await;
        // The repair applies peers, then device settings (key, port) in their own
        // transaction: wait for the whole configuration, not the first sign of it.
        let after = eventually("the interface configured as before", CONVERGE, || async {
            site.try_gw_dump()
                .await
                .filter(|d| d.config() == before.config())
        })
        .await;
        assert_eq!(after.config(), before.config());
        let ping_after = site.wait_ping().await;
        eprintln!(
            "wireguard-go {old} killed: {new} serving its peers after {:?}, ping after {:?} more",
            t.elapsed(),
            ping_after
        );
        let log = site.agent_log();
        assert!(log.contains("restarting it"), "no repair in the log");
        let status = site.status().await;
        assert!(status.backend_error.is_none(), "{:?}", status.backend_error);
        assert!(status.ready, "{}", status.ready_reason);
    });
}
