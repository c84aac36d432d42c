//! Exact traffic totals across counter resets (the epoch rule of the proto's `Stats`).
//!
//! Per (gateway, peer) the Core keeps the last reported counters and a running base (and
//! the agent likewise per peer, for its own totals).
//! When a counter run has ended, the stored counters are added to the base;
//! total = base + current counters. A run ends when
//! - a counter went down (the kernel re-created the peer), whatever the epochs;
//! - the epoch changed from one nonzero value to another (the gateway re-created the
//!   peer), or from 0 to nonzero (the peer was re-created after an adoption).
//!
//! Epoch 0 means "the gateway does not know when the counters started" (it lost its state
//! and adopted the peer): such a report continues the stored run unless a counter is lower.
//! Treating 0 as a new epoch would count the adopted peer's counters twice.

/// What is kept per (gateway, peer): the last counters, their epoch and the running base.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterRun {
    pub epoch: u64,
    pub rx: u64,
    pub tx: u64,
    pub base_rx: u64,
    pub base_tx: u64,
}

impl CounterRun {
    /// Folds a new report into the stored state (`None`: the first report).
    pub fn advance(prev: Option<CounterRun>, epoch: u64, rx: u64, tx: u64) -> CounterRun {
        let Some(prev) = prev else {
            return CounterRun {
                epoch,
                rx,
                tx,
                base_rx: 0,
                base_tx: 0,
            };
        };
        // Both counters restart together when the kernel (re)creates the peer, so a drop
        // of either one ends the run for both.
        let dropped = rx < prev.rx || tx < prev.tx;
        // Epoch 0 is "unknown start": it never ends a run by itself.
        let new_epoch = epoch != 0 && epoch != prev.epoch;
        let run_ended = dropped || new_epoch;
        let (base_rx, base_tx) = if run_ended {
            (
                prev.base_rx.saturating_add(prev.rx),
                prev.base_tx.saturating_add(prev.tx),
            )
        } else {
            (prev.base_rx, prev.base_tx)
        };
        CounterRun {
            epoch,
            rx,
            tx,
            base_rx,
            base_tx,
        }
    }

    /// Total received bytes across every run.
    pub fn total_rx(&self) -> u64 {
        self.base_rx.saturating_add(self.rx)
    }

    /// Total sent bytes across every run.
    pub fn total_tx(&self) -> u64 {
        self.base_tx.saturating_add(self.tx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_report_is_its_own_total() {
        let r = CounterRun::advance(None, 5, 100, 40);
        assert_eq!((r.total_rx(), r.total_tx()), (100, 40));
    }

    #[test]
    fn growing_counters_in_one_epoch_do_not_double_count() {
        let r = CounterRun::advance(None, 5, 100, 40);
        let r = CounterRun::advance(Some(r), 5, 150, 60);
        assert_eq!((r.total_rx(), r.total_tx()), (150, 60));
    }

    #[test]
    fn a_new_epoch_keeps_the_previous_run() {
        let r = CounterRun::advance(None, 5, 100, 40);
        // Peer recreated: a new epoch, counters larger than before (not a visible drop).
        let r = CounterRun::advance(Some(r), 9, 300, 50);
        assert_eq!((r.total_rx(), r.total_tx()), (400, 90));
        assert_eq!(r.epoch, 9);
    }

    #[test]
    fn a_counter_reset_in_the_same_epoch_keeps_the_previous_run() {
        // Epoch 0: the gateway does not know; only the drop reveals the reset.
        let r = CounterRun::advance(None, 0, 100, 40);
        let r = CounterRun::advance(Some(r), 0, 10, 45);
        assert_eq!((r.total_rx(), r.total_tx()), (110, 85));
        let r = CounterRun::advance(Some(r), 0, 20, 50);
        assert_eq!((r.total_rx(), r.total_tx()), (120, 90));
    }

    #[test]
    fn epoch_zero_after_a_known_epoch_continues_the_run() {
        // The gateway lost its state file and adopted the peer: same kernel counters.
        let r = CounterRun::advance(None, 5, 100, 40);
        let r = CounterRun::advance(Some(r), 0, 130, 50);
        assert_eq!(
            (r.total_rx(), r.total_tx()),
            (130, 50),
            "not double-counted"
        );
        assert_eq!(r.epoch, 0);
        let r = CounterRun::advance(Some(r), 0, 170, 60);
        assert_eq!((r.total_rx(), r.total_tx()), (170, 60));
    }

    #[test]
    fn epoch_zero_with_a_lower_counter_is_a_reset() {
        let r = CounterRun::advance(None, 5, 100, 40);
        let r = CounterRun::advance(Some(r), 0, 30, 50);
        assert_eq!((r.total_rx(), r.total_tx()), (130, 90));
        // Only tx went down: still a reset of both.
        let r = CounterRun::advance(Some(r), 0, 35, 10);
        assert_eq!((r.total_rx(), r.total_tx()), (165, 100));
    }

    #[test]
    fn epoch_zero_to_nonzero_ends_the_run() {
        // An adopted peer (epoch 0) is re-created by the gateway: a new, known run.
        let r = CounterRun::advance(None, 0, 100, 40);
        let r = CounterRun::advance(Some(r), 7, 120, 45);
        assert_eq!((r.total_rx(), r.total_tx()), (220, 85));
        assert_eq!(r.epoch, 7);
        // Then it continues in that epoch.
        let r = CounterRun::advance(Some(r), 7, 150, 60);
        assert_eq!((r.total_rx(), r.total_tx()), (250, 100));
    }

    #[test]
    fn same_nonzero_epoch_with_a_lower_counter_is_a_reset() {
        let r = CounterRun::advance(None, 5, 100, 40);
        let r = CounterRun::advance(Some(r), 5, 10, 5);
        assert_eq!((r.total_rx(), r.total_tx()), (110, 45));
    }

    #[test]
    fn a_sequence_of_mixed_reports_gives_exact_totals() {
        // (epoch, rx, tx, expected total rx, expected total tx)
        let steps = [
            (3, 10, 1, 10, 1),
            (3, 20, 2, 20, 2),
            (0, 25, 3, 25, 3), // adopted without state: continues
            (0, 5, 1, 30, 4),  // counters reset (kernel re-created it)
            (9, 0, 0, 30, 4),  // re-created by the gateway, nothing yet
            (9, 8, 2, 38, 6),
            (11, 8, 2, 46, 8), // re-created again, same counters by chance
            (0, 9, 3, 47, 9),  // state lost again: continues
        ];
        let mut run = None;
        for (i, (epoch, rx, tx, total_rx, total_tx)) in steps.into_iter().enumerate() {
            let r = CounterRun::advance(run, epoch, rx, tx);
            assert_eq!(
                (r.total_rx(), r.total_tx()),
                (total_rx, total_tx),
                "step {i}"
            );
            run = Some(r);
        }
    }
}
