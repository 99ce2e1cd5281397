//! Destination templates: `outbox.event.{aggregate_type}`, `{aggregate_type}.{event_type}`.

use crate::outbox::OutboxRow;

/// A parsed template; placeholders are resolved from the row being published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    AggregateType,
    EventType,
}

impl Template {
    /// Parses a template; the error is the constraint that was broken.
    pub(crate) fn parse(raw: &str) -> Result<Self, String> {
        if raw.is_empty() {
            return Err("must not be empty".to_owned());
        }
        let mut parts = Vec::new();
        let mut rest = raw;
        while let Some(open) = rest.find(['{', '}']) {
            if rest[open..].starts_with('}') {
                return Err("has a `}` without a matching `{`".to_owned());
            }
            if open > 0 {
                parts.push(Part::Literal(rest[..open].to_owned()));
            }
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| "has a `{` without a matching `}`".to_owned())?;
            parts.push(match &rest[open + 1..open + close] {
                "aggregate_type" => Part::AggregateType,
                "event_type" => Part::EventType,
                other => {
                    return Err(format!(
                        "uses unknown placeholder {{{other}}}; known: {{aggregate_type}}, {{event_type}}"
                    ));
                }
            });
            rest = &rest[open + close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_owned()));
        }
        Ok(Self { parts })
    }

    /// Renders the template for `row`.
    pub(crate) fn render(&self, row: &OutboxRow) -> String {
        let mut out = String::with_capacity(64);
        for part in &self.parts {
            out.push_str(match part {
                Part::Literal(text) => text,
                Part::AggregateType => &row.aggregate_type,
                Part::EventType => &row.event_type,
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::Template;
    use crate::outbox::OutboxRow;

    fn row() -> OutboxRow {
        OutboxRow::sample(1, "42")
    }

    #[test]
    fn renders_placeholders() {
        let t = Template::parse("outbox.{aggregate_type}.{event_type}.v1").unwrap();
        assert_eq!(t.render(&row()), "outbox.order.placed.v1");
        assert_eq!(Template::parse("static").unwrap().render(&row()), "static");
    }

    #[test]
    fn rejects_bad_templates() {
        for bad in ["", "a{", "a}", "{aggregate_id}", "x{unknown}y"] {
            assert!(Template::parse(bad).is_err(), "{bad:?} must be refused");
        }
    }
}
