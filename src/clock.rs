//! The wall clock the scheduler reads, as a seam: production reads the system's; tests
//! with tokio's paused time read one that moves with tokio's clock, so a single clock
//! drives every timer (tokio's `Instant` for in-memory timers, this for persisted ones) and
//! "nothing happened in N seconds" is checked in virtual time, not by sleeping.

use std::time::SystemTime;

pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> SystemTime;
}

/// The system's wall clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// Wall time that advances with tokio's clock (paused and advanced in tests).
pub struct TokioClock {
    wall: SystemTime,
    at: tokio::time::Instant,
}

impl TokioClock {
    /// Anchored now; create it inside the runtime whose clock it follows.
    pub fn new() -> TokioClock {
        TokioClock { wall: SystemTime::now(), at: tokio::time::Instant::now() }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        TokioClock::new()
    }
}

impl Clock for TokioClock {
    fn now(&self) -> SystemTime {
        self.wall + self.at.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn the_tokio_clock_moves_only_with_tokio_time() {
        let clock = TokioClock::new();
        let t0 = clock.now();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(clock.now(), t0, "real time passing does not move it");
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(clock.now().duration_since(t0).unwrap(), Duration::from_secs(3600));
    }
}
