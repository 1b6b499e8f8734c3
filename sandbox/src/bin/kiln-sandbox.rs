//! The sandbox helper on its own, for the crate's tests: `kiln` itself
//! serves as the helper in builds (`kiln __sandbox`).

fn main() {
    kiln_sandbox::helper_main()
}
