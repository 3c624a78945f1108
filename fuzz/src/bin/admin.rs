//! AFL target: see `harness::admin`.
#[path = "../harness.rs"]
mod harness;

fn main() {
    afl::fuzz!(|data: &[u8]| harness::admin(data));
}
