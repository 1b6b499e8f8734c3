//! The schema of what the builder writes for kiln-init.
//!
//! Only this module is shared with `kiln-assemble`; the rest of the init
//! lives behind the binary so the builder never links it.

pub mod config;
