//! The outbox table's name as PostgreSQL sees it: validated, quoted, and the names of its
//! companion objects (indexes, lease table, trigger).

use std::fmt;

/// The longest suffix a companion object adds to the table's name (`_aggregate_pending_idx`).
const LONGEST_SUFFIX: usize = "_aggregate_pending_idx".len();
/// The longest table name whose companion names stay within PostgreSQL's 63 bytes: longer ones
/// would be cut there, and two tables could then share an index or lease table name.
const MAX_NAME: usize = 63 - LONGEST_SUFFIX;

/// A validated outbox table name, optionally schema-qualified (`billing.outbox`).
///
/// Parts must match `[a-z_][a-z0-9_]*` (so the quoted form can be put into SQL text safely),
/// the schema at most 63 characters, the name at most [`MAX_NAME`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    schema: Option<String>,
    name: String,
}

impl Table {
    /// Parses `name` or `schema.name`; the error is the constraint that was broken.
    pub fn parse(raw: &str) -> Result<Self, &'static str> {
        const CONSTRAINT: &str = "must be `name` or `schema.name`, each part matching [a-z_][a-z0-9_]*, the schema at most 63 and the name at most 41 characters (its companion objects add up to 22: `<name>_aggregate_pending_idx`, and PostgreSQL cuts names at 63 bytes)";
        let mut parts = raw.split('.');
        let (schema, name) = match (parts.next(), parts.next(), parts.next()) {
            (Some(name), None, None) => (None, name),
            (Some(schema), Some(name), None) => (Some(schema), name),
            _ => return Err(CONSTRAINT),
        };
        let valid = |part: &str, max: usize| {
            let mut chars = part.chars();
            matches!(chars.next(), Some('a'..='z' | '_'))
                && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'))
                && part.len() <= max
        };
        if !valid(name, MAX_NAME) || !schema.is_none_or(|s| valid(s, 63)) {
            return Err(CONSTRAINT);
        }
        Ok(Self {
            schema: schema.map(str::to_owned),
            name: name.to_owned(),
        })
    }

    /// The quoted, possibly qualified name to put into SQL: `"billing"."outbox"`.
    pub(crate) fn quoted(&self) -> String {
        match &self.schema {
            Some(schema) => format!("\"{schema}\".\"{}\"", self.name),
            None => format!("\"{}\"", self.name),
        }
    }

    /// The quoted name of a companion object (index, trigger, function) in the table's schema.
    pub(crate) fn companion(&self, suffix: &str) -> String {
        let name = format!("{}_{suffix}", self.name);
        match &self.schema {
            Some(schema) => format!("\"{schema}\".\"{name}\""),
            None => format!("\"{name}\""),
        }
    }

    /// The bare relation name, without schema.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// The schema given in the configuration, if any.
    pub(crate) fn schema(&self) -> Option<&str> {
        self.schema.as_deref()
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.schema {
            Some(schema) => write!(f, "{schema}.{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Table;

    #[test]
    fn companion_names_of_the_longest_table_name_fit_postgresql() {
        let longest = "t".repeat(super::MAX_NAME);
        let table = Table::parse(&longest).unwrap();
        for suffix in [
            "pending_idx",
            "aggregate_pending_idx",
            "waiting_idx",
            "dead_idx",
            "published_idx",
            "leases",
            "relay_notify",
            "uuidv7",
            "topic_partitions",
            "ordering_idx",
            "awake",
        ] {
            let name = table.companion(suffix);
            assert!(name.trim_matches('"').len() <= 63, "{name}");
        }
    }

    #[test]
    fn table_names_are_validated_and_quoted() {
        assert_eq!(Table::parse("outbox").unwrap().quoted(), "\"outbox\"");
        assert_eq!(
            Table::parse("billing.outbox").unwrap().quoted(),
            "\"billing\".\"outbox\""
        );
        assert_eq!(
            Table::parse("billing.outbox")
                .unwrap()
                .companion("pending_idx"),
            "\"billing\".\"outbox_pending_idx\""
        );
        for bad in [
            "",
            "Outbox",
            "out-box",
            "a.b.c",
            "1outbox",
            "outbox;drop",
            "a.",
            ".a",
            "x\"y",
            &"t".repeat(42),
        ] {
            assert!(Table::parse(bad).is_err(), "{bad:?} must be refused");
        }
    }
}
