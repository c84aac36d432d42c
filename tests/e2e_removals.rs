//! Removals are never blocked (design §4), with real WireGuard: the agent as a real
//! process (userspace backend, wireguard-go) in a gateway namespace whose IPv6 is disabled
//! by sysctl, a real client in a client namespace. The location gets an IPv6 address, which
//! this host cannot add; then the client's peer is revoked: it leaves the interface all the
//! same, and the failing address step is reported (`/status`, `/readyz`, the Core's view
//! of the gateway's last `Applied`) and retried.
//!
//! Root only: `tests/netns/run-root-tests.sh e2e_removals`.

#[path = "e2e/mod.rs"]
mod e2e;

use e2e::{cmd_ok, eventually, ClientOptions, Site, CONVERGE, GW_TUNNEL};
use gatehouse::agent::status::Status;
use gatehouse_core::api::LocationPatch;

#[test]
#[ignore = "root + wireguard-go: tests/netns/run-root-tests.sh e2e_removals"]
fn a_revoked_peer_leaves_the_interface_although_an_address_cannot_be_added() {
    e2e::run("rv", async |mut site: Site| {
        // IPv6 off in the gateway namespace (this thread runs in it): every new
        // interface starts without IPv6, so adding an IPv6 address to it fails.
        for key in ["all", "default"] {
            cmd_ok(
                "sysctl",
                &["-w", &format!("net.ipv6.conf.{key}.disable_ipv6=1")],
            )
            .await;
        }
        let name = format!("loc-{}", site.tag);
        site.create_location(Site::default_location(&name)).await;
        site.add_client(ClientOptions::default()).await;
        site.start_agent().await;
        site.wait_synced().await;
        site.wait_ping().await;
        let client_key = site.client().public_key.clone();
        assert!(site.gw_dump().await.peers.contains_key(&client_key));

        // The location gets an IPv6 address: the apply fails at that step, reported.
        let location = site.location().id;
        site.admin()
            .patch_location(
                location,
                &LocationPatch {
                    addresses: Some(vec![format!("{GW_TUNNEL}/24"), "fd77::1/64".into()]),
                    ..Default::default()
                },
            )
            .await
            .expect("patch the location");
        let status = eventually("the address step failure reported", CONVERGE, || async {
            site.try_status()
                .await
                .filter(|s| s.failed_steps.iter().any(|f| f.starts_with("addresses:")))
        })
        .await;
        eprintln!("failed steps: {:?}", status.failed_steps);

        // The client's peer is revoked: it leaves the interface all the same.
        let peer_id = site.client().peer_id;
        site.admin()
            .delete_peer(location, peer_id)
            .await
            .expect("revoke the client");
        eventually("the revoked peer gone from wg show", CONVERGE, || async {
            let dump = site.try_gw_dump().await?;
            (!dump.peers.contains_key(&client_key)).then_some(())
        })
        .await;
        assert!(
            !site.ping_once(None).await,
            "the revoked client still reaches the gateway"
        );

        // Still reported, in every place, and still retried (each resync tries again).
        let status = site.status().await;
        assert!(
            status
                .failed_steps
                .iter()
                .any(|f| f.starts_with("addresses:") && f.contains("fd77::1/64")),
            "{:?}",
            status.failed_steps
        );
        assert_eq!(status.failed_steps.len(), 1, "{:?}", status.failed_steps);
        assert_eq!(status.kernel_peers, 0);
        let (code, body) = site.readyz().await.expect("/readyz answers");
        assert!(body.contains("addresses:"), "{code} {body}");
        let gw = site
            .gateway_in_core()
            .await
            .expect("the gateway in the Core");
        let error = gw
            .last_error
            .expect("the failed apply reported to the Core");
        assert!(
            error.rejected.iter().any(|r| r.item == "step.addresses"),
            "{error:?}"
        );
        // Retried with backoff (in /status: attempts in a row), logged once.
        let tries = |s: &Status| s.apply_retry.as_ref().map_or(0, |r| r.attempts);
        let before = tries(&status);
        tokio::time::sleep(site.options.resync_interval * 3).await;
        let after = site.status().await;
        assert!(
            tries(&after) > before && before >= 1,
            "the address step is retried: {:?} then {:?}",
            status.apply_retry,
            after.apply_retry
        );
        let log = site.agent_log();
        assert!(
            log.matches("retrying with backoff").count() < tries(&after) as usize,
            "logged at each attempt: {log}"
        );

        // IPv6 back on: the next resync adds the address and clears the failure.
        let iface = site.interface().to_string();
        cmd_ok(
            "sysctl",
            &["-w", &format!("net.ipv6.conf.{iface}.disable_ipv6=0")],
        )
        .await;
        eventually(
            "the address added and the failure cleared",
            CONVERGE,
            || async {
                site.try_status()
                    .await
                    .filter(|s| s.failed_steps.is_empty())
            },
        )
        .await;
        let addresses = cmd_ok("ip", &["-6", "addr", "show", "dev", &iface]).await;
        assert!(addresses.contains("fd77::1/64"), "{addresses}");
    });
}
