//! The fault suite's oracle: compares what the table holds with what the broker delivered.
//!
//! After a scenario it counts, over every committed row: lost (neither delivered nor
//! dead-lettered nor parked behind a dead letter), duplicates (deliveries beyond the first), unexpected deliveries (event ids
//! the table never committed), per-aggregate order violations (an aggregate's first deliveries
//! out of `id` order) and marked-but-missing rows (`published_at` set, yet never delivered:
//! the one thing the relay must never do). With `FAULTS_REPORT` set, each verdict is appended
//! to that file as a JSON line; `scripts/faults.sh` turns them into the RELIABILITY.md table.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use super::{Outbox, Received};

#[derive(Debug, Clone, serde::Serialize)]
pub struct Verdict {
    pub scenario: String,
    pub broker: String,
    /// Committed rows.
    pub events: usize,
    pub dead_lettered: usize,
    /// Not delivered because an earlier row of the aggregate is dead-lettered (park mode):
    /// held, visible and requeueable, not lost.
    pub parked: usize,
    /// Distinct events delivered.
    pub delivered: usize,
    pub lost: usize,
    pub duplicates: usize,
    pub unexpected: usize,
    pub order_violations: usize,
    pub marked_not_delivered: usize,
    /// From the fault clearing to every live row published, when the scenario measures it.
    pub recovery_ms: Option<u128>,
}

impl Verdict {
    /// Reads the table and judges `received` (every message consumed, in consumption order).
    pub async fn judge(scenario: &str, outbox: &Outbox, received: &[Received]) -> Self {
        let rows: Vec<(String, String, i64, bool, bool)> =
            sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "select event_id::text, aggregate_id, id, dead_lettered_at is not null,
                        published_at is not null
                 from {} order by id",
                outbox.table
            )))
            .fetch_all(&outbox.pool)
            .await
            .expect("read outbox rows");
        let table: HashMap<&str, (&str, i64)> = rows
            .iter()
            .map(|(event, aggregate, id, _, _)| (event.as_str(), (aggregate.as_str(), *id)))
            .collect();
        let mut first_seen = HashSet::new();
        let mut unexpected = 0;
        let mut order_violations = 0;
        let mut last_id: BTreeMap<&str, i64> = BTreeMap::new();
        for message in received {
            let event = message.header("event_id");
            let Some(&(aggregate, id)) = table.get(event) else {
                unexpected += 1;
                continue;
            };
            if !first_seen.insert(event.to_owned()) {
                continue;
            }
            let last = last_id.entry(aggregate).or_insert(i64::MIN);
            if id < *last {
                order_violations += 1;
            }
            *last = (*last).max(id);
        }
        let delivered = first_seen.len();
        let mut first_dead: HashMap<&str, i64> = HashMap::new();
        for (_, aggregate, id, dead, _) in &rows {
            if *dead {
                first_dead.entry(aggregate.as_str()).or_insert(*id);
            }
        }
        let undelivered: Vec<_> = rows
            .iter()
            .filter(|(event, _, _, dead, _)| !dead && !first_seen.contains(event))
            .collect();
        let parked = undelivered
            .iter()
            .filter(|(_, aggregate, id, _, _)| {
                first_dead
                    .get(aggregate.as_str())
                    .is_some_and(|dead| dead < id)
            })
            .count();
        let lost = undelivered.len() - parked;
        let marked_not_delivered = rows
            .iter()
            .filter(|(event, _, _, _, published)| *published && !first_seen.contains(event))
            .count();
        Self {
            scenario: scenario.to_owned(),
            broker: format!("{:?}", outbox.broker),
            events: rows.len(),
            dead_lettered: rows.iter().filter(|r| r.3).count(),
            parked,
            delivered,
            lost,
            duplicates: received.len() - unexpected - delivered,
            unexpected,
            order_violations,
            marked_not_delivered,
            recovery_ms: None,
        }
    }

    pub fn recovered_in(mut self, recovery: Duration) -> Self {
        self.recovery_ms = Some(recovery.as_millis());
        self
    }

    /// Asserts the guarantees: nothing lost, nothing unexpected, no order violation, nothing
    /// marked that was not delivered, at most `max_duplicates` duplicates. Records the verdict.
    pub fn assert_holds(&self, max_duplicates: usize) {
        self.record();
        assert!(
            self.lost == 0
                && self.unexpected == 0
                && self.order_violations == 0
                && self.marked_not_delivered == 0
                && self.duplicates <= max_duplicates,
            "guarantees broken (duplicates allowed: {max_duplicates}): {self:#?}"
        );
    }

    fn record(&self) {
        let Ok(path) = std::env::var("FAULTS_REPORT") else {
            return;
        };
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("open FAULTS_REPORT");
        writeln!(file, "{}", serde_json::to_string(self).unwrap()).expect("write FAULTS_REPORT");
    }
}
