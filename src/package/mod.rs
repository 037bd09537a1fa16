//! The model package: its manifest (`embedder.json`), the files it names and their checksums, and
//! where a package comes from (a directory, or the Hugging Face Hub).

pub(crate) mod hub;
mod manifest;

pub use hub::{is_repo_id, locate};
pub use manifest::*;
