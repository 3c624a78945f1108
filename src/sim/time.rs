//! The simulator's one clock: virtual time that runs on across the agent's restarts (each
//! incarnation has a runtime of its own, with a paused clock that starts at zero), and the
//! host's wall clock, which a fault may step.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::clock::Step;

/// GitHub's wall clock at the start of every run: the same for every seed.
pub fn epoch() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

#[derive(Debug)]
struct Inner {
    /// Virtual time spent by earlier incarnations (and between them).
    base: Duration,
    /// The current incarnation's start, on its runtime's clock.
    t0: Option<Instant>,
    /// How far the host's wall clock was stepped.
    skew: Step,
    /// The virtual time last read inside the runtime: what it still is outside, where the
    /// world acts between the runtime's turns (tokio's clock read there is the real one).
    last: Duration,
}

/// Shared by the world, the simulated GitHub and the agent's clock.
#[derive(Debug, Clone)]
pub struct Time(Arc<Mutex<Inner>>);

thread_local! {
    /// The time of the run on this thread (a run is one thread's), for its log lines.
    static CURRENT: std::cell::RefCell<Option<Time>> = const { std::cell::RefCell::new(None) };
}

/// Virtual time of the run on this thread, as [`Time::now`] without recording the read
/// (a log line must not change the run); `None` outside a run. `--log` stamps lines with it.
pub fn current() -> Option<Duration> {
    CURRENT.with(|c| c.borrow().as_ref().map(|time| time.lock().read()))
}

impl Inner {
    /// Virtual time since the run began (see [`Time::now`]).
    fn read(&self) -> Duration {
        match self.t0 {
            Some(t0) if tokio::runtime::Handle::try_current().is_ok() => self.base + t0.elapsed(),
            _ => self.last.max(self.base),
        }
    }
}

impl Default for Time {
    fn default() -> Self {
        Time(Arc::new(Mutex::new(Inner {
            base: Duration::ZERO,
            t0: None,
            skew: Step::default(),
            last: Duration::ZERO,
        })))
    }
}

impl Time {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// This run's time is what [`current`] reads on this thread.
    pub fn make_current(&self) {
        CURRENT.with(|c| *c.borrow_mut() = Some(self.clone()));
    }

    /// Virtual time since the run began. Outside the incarnation's runtime (the world's
    /// turn, between two of the runtime's) it stands where the runtime left it.
    pub fn now(&self) -> Duration {
        let mut inner = self.lock();
        let now = inner.read();
        inner.last = now;
        now
    }

    /// GitHub's wall clock (true time).
    pub fn wall(&self) -> SystemTime {
        epoch() + self.now()
    }

    /// The host's wall clock (stepped by `skew`).
    pub fn host_wall(&self) -> SystemTime {
        let skew = self.lock().skew;
        skew.apply(self.wall())
    }

    /// The virtual time at which the host's wall clock, as it is stepped now, said `t`.
    pub fn host_to_virtual(&self, t: SystemTime) -> Duration {
        let skew = self.lock().skew;
        Step(-skew.0).apply(t).duration_since(epoch()).unwrap_or_default()
    }

    /// A new incarnation starts (call inside its runtime) after `down` of downtime.
    pub fn start_incarnation(&self, down: Duration) {
        let mut inner = self.lock();
        if let Some(t0) = inner.t0.take() {
            inner.base += t0.elapsed();
        }
        inner.base += down;
        inner.last = inner.base;
        inner.t0 = Some(Instant::now());
    }

    /// The incarnation ends (call inside its runtime, before it is dropped).
    pub fn end_incarnation(&self) {
        let mut inner = self.lock();
        if let Some(t0) = inner.t0.take() {
            inner.base += t0.elapsed();
        }
        inner.last = inner.base;
    }

    /// The host's wall clock is stepped forward by `by` (NTP after a long drift).
    pub fn step_host_clock(&self, by: Step) {
        let mut inner = self.lock();
        inner.skew = inner.skew.then(by);
    }
}

/// The agent's wall clock in the simulator.
pub struct HostClock(pub Time);

impl crate::clock::Clock for HostClock {
    fn now(&self) -> SystemTime {
        self.0.host_wall()
    }

    /// Virtual time: the host never reboots in a run, and no fault steps this clock.
    fn uptime(&self) -> Option<crate::clock::Uptime> {
        Some(crate::clock::Uptime { boot: "sim".into(), since_boot: self.0.now() })
    }
}
