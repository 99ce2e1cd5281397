//! Retry delays: exponential, capped, with jitter.

use std::time::Duration;

use rand::RngExt;

/// Delay before retry number `attempt` (1-based): `initial * 2^(attempt-1)`, capped at `max`,
/// with "equal jitter" (a uniformly random point in the upper half). Equal rather than full
/// jitter keeps the schedule growing: the shortest delay of attempt n+1 is the longest of
/// attempt n, so retries never bunch up, while instances still spread out.
pub(crate) fn delay(attempt: u32, initial: Duration, max: Duration) -> Duration {
    let exponent = attempt.saturating_sub(1).min(32);
    let base = initial.saturating_mul(1u32 << exponent.min(31)).min(max);
    let half = base / 2;
    let jitter = rand::rng().random_range(0..=half.as_micros().min(u128::from(u64::MAX)) as u64);
    half + Duration::from_micros(jitter)
}

#[cfg(test)]
mod tests {
    use super::delay;
    use std::time::Duration;

    #[test]
    fn delays_grow_and_stay_capped() {
        let initial = Duration::from_millis(100);
        let max = Duration::from_secs(5);
        let mut previous_max = Duration::ZERO;
        for attempt in 1..=20 {
            let base = (initial * 2u32.pow((attempt - 1).min(20))).min(max);
            for _ in 0..50 {
                let d = delay(attempt, initial, max);
                assert!(
                    d >= base / 2 && d <= base,
                    "attempt {attempt}: {d:?} not in [{:?}, {base:?}]",
                    base / 2
                );
                assert!(d >= previous_max / 2);
            }
            previous_max = base;
        }
        assert!(delay(1000, initial, max) <= max);
    }
}
