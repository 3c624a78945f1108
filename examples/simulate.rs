//! `./scripts/simulate`: runs the deterministic simulator (`runnervisor::sim`) over many
//! seeds on every core, or one seed with its trace.
//!
//!   simulate [--seeds N] [--first S] [--seed S] [--steps K] [--threads T] [--no-faults] [--trace] [--log] [--each] [--ledger FILE]
//!   simulate --regressions       the seeds that found bugs (`runnervisor::sim::REGRESSIONS`)
//!
//! `--each` prints a line per seed with a digest of its trace: two runs of the same binary
//! must print the same lines (sorted), whatever the machine's load.
//!
//! Prints one line per violation (the line that reproduces it, and what broke), then
//! `simulate: seeds=S steps=T faults=F violations=V` last; exits 1 on any violation.
//!
//! `--ledger FILE` makes a long run outlive its process: each chunk of 1,000 seeds done
//! appends its line (totals, violations, build) to FILE, and a run started again with the
//! same FILE, seeds and steps runs only the chunks not there, then sums the whole ledger.
//! Chunks count only for the build that ran them (`key=`: the git trees of the sources,
//! which `scripts/simulate` passes in `RV_SIM_SOURCE`, and the digest of the traces of
//! seeds 1-4): a commit that changes src/, examples/ or Cargo's files starts it afresh.

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
    ledger: Option<std::path::PathBuf>,
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
        ledger: None,
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
            "--ledger" => a.ledger = Some(value("--ledger")?.into()),
            other => return Err(format!("unknown argument {other:?} (see the header of examples/simulate.rs)")),
        }
    }
    if a.ledger.is_some() && (a.one.is_some() || a.regressions) {
        return Err("--ledger is for runs of many seeds (--seeds, --first), not --seed or --regressions".into());
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
            .with_timer(VirtualTime)
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
    let end = args.first + args.seeds;
    // The seeds to run: all of them, or the ledger's chunks not done by this build.
    let ledger = match &args.ledger {
        None => None,
        Some(_) if args.first == 0 || (args.first - 1) % CHUNK != 0 || args.seeds % CHUNK != 0 => {
            eprintln!(
                "simulate: --ledger runs whole chunks of {CHUNK} seeds: --first must be 1 more than a multiple of {CHUNK}, --seeds a multiple"
            );
            return std::process::ExitCode::from(2);
        }
        Some(path) => match Ledger::open(path, args.steps, args.faults) {
            Ok(l) => Some(Arc::new(l)),
            Err(e) => {
                eprintln!("simulate: {e}");
                return std::process::ExitCode::from(2);
            }
        },
    };
    let seeds: Arc<Vec<u64>> = Arc::new(match &ledger {
        None => (args.first..end).collect(),
        Some(l) => {
            let todo: Vec<u64> = chunks(args.first, end).filter(|c| !l.done.contains(c)).collect();
            eprintln!(
                "simulate: ledger {}: {}, {} chunks of {CHUNK} seeds of the range done before, {} to run",
                l.path.display(),
                l.key,
                chunks(args.first, end).count() - todo.len(),
                todo.len()
            );
            // A seed that spun in an earlier process is counted as it was (its violation).
            todo.iter().flat_map(|&c| c..c + CHUNK).filter(|seed| !l.spun.contains_key(seed)).collect()
        }
    });
    // A seed whose agent spins (a task always ready, so the paused clock never moves) would
    // hang its worker for good: a watchdog names it and fails the run. It measures the
    // worker's CPU time (a loaded or stopped machine is no spin).
    let running: Arc<Mutex<Vec<(u64, ClockId, std::time::Duration)>>> = Arc::new(Mutex::new(Vec::new()));
    {
        let (running, ledger) = (running.clone(), ledger.clone());
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
                    let line = format!(
                        "violation: ./scripts/simulate --seed {seed} --steps {} # the agent spins: no virtual time passes (60 s of CPU time on one seed)",
                        args.steps
                    );
                    println!("{line}");
                    // Its chunk cannot end in this process: the ledger keeps the seed as
                    // done with its violation, and a run started again goes on past it.
                    if let Some(l) = &ledger
                        && let Err(e) = l.spun(seed, &line)
                    {
                        eprintln!("simulate: {e}");
                    }
                    std::process::exit(1);
                }
            }
        });
    }
    let next = Arc::new(AtomicU64::new(0));
    let totals = Arc::new(Mutex::new((0u64, 0u64, 0u64, 0u64, Vec::<String>::new(), (0u64, 0u64))));
    let workers: Vec<_> = (0..args.threads)
        .map(|_| {
            let (next, totals, running, seeds, ledger) =
                (next.clone(), totals.clone(), running.clone(), seeds.clone(), ledger.clone());
            let (steps, faults, each) = (args.steps, args.faults, args.each);
            std::thread::spawn(move || {
                loop {
                    let Some(&seed) = seeds.get(next.fetch_add(1, Ordering::Relaxed) as usize) else {
                        return;
                    };
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
                            if let Some(l) = &ledger {
                                l.seed_done(seed, 0, 0, Some(line.clone()));
                            }
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
                    let violation = out.violation_line();
                    if let Some(l) = &ledger {
                        l.seed_done(seed, out.steps as u64, out.faults as u64, violation.clone());
                    }
                    let mut t = totals.lock().unwrap();
                    t.0 += 1;
                    t.1 += out.steps as u64;
                    t.2 += out.faults as u64;
                    t.3 += out.jobs as u64;
                    t.5 = t.5.max((out.busiest_hour, seed));
                    if let Some(line) = violation {
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
    if let Some(l) = &ledger {
        // The whole run: every chunk of it in the ledger, whichever process ran it.
        return match l.sum(args.first, end) {
            Ok(sum) => {
                println!("{}", sum.about);
                for line in &sum.violations {
                    println!("{line}");
                }
                println!(
                    "simulate: seeds={} steps={} faults={} violations={}",
                    sum.seeds,
                    sum.steps,
                    sum.faults,
                    sum.violations.len()
                );
                if sum.violations.is_empty() && sum.missing == 0 {
                    std::process::ExitCode::SUCCESS
                } else {
                    std::process::ExitCode::FAILURE
                }
            }
            Err(e) => {
                eprintln!("simulate: {e}");
                std::process::ExitCode::from(2)
            }
        };
    }
    println!("simulate: seeds={} steps={} faults={} violations={}", t.0, t.1, t.2, t.4.len());
    if t.4.is_empty() { std::process::ExitCode::SUCCESS } else { std::process::ExitCode::FAILURE }
}

/// Seeds per ledger line.
const CHUNK: u64 = 1000;

/// The first seed of each chunk of `first..end`.
fn chunks(first: u64, end: u64) -> impl Iterator<Item = u64> {
    (first..end).step_by(CHUNK as usize)
}

/// A long run's record on disk (`--ledger`): one line per chunk of seeds done, by any
/// process, and one per seed a process died on (the watchdog's spin):
///
///   chunk key=K steps_per_seed=N first=S seeds=C steps=T faults=F commit=G at=UNIX violations=["…"]
///   spun key=K steps_per_seed=N seed=S violation="…"
///
/// `key` is the build: the commit's sources (`RV_SIM_SOURCE`, from scripts/simulate: the
/// git trees of src/, examples/ and Cargo's files) and the digest of the traces of seeds
/// 1-4. A line cut short by a killed process does not parse, and counts for nothing.
struct Ledger {
    path: std::path::PathBuf,
    key: String,
    steps_per_seed: u32,
    commit: String,
    /// Chunks this build has done (their first seeds), read at the start.
    done: std::collections::BTreeSet<u64>,
    /// Seeds this build spun on, with their violation, read at the start.
    spun: std::collections::BTreeMap<u64, String>,
    /// Chunks under way: seeds done, steps, faults, violations.
    open: Mutex<std::collections::BTreeMap<u64, (u64, u64, u64, Vec<String>)>>,
}

/// A ledger's totals over a run's seeds.
struct Sum {
    seeds: u64,
    steps: u64,
    faults: u64,
    violations: Vec<String>,
    /// Chunks of the range not in the ledger.
    missing: usize,
    /// Which commits ran the chunks, over how long.
    about: String,
}

/// The ledger's lines of one build and steps per seed.
#[derive(Default)]
struct Lines {
    chunks: Vec<ChunkLine>,
    spun: std::collections::BTreeMap<u64, String>,
}

impl Ledger {
    fn open(path: &std::path::Path, steps_per_seed: u32, faults: bool) -> Result<Ledger, String> {
        if !faults {
            return Err("--ledger: a long run draws faults (drop --no-faults)".into());
        }
        let source = std::env::var("RV_SIM_SOURCE").unwrap_or_default();
        if source.is_empty() || source.ends_with("-dirty") {
            return Err(format!(
                "--ledger: run it through ./scripts/simulate with src/, examples/ and Cargo's files committed (RV_SIM_SOURCE={source:?}): a ledger counts a build's chunks only"
            ));
        }
        let traces: Vec<String> = (1..=4)
            .flat_map(|seed| run_seed(Options { seed, steps: steps_per_seed.min(1000), faults: true }).trace)
            .collect();
        let digest = digest(&traces);
        let mut ledger = Ledger {
            path: path.to_path_buf(),
            key: format!("{source}/{digest:016x}"),
            steps_per_seed,
            commit: std::env::var("RV_SIM_COMMIT").unwrap_or_else(|_| "-".into()),
            done: Default::default(),
            spun: Default::default(),
            open: Mutex::new(Default::default()),
        };
        let lines = ledger.lines()?;
        ledger.done = lines.chunks.iter().map(|c| c.first).collect();
        ledger.spun = lines.spun;
        {
            let mut open = ledger.open.lock().unwrap();
            for (seed, line) in &ledger.spun {
                let c = open.entry(chunk_of(*seed)).or_default();
                c.0 += 1;
                c.3.push(line.clone());
            }
        }
        // A line a killed process left unfinished is ended, so the next one starts afresh.
        if std::fs::read(path).is_ok_and(|t| t.last().is_some_and(|b| *b != b'\n')) {
            ledger.append("\n")?;
        }
        Ok(ledger)
    }

    /// This build's lines of this many steps per seed.
    fn lines(&self) -> Result<Lines, String> {
        let text = match std::fs::read(&self.path) {
            // (A stray byte spoils its line only.)
            Ok(t) => String::from_utf8_lossy(&t).into_owned(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(format!("--ledger {}: {e}", self.path.display())),
        };
        let mut lines = Lines::default();
        for line in text.lines() {
            let Some((kind, rest)) = line.split_once(' ') else { continue };
            // The fields before the JSON one, which ends the line.
            let separator = if kind == "chunk" { " violations=" } else { " violation=" };
            let Some((fields, json)) = rest.split_once(separator) else { continue };
            let field = |key: &str| fields.split(' ').find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='));
            let num = |key: &str| field(key).and_then(|v| v.parse::<u64>().ok());
            if field("key") != Some(self.key.as_str()) || num("steps_per_seed") != Some(u64::from(self.steps_per_seed))
            {
                continue;
            }
            match kind {
                "chunk" => {
                    let (Some(first), Some(seeds), Some(steps), Some(faults), Some(at), Ok(violations)) = (
                        num("first"),
                        num("seeds"),
                        num("steps"),
                        num("faults"),
                        num("at"),
                        serde_json::from_str::<Vec<String>>(json),
                    ) else {
                        continue;
                    };
                    let commit = field("commit").unwrap_or("-").to_string();
                    lines.chunks.push(ChunkLine { first, seeds, steps, faults, at, commit, violations });
                }
                "spun" => {
                    if let (Some(seed), Ok(violation)) = (num("seed"), serde_json::from_str::<String>(json)) {
                        lines.spun.insert(seed, violation);
                    }
                }
                _ => {}
            }
        }
        Ok(lines)
    }

    /// Seed `seed` is done; its chunk's line is written once all its seeds are.
    fn seed_done(&self, seed: u64, steps: u64, faults: u64, violation: Option<String>) {
        let first = chunk_of(seed);
        let mut open = self.open.lock().unwrap();
        let c = open.entry(first).or_default();
        c.0 += 1;
        c.1 += steps;
        c.2 += faults;
        c.3.extend(violation);
        if c.0 < CHUNK {
            return;
        }
        let (seeds, steps, faults, violations) = open.remove(&first).unwrap_or_default();
        let at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let line = format!(
            "chunk key={} steps_per_seed={} first={first} seeds={seeds} steps={steps} faults={faults} commit={} at={at} violations={}\n",
            self.key,
            self.steps_per_seed,
            self.commit,
            serde_json::to_string(&violations).unwrap_or_default()
        );
        if let Err(e) = self.append(&line) {
            eprintln!("simulate: {e}");
            std::process::exit(2);
        }
    }

    /// The process dies on seed `seed`, which spins: recorded with its violation.
    fn spun(&self, seed: u64, violation: &str) -> Result<(), String> {
        self.append(&format!(
            "spun key={} steps_per_seed={} seed={seed} violation={}\n",
            self.key,
            self.steps_per_seed,
            serde_json::to_string(violation).unwrap_or_default()
        ))
    }

    /// One write of a whole line, appended and flushed: a process killed later loses no
    /// chunk it wrote.
    fn append(&self, text: &str) -> Result<(), String> {
        use std::io::Write;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .and_then(|mut f| f.write_all(text.as_bytes()).and_then(|()| f.sync_data()))
            .map_err(|e| format!("cannot write the ledger {}: {e}", self.path.display()))
    }

    /// The ledger's totals over `first..end` (a chunk written twice, by two processes,
    /// counted once).
    fn sum(&self, first: u64, end: u64) -> Result<Sum, String> {
        let mut by_first: std::collections::BTreeMap<u64, ChunkLine> = Default::default();
        for c in self.lines()?.chunks.into_iter().filter(|c| c.first >= first && c.first < end) {
            by_first.entry(c.first).or_insert(c);
        }
        let missing = chunks(first, end).filter(|c| !by_first.contains_key(c)).count();
        let mut sum = Sum { seeds: 0, steps: 0, faults: 0, violations: vec![], missing, about: String::new() };
        let mut commits: Vec<&str> = Vec::new();
        for c in by_first.values() {
            sum.seeds += c.seeds;
            sum.steps += c.steps;
            sum.faults += c.faults;
            sum.violations.extend(c.violations.iter().cloned());
            if !commits.contains(&c.commit.as_str()) {
                commits.push(&c.commit);
            }
        }
        let (from, to) =
            (by_first.values().map(|c| c.at).min().unwrap_or(0), by_first.values().map(|c| c.at).max().unwrap_or(0));
        sum.about = format!(
            "simulate: ledger {}: {}, {} chunks written over {:.1} h (unix {from}..{to}) by commits {commits:?}; {missing} chunks of the range not run",
            self.path.display(),
            self.key,
            by_first.len(),
            to.saturating_sub(from) as f64 / 3600.0
        );
        Ok(sum)
    }
}

/// The first seed of the chunk `seed` is in.
fn chunk_of(seed: u64) -> u64 {
    seed - (seed - 1) % CHUNK
}

/// A chunk's line in the ledger.
struct ChunkLine {
    first: u64,
    seeds: u64,
    steps: u64,
    faults: u64,
    at: u64,
    commit: String,
    violations: Vec<String>,
}

/// A log line's time: the simulated clock's, in seconds from the seed's start (the
/// trace's), not the wall clock's (which stands still while the world runs).
struct VirtualTime;

impl tracing_subscriber::fmt::time::FormatTime for VirtualTime {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        let now = runnervisor::sim::time::current().unwrap_or_default();
        write!(w, "[{:.1}s]", now.as_secs_f64())
    }
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
