//! Dead letters: the copy of a dead-lettered row sent to `retry.dead_letter_destination`.

use super::OutboxRow;

/// The copy of a dead-lettered row sent to the dead-letter destination: the same event, with
/// headers `dead_letter_error` (why) and `dead_letter_attempts` added. Headers that are not a
/// JSON object (one way to be dead-lettered) are replaced by those two.
pub(crate) fn dead_letter_copy(row: &OutboxRow, error: &str) -> OutboxRow {
    let mut headers: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&row.headers).unwrap_or_default();
    headers.insert("dead_letter_error".to_owned(), error.into());
    headers.insert(
        "dead_letter_attempts".to_owned(),
        row.attempts.to_string().into(),
    );
    OutboxRow {
        headers: serde_json::Value::Object(headers).to_string(),
        ..row.clone()
    }
}
