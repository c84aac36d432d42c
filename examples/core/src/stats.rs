//! The peers' last activity from their stats, and the exact traffic totals across counter
//! resets ([`CounterRun`]: the epoch rule of the proto's `Stats`, in the proto crate so
//! that the agent's own totals follow the same rule).

pub use gatehouse_proto::counters::CounterRun;

/// The latest sign of life of a peer on one gateway after a report (Unix ms; 0 = none):
/// a handshake newer than the stored one counts at its time; received bytes that grew
/// within the same counter run (or a new run that has received) count at the report's
/// time. The first report of a (gateway, peer) counts only its handshake: its counters
/// say nothing about when they grew. Never goes back.
pub fn last_active(
    prev: Option<&CounterRun>,
    prev_handshake_ms: i64,
    prev_active_ms: i64,
    epoch: u64,
    rx: u64,
    handshake_ms: i64,
    report_ms: i64,
) -> i64 {
    let mut active = prev_active_ms;
    if handshake_ms > prev_handshake_ms {
        active = active.max(handshake_ms.min(report_ms));
    }
    if let Some(prev) = prev {
        let same_run = (epoch == 0 || epoch == prev.epoch) && rx >= prev.rx;
        let received = if same_run { rx > prev.rx } else { rx > 0 };
        if received {
            active = active.max(report_ms);
        }
    }
    active
}

/// A peer's activity on another gateway as an MFA decision counts it (Unix ms; 0 =
/// none), protocol rule 8. The Core knows what a gateway saw up to when it last heard
/// from it (`last_seen`); since then the gateway may have carried the client unheard (cut
/// off from the Core, its stream not yet known dead). When the peer was still active on
/// it then (within the threshold before `last_seen`), its activity counts as lasting
/// until `last_seen`. For a gateway that reports regularly this changes no decision (the
/// peer was active within the threshold either way); a gateway cut off for less than a
/// threshold keeps its active clients against a sibling's idle view, and one silent for
/// longer no longer keeps sessions alive.
pub fn activity_elsewhere(last_active: i64, last_seen: i64, threshold_ms: i64) -> i64 {
    if last_active > 0 && last_seen.saturating_sub(last_active) <= threshold_ms {
        last_active.max(last_seen)
    } else {
        last_active
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silent_gateway_counts_activity_until_the_core_last_heard_from_it() {
        let t = 20_000;
        // The peer live on it when the Core last heard from it: until then.
        assert_eq!(activity_elsewhere(10_000, 29_000, t), 29_000);
        assert_eq!(activity_elsewhere(10_000, 30_000, t), 30_000);
        // Idle on it for longer than the threshold before that: as reported.
        assert_eq!(activity_elsewhere(10_000, 30_001, t), 10_000);
        // Never active there: nothing.
        assert_eq!(activity_elsewhere(0, 30_000, t), 0);
        // Heard from before the activity it reported (clocks apart): as reported.
        assert_eq!(activity_elsewhere(10_000, 9_000, t), 10_000);
    }

    fn run(epoch: u64, rx: u64) -> CounterRun {
        CounterRun {
            epoch,
            rx,
            ..Default::default()
        }
    }

    #[test]
    fn activity_is_a_newer_handshake_or_received_bytes() {
        // First report: only its handshake counts.
        assert_eq!(last_active(None, 0, 0, 7, 500, 0, 1_000), 0);
        assert_eq!(last_active(None, 0, 0, 7, 500, 900, 1_000), 900);
        let prev = run(7, 500);
        // rx grew in the same run: active at the report.
        assert_eq!(
            last_active(Some(&prev), 900, 900, 7, 600, 900, 2_000),
            2_000
        );
        // Only tx changed (the gateway's keepalives to a silent client): not active.
        assert_eq!(last_active(Some(&prev), 900, 900, 7, 500, 900, 2_000), 900);
        // A newer handshake without new bytes.
        assert_eq!(
            last_active(Some(&prev), 900, 900, 7, 500, 1_500, 2_000),
            1_500
        );
        // A handshake "in the future" counts at the report's time, not later.
        assert_eq!(
            last_active(Some(&prev), 900, 900, 7, 500, 9_000, 2_000),
            2_000
        );
        // New run (the peer was re-created) that has received: active.
        assert_eq!(last_active(Some(&prev), 900, 900, 8, 10, 900, 3_000), 3_000);
        // Epoch 0 continues the run: unchanged counters are no activity.
        assert_eq!(last_active(Some(&prev), 900, 900, 0, 500, 900, 3_000), 900);
        // Never goes back.
        assert_eq!(
            last_active(Some(&prev), 900, 5_000, 7, 500, 900, 3_000),
            5_000
        );
    }
}
