//! Helpers shared by the integration tests.
pub mod images;
pub mod kiln;
pub mod registry;
