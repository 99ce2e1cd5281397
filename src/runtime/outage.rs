//! Outage bookkeeping for one dependency (the database, the broker): an outage is logged once
//! when it starts, by the caller, and once when it ends, here.

use std::sync::Mutex;
use std::time::Instant;

use crate::telemetry::metric;

/// The state of one dependency's outage, if it is in one.
#[derive(Debug)]
pub(crate) struct Outage {
    /// `database` or `broker`: the `dependency` label and the log line's subject.
    what: &'static str,
    /// Start of the current outage and how many consecutive failures it has seen.
    state: Mutex<Option<(Instant, u32)>>,
}

impl Outage {
    pub(crate) fn new(what: &'static str) -> Self {
        Self {
            what,
            state: Mutex::new(None),
        }
    }

    /// Records a failure; returns the number of consecutive failures and whether it is the first.
    pub(crate) fn failed(&self) -> (u32, bool) {
        let mut state = self.state.lock().expect("outage lock poisoned");
        let (_, streak) = state.get_or_insert((Instant::now(), 0));
        *streak += 1;
        (*streak, *streak == 1)
    }

    /// Ends the outage, if there was one (logged, and counted as a reconnect); returns whether
    /// there was.
    pub(crate) fn recovered(&self) -> bool {
        let ended = self.state.lock().expect("outage lock poisoned").take();
        let Some((since, failures)) = ended else {
            return false;
        };
        metrics::counter!(metric::RECONNECTS, "dependency" => self.what).increment(1);
        tracing::info!(
            outage_ms = since.elapsed().as_millis() as u64,
            failures,
            "{} available again",
            self.what
        );
        true
    }
}

#[cfg(test)]
mod tests {
    use super::Outage;

    #[test]
    fn an_outage_counts_its_failures_and_ends_once() {
        let outage = Outage::new("database");
        assert!(!outage.recovered(), "no outage yet");
        assert_eq!(outage.failed(), (1, true));
        assert_eq!(outage.failed(), (2, false));
        assert!(outage.recovered());
        assert!(!outage.recovered(), "ended already");
        assert_eq!(outage.failed(), (1, true), "a new outage starts over");
    }
}
