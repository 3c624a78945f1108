//! AFL target: see `harness::webhook`.
#[path = "../harness.rs"]
mod harness;

fn main() {
    afl::fuzz!(|data: &[u8]| harness::webhook(data));
}
