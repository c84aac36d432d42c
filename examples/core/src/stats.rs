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

#[cfg(test)]
mod tests {
    use super::*;

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
