//! Exact traffic totals across counter resets (the epoch rule of the proto's `Stats`).
//!
//! Per (gateway, peer) the Core keeps the last reported counters and a running base.
//! When a report's epoch differs from the stored one, or a counter went down, the stored
//! counter run has ended: it is added to the base. total = base + current counter.

/// What the Core stores per (gateway, peer).
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
        let run_ended = epoch != prev.epoch || rx < prev.rx || tx < prev.tx;
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

    pub fn total_rx(&self) -> u64 {
        self.base_rx.saturating_add(self.rx)
    }

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
}
