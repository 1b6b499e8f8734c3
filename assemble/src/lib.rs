//! Turns a recipe into an image: recipe → plan (every input pinned by
//! digest) → content-addressed cache → root trees → filesystems → disk.
//!
//! This crate knows nothing about the command line.

#![forbid(unsafe_code)]

pub mod ab;
pub mod arch;
pub mod cache;
pub mod configure;
pub mod debian;
pub mod fetch;
pub mod host;
pub mod image;
pub mod kernel;
pub mod kernel_source;
pub mod layers;
pub mod oci;
pub mod output;
pub mod plan;
pub mod progress;
pub mod recipe;
pub mod users;

/// An error and its sources as one line, `outer: inner: root cause`, for
/// errors from libraries (reqwest, oci-client) whose own message hides the
/// cause ("error sending request for url").
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        // Some libraries repeat their source's text in their own message.
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn error_chain_shows_each_cause_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::other("connection refused"));
        assert_eq!(super::error_chain(&e), "outer: connection refused");
    }
}
