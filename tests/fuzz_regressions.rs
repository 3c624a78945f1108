//! Replays every fuzz seed and every input that ever crashed a fuzz target
//! (`fuzz/seeds/TARGET/`, `fuzz/regressions/TARGET/`) through the same harness the AFL
//! targets run (`fuzz/src/harness.rs`), in the ordinary test suite.

#[path = "../fuzz/src/harness.rs"]
mod harness;

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut n = 0;
    for dir in ["seeds", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else { continue };
        for e in entries {
            let path = e.unwrap().path();
            if path.file_name().is_some_and(|f| f == "README") {
                continue;
            }
            let data = std::fs::read(&path).unwrap();
            let r = std::panic::catch_unwind(|| run(&data));
            assert!(r.is_ok(), "{target}: {} panics the harness", path.display());
            n += 1;
        }
    }
    assert!(n > 0, "no seeds for {target}");
}

#[test]
fn webhook_inputs() {
    replay("webhook", harness::webhook);
}

#[test]
fn config_inputs() {
    replay("config", harness::config);
}

#[test]
fn admin_inputs() {
    replay("admin", harness::admin);
}

#[test]
fn github_inputs() {
    replay("github", harness::github);
}

/// The seeds reach the deep end: the signed webhook seeds are persisted, the config
/// seeds are valid, GitHub's seeds parse.
#[test]
fn seeds_are_meaningful() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
    let reply = std::fs::read_to_string(root.join("admin/status-reply")).unwrap();
    let parsed = runnervisor::admin::parse_reply(&reply).unwrap();
    assert!(matches!(parsed, runnervisor::admin::Reply::Status(_)), "the status seed is a status reply");
    let example = std::fs::read_to_string(root.join("config/example.toml")).unwrap();
    assert!(runnervisor::config::Config::parse(&example).is_ok());
    for f in ["0.json", "3.json", "6.json"] {
        let data = std::fs::read(root.join("github").join(f)).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&data[1..]).unwrap();
        let ok = match data[0] {
            0 => runnervisor::github::responses::jit_config(v).is_ok(),
            3 => runnervisor::github::responses::runners(v).is_ok(),
            _ => runnervisor::github::responses::deliveries(v).is_ok(),
        };
        assert!(ok, "github seed {f} does not parse");
    }
}
