//! Turns a recipe into an image: recipe → plan (every input pinned by
//! digest) → content-addressed cache → root trees → filesystems → disk.
//!
//! This crate knows nothing about the command line.

pub mod cache;
pub mod debian;
pub mod image;
pub mod kernel;
pub mod kernel_source;
pub mod layers;
pub mod oci;
pub mod recipe;
pub mod users;
