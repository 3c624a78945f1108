//! cloud-init NoCloud user-data and meta-data for one runner VM. Pure and serialized:
//! the documents are JSON (a subset of YAML that cloud-init reads), so no value is ever
//! spliced into YAML text, and `runcmd` entries are argument lists, never shell strings.
//!
//! What the guest does is exactly what works with GitHub's real `actions/runner`:
//! - JIT: `runuser -u USER -- DIR/run.sh --jitconfig ENCODED`
//! - token: `DIR/config.sh --unattended --url .. --token .. --name .. --labels a,b
//!   --no-default-labels --ephemeral [--disableupdate] [--runnergroup G] --work _work`,
//!   then `DIR/run.sh`, both as USER.
//! - then the guest powers off (`power_state`), which the host sees as the domain stopping.
//!
//! A warm VM's user-data ([`warm_user_data`]) carries no credential and runs nothing: its
//! guest unit (`images/guest/runnervisor-warm`) waits for [`bind_message`], the same
//! command lists in one JSON line, delivered over a virtio-serial port when a job arrives.

use serde_json::{Value, json};

use crate::secret::Secret;

/// The one-job credential a VM carries.
#[derive(Debug, Clone)]
pub enum Credential {
    Jit { encoded: Secret },
    Token { url: String, token: Secret, labels: Vec<String>, runner_group: Option<String>, disable_update: bool },
}

#[derive(Debug, Clone)]
pub struct RunnerSpec<'a> {
    pub vm_name: &'a str,
    pub runner_user: &'a str,
    pub runner_dir: &'a str,
    pub credential: &'a Credential,
}

/// The commands that run the VM's runner, as argument lists (run in order, as root).
fn runcmd(spec: &RunnerSpec<'_>) -> Vec<Value> {
    let dir = spec.runner_dir.trim_end_matches('/');
    let as_runner = |mut args: Vec<Value>| {
        let mut cmd = vec![json!("runuser"), json!("-u"), json!(spec.runner_user), json!("--")];
        cmd.append(&mut args);
        Value::Array(cmd)
    };
    match spec.credential {
        Credential::Jit { encoded } => {
            vec![as_runner(vec![json!(format!("{dir}/run.sh")), json!("--jitconfig"), json!(encoded.expose())])]
        }
        Credential::Token { url, token, labels, runner_group, disable_update } => {
            let mut config = vec![
                json!(format!("{dir}/config.sh")),
                json!("--unattended"),
                json!("--url"),
                json!(url),
                json!("--token"),
                json!(token.expose()),
                json!("--name"),
                json!(spec.vm_name),
                json!("--labels"),
                json!(labels.join(",")),
                json!("--no-default-labels"),
                json!("--ephemeral"),
                json!("--work"),
                json!("_work"),
            ];
            if *disable_update {
                config.push(json!("--disableupdate"));
            }
            if let Some(g) = runner_group {
                config.push(json!("--runnergroup"));
                config.push(json!(g));
            }
            vec![as_runner(config), as_runner(vec![json!(format!("{dir}/run.sh"))])]
        }
    }
}

/// `#cloud-config` user-data of a cold VM: the runner's commands, then power off.
pub fn user_data(spec: &RunnerSpec<'_>) -> String {
    let doc = json!({
        "runcmd": runcmd(spec),
        "power_state": {
            "mode": "poweroff",
            "delay": "now",
            "condition": true,
            "message": "runnervisor: runner finished, powering off",
        },
    });
    format!("#cloud-config\n{}\n", serde_json::to_string_pretty(&doc).expect("json"))
}

/// `#cloud-config` user-data of a warm VM: nothing to run and nothing secret. The guest's
/// `runnervisor-warm` unit waits for [`bind_message`] instead.
pub fn warm_user_data() -> String {
    "#cloud-config\n{}\n".to_string()
}

/// The version of [`bind_message`] the guest unit understands.
pub const BIND_PROTOCOL: u32 = 1;

/// The one line delivered into a warm VM when a job arrives: the same runner commands a
/// cold VM's cloud-init runs, as JSON. The guest answers with [`bind_ack`].
pub fn bind_message(spec: &RunnerSpec<'_>) -> Secret {
    let doc = json!({"runnervisor": BIND_PROTOCOL, "vm": spec.vm_name, "runcmd": runcmd(spec)});
    Secret::new(format!("{}\n", serde_json::to_string(&doc).expect("json")))
}

/// The guest's acknowledgement of [`bind_message`] for `vm_name`.
pub fn bind_ack(vm_name: &str) -> String {
    format!("ACK {vm_name}\n")
}

/// meta-data: the instance id and hostname are the VM name.
pub fn meta_data(vm_name: &str) -> String {
    format!("{}\n", json!({"instance-id": vm_name, "local-hostname": vm_name}))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(user_data: &str) -> Value {
        let body = user_data.strip_prefix("#cloud-config\n").expect("header");
        serde_json::from_str(body).unwrap()
    }

    #[test]
    fn jit_user_data_runs_the_runner_as_the_user_then_powers_off() {
        let cred = Credential::Jit { encoded: Secret::new("ZW5jb2RlZA==") };
        let ud = user_data(&RunnerSpec {
            vm_name: "rv-p-1",
            runner_user: "runner",
            runner_dir: "/opt/actions-runner/",
            credential: &cred,
        });
        let v = parse(&ud);
        assert_eq!(
            v["runcmd"],
            json!([["runuser", "-u", "runner", "--", "/opt/actions-runner/run.sh", "--jitconfig", "ZW5jb2RlZA=="]])
        );
        assert_eq!(v["power_state"]["mode"], "poweroff");
        assert_eq!(v["power_state"]["condition"], true);
    }

    #[test]
    fn token_user_data_configures_ephemeral_with_exact_labels() {
        let cred = Credential::Token {
            url: "https://github.com/octo-org".into(),
            token: Secret::new("AABBCC"),
            labels: vec!["self-hosted".into(), "linux".into()],
            runner_group: Some("ci vms".into()),
            disable_update: true,
        };
        let v = parse(&user_data(&RunnerSpec {
            vm_name: "rv-p-2",
            runner_user: "runner",
            runner_dir: "/opt/actions-runner",
            credential: &cred,
        }));
        let config: Vec<&str> = v["runcmd"][0].as_array().unwrap().iter().map(|x| x.as_str().unwrap()).collect();
        assert_eq!(&config[..5], ["runuser", "-u", "runner", "--", "/opt/actions-runner/config.sh"]);
        let after = |flag: &str| config[config.iter().position(|a| *a == flag).unwrap() + 1];
        assert_eq!(after("--url"), "https://github.com/octo-org");
        assert_eq!(after("--token"), "AABBCC");
        assert_eq!(after("--name"), "rv-p-2");
        assert_eq!(after("--labels"), "self-hosted,linux");
        assert_eq!(after("--runnergroup"), "ci vms");
        for flag in ["--unattended", "--ephemeral", "--no-default-labels", "--disableupdate"] {
            assert!(config.contains(&flag), "{flag}");
        }
        assert_eq!(v["runcmd"][1], json!(["runuser", "-u", "runner", "--", "/opt/actions-runner/run.sh"]));
    }

    /// Hostile strings stay single, exact arguments: YAML specials, quotes, newlines, markup.
    #[test]
    fn hostile_values_are_serialized_not_spliced() {
        let nasty = "x'\"<&>: - {a: b} # c\n- [evil]\u{0}\\ $(reboot) `id` yes null ~";
        let cred = Credential::Token {
            url: nasty.into(),
            token: Secret::new(nasty),
            labels: vec![nasty.into()],
            runner_group: Some(nasty.into()),
            disable_update: false,
        };
        let ud =
            user_data(&RunnerSpec { vm_name: nasty, runner_user: "runner", runner_dir: "/opt/r", credential: &cred });
        assert_eq!(ud.lines().count(), ud.matches('\n').count(), "no raw newline beyond the JSON layout");
        let v = parse(&ud);
        let config = v["runcmd"][0].as_array().unwrap();
        assert_eq!(config.iter().filter(|a| a.as_str() == Some(nasty)).count(), 5);
        let md: Value = serde_json::from_str(&meta_data(nasty)).unwrap();
        assert_eq!(md["instance-id"], nasty);
    }

    #[test]
    fn warm_vms_get_the_cold_commands_later_and_nothing_secret_before() {
        let cred = Credential::Jit { encoded: Secret::new("ZW5jb2RlZA==") };
        let spec = RunnerSpec { vm_name: "rv-p-w7", runner_user: "runner", runner_dir: "/opt/r", credential: &cred };
        let warm = warm_user_data();
        assert!(!warm.contains("ZW5jb2RlZA==") && !warm.contains("runcmd"), "{warm}");
        assert_eq!(parse(&warm), json!({}));
        let msg = bind_message(&spec);
        let line = msg.expose();
        assert!(line.ends_with('\n') && line.matches('\n').count() == 1, "one line: {line}");
        let v: Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["runnervisor"], 1);
        assert_eq!(v["vm"], "rv-p-w7");
        assert_eq!(v["runcmd"], parse(&user_data(&spec))["runcmd"], "the cold path's commands, exactly");
        assert!(!format!("{msg:?}").contains("ZW5jb2RlZA=="), "the message is a secret");
        assert_eq!(bind_ack("rv-p-w7"), "ACK rv-p-w7\n");
    }

    #[test]
    fn meta_data_names_the_instance() {
        let md: Value = serde_json::from_str(&meta_data("rv-small-42")).unwrap();
        assert_eq!(md, json!({"instance-id": "rv-small-42", "local-hostname": "rv-small-42"}));
    }
}
