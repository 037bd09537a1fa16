//! Files in and out: reading texts and few-shot examples ([`input`]), writing `.npy` and JSON lines
//! ([`output`]), and corpus-scale runs that stream, resume and shard ([`run`]: the loop over
//! chunks; [`reader`]: records and chunks; `journal`: the run's state and files beside the
//! output; [`lock`]: one run per output).

pub mod input;
mod journal;
pub mod lock;
pub mod output;
pub mod reader;
pub mod run;
