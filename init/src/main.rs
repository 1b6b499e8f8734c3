//! kiln-init: PID 1 of a kiln image.

fn main() {
    eprintln!("kiln-init: not implemented yet");
}
