//! Manual pages: `runnervisor.toml(5)` from the annotated example configuration (which
//! shows every key with its default, and is parsed by the config tests, so the manual
//! cannot drift from the schema), and the sections `runnervisor(8)` adds to the page clap
//! renders from the CLI definition.

/// The example configuration the package installs next to the manual.
pub const EXAMPLE: &str = include_str!("../config.toml.example");

/// Escapes text for a roff line: backslashes, and a leading `.` or `'` (a request).
fn roff(text: &str) -> String {
    let t = text.replace('\\', "\\e");
    if t.starts_with('.') || t.starts_with('\'') { format!("\\&{t}") } else { t }
}

/// A `key = value` line, commented out (a default or an alternative) or not (an example).
fn key_line(line: &str) -> Option<(&str, &str, bool)> {
    let (commented, rest) = match line.strip_prefix('#') {
        Some(r) => (true, r.trim_start()),
        None => (false, line),
    };
    let (key, value) = rest.split_once(" = ")?;
    let is_key = !key.is_empty() && key.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    is_key.then_some((key, value.trim(), commented))
}

/// `runnervisor.toml(5)`: every table of the example as a section, its comments as
/// paragraphs and its keys as tagged entries (commented-out ones are defaults).
pub fn config_manual(example: &str, version: &str) -> String {
    let mut out = format!(
        ".TH RUNNERVISOR.TOML 5 \"\" \"runnervisor {version}\" \"File Formats Manual\"\n\
         .SH NAME\nrunnervisor.toml \\- configuration of the runnervisor agent\n\
         .SH SYNOPSIS\n/etc/runnervisor/config.toml\n\
         .SH DESCRIPTION\nThe configuration of \\fBrunnervisor\\fR(8), in TOML. Unknown keys and \
         invalid values are errors that name the key and the value; \\fBrunnervisor check\\fR \
         verifies a file against this host and GitHub. Durations are written \"30s\", \"5m\", \
         \"6h\". Secrets are never written in the file itself: \\fB{{ file = \"PATH\" }}\\fR \
         (mode 0600) or \\fB{{ credential = \"NAME\" }}\\fR (a systemd credential).\n\
         .PP\nWhat follows is the example configuration, table by table. A key shown \
         commented out is optional and shows its default (or an alternative).\n"
    );
    let mut prose = false;
    for line in example.lines() {
        let line = line.trim_end();
        if line.is_empty() {
            prose = false;
            continue;
        }
        // A table the example leaves out (`# [fleet]`) is a section of its own too.
        if let Some(header) =
            line.strip_prefix("# ").filter(|h| h.starts_with('[')).or(line.starts_with('[').then_some(line))
        {
            out.push_str(&format!(".SH \"{}\"\n", roff(header).replace('"', "")));
            prose = false;
        } else if let Some((key, value, commented)) = key_line(line) {
            let note = if commented { "optional; default or alternative shown" } else { "as in the example" };
            out.push_str(&format!(".TP\n\\fB{}\\fR = {}\n({note})\n", roff(key), roff(value)));
            prose = false;
        } else {
            let text = line.strip_prefix('#').unwrap_or(line).trim();
            if !prose {
                out.push_str(".PP\n");
                prose = true;
            }
            if let Some(item) = text.strip_prefix("- ") {
                out.push_str(&format!(".br\n\\(bu {}\n", roff(item)));
            } else {
                out.push_str(&roff(text));
                out.push('\n');
            }
        }
    }
    out.push_str(
        ".SH FILES\n/etc/runnervisor/config.toml\n.br\n/etc/runnervisor/config.toml.example\n\
         .SH SEE ALSO\n\\fBrunnervisor\\fR(8)\n",
    );
    out
}

/// What `runnervisor(8)` says beyond the options clap documents.
pub const AGENT_MANUAL_EXTRA: &str = r#".SH FILES
.TP
/etc/runnervisor/config.toml
the configuration (\fBrunnervisor.toml\fR(5))
.TP
/var/lib/runnervisor/state
the agent's store (jobs, VMs, delivery ids)
.TP
/run/runnervisor/admin.sock
the admin socket used by \fBstatus\fR, \fBdrain\fR, \fBundrain\fR and \fBvm destroy\fR
.TP
/usr/share/runnervisor/grafana/runnervisor.json
a Grafana dashboard on the agent's metrics
.SH EXIT STATUS
0 on success; 1 when \fBcheck\fR finds a problem or a command fails; 2 configuration
error; 3 a secret cannot be read; 4 start-up failed (store, listener, libvirt); 5 the
admin socket cannot be reached.
.SH SIGNALS
SIGTERM stops taking webhooks, lets in-flight provisioning finish and exits; running VMs
keep running and are adopted again at the next start.
.SH SEE ALSO
\fBrunnervisor.toml\fR(5), \fBvirsh\fR(1), \fBjournalctl\fR(1)
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_manual_has_every_table_and_key_of_the_example() {
        let man = config_manual(EXAMPLE, "1.2.3");
        assert!(man.starts_with(".TH RUNNERVISOR.TOML 5 \"\" \"runnervisor 1.2.3\""));
        for table in [
            "[server]",
            "[github]",
            "[libvirt]",
            "[admin]",
            "[metrics]",
            "[reconcile]",
            "[capacity]",
            "[fleet]",
            "[[pool]]",
        ] {
            assert!(man.contains(&format!(".SH \"{table}\"\n")), "{table}");
        }
        for key in
            ["state_dir", "listen", "webhook_secret", "network", "max_vms", "warm", "bind_timeout", "lease", "postgres"]
        {
            assert!(man.contains(&format!(".TP\n\\fB{key}\\fR = ")), "{key}");
        }
        // Only the requests this generator writes start a line; text never does.
        let requests = [".TH ", ".SH ", ".PP", ".TP", ".br"];
        for line in man.lines().filter(|l| l.starts_with('.') || l.starts_with('\'')) {
            assert!(requests.iter().any(|r| line.starts_with(r)), "a text line read as a request: {line}");
        }
    }

    #[test]
    fn text_that_looks_like_roff_stays_text() {
        let man = config_manual("# .so /etc/passwd\n# 'x\n# back\\slash\n[t]\nk = \"\\\\n\"\n", "0");
        assert!(man.contains("\\&.so /etc/passwd\n") && man.contains("\\&'x\n"), "{man}");
        assert!(man.contains("back\\eslash") && man.contains("\\fBk\\fR = \"\\e\\en\""), "{man}");
        assert_eq!(key_line("# - { type = \"network\" } (default): x"), None);
        assert_eq!(key_line("# warm = 0"), Some(("warm", "0", true)));
        assert_eq!(key_line("max_vms = 4"), Some(("max_vms", "4", false)));
    }
}
