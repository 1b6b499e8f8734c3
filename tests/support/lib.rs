//! Helpers shared by the integration tests.
pub mod images;
pub mod registry;
