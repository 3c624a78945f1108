//! The wall clock the scheduler reads, as a seam: production reads the system's; tests
//! with tokio's paused time read one that moves with tokio's clock, so a single clock
//! drives every timer (tokio's `Instant` for in-memory timers, this for persisted ones) and
//! "nothing happened in N seconds" is checked in virtual time, not by sleeping.
//!
//! A VM's timers (its `max_lifetime`, registration timeout, ...) count from timestamps the
//! store keeps, so they are wall times; but a wall clock is stepped (NTP at boot, an
//! operator's `date -s`), and a step must age no VM. [`FrameClock`] gives the scheduler
//! wall time that only the host's monotonic clock moves (its *frame*), and tells it when
//! the wall clock was stepped away from it: the scheduler then moves its timestamps by the
//! step and takes the wall clock's frame again (see `clock.rs` in ARCHITECTURE.md's code
//! map).

use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> SystemTime;
    /// The host's clock that nobody steps, if this clock has one.
    fn uptime(&self) -> Option<Uptime> {
        None
    }
}

/// Where the host's monotonic clock (Linux's `CLOCK_BOOTTIME`: suspend included, never
/// stepped) stands: which boot, and how long since it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uptime {
    pub boot: String,
    pub since_boot: Duration,
}

/// How far apart the wall clock and the frame may drift before it counts as a step (a
/// frame read twice differs by microseconds; NTP slews both clocks alike).
pub const STEP_MIN: Duration = Duration::from_secs(1);

/// A frame: when the host booted, as a wall clock said at some point. Wall time in the
/// frame is `booted_at + since_boot`; a step of the wall clock moves its own frame by the
/// step, and no other.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Frame {
    pub boot: String,
    /// Nanoseconds since the Unix epoch.
    pub booted_at_ns: i64,
}

impl Frame {
    /// The frame the wall clock reading `wall` at `up` is in.
    pub fn of(wall: SystemTime, up: &Uptime) -> Frame {
        Frame { boot: up.boot.clone(), booted_at_ns: unix_ns(wall) - up.since_boot.as_nanos() as i64 }
    }

    /// Wall time at `up` in this frame (`None`: another boot's frame).
    pub fn at(&self, up: &Uptime) -> Option<SystemTime> {
        let since_epoch = Step(self.booted_at_ns + up.since_boot.as_nanos() as i64);
        (self.boot == up.boot).then(|| since_epoch.apply(SystemTime::UNIX_EPOCH))
    }

    /// How far `later`, the wall clock's frame now, was stepped from this one: `None` if
    /// by less than [`STEP_MIN`], or after a reboot (the host's VMs did not live through
    /// it with their timers; nothing to measure against).
    pub fn step_to(&self, later: &Frame) -> Option<Step> {
        let step = Step(later.booted_at_ns - self.booted_at_ns);
        (self.boot == later.boot && step.0.unsigned_abs() >= STEP_MIN.as_nanos() as u64).then_some(step)
    }
}

/// A step of the wall clock, in nanoseconds: forward (positive) or back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Step(pub i64);

impl Step {
    /// `t`, as the stepped clock says it.
    pub fn apply(self, t: SystemTime) -> SystemTime {
        let by = Duration::from_nanos(self.0.unsigned_abs());
        if self.0 >= 0 { t + by } else { t.checked_sub(by).unwrap_or(SystemTime::UNIX_EPOCH) }
    }

    pub fn then(self, next: Step) -> Step {
        Step(self.0.saturating_add(next.0))
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dir = if self.0 >= 0 { "forward" } else { "back" };
        write!(f, "{dir} {:.3}s", self.0.unsigned_abs() as f64 / 1e9)
    }
}

fn unix_ns(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i64,
        Err(e) => -(e.duration().as_nanos() as i64),
    }
}

/// The scheduler's clock: wall time in its frame, moved by the host's monotonic clock
/// alone. Without a monotonic clock (or after a reboot) it is the wall clock.
pub struct FrameClock {
    wall: std::sync::Arc<dyn Clock>,
    frame: Mutex<Option<Frame>>,
}

impl FrameClock {
    /// In `frame` (the one the store's timestamps were written in), if any.
    pub fn new(wall: std::sync::Arc<dyn Clock>, frame: Option<Frame>) -> FrameClock {
        FrameClock { wall, frame: Mutex::new(frame) }
    }

    fn frame_lock(&self) -> std::sync::MutexGuard<'_, Option<Frame>> {
        self.frame.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The frame now, if one was taken.
    pub fn frame(&self) -> Option<Frame> {
        self.frame_lock().clone()
    }

    /// Compares the frame with the wall clock's and takes the wall clock's when they
    /// differ by a step (or when there was none, or it was another boot's).
    pub fn follow(&self) -> Followed {
        let Some(up) = self.wall.uptime() else { return Followed::Same };
        let wall = Frame::of(self.wall.now(), &up);
        let mut frame = self.frame_lock();
        let followed = match frame.as_ref() {
            Some(f) if f.boot == wall.boot => match f.step_to(&wall) {
                None => return Followed::Same,
                Some(step) => Followed::Stepped(wall.clone(), step),
            },
            _ => Followed::Taken(wall.clone()),
        };
        *frame = Some(wall);
        followed
    }
}

/// What [`FrameClock::follow`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Followed {
    /// The frame stands.
    Same,
    /// A frame was taken where there was none (or another boot's): nothing moves.
    Taken(Frame),
    /// The wall clock was stepped: the timestamps move by the step, into the new frame.
    Stepped(Frame, Step),
}

impl Clock for FrameClock {
    fn now(&self) -> SystemTime {
        let frame = self.frame();
        match (frame, self.wall.uptime()) {
            (Some(f), Some(up)) => f.at(&up).unwrap_or_else(|| self.wall.now()),
            _ => self.wall.now(),
        }
    }

    fn uptime(&self) -> Option<Uptime> {
        self.wall.uptime()
    }
}

/// The system's wall clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }

    fn uptime(&self) -> Option<Uptime> {
        static BOOT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
        let boot = BOOT.get_or_init(|| {
            std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok().map(|s| s.trim().to_string())
        });
        let since = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME).ok()?;
        let since_boot = Duration::new(since.tv_sec() as u64, since.tv_nsec() as u32);
        Some(Uptime { boot: boot.clone()?, since_boot })
    }
}

/// Wall time that advances with tokio's clock (paused and advanced in tests), and that a
/// test may step; its monotonic clock is tokio's. Every one in a runtime reads the same
/// time (as a host's clocks do for each start of the agent).
pub struct TokioClock {
    stepped: Mutex<Step>,
}

/// The process's real wall and monotonic clocks at one point: what tokio's clock is read
/// against.
fn reference() -> (SystemTime, std::time::Instant) {
    static REFERENCE: std::sync::OnceLock<(SystemTime, std::time::Instant)> = std::sync::OnceLock::new();
    *REFERENCE.get_or_init(|| (SystemTime::now(), std::time::Instant::now()))
}

impl TokioClock {
    /// Call it inside the runtime whose clock it follows.
    pub fn new() -> TokioClock {
        TokioClock { stepped: Mutex::default() }
    }

    /// Steps the wall clock (as NTP or `date -s` would).
    pub fn step(&self, by: Step) {
        let mut s = self.stepped.lock().unwrap_or_else(|p| p.into_inner());
        *s = s.then(by);
    }

    /// Tokio's time since the reference (negative: before it).
    fn since_reference() -> Step {
        let (now, at) = (tokio::time::Instant::now().into_std(), reference().1);
        match now.checked_duration_since(at) {
            Some(d) => Step(d.as_nanos() as i64),
            None => Step(-(at.duration_since(now).as_nanos() as i64)),
        }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        TokioClock::new()
    }
}

impl Clock for TokioClock {
    fn now(&self) -> SystemTime {
        let stepped = *self.stepped.lock().unwrap_or_else(|p| p.into_inner());
        stepped.then(Self::since_reference()).apply(reference().0)
    }

    fn uptime(&self) -> Option<Uptime> {
        // The reference is a day after boot (tokio's clock may read a little before it).
        let since_boot = Self::since_reference().0.saturating_add(86_400_000_000_000).max(0);
        Some(Uptime { boot: "tokio".into(), since_boot: Duration::from_nanos(since_boot as u64) })
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

    #[test]
    fn this_host_has_a_monotonic_clock() {
        let (a, b) = (SystemClock.uptime().expect("CLOCK_BOOTTIME and a boot id"), SystemClock.uptime().unwrap());
        assert!(!a.boot.is_empty() && a.boot == b.boot && b.since_boot >= a.since_boot, "{a:?} {b:?}");
    }

    fn up(boot: &str, secs: u64) -> Uptime {
        Uptime { boot: boot.into(), since_boot: Duration::from_secs(secs) }
    }

    #[test]
    fn a_frame_measures_steps_of_its_boot_only() {
        let t = |s: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        let frame = Frame::of(t(1_000_000), &up("a", 100));
        assert_eq!(frame.at(&up("a", 160)), Some(t(1_000_060)));
        assert_eq!(frame.at(&up("b", 160)), None, "another boot's frame says nothing");
        let table: &[(Frame, Option<Step>)] = &[
            (Frame::of(t(1_000_060), &up("a", 160)), None),
            (Frame::of(t(1_007_260), &up("a", 160)), Some(Step(7200 * 1_000_000_000))),
            (Frame::of(t(999_960), &up("a", 160)), Some(Step(-100 * 1_000_000_000))),
            (Frame::of(t(1_000_060) + Duration::from_millis(999), &up("a", 160)), None),
            (Frame::of(t(1_000_061), &up("a", 160)), Some(Step(1_000_000_000))),
            (Frame::of(t(5_000_000), &up("b", 10)), None),
        ];
        for (later, step) in table {
            assert_eq!(frame.step_to(later), *step, "{later:?}");
        }
        assert_eq!(Step(-100 * 1_000_000_000).apply(t(1000)), t(900));
        assert_eq!(Step(5 * 1_000_000_000).then(Step(-7 * 1_000_000_000)).apply(t(1000)), t(998));
        assert_eq!(Step(-2_500_000_000).to_string(), "back 2.500s");
    }

    #[tokio::test(start_paused = true)]
    async fn the_frame_clock_moves_with_the_monotonic_clock_and_follows_steps() {
        let wall = std::sync::Arc::new(TokioClock::new());
        let clock = FrameClock::new(wall.clone(), None);
        let Followed::Taken(first) = clock.follow() else { panic!("a frame is taken at first") };
        assert_eq!(clock.follow(), Followed::Same);
        let t0 = clock.now();
        wall.step(Step(3600 * 1_000_000_000));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(clock.now().duration_since(t0).unwrap(), Duration::from_secs(10), "the step is not seen yet");
        let Followed::Stepped(second, step) = clock.follow() else { panic!("the step is found") };
        assert_eq!(step, Step(3600 * 1_000_000_000));
        assert_eq!(first.step_to(&second), Some(step));
        assert_eq!(clock.now(), wall.now(), "then the wall clock's frame is taken");
        // A frame kept from before (the store's) is measured against at once.
        let again = FrameClock::new(wall.clone(), Some(first));
        assert!(matches!(again.follow(), Followed::Stepped(_, s) if s == step));
    }
}
