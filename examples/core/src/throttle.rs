//! Snapshot requests of one gateway stream, throttled: at most one snapshot answers
//! requests per interval; requests that arrive sooner are coalesced into one snapshot sent
//! when the interval has passed, so a flood costs the Core one snapshot a second and the
//! gateway still gets the newest state. Pure: the caller passes `now` and sleeps until
//! [`SnapshotThrottle::deadline`].

use std::time::Duration;

use tokio::time::Instant;

/// Least time between two snapshots sent in answer to requests.
pub const SNAPSHOT_INTERVAL: Duration = Duration::from_secs(1);

/// The throttle of one stream.
#[derive(Debug)]
pub struct SnapshotThrottle {
    interval: Duration,
    last: Option<Instant>,
    pending: bool,
}

impl SnapshotThrottle {
    pub fn new(interval: Duration) -> Self {
        SnapshotThrottle {
            interval,
            last: None,
            pending: false,
        }
    }

    /// A request arrived: true when a snapshot is to be sent now; false when it is
    /// coalesced into the one due at [`Self::deadline`].
    pub fn request(&mut self, now: Instant) -> bool {
        match self.last {
            Some(last) if now < last + self.interval => {
                self.pending = true;
                false
            }
            _ => {
                self.last = Some(now);
                self.pending = false;
                true
            }
        }
    }

    /// When the coalesced snapshot is due (None: nothing waits).
    pub fn deadline(&self) -> Option<Instant> {
        match (self.pending, self.last) {
            (true, Some(last)) => Some(last + self.interval),
            _ => None,
        }
    }

    /// The deadline passed: true when the coalesced snapshot is to be sent now.
    pub fn due(&mut self, now: Instant) -> bool {
        match self.deadline() {
            Some(at) if now >= at => {
                self.pending = false;
                self.last = Some(now);
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_yields_one_snapshot_per_interval_and_none_is_lost() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut th = SnapshotThrottle::new(ms(1000));
        assert!(th.request(t0), "the first request is answered at once");
        assert_eq!(th.deadline(), None);
        let mut sent = 1;
        // 1,000 requests over 2.5 s, the timer polled every 10 ms.
        for i in 1..=1000u64 {
            let now = t0 + ms(i * 25 / 10);
            if th.request(now) {
                sent += 1;
            }
            if th.due(now) {
                sent += 1;
            }
        }
        assert!(sent <= 4, "{sent} snapshots for 1,000 requests in 2.5 s");
        // The last requests are not dropped: a snapshot is due after them.
        let at = th
            .deadline()
            .expect("the last requests wait for a snapshot");
        assert!(!th.due(at - ms(1)));
        assert!(th.due(at));
        assert_eq!(th.deadline(), None);
    }

    #[test]
    fn requests_an_interval_apart_are_answered_at_once() {
        let t0 = Instant::now();
        let mut th = SnapshotThrottle::new(Duration::from_secs(1));
        assert!(th.request(t0));
        assert!(th.request(t0 + Duration::from_secs(1)));
        assert!(th.request(t0 + Duration::from_secs(5)));
        assert_eq!(th.deadline(), None);
    }
}
