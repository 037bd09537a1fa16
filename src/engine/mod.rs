//! The one path from token ids to vectors: batches planned under a token budget, padded, run on the
//! model (on top of a prefix's states where one applies), and handed back in input order.

pub mod batch;
pub mod run;

pub use batch::Batch;
pub use run::{BatchLimits, Batches, Finished};
