//! Process-wide machinery both directions use: retry delays (`backoff`), outage bookkeeping
//! (`outage`) and the shutdown signal ([`shutdown`]).

pub(crate) mod backoff;
pub(crate) mod outage;
pub mod shutdown;
