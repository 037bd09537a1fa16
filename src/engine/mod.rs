//! The one path from token ids to vectors: rows costed and batched under a token budget
//! ([`plan`]), padded ([`batch`]), run on the model on top of a prefix's states where one applies
//! ([`run`]), the prefixes' states kept between calls ([`prefix`]), and the rows handed back in
//! input order.

pub mod batch;
pub mod plan;
pub mod prefix;
pub mod run;

pub use batch::Batch;
pub use plan::BatchLimits;
pub use prefix::{Held, PrefixState, PrefixStats, PrefixStore};
pub use run::{Batches, Failed, Finished};
