//! What a published batch's outcomes mean: which rows are marked, retried, dead-lettered or
//! given back, and what is logged and counted. Plain functions of (batch, outcomes, policy),
//! unit-tested case by case; the relay loop runs the statements and writes the logs.
//!
//! A batch is settled in two steps:
//! 1. [`triage`], before publishing: rows that must not be sent (a crash suspect over its
//!    attempt budget, a NULL where the message needs a value) fail without being sent, and the
//!    later rows of their aggregates wait behind them.
//! 2. [`settle`], after: each sent row's [`Outcome`] becomes a mark, a recorded failure or a
//!    release, following the error's class:
//!    - acknowledged: marked published;
//!    - permanent: an attempt used; dead-lettered once `retry.max_attempts` are used up;
//!    - destination in trouble: backs off without using an attempt (deferred);
//!    - transient or fatal: an outage when the broker took nothing of the batch (given back,
//!      the relay pauses), otherwise deferred like a destination in trouble;
//!    - not attempted (held back behind its aggregate, or caught in another row's channel
//!      loss): given back, nothing charged.

use std::borrow::Cow;
use std::collections::HashSet;
use std::time::Duration;

use super::OutboxRow;
use super::config::RetryPolicy;
use super::store::Failure;
use crate::broker::{ErrorClass, Outcome, Outcomes};
use crate::telemetry::ErrorChain;

/// The rows of a claimed batch that are not to be sent (step 1).
#[derive(Debug, Default)]
pub(crate) struct Triage {
    /// Rows failed without being sent.
    failures: Vec<Failure>,
    /// Later rows of their aggregates, given back unsent.
    held_back: Vec<i64>,
    notes: Vec<Note>,
}

impl Triage {
    /// The rows to publish, in batch order: borrowed when that is every row (the usual case).
    pub(crate) fn to_publish<'r>(&self, rows: &'r [OutboxRow]) -> Cow<'r, [OutboxRow]> {
        if self.failures.is_empty() && self.held_back.is_empty() {
            return Cow::Borrowed(rows);
        }
        let skipped: HashSet<i64> = self
            .failures
            .iter()
            .map(|f| f.id)
            .chain(self.held_back.iter().copied())
            .collect();
        Cow::Owned(
            rows.iter()
                .filter(|r| !skipped.contains(&r.id))
                .cloned()
                .collect(),
        )
    }
}

/// Something a settlement wants logged, with the fields of its log line.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Note {
    /// A row used its last attempt (or crashed the relay more often than it may) and is dead.
    DeadLettered {
        event_id: String,
        aggregate_id: String,
        attempt: i32,
        error: String,
        /// What happens to its aggregate's later rows (`retry.on_dead_letter`).
        later_rows: &'static str,
    },
    /// A row failed permanently and will be retried.
    WillRetry {
        event_id: String,
        attempt: i32,
        retry_in: Duration,
        error: String,
    },
    /// A row failed for a reason that is not its own (debug level: the outage, or the
    /// deferral below, is what is reported).
    FailedTransiently {
        event_id: String,
        attempt: i32,
        error: String,
    },
    /// Rows whose destination is in trouble back off without using an attempt; one line per
    /// batch, naming the first.
    Deferred {
        rows: usize,
        event_id: String,
        deferrals: i32,
        error: String,
    },
}

/// What to write for a published batch (step 2), and what to report.
#[derive(Debug, Default)]
pub(crate) struct Settlement {
    /// Acknowledged by the broker: mark published.
    pub(crate) acked: Vec<i64>,
    /// Failed attempts to record (retry or dead letter, deferred or charged), by id.
    pub(crate) failures: Vec<Failure>,
    /// Given back because the broker is unavailable: keep [`Settlement::outage`]'s error on them.
    pub(crate) released: Vec<i64>,
    /// Given back without an error: held back behind their aggregate, or not attempted.
    pub(crate) held_back: Vec<i64>,
    /// The broker took nothing and failed transiently (or fatally): the first such error, and
    /// the relay pauses.
    pub(crate) outage: Option<(ErrorClass, String)>,
    /// The class of every failed publish, for `outbox_relay_publish_errors_total`.
    pub(crate) errors: Vec<ErrorClass>,
    /// Lines to log.
    pub(crate) notes: Vec<Note>,
}

impl Settlement {
    /// Rows this settlement changes; the statements changing fewer means the lease was lost.
    pub(crate) fn rows(&self) -> usize {
        self.acked.len() + self.failures.len() + self.released.len() + self.held_back.len()
    }

    /// Rows dead-lettered now.
    pub(crate) fn dead(&self) -> usize {
        self.failures.iter().filter(|f| f.dead).count()
    }

    /// Rows whose failure used an attempt and that will be retried.
    pub(crate) fn retried(&self) -> usize {
        self.failures
            .iter()
            .filter(|f| !f.deferred && !f.dead)
            .count()
    }
}

/// The attempt number as the backoff counts it.
fn attempt_of(row: &OutboxRow) -> u32 {
    u32::try_from(row.attempts).unwrap_or(0)
}

fn later_rows(policy: &RetryPolicy) -> &'static str {
    if policy.parks() {
        "parked until `outbox-relay requeue`"
    } else {
        "published without it (order broken)"
    }
}

/// The note for `row`'s charged failure: dead-lettered, or retried after `retry_in`.
fn failure_note(
    row: &OutboxRow,
    dead: bool,
    retry_in: Duration,
    error: &str,
    policy: &RetryPolicy,
) -> Note {
    if dead {
        Note::DeadLettered {
            event_id: row.event_id.clone(),
            aggregate_id: row.aggregate_id.clone(),
            attempt: row.attempts,
            error: error.to_owned(),
            later_rows: later_rows(policy),
        }
    } else {
        Note::WillRetry {
            event_id: row.event_id.clone(),
            attempt: row.attempts,
            retry_in,
            error: error.to_owned(),
        }
    }
}

/// Step 1: the rows of `rows` (a batch, in `id` order) that are not to be sent.
///
/// - A row past its attempt budget (every earlier attempt ended without an outcome: it crashed
///   the relay, or lost its lease, each time) is dead-lettered without another try, so a row
///   that crashes the relay cannot keep it in a crash loop.
/// - A row with a NULL where the message needs a value fails permanently (retried, then
///   dead-lettered), as the broker's rejection would.
///
/// Later rows of such an aggregate wait while it may still be retried, or is parked.
pub(crate) fn triage(rows: &[OutboxRow], policy: &RetryPolicy) -> Triage {
    let budget = i64::from(policy.max_attempts);
    let mut triage = Triage::default();
    if rows
        .iter()
        .all(|r| i64::from(r.attempts) <= budget && r.null_columns.is_empty())
    {
        return triage;
    }
    let mut stopped: HashSet<&str> = HashSet::new();
    for row in rows {
        if stopped.contains(row.aggregate_id.as_str()) {
            triage.held_back.push(row.id);
            continue;
        }
        let attempt = attempt_of(row);
        let (error, dead) = if i64::from(row.attempts) > budget {
            let error = format!(
                "attempt {} exceeds retry.max_attempts = {budget}: every earlier attempt ended without an outcome (the relay crashed, was killed or lost its lease while publishing this row)",
                row.attempts
            );
            (error, true)
        } else if !row.null_columns.is_empty() {
            let error = format!(
                "column {} is NULL; the message needs a value (add NOT NULL constraints, see `outbox-relay check`)",
                row.null_columns.join(", ")
            );
            (error, attempt >= policy.max_attempts)
        } else {
            continue;
        };
        let retry_in = policy.backoff(attempt);
        triage
            .notes
            .push(failure_note(row, dead, retry_in, &error, policy));
        if policy.parks() || !dead {
            stopped.insert(&row.aggregate_id);
        }
        triage.failures.push(Failure {
            id: row.id,
            error,
            retry_in,
            dead,
            deferred: false,
        });
    }
    triage
}

/// Transient failures beside acknowledgements in one batch are not an outage: the broker took
/// other messages, so the trouble is these rows' destinations (a partition without a leader or
/// enough in-sync replicas times out while the others are acknowledged). They back off on their
/// own instead of pausing the relay; without any acknowledgement it is an outage, and the rows
/// are given back for when the broker returns.
fn is_outage(nothing_acked: bool, transient_failures: usize) -> bool {
    nothing_acked && transient_failures > 0
}

/// Step 2: what `outcomes` (one per row of `sent`, in order) mean, together with `triage`.
pub(crate) fn settle(
    sent: &[OutboxRow],
    outcomes: Outcomes,
    triage: Triage,
    policy: &RetryPolicy,
) -> Settlement {
    let Triage {
        failures,
        held_back,
        notes,
        ..
    } = triage;
    let mut settlement = Settlement {
        failures,
        held_back,
        notes,
        ..Settlement::default()
    };
    // Rows whose destination is in trouble, and transient failures (decided below).
    let mut deferred: Vec<(&OutboxRow, String)> = Vec::new();
    let mut transient: Vec<(&OutboxRow, ErrorClass, String)> = Vec::new();
    for (row, outcome) in sent.iter().zip(outcomes) {
        let err = match outcome {
            Outcome::Acked => {
                settlement.acked.push(row.id);
                continue;
            }
            Outcome::NotAttempted(_) => {
                settlement.held_back.push(row.id);
                continue;
            }
            Outcome::Failed(err) => err,
        };
        let class = err.class();
        settlement.errors.push(class);
        // Kept in `last_error` for operators, and logged.
        let error = ErrorChain(&err).to_string();
        match class {
            ErrorClass::Destination => deferred.push((row, error)),
            ErrorClass::Permanent => {
                let attempt = attempt_of(row);
                let dead = attempt >= policy.max_attempts;
                let retry_in = policy.backoff(attempt);
                settlement
                    .notes
                    .push(failure_note(row, dead, retry_in, &error, policy));
                settlement.failures.push(Failure {
                    id: row.id,
                    error,
                    retry_in,
                    dead,
                    deferred: false,
                });
            }
            ErrorClass::Transient | ErrorClass::Fatal => {
                settlement.notes.push(Note::FailedTransiently {
                    event_id: row.event_id.clone(),
                    attempt: row.attempts,
                    error: error.clone(),
                });
                transient.push((row, class, error));
            }
        }
    }
    if is_outage(settlement.acked.is_empty(), transient.len()) {
        for (row, class, error) in transient {
            settlement.outage.get_or_insert((class, error));
            settlement.released.push(row.id);
        }
    } else {
        deferred.extend(transient.into_iter().map(|(row, _, error)| (row, error)));
    }
    if let Some((first, error)) = deferred.first() {
        settlement.notes.push(Note::Deferred {
            rows: deferred.len(),
            event_id: first.event_id.clone(),
            deferrals: first.deferrals + 1,
            error: error.clone(),
        });
    }
    for (row, error) in deferred {
        let deferrals = u32::try_from(row.deferrals).unwrap_or(0).saturating_add(1);
        settlement.failures.push(Failure {
            id: row.id,
            error,
            retry_in: policy.backoff(deferrals),
            dead: false,
            deferred: true,
        });
    }
    settlement.failures.sort_unstable_by_key(|f| f.id);
    settlement
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::{NotAttempted, PublishError};
    use crate::outbox::config::OnDeadLetter;

    fn policy(on_dead_letter: OnDeadLetter) -> RetryPolicy {
        RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            on_dead_letter,
            dead_letter_destination: None,
        }
    }

    fn row(id: i64, aggregate: &str, attempts: i32) -> OutboxRow {
        OutboxRow {
            attempts,
            ..OutboxRow::sample(id, aggregate)
        }
    }

    fn permanent() -> Outcome {
        Outcome::Failed(PublishError::TooLarge { size: 2, limit: 1 })
    }

    fn transient() -> Outcome {
        Outcome::Failed(PublishError::ConfirmTimeout)
    }

    /// Triage (nothing to skip) and settle in one go.
    fn settle_all(rows: &[OutboxRow], outcomes: Outcomes, policy: &RetryPolicy) -> Settlement {
        let triage = triage(rows, policy);
        let sent = triage.to_publish(rows).into_owned();
        settle(&sent, outcomes, triage, policy)
    }

    fn ids(failures: &[Failure]) -> Vec<i64> {
        failures.iter().map(|f| f.id).collect()
    }

    #[test]
    fn acknowledged_rows_are_marked_and_nothing_else_is_written() {
        let rows = [row(1, "a", 1), row(2, "b", 1)];
        let policy = policy(OnDeadLetter::Park);
        let triage = triage(&rows, &policy);
        assert!(
            matches!(triage.to_publish(&rows), Cow::Borrowed(_)),
            "a clean batch is sent as it is, without a copy"
        );
        let s = settle(&rows, vec![Outcome::Acked, Outcome::Acked], triage, &policy);
        assert_eq!(s.acked, [1, 2]);
        assert!(s.failures.is_empty() && s.released.is_empty() && s.held_back.is_empty());
        assert_eq!(s.outage, None);
        assert!(s.errors.is_empty() && s.notes.is_empty());
        assert_eq!(s.rows(), 2);
    }

    #[test]
    fn a_permanent_failure_uses_an_attempt_and_backs_off() {
        let rows = [row(1, "a", 1)];
        let s = settle_all(&rows, vec![permanent()], &policy(OnDeadLetter::Park));
        assert_eq!(ids(&s.failures), [1]);
        let failure = &s.failures[0];
        assert!(!failure.dead && !failure.deferred);
        // attempt 1 with 1 s initial backoff: equal jitter in [0.5 s, 1 s]
        assert!((Duration::from_millis(500)..=Duration::from_secs(1)).contains(&failure.retry_in));
        assert!(
            failure.error.contains("max_message_size"),
            "{}",
            failure.error
        );
        assert_eq!(s.errors, [ErrorClass::Permanent]);
        assert!(matches!(s.notes[..], [Note::WillRetry { attempt: 1, .. }]));
        assert_eq!(s.outage, None, "a row's own failure is not an outage");
    }

    #[test]
    fn the_last_attempt_dead_letters_and_says_what_happens_to_later_rows() {
        let rows = [row(1, "a", 3)];
        let s = settle_all(&rows, vec![permanent()], &policy(OnDeadLetter::Park));
        assert!(s.failures[0].dead);
        assert_eq!(s.dead(), 1);
        assert_eq!(s.retried(), 0);
        match &s.notes[..] {
            [
                Note::DeadLettered {
                    later_rows,
                    attempt,
                    ..
                },
            ] => {
                assert_eq!(*attempt, 3);
                assert!(later_rows.contains("parked"));
            }
            other => panic!("{other:?}"),
        }
        let s = settle_all(&rows, vec![permanent()], &policy(OnDeadLetter::Skip));
        assert!(
            matches!(&s.notes[..], [Note::DeadLettered { later_rows, .. }] if later_rows.contains("order broken"))
        );
    }

    #[test]
    fn transient_failures_are_an_outage_only_when_the_broker_took_nothing() {
        let policy = policy(OnDeadLetter::Park);
        let rows = [row(1, "a", 1), row(2, "b", 1)];
        let s = settle_all(&rows, vec![transient(), transient()], &policy);
        assert_eq!(s.released, [1, 2], "given back, no attempt charged");
        assert!(s.failures.is_empty());
        let (class, error) = s.outage.expect("an outage");
        assert_eq!(class, ErrorClass::Transient);
        assert!(error.contains("confirm"), "{error}");
        assert_eq!(s.errors, [ErrorClass::Transient, ErrorClass::Transient]);

        // WHEN the broker acknowledged another row of the same batch
        let s = settle_all(&rows, vec![Outcome::Acked, transient()], &policy);
        // THEN the failing row's destination is in trouble, not the broker
        assert_eq!(s.outage, None);
        assert_eq!(s.acked, [1]);
        assert_eq!(ids(&s.failures), [2]);
        assert!(s.failures[0].deferred && !s.failures[0].dead);
        assert!(matches!(
            &s.notes[..],
            [
                Note::FailedTransiently { .. },
                Note::Deferred { rows: 1, .. }
            ]
        ));
    }

    #[test]
    fn a_fatal_error_pauses_like_an_outage_and_keeps_its_class() {
        let rows = [row(1, "a", 1)];
        let fatal = Outcome::Failed(PublishError::Kafka {
            class: ErrorClass::Fatal,
            source: rdkafka::error::KafkaError::MessageProduction(
                rdkafka::error::RDKafkaErrorCode::Fatal,
            ),
        });
        let s = settle_all(&rows, vec![fatal], &policy(OnDeadLetter::Park));
        assert_eq!(s.outage.map(|(class, _)| class), Some(ErrorClass::Fatal));
        assert_eq!(s.released, [1]);
    }

    #[test]
    fn a_destination_in_trouble_defers_its_rows_by_their_deferrals_without_an_attempt() {
        let mut troubled = row(2, "b", 3);
        troubled.deferrals = 5;
        let rows = [row(1, "a", 1), troubled];
        let s = settle_all(
            &rows,
            vec![
                Outcome::Failed(PublishError::Nacked),
                Outcome::Failed(PublishError::Nacked),
            ],
            &policy(OnDeadLetter::Park),
        );
        assert_eq!(s.outage, None, "the relay does not pause");
        assert!(
            s.failures.iter().all(|f| f.deferred && !f.dead),
            "row 2 is on its last attempt, yet not dead"
        );
        // the sixth deferral: 1 s × 2^5 = 32 s, jittered into [16 s, 32 s]
        assert!(
            (Duration::from_secs(16)..=Duration::from_secs(32)).contains(&s.failures[1].retry_in)
        );
        assert!(matches!(
            &s.notes[..],
            [Note::Deferred {
                rows: 2,
                deferrals: 1,
                ..
            }]
        ));
        assert_eq!(s.errors, [ErrorClass::Destination, ErrorClass::Destination]);
        assert_eq!(s.retried(), 0);
    }

    #[test]
    fn rows_not_attempted_are_given_back_without_an_error_or_a_count() {
        let rows = [row(1, "a", 1), row(2, "a", 1), row(3, "b", 1)];
        let s = settle_all(
            &rows,
            vec![
                permanent(),
                Outcome::NotAttempted(NotAttempted::HeldBack),
                Outcome::NotAttempted(NotAttempted::ChannelLost),
            ],
            &policy(OnDeadLetter::Park),
        );
        assert_eq!(s.held_back, [2, 3]);
        assert_eq!(
            s.errors,
            [ErrorClass::Permanent],
            "only the failure itself is counted"
        );
        assert_eq!(s.outage, None);
    }

    #[test]
    fn a_crash_suspect_over_its_budget_is_dead_lettered_unsent_and_holds_back_its_aggregate() {
        let policy = policy(OnDeadLetter::Park);
        let rows = [row(1, "a", 4), row(2, "a", 1), row(3, "b", 1)];
        let triage = triage(&rows, &policy);
        let sent = triage.to_publish(&rows);
        assert_eq!(sent.iter().map(|r| r.id).collect::<Vec<_>>(), [3]);
        let s = settle(&sent, vec![Outcome::Acked], triage, &policy);
        assert_eq!(ids(&s.failures), [1]);
        assert!(s.failures[0].dead);
        assert!(s.failures[0].error.contains("exceeds retry.max_attempts"));
        assert_eq!(s.held_back, [2], "parked behind the dead row");
        assert_eq!(s.acked, [3]);
        assert!(s.errors.is_empty(), "nothing was sent for it");
    }

    #[test]
    fn with_skip_a_dead_row_lets_its_aggregate_pass() {
        let policy = policy(OnDeadLetter::Skip);
        let rows = [row(1, "a", 4), row(2, "a", 1)];
        let triage = triage(&rows, &policy);
        assert_eq!(triage.to_publish(&rows).len(), 1, "row 2 is sent");
        let s = settle(
            &triage.to_publish(&rows),
            vec![Outcome::Acked],
            triage,
            &policy,
        );
        assert_eq!(s.acked, [2]);
        assert!(s.held_back.is_empty());
    }

    #[test]
    fn a_null_column_fails_permanently_and_holds_back_its_aggregate_while_retried() {
        let policy = policy(OnDeadLetter::Skip);
        let mut null = row(1, "a", 1);
        null.null_columns = vec!["aggregate_type"];
        let rows = [null, row(2, "a", 1)];
        let triage = triage(&rows, &policy);
        assert!(triage.to_publish(&rows).is_empty());
        let s = settle(&[], Vec::new(), triage, &policy);
        assert_eq!(ids(&s.failures), [1]);
        assert!(!s.failures[0].dead, "attempt 1 of 3");
        assert!(
            s.failures[0]
                .error
                .contains("column aggregate_type is NULL")
        );
        assert_eq!(s.held_back, [2], "even with skip: row 1 is not dead yet");
        assert!(matches!(&s.notes[..], [Note::WillRetry { .. }]));
    }

    #[test]
    fn failures_are_recorded_in_id_order() {
        let rows = [row(1, "a", 1), row(2, "b", 1), row(3, "c", 1)];
        let s = settle_all(
            &rows,
            vec![
                Outcome::Failed(PublishError::Nacked),
                permanent(),
                Outcome::Failed(PublishError::Nacked),
            ],
            &policy(OnDeadLetter::Park),
        );
        assert_eq!(ids(&s.failures), [1, 2, 3]);
        assert_eq!(s.rows(), 3);
    }
}
