//! Blocking calls (libvirt's are all blocking) run off the runtime's workers, as a seam:
//! on tokio's blocking pool in production; in the simulator (`set_inline`) as a task of
//! its one-threaded runtime, between two latencies it draws, so that a seed's run is the same
//! every time (a thread's timing would change it, and tokio's paused clock would move on
//! while a thread works). Either way the call runs to its end even when whoever waits for
//! it is aborted, and a panic in it is the handle's `JoinError`.

use std::cell::RefCell;
use std::time::Duration;

use tokio::task::JoinHandle;

/// Draws the latencies of the next blocking call (the simulator's slow or hung libvirt):
/// before it acts, and before its answer arrives.
pub type Latency = Box<dyn FnMut() -> (Duration, Duration)>;

thread_local! {
    /// Set on a simulator's thread: blocking calls run inline, between these latencies.
    static INLINE: RefCell<Option<Latency>> = const { RefCell::new(None) };
}

/// Blocking calls spawned from this thread run inline, each after the first of `latency()`
/// (of tokio's time), and answer after the second; `None`: on tokio's blocking pool again.
pub fn set_inline(latency: Option<Latency>) {
    INLINE.with(|i| *i.borrow_mut() = latency);
}

/// Whether this thread's blocking calls run inline (the simulator's).
pub fn is_inline() -> bool {
    INLINE.with(|i| i.borrow().is_some())
}

/// Runs `f` off the runtime's workers (see the module's doc).
pub fn spawn<F, T>(f: F) -> JoinHandle<T>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    // Before the call does what it does, and after (its answer on its way back: what it
    // saw may be stale by then, and what it did is done whether or not anyone waits).
    // An abort meanwhile leaves the call done (as on the blocking pool) and its answer lost.
    let latency = INLINE.with(|i| i.borrow_mut().as_mut().map(|draw| draw()));
    match latency {
        None => tokio::task::spawn_blocking(f),
        Some((before, after)) => tokio::spawn(async move {
            if !before.is_zero() {
                tokio::time::sleep(before).await;
            }
            let out = f();
            if !after.is_zero() {
                tokio::time::sleep(after).await;
            }
            out
        }),
    }
}
