//! ONNX Runtime: the shared library and execution providers ([`runtime`]), and one variant of a
//! package as a session checked against the graph contract, with its forward pass ([`Model`]).

pub mod memory;
mod model;
pub(crate) mod pooling;
pub mod runtime;

pub use memory::MemoryLimit;
pub use model::*;
pub use pooling::{shorten, shorten_row};
pub use runtime::Device;
