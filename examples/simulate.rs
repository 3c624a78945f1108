//! `./scripts/simulate`: runs the deterministic simulator (`runnervisor::sim`) over many
//! seeds on every core, or one seed with its trace.
//!
//!   simulate [--seeds N] [--first S] [--seed S] [--steps K] [--threads T] [--no-faults] [--trace] [--log] [--each]
//!   simulate --regressions       the seeds that found bugs (`runnervisor::sim::REGRESSIONS`)
//!
//! `--each` prints a line per seed with a digest of its trace: two runs of the same binary
//! must print the same lines (sorted), whatever the machine's load.
//!
//! Prints one line per violation (the line that reproduces it, and what broke), then
//! `simulate: seeds=S steps=T faults=F violations=V` last; exits 1 on any violation.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use nix::time::ClockId;

use runnervisor::sim::{Options, REGRESSIONS, run_seed};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Args {
    seeds: u64,
    first: u64,
    one: Option<u64>,
    steps: u32,
    threads: usize,
    faults: bool,
    trace: bool,
    log: bool,
    each: bool,
    regressions: bool,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        seeds: 100,
        first: 1,
        one: None,
        steps: 2000,
        threads: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        faults: true,
        trace: false,
        log: false,
        each: false,
        regressions: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        let num = |name: &str, v: String| v.parse::<u64>().map_err(|_| format!("{name}: not a number: {v:?}"));
        match arg.as_str() {
            "--seeds" => a.seeds = num("--seeds", value("--seeds")?)?,
            "--first" => a.first = num("--first", value("--first")?)?,
            "--seed" => a.one = Some(num("--seed", value("--seed")?)?),
            "--steps" => a.steps = num("--steps", value("--steps")?)? as u32,
            "--threads" => a.threads = num("--threads", value("--threads")?)?.max(1) as usize,
            "--no-faults" => a.faults = false,
            "--trace" => a.trace = true,
            "--log" => a.log = true,
            "--each" => a.each = true,
            "--regressions" => a.regressions = true,
            other => return Err(format!("unknown argument {other:?} (see the header of examples/simulate.rs)")),
        }
    }
    Ok(a)
}

fn main() -> std::process::ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("simulate: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    if args.log {
        // The agent's own log (info and above), on stderr: for one seed.
        tracing_subscriber::fmt()
            .with_max_level(if std::env::var_os("SIM_DEBUG").is_some() {
                tracing::Level::DEBUG
            } else {
                tracing::Level::INFO
            })
            .with_writer(std::io::stderr)
            .init();
    }
    if args.regressions {
        let mut violations = 0;
        for &(seed, steps) in REGRESSIONS {
            let out = run_seed(Options { seed, steps, faults: true });
            if let Some(line) = out.violation_line() {
                violations += 1;
                println!("{line}");
            }
        }
        println!("simulate: regressions={} violations={violations}", REGRESSIONS.len());
        return if violations > 0 { std::process::ExitCode::FAILURE } else { std::process::ExitCode::SUCCESS };
    }
    if let Some(seed) = args.one {
        let out = run_seed(Options { seed, steps: args.steps, faults: args.faults });
        if args.trace || out.violation.is_some() {
            for line in &out.trace {
                println!("{line}");
            }
        }
        if let Some(line) = out.violation_line() {
            println!("{line}");
        }
        println!(
            "simulate: seeds=1 steps={} faults={} jobs={} busiest_hour={} violations={}",
            out.steps,
            out.faults,
            out.jobs,
            out.busiest_hour,
            out.violation.is_some() as u32
        );
        return if out.violation.is_some() { std::process::ExitCode::FAILURE } else { std::process::ExitCode::SUCCESS };
    }
    let started = Instant::now();
    // A seed whose agent spins (a task always ready, so the paused clock never moves) would
    // hang its worker for good: a watchdog names it and fails the run. It measures the
    // worker's CPU time (a loaded or stopped machine is no spin).
    let running: Arc<Mutex<Vec<(u64, ClockId, std::time::Duration)>>> = Arc::new(Mutex::new(Vec::new()));
    {
        let running = running.clone();
        std::thread::spawn(move || {
            loop {
                std::thread::sleep(std::time::Duration::from_secs(1));
                let stuck = running
                    .lock()
                    .unwrap()
                    .iter()
                    .find(|(_, clock, at)| cpu_time(*clock).saturating_sub(*at).as_secs() >= 60)
                    .map(|(seed, _, _)| *seed);
                if let Some(seed) = stuck {
                    println!(
                        "violation: ./scripts/simulate --seed {seed} --steps {} # the agent spins: no virtual time passes (60 s of CPU time on one seed)",
                        args.steps
                    );
                    std::process::exit(1);
                }
            }
        });
    }
    let next = Arc::new(AtomicU64::new(args.first));
    let end = args.first + args.seeds;
    let totals = Arc::new(Mutex::new((0u64, 0u64, 0u64, 0u64, Vec::<String>::new(), (0u64, 0u64))));
    let workers: Vec<_> = (0..args.threads)
        .map(|_| {
            let (next, totals, running) = (next.clone(), totals.clone(), running.clone());
            let (steps, faults, each) = (args.steps, args.faults, args.each);
            std::thread::spawn(move || {
                loop {
                    let seed = next.fetch_add(1, Ordering::Relaxed);
                    if seed >= end {
                        return;
                    }
                    let clock = this_thread_clock();
                    running.lock().unwrap().push((seed, clock, cpu_time(clock)));
                    // A panic out of the run (the world's own, or the agent's outside its
                    // tasks) fails the seed, not the worker (whose seeds went unrun, the run
                    // passing with fewer seeds).
                    let run = std::panic::catch_unwind(|| run_seed(Options { seed, steps, faults }));
                    running.lock().unwrap().retain(|(s, _, _)| *s != seed);
                    let out = match run {
                        Ok(out) => out,
                        Err(_) => {
                            let line = format!(
                                "violation: ./scripts/simulate --seed {seed} --steps {steps} # the simulator panicked (its message above)"
                            );
                            println!("{line}");
                            let mut t = totals.lock().unwrap();
                            t.0 += 1;
                            t.4.push(line);
                            continue;
                        }
                    };
                    if each {
                        println!(
                            "seed {seed} steps={} faults={} jobs={} trace={:016x}",
                            out.steps,
                            out.faults,
                            out.jobs,
                            digest(&out.trace)
                        );
                    }
                    let mut t = totals.lock().unwrap();
                    t.0 += 1;
                    t.1 += out.steps as u64;
                    t.2 += out.faults as u64;
                    t.3 += out.jobs as u64;
                    t.5 = t.5.max((out.busiest_hour, seed));
                    if let Some(line) = out.violation_line() {
                        println!("{line}");
                        t.4.push(line);
                    }
                    if t.0 % 1000 == 0 {
                        eprintln!("simulate: {} seeds, {:.0} s", t.0, started.elapsed().as_secs_f64());
                    }
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    let t = totals.lock().unwrap();
    let secs = started.elapsed().as_secs_f64();
    println!(
        "simulate: {:.0} seeds/min ({:.1} s), {} jobs; at most {} GitHub API calls in an hour (seed {})",
        t.0 as f64 * 60.0 / secs.max(0.001),
        secs,
        t.3,
        t.5.0,
        t.5.1
    );
    println!("simulate: seeds={} steps={} faults={} violations={}", t.0, t.1, t.2, t.4.len());
    if t.4.is_empty() { std::process::ExitCode::SUCCESS } else { std::process::ExitCode::FAILURE }
}

/// FNV-1a over the trace's lines: equal traces, equal digests.
fn digest(trace: &[String]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in trace.iter().flat_map(|l| l.bytes().chain([b'\n'])) {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// CPU time spent by the thread whose clock `clock` is.
fn cpu_time(clock: ClockId) -> std::time::Duration {
    clock.now().map(std::time::Duration::from).unwrap_or_default()
}

/// The CPU-time clock of the calling thread.
fn this_thread_clock() -> ClockId {
    let mut id: libc::clockid_t = 0;
    // SAFETY: pthread_self is always valid for the calling thread; `id` is written on success.
    let rc = unsafe { libc::pthread_getcpuclockid(libc::pthread_self(), &mut id) };
    assert_eq!(rc, 0, "pthread_getcpuclockid");
    ClockId::from_raw(id)
}
