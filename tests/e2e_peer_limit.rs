//! A location larger than wireguard-go can hold (65,536 peers), at agent level: the agent
//! as a real process with the userspace backend in a gateway namespace, 65,537 peers from
//! the reference Core. The peers within the limit are applied and the last one is refused
//! with one error naming the limit and the kernel backend, in `Applied` (the Core's view
//! of the gateway) and in `/status`; the resyncs after that plan nothing; a removal is
//! applied and makes room for the refused peer.
//!
//! Root only: `tests/netns/run-root-tests.sh e2e_peer_limit` (about a minute: wireguard-go
//! takes its 65,536 peers through UAPI in about 15 s on the 2-core test host).

#[path = "e2e/mod.rs"]
mod e2e;

use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use e2e::support::bulk_peer;
use e2e::{eventually, Site};
use gatehouse_core::api::NewPeer;

const LIMIT: usize = 1 << 16;
const PEERS: usize = LIMIT + 1;
const WITHIN: Duration = Duration::from_secs(300);

#[test]
#[ignore = "root + wireguard-go: tests/netns/run-root-tests.sh e2e_peer_limit"]
fn a_location_beyond_the_wireguard_go_limit() {
    e2e::run("pl", async |mut site: Site| {
        let name = format!("loc-{}", site.tag);
        let id = site.create_location(Site::default_location(&name)).await.id;
        let all: Vec<NewPeer> = (0..PEERS).map(bulk_peer).collect();
        for chunk in all.chunks(8_192) {
            site.admin().add_peers(id, chunk).await.expect("add peers");
        }
        let revision = site.revision().await;
        // A stats tick reads all 65,536 peers (seconds under load): at the default 1 s it
        // would run back to back and leave the resyncs no turn.
        site.options.stats_interval = Duration::from_secs(60);
        site.start_agent().await;

        let status = eventually("65,536 peers applied, one refused", WITHIN, || async {
            site.try_status().await.filter(|s| {
                // Only the refusal: a UAPI transaction that timed out under load (a
                // dump of 65,536 peers is slow) is retried by the next resync.
                s.held_revision == revision
                    && s.kernel_peers == LIMIT
                    && s.failed_steps.len() == 1
                    && s.failed_steps[0].starts_with("peer limit")
            })
        })
        .await;
        let reason = &status.failed_steps[0];
        assert!(
            reason.contains("65537 peers wanted")
                && reason.contains("at most 65536")
                && reason.contains("kernel backend"),
            "{reason}"
        );
        // Nothing is in the device at first: the peers are kept by key, the greatest refused.
        let refused = (0..PEERS)
            .map(|i| bulk_peer(i).public_key)
            .max_by_key(|k| B64.decode(k).expect("base64"))
            .expect("peers");
        assert!(reason.contains(&refused), "{reason} names {refused}");
        let gw = eventually("the refusal in Applied", WITHIN, || async {
            site.gateway_in_core().await.filter(|g| {
                g.last_error
                    .as_ref()
                    .is_some_and(|e| e.attempted_revision == revision)
            })
        })
        .await;
        // One refusal (a step that timed out under load may be listed beside it).
        let error = gw.last_error.expect("error");
        let refusals: Vec<_> = error
            .rejected
            .iter()
            .filter(|r| r.item == "step.peer_limit")
            .collect();
        assert_eq!(refusals.len(), 1, "{:?}", error.rejected);
        assert!(refusals[0].reason.contains("at most 65536"));
        let dump = site.gw_dump().await;
        assert_eq!(dump.peers.len(), LIMIT);
        assert!(
            !dump.peers.contains_key(&refused),
            "the refused peer is the one named"
        );

        // Resyncs while the refusal stands plan nothing.
        let resyncs = status.timers.resyncs;
        let after = eventually("two more resyncs", WITHIN, || async {
            site.try_status()
                .await
                .filter(|s| s.timers.resyncs >= resyncs + 2)
        })
        .await;
        assert_eq!(
            after.last_reconcile_ops, 0,
            "a resync over the limit is a no-op"
        );
        assert_eq!(after.failed_steps, status.failed_steps);

        // A removal applies and makes room for the refused peer: all fit, no refusal.
        let first = site
            .admin()
            .peers(id)
            .await
            .expect("peers")
            .into_iter()
            .next()
            .expect("a peer");
        let removed = site
            .admin()
            .delete_peer(id, first.id)
            .await
            .expect("delete")
            .revision;
        let status = eventually("the removal applied, everything fits", WITHIN, || async {
            site.try_status().await.filter(|s| {
                s.applied_revision >= removed
                    && s.kernel_peers == LIMIT
                    && s.failed_steps.is_empty()
            })
        })
        .await;
        assert!(status.apply_error.is_none());
        let dump = site.gw_dump().await;
        assert!(!dump.peers.contains_key(&first.public_key));
        assert!(dump.peers.contains_key(&refused));
    });
}
