//! What happened to each VM and its job, as the agent saw it: the milestones the scheduler
//! records (job queued, VM defined, started, bound when warm, runner online, job completed,
//! VM gone), kept in memory for the VMs alive and the last [`KEEP`] finished ones, read
//! over the admin socket (`runnervisor timeline`), and drawn as a table or an SVG picture
//! (both pure). Lost on restart, like the logs' "since start": the journal keeps the rest.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::model::{Reason, VmRec};

/// Finished VMs kept (a ring): enough for a demo or the last hour of a busy host.
pub const KEEP: usize = 500;

/// One VM's life and the job it served. Times are Unix milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trace {
    pub vm: String,
    pub pool: String,
    /// Booted without a credential, then bound to a job.
    pub warm: bool,
    /// Restored from a snapshot slot (its provisioning is the restore).
    #[serde(default)]
    pub restored: bool,
    /// Booted to be saved as a snapshot slot (never a runner).
    #[serde(default)]
    pub slot: bool,
    /// The job its runner took, or the one it was made (or bound) for; none: no job yet.
    #[serde(default)]
    pub job_id: Option<u64>,
    #[serde(default)]
    pub repository: String,
    /// The job's webhook reached the agent.
    #[serde(default)]
    pub queued: Option<u64>,
    /// The VM's record was made (provisioning began).
    #[serde(default)]
    pub created: Option<u64>,
    #[serde(default)]
    pub defined: Option<u64>,
    #[serde(default)]
    pub started: Option<u64>,
    /// Warm: its guest is up and waits for a job.
    #[serde(default)]
    pub ready: Option<u64>,
    /// Warm: the job's credential was handed to the waiting VM.
    #[serde(default)]
    pub bound: Option<u64>,
    /// Its runner was seen online, or taking the job (whichever the agent heard first).
    #[serde(default)]
    pub online: Option<u64>,
    #[serde(default)]
    pub completed: Option<u64>,
    /// Teardown began.
    #[serde(default)]
    pub reaped: Option<u64>,
    #[serde(default)]
    pub gone: Option<u64>,
    /// Why it was torn down (`stopped` after a job, `registration_timeout`, ...).
    #[serde(default)]
    pub reason: Option<String>,
}

impl Trace {
    /// How the VM came to be: `cold` (booted for its job), `warm` (booted before it, bound
    /// to it), `restored` (from a snapshot slot), `slot` (booted to be saved as one).
    pub fn kind(&self) -> &'static str {
        match (self.slot, self.restored, self.warm) {
            (true, _, _) => "slot",
            (_, true, _) => "restored",
            (_, _, true) => "warm",
            _ => "cold",
        }
    }

    fn first(&self) -> Option<u64> {
        [self.queued, self.created, self.defined, self.started].into_iter().flatten().min()
    }
    fn last(&self) -> Option<u64> {
        [
            self.gone,
            self.reaped,
            self.completed,
            self.online,
            self.bound,
            self.ready,
            self.started,
            self.defined,
            self.created,
            self.queued,
        ]
        .into_iter()
        .flatten()
        .max()
    }
}

pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A milestone the scheduler reports for a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    Ready,
    Bound,
    Online,
    Completed,
}

/// The scheduler's record of traces. Every milestone is kept from its first report.
#[derive(Debug, Default)]
pub struct Recorder {
    live: BTreeMap<String, Trace>,
    done: VecDeque<Trace>,
}

impl Recorder {
    /// The trace of `vm`, begun from its record when the recorder has none (a VM re-adopted
    /// after a restart), with the job it serves and when that job was queued, once known.
    fn trace(&mut self, vm: &VmRec, queued: Option<SystemTime>) -> &mut Trace {
        let t = self.live.entry(vm.name.clone()).or_insert_with(|| Trace {
            vm: vm.name.clone(),
            pool: vm.pool.clone(),
            warm: vm.warm && !vm.for_slot,
            restored: vm.slot.is_some(),
            slot: vm.for_slot,
            created: Some(unix_ms(vm.created_at)),
            ..Trace::default()
        });
        let job = vm.took_job.unwrap_or(vm.job_id);
        if job != 0 && t.job_id != Some(job) {
            t.job_id = Some(job);
            t.queued = queued.map(unix_ms);
            t.repository = vm.repository.clone();
        }
        t
    }

    /// A VM record was made (provisioning is about to start).
    pub fn created(&mut self, vm: &VmRec, queued: Option<SystemTime>) {
        self.trace(vm, queued);
    }

    pub fn provisioned(&mut self, vm: &VmRec, queued: Option<SystemTime>, defined: SystemTime, started: SystemTime) {
        let t = self.trace(vm, queued);
        t.defined.get_or_insert(unix_ms(defined));
        t.started.get_or_insert(unix_ms(started));
    }

    pub fn mark(&mut self, vm: &VmRec, queued: Option<SystemTime>, mark: Mark, at: SystemTime) {
        let t = self.trace(vm, queued);
        let slot = match mark {
            Mark::Ready => &mut t.ready,
            Mark::Bound => &mut t.bound,
            Mark::Online => &mut t.online,
            Mark::Completed => &mut t.completed,
        };
        slot.get_or_insert(unix_ms(at));
    }

    /// Teardown began for `reason` (the first reason and time are the ones kept).
    pub fn reaping(&mut self, vm: &VmRec, reason: Reason, at: SystemTime) {
        let t = self.trace(vm, None);
        t.reason.get_or_insert_with(|| reason.as_str().to_string());
        t.reaped.get_or_insert(unix_ms(at));
    }

    /// The VM and everything it used are gone: its trace is finished.
    pub fn gone(&mut self, vm: &VmRec, at: SystemTime) {
        let mut t = self.live.remove(&vm.name).unwrap_or_else(|| {
            let mut r = Recorder::default();
            r.trace(vm, None).clone()
        });
        t.gone = Some(unix_ms(at));
        if self.done.len() == KEEP {
            self.done.pop_front();
        }
        self.done.push_back(t);
    }

    /// Finished and live traces, oldest first.
    pub fn traces(&self) -> Vec<Trace> {
        let mut all: Vec<Trace> = self.done.iter().chain(self.live.values()).cloned().collect();
        all.sort_by_key(|t| (t.first().unwrap_or(u64::MAX), t.vm.clone()));
        all
    }
}

fn secs(from: Option<u64>, to: Option<u64>) -> Option<f64> {
    Some(to?.checked_sub(from?)? as f64 / 1000.0)
}

/// A table: one line per VM with its phases in seconds.
pub fn table(traces: &[Trace]) -> String {
    let mut out = format!(
        "{:<28} {:>12} {:<8} {:>9} {:>9} {:>9} {:>9} {:>9}  {}\n",
        "VM", "JOB", "KIND", "QUEUED→ON", "START", "BOOT", "JOB RAN", "TEARDOWN", "END"
    );
    let f = |v: Option<f64>| v.map(|s| format!("{s:.1}s")).unwrap_or_else(|| "-".into());
    for t in traces {
        let boot_from = if t.warm { t.bound } else { t.started };
        let _ = writeln!(
            out,
            "{:<28} {:>12} {:<8} {:>9} {:>9} {:>9} {:>9} {:>9}  {}",
            t.vm,
            t.job_id.map(|j| j.to_string()).unwrap_or_else(|| "-".into()),
            t.kind(),
            f(secs(t.queued, t.online)),
            // Provisioning: for a restored VM, its restore.
            f(secs(t.created, t.started)),
            f(secs(boot_from, t.online)),
            f(secs(t.online, t.completed)),
            f(secs(t.completed, t.gone)),
            t.reason.as_deref().unwrap_or(if t.gone.is_some() { "" } else { "(running)" }),
        );
    }
    out
}

/// Text for XML character data and attribute values.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if (c as u32) < 0x20 && c != '\t' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// The phases drawn, in order, with their colours and legend.
const PHASES: &[(&str, &str)] = &[
    ("#9e9e9e", "provisioning (credential, overlay, seed, define, start)"),
    ("#ffb74d", "booting (cold: until its runner is online)"),
    ("#a5d6a7", "warm: up, waiting for a job, no credential"),
    ("#fff176", "warm: job's runner starting"),
    ("#42a5f5", "running the job"),
    ("#cfd8dc", "teardown (domain, volumes, runner)"),
];

/// The timeline as an SVG picture: one row per VM (job id, warm or cold), time across,
/// each phase a bar, the job's arrival a mark, its wait for a runner a line above the bar.
/// `now` closes the phases of VMs still alive.
pub fn svg(traces: &[Trace], now: SystemTime) -> String {
    let now = unix_ms(now);
    let start = traces.iter().filter_map(Trace::first).min().unwrap_or(now);
    let end = traces.iter().filter_map(Trace::last).max().unwrap_or(now).max(now.min(start + 1)).max(start + 1);
    let span = (end - start) as f64 / 1000.0;
    let (label_w, plot_w, row_h, top) = (350.0, 720.0, 26.0, 96.0);
    let width = label_w + plot_w + 130.0;
    let height = top + row_h * traces.len() as f64 + 50.0;
    let x = |ms: u64| label_w + (ms.saturating_sub(start) as f64 / 1000.0) / span * plot_w;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let warm = traces.iter().filter(|t| t.warm).count();
    let _ = writeln!(
        s,
        r#"<text x="10" y="20" font-size="15" font-weight="bold">runnervisor: {} VMs ({} warm, {} cold) over {:.0} s</text>"#,
        traces.len(),
        warm,
        traces.len() - warm,
        span
    );
    // Legend.
    for (i, (colour, what)) in PHASES.iter().enumerate() {
        let (lx, ly) = (10.0 + (i % 3) as f64 * 360.0, 36.0 + (i / 3) as f64 * 18.0);
        let _ = writeln!(s, r#"<rect x="{lx}" y="{ly}" width="14" height="10" fill="{colour}"/>"#);
        let _ = writeln!(s, r#"<text x="{}" y="{}">{}</text>"#, lx + 20.0, ly + 9.0, escape(what));
    }
    let _ = writeln!(
        s,
        r##"<path d="M 10 72 l 5 8 l 5 -8 z" fill="#c62828"/><text x="30" y="81">job queued (its webhook reached the agent)</text><line x1="370" y1="76" x2="400" y2="76" stroke="#c62828" stroke-width="2" stroke-dasharray="4 2"/><text x="406" y="81">the job waiting for a runner (seconds)</text>"##
    );
    // Time axis: about eight ticks at a round step.
    let step = [1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0]
        .into_iter()
        .find(|st| span / st <= 10.0)
        .unwrap_or(7200.0);
    let axis_y = top + row_h * traces.len() as f64 + 8.0;
    let mut tick = 0.0;
    while tick <= span + 1e-9 {
        let tx = label_w + tick / span * plot_w;
        let _ = writeln!(
            s,
            r##"<line x1="{tx:.1}" y1="{:.1}" x2="{tx:.1}" y2="{axis_y:.1}" stroke="#eeeeee"/><text x="{tx:.1}" y="{:.1}" text-anchor="middle" fill="#555555">{tick:.0} s</text>"##,
            top - 6.0,
            axis_y + 16.0
        );
        tick += step;
    }
    for (row, t) in traces.iter().enumerate() {
        let y = top + row as f64 * row_h;
        let job = t.job_id.map(|j| format!("job {j}")).unwrap_or_else(|| "no job".into());
        let kind = t.kind();
        let _ = writeln!(
            s,
            r##"<text x="10" y="{:.1}"><tspan font-weight="bold">{}</tspan> {kind} <tspan fill="#777777">{}</tspan></text>"##,
            y + 15.0,
            escape(&job),
            escape(&t.vm)
        );
        let made = t.created.or(t.defined);
        let close = t.gone.unwrap_or(now);
        // Each phase ends where the next began, or where teardown did.
        let end = |next: Option<u64>| next.or(t.reaped).or(t.gone);
        let online = t.online.or(t.completed);
        let bars = if t.warm {
            [
                (made, end(t.started)),
                (t.started, end(t.ready.or(t.bound))),
                (t.ready, end(t.bound)),
                (t.bound, end(online)),
                (t.online, end(t.completed)),
                (t.completed.or(t.reaped), t.gone),
            ]
        } else {
            [
                (made, end(t.started)),
                (t.started, end(online)),
                (None, None),
                (None, None),
                (t.online, end(t.completed)),
                (t.completed.or(t.reaped), t.gone),
            ]
        };
        for (i, (from, to)) in bars.into_iter().enumerate() {
            let Some(from) = from else { continue };
            let to = to.unwrap_or(close).max(from);
            let (x0, x1) = (x(from), x(to));
            let title = format!("{}: {:.1} s", PHASES[i].1, (to - from) as f64 / 1000.0);
            let _ = writeln!(
                s,
                r#"<rect x="{x0:.1}" y="{:.1}" width="{:.1}" height="14" fill="{}"><title>{}</title></rect>"#,
                y + 5.0,
                (x1 - x0).max(1.0),
                PHASES[i].0,
                escape(&title)
            );
        }
        if let Some(q) = t.queued {
            let qx = x(q);
            let _ = writeln!(s, r##"<path d="M {:.1} {:.1} l 5 -7 l -10 0 z" fill="#c62828"/>"##, qx, y + 5.0);
            if let Some(on) = t.online {
                let wait = (on.saturating_sub(q)) as f64 / 1000.0;
                let _ = writeln!(
                    s,
                    r##"<line x1="{qx:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#c62828" stroke-width="2" stroke-dasharray="4 2"><title>queued → runner online: {wait:.1} s</title></line><text x="{:.1}" y="{:.1}" font-size="10" fill="#c62828">{wait:.1} s</text>"##,
                    y + 3.0,
                    x(on),
                    y + 3.0,
                    x(on) + 3.0,
                    y + 3.0
                );
            }
        }
        if let Some(reason) = t.reason.as_deref().filter(|r| *r != "stopped") {
            let _ = writeln!(
                s,
                r##"<text x="{:.1}" y="{:.1}" font-size="10" fill="#b71c1c">{}</text>"##,
                x(close) + 4.0,
                y + 16.0,
                escape(reason)
            );
        }
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::model::VmState;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs)
    }

    fn vm(name: &str, warm: bool, job: u64, created: u64) -> VmRec {
        VmRec { job_id: job, repository: "octo-org/<app>".into(), ..VmRec::new(name.into(), "p", warm, at(created)) }
    }

    /// A cold VM and a warm one through their lives, as the scheduler reports them.
    fn recorded() -> Recorder {
        let mut r = Recorder::default();
        let cold = vm("rv-p-7-1", false, 7, 10);
        r.created(&cold, Some(at(9)));
        r.provisioned(&cold, Some(at(9)), at(11), at(12));
        r.mark(&cold, Some(at(9)), Mark::Online, at(50));
        r.mark(&cold, Some(at(9)), Mark::Online, at(55));
        r.mark(&cold, Some(at(9)), Mark::Completed, at(80));
        r.reaping(&cold, Reason::Stopped, at(82));
        r.reaping(&cold, Reason::Operator, at(83));
        r.gone(&cold, at(83));

        let mut warm = vm("rv-p-w1", true, 0, 0);
        r.created(&warm, None);
        r.provisioned(&warm, None, at(1), at(2));
        r.mark(&warm, None, Mark::Ready, at(30));
        warm.job_id = 8;
        warm.state = VmState::Binding;
        r.mark(&warm, Some(at(60)), Mark::Bound, at(60));
        r.mark(&warm, Some(at(60)), Mark::Online, at(62));
        r
    }

    #[test]
    fn milestones_are_kept_from_their_first_report() {
        let traces = recorded().traces();
        assert_eq!(traces.len(), 2);
        let (warm, cold) = (&traces[0], &traces[1]);
        assert_eq!(warm.vm, "rv-p-w1", "ordered by their first milestone");
        let ms = |s: u64| Some(unix_ms(at(s)));
        assert_eq!(
            (
                cold.job_id,
                cold.queued,
                cold.created,
                cold.defined,
                cold.started,
                cold.online,
                cold.completed,
                cold.gone
            ),
            (Some(7), ms(9), ms(10), ms(11), ms(12), ms(50), ms(80), ms(83))
        );
        assert_eq!((cold.reason.as_deref(), cold.reaped), (Some("stopped"), ms(82)), "the first reason");
        assert_eq!(
            (warm.job_id, warm.ready, warm.queued, warm.bound, warm.online, warm.gone),
            (Some(8), ms(30), ms(60), ms(60), ms(62), None)
        );
        assert!(warm.warm && !cold.warm);
    }

    #[test]
    fn a_runner_that_took_another_job_is_traced_with_that_job() {
        let mut r = Recorder::default();
        let mut v = vm("rv-p-7-1", false, 7, 10);
        r.created(&v, Some(at(9)));
        v.took_job = Some(5);
        r.mark(&v, Some(at(3)), Mark::Online, at(40));
        let t = &r.traces()[0];
        assert_eq!((t.job_id, t.queued), (Some(5), Some(unix_ms(at(3)))));
    }

    #[test]
    fn a_re_adopted_vm_gets_a_trace_and_finished_ones_are_bounded() {
        let mut r = Recorder::default();
        r.gone(&vm("rv-p-1-1", false, 1, 0), at(5));
        assert_eq!(r.traces()[0].created, Some(unix_ms(at(0))));
        for i in 0..KEEP + 10 {
            r.gone(&vm(&format!("rv-p-{i}-1"), false, i as u64, i as u64), at(i as u64 + 1));
        }
        assert_eq!(r.traces().len(), KEEP);
    }

    #[test]
    fn the_table_gives_each_phase_in_seconds() {
        let t = table(&recorded().traces());
        let cold = t.lines().find(|l| l.starts_with("rv-p-7-1")).unwrap();
        for want in ["cold", "41.0s", "38.0s", "30.0s", "3.0s", "stopped"] {
            assert!(cold.contains(want), "{want}: {cold}");
        }
        let warm = t.lines().find(|l| l.starts_with("rv-p-w1")).unwrap();
        assert!(warm.contains("warm") && warm.contains("2.0s") && warm.contains("(running)"), "{warm}");
    }

    #[test]
    fn the_svg_is_well_formed_escaped_and_draws_every_phase() {
        let mut traces = recorded().traces();
        traces[1].vm = "rv-<p>&\"x\"".into();
        traces[1].reason = Some("registration_timeout".into());
        let svg = svg(&traces, at(90));
        let doc = roxmltree::Document::parse(&svg).unwrap_or_else(|e| panic!("{e}\n{svg}"));
        let rects = doc.descendants().filter(|n| n.has_tag_name("rect")).count();
        // Background, 6 legend swatches; cold: provisioning, booting, job, teardown;
        // warm (alive at `now`): provisioning, booting, waiting, runner starting, job.
        assert_eq!(rects, 1 + 6 + 4 + 5, "{svg}");
        let text: String = doc.descendants().filter_map(|n| n.text()).collect();
        for want in ["job 7", "job 8", "warm", "cold", "rv-<p>&\"x\"", "registration_timeout", "41.0 s", "2.0 s"] {
            assert!(text.contains(want), "{want}: {text}");
        }
        assert!(!svg.contains("<p>"), "escaped");
        // Nothing to draw is still a picture.
        assert!(roxmltree::Document::parse(&super::svg(&[], at(0))).is_ok());
    }
}
