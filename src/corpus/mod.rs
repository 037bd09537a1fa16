//! Files in and out: reading texts and few-shot examples ([`input`]), writing `.npy` and JSON lines
//! ([`output`]), and corpus-scale runs that stream, resume and shard ([`run`]).

pub mod input;
pub mod output;
pub mod run;
