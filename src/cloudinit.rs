//! What a runner VM is given: cloud-init NoCloud user-data, meta-data and (where the agent
//! fixed its address) network-config at boot, which carry nothing secret, and — once its
//! guest waits on its bind port — the one line that starts its runner ([`bind_message`]).
//! Pure and serialized: the documents are JSON (a subset of YAML that cloud-init reads),
//! so no value is ever spliced into YAML text, and commands are argument lists, never
//! shell strings.
//!
//! No credential ever passes through cloud-init: it keeps copies of its user-data (under
//! `/var/lib/cloud/instances/`) that a job which gains root could read for as long as the
//! VM lives. Every VM, cold or warm, boots with [`user_data`] (nothing to run) and its
//! guest unit (`images/guest/runnervisor-warm`) waits for [`bind_message`], delivered over
//! a virtio-serial port and consumed by reading it. What the guest does with it is exactly
//! what works with GitHub's real `actions/runner`:
//! - JIT: the encoded config is what `run.sh --jitconfig` would unpack (a JSON map of file
//!   names to base64 contents, written into the runner's directory): it is unpacked here
//!   into `files`, which the guest writes there (owner the runner user, mode 0600), then it
//!   runs `runuser -u USER -- DIR/run.sh` — so the config is never in a process's argument
//!   list or environment. The runner keeps those files (`.runner`, `.credentials`,
//!   `.credentials_rsaparams`) for its one job, as it would have written them itself.
//! - token: `DIR/config.sh --unattended --url .. --name .. --labels a,b
//!   --no-default-labels --ephemeral [--disableupdate] [--runnergroup G] --work _work`
//!   with the token in its environment (`ACTIONS_RUNNER_INPUT_TOKEN`, which the runner reads
//!   and removes), then `DIR/run.sh` (without it), both as USER. Not in its arguments: the
//!   journal records the command line of every process that logs (`_CMDLINE`), and PAM
//!   logs `runuser`'s session. `config.sh` has exited before the runner, and any job,
//!   starts.
//! - then the guest powers off, which the host sees as the domain stopping.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};

use crate::hypervisor::network::{Reservation, Subnet};
use crate::secret::Secret;

/// The one-job credential a VM is given.
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
    /// What makes the guest a fresh instance before its runner starts (always given by
    /// the agent; `None` only in tests that show why).
    pub fresh: Option<Fresh<'a>>,
}

/// A VM restored from a saved state resumes with the kernel RNG state and the clock of the
/// save, the same in every VM restored from it: the guest mixes `entropy` into its kernel's
/// pool, reseeds the kernel RNG from it, and sets its wall clock to `now`.
#[derive(Debug, Clone, Copy)]
pub struct Fresh<'a> {
    pub entropy: &'a [u8],
    pub now: std::time::SystemTime,
}

/// How many random bytes every bind message carries for the guest's kernel RNG.
pub const ENTROPY_BYTES: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BindMessageError {
    #[error("the JIT config is not what GitHub's runner unpacks (base64 of a JSON map of file names to base64): {0}")]
    JitConfig(String),
}

/// The files a JIT config unpacks into (name → base64 contents), as `run.sh --jitconfig`
/// writes them into the runner's directory. Names are plain file names: anything with a
/// path separator, `.` or `..` is refused.
fn jit_files(encoded: &str) -> Result<BTreeMap<String, String>, BindMessageError> {
    let bad = |m: String| BindMessageError::JitConfig(m);
    let json = STANDARD.decode(encoded.trim()).map_err(|e| bad(format!("not base64: {e}")))?;
    let files: BTreeMap<String, String> =
        serde_json::from_slice(&json).map_err(|e| bad(format!("not a JSON map of strings: {e}")))?;
    if files.is_empty() {
        return Err(bad("no files in it".into()));
    }
    for (name, content) in &files {
        if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\\', '\0']) {
            return Err(bad(format!("file name {name:?} is not a plain name")));
        }
        STANDARD.decode(content).map_err(|e| bad(format!("{name}: not base64: {e}")))?;
    }
    Ok(files)
}

/// The environment variable `config.sh` takes the registration token from (the runner
/// reads any `ACTIONS_RUNNER_INPUT_<ARG>` and removes it from its environment).
pub const TOKEN_ENV: &str = "ACTIONS_RUNNER_INPUT_TOKEN";

/// The files to write into the runner's directory and the commands to run (as root, in
/// order; they drop to the runner user themselves): `{"argv": [...]}`, with `"env"` for
/// variables that one command alone gets.
fn runner_start(spec: &RunnerSpec<'_>) -> Result<(BTreeMap<String, String>, Vec<Value>), BindMessageError> {
    let dir = spec.runner_dir.trim_end_matches('/');
    let as_runner = |mut args: Vec<Value>| {
        let mut cmd = vec![json!("runuser"), json!("-u"), json!(spec.runner_user), json!("--")];
        cmd.append(&mut args);
        json!({"argv": cmd})
    };
    match spec.credential {
        Credential::Jit { encoded } => {
            Ok((jit_files(encoded.expose())?, vec![as_runner(vec![json!(format!("{dir}/run.sh"))])]))
        }
        Credential::Token { url, token, labels, runner_group, disable_update } => {
            let mut config = vec![
                json!(format!("{dir}/config.sh")),
                json!("--unattended"),
                json!("--url"),
                json!(url),
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
            let mut config = as_runner(config);
            config["env"] = json!({TOKEN_ENV: token.expose()});
            Ok((BTreeMap::new(), vec![config, as_runner(vec![json!(format!("{dir}/run.sh"))])]))
        }
    }
}

/// `#cloud-config` user-data of every VM: nothing to run and nothing secret. The guest's
/// `runnervisor-warm` unit waits for [`bind_message`] instead.
pub fn user_data() -> String {
    "#cloud-config\n{}\n".to_string()
}

/// The version of [`bind_message`] this agent sends. The guest unit also takes version 1
/// (no `files`; the JIT config on `run.sh`'s command line), which older agents send.
pub const BIND_PROTOCOL: u32 = 2;

/// The guest protocol (an image manifest's `bind_protocol`) from which the guest unit
/// applies [`Fresh`] (entropy and clock) before its runner starts. Older units take the
/// same messages and ignore those fields: fine for a VM that booted on its own, not for
/// one restored from a saved state shared with others.
pub const GUEST_FRESHENS: u32 = 3;

/// The one line delivered into a VM whose guest waits on its bind port: the files for the
/// runner's directory, and the commands that start it. The guest answers with
/// [`bind_ack`].
pub fn bind_message(spec: &RunnerSpec<'_>) -> Result<Secret, BindMessageError> {
    let (files, runcmd) = runner_start(spec)?;
    let mut doc = json!({
        "runnervisor": BIND_PROTOCOL,
        "vm": spec.vm_name,
        "user": spec.runner_user,
        "dir": spec.runner_dir.trim_end_matches('/'),
        "files": files,
        "runcmd": runcmd,
    });
    if let Some(fresh) = spec.fresh {
        doc["entropy"] = json!(STANDARD.encode(fresh.entropy));
        // Milliseconds are what a delivery over the bind port takes. A host clock before
        // the epoch is no time to give a guest.
        if let Ok(since_epoch) = fresh.now.duration_since(std::time::UNIX_EPOCH) {
            doc["time"] = json!((since_epoch.as_millis() as f64) / 1000.0);
        }
    }
    Ok(Secret::new(format!("{}\n", serde_json::to_string(&doc).expect("json"))))
}

/// The guest's acknowledgement of [`bind_message`] for `vm_name`.
pub fn bind_ack(vm_name: &str) -> String {
    format!("ACK {vm_name}\n")
}

/// NoCloud network-config (version 2) for a VM whose address the agent fixed: the
/// interface with the reservation's MAC gets its address, the default route and DNS via
/// the network's gateway, and asks no DHCP server (the fence drops DHCP from it).
pub fn network_config(r: &Reservation, subnet: Subnet) -> String {
    let gw = subnet.gateway.to_string();
    let doc = json!({
        "version": 2,
        "ethernets": {
            "rv0": {
                "match": {"macaddress": r.mac},
                "dhcp4": false,
                "dhcp6": false,
                "addresses": [format!("{}/{}", r.ip, subnet.prefix)],
                "routes": [{"to": "0.0.0.0/0", "via": gw}],
                "nameservers": {"addresses": [gw]},
            }
        }
    });
    format!("{doc}\n")
}

/// meta-data: the instance id and hostname are the VM name.
pub fn meta_data(vm_name: &str) -> String {
    format!("{}\n", json!({"instance-id": vm_name, "local-hostname": vm_name}))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_line(msg: &Secret) -> Value {
        let line = msg.expose();
        assert!(line.ends_with('\n') && line.matches('\n').count() == 1, "one line: {line}");
        serde_json::from_str(line).unwrap()
    }

    /// A JIT config as GitHub encodes it: base64 of a JSON map of file names to base64.
    fn encoded_jit(files: &[(&str, &str)]) -> String {
        let map: BTreeMap<&str, String> = files.iter().map(|(n, c)| (*n, STANDARD.encode(c))).collect();
        STANDARD.encode(serde_json::to_string(&map).unwrap())
    }

    fn spec<'a>(name: &'a str, credential: &'a Credential) -> RunnerSpec<'a> {
        RunnerSpec { vm_name: name, runner_user: "runner", runner_dir: "/opt/actions-runner/", credential, fresh: None }
    }

    #[test]
    fn the_bind_message_carries_fresh_entropy_and_the_clock() {
        let cred = Credential::Jit { encoded: Secret::new(encoded_jit(&[(".runner", "{}")])) };
        let bare = parse_line(&bind_message(&spec("rv-p-1", &cred)).unwrap());
        assert!(bare.get("entropy").is_none() && bare.get("time").is_none(), "{bare}");
        let entropy = [7u8; ENTROPY_BYTES];
        let now = std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_764_720_000_123);
        let fresh = Fresh { entropy: &entropy, now };
        let v = parse_line(&bind_message(&RunnerSpec { fresh: Some(fresh), ..spec("rv-p-1", &cred) }).unwrap());
        assert_eq!(STANDARD.decode(v["entropy"].as_str().unwrap()).unwrap(), entropy);
        assert_eq!(v["time"].as_f64().unwrap(), 1_764_720_000.123);
    }

    #[test]
    fn a_fixed_address_is_the_network_config() {
        let r =
            Reservation { vm: "rv-p-1".into(), mac: "52:54:00:33:64:07".into(), ip: "198.51.100.7".parse().unwrap() };
        let subnet = Subnet { gateway: "198.51.100.1".parse().unwrap(), prefix: 24 };
        let doc: Value = serde_json::from_str(&network_config(&r, subnet)).unwrap();
        assert_eq!(doc["version"], 2);
        let eth = &doc["ethernets"]["rv0"];
        assert_eq!(eth["match"]["macaddress"], "52:54:00:33:64:07");
        assert_eq!((&eth["dhcp4"], &eth["dhcp6"]), (&json!(false), &json!(false)), "no DHCP: the fence drops it");
        assert_eq!(eth["addresses"], json!(["198.51.100.7/24"]));
        assert_eq!(eth["routes"], json!([{"to": "0.0.0.0/0", "via": "198.51.100.1"}]));
        assert_eq!(eth["nameservers"]["addresses"], json!(["198.51.100.1"]));
    }

    #[test]
    fn jit_configs_are_unpacked_into_files_and_never_put_on_a_command_line() {
        let encoded = encoded_jit(&[(".runner", "{\"agentId\": 7}"), (".credentials", "{\"token\": \"s3cret\"}")]);
        let cred = Credential::Jit { encoded: Secret::new(encoded.clone()) };
        let msg = bind_message(&spec("rv-p-1", &cred)).unwrap();
        let v = parse_line(&msg);
        assert_eq!(v["runnervisor"], 2);
        assert_eq!(
            (v["vm"].as_str(), v["user"].as_str(), v["dir"].as_str()),
            (Some("rv-p-1"), Some("runner"), Some("/opt/actions-runner"))
        );
        assert_eq!(v["runcmd"], json!([{"argv": ["runuser", "-u", "runner", "--", "/opt/actions-runner/run.sh"]}]));
        let files = v["files"].as_object().unwrap();
        assert_eq!(files.keys().collect::<Vec<_>>(), [".credentials", ".runner"]);
        assert_eq!(STANDARD.decode(files[".credentials"].as_str().unwrap()).unwrap(), b"{\"token\": \"s3cret\"}");
        assert!(!msg.expose().contains(&encoded), "the encoded config itself is in no command");
        assert!(!format!("{msg:?}").contains("s3cret"), "the message is a secret");
        assert_eq!(bind_ack("rv-p-1"), "ACK rv-p-1\n");
    }

    #[test]
    fn malformed_jit_configs_are_refused_naming_what_is_wrong() {
        let table: &[(String, &str)] = &[
            ("not base64!".into(), "not base64"),
            (STANDARD.encode("[1, 2]"), "not a JSON map"),
            (STANDARD.encode("{}"), "no files"),
            (encoded_jit(&[("../../etc/passwd", "x")]), "not a plain name"),
            (encoded_jit(&[("..", "x")]), "not a plain name"),
            (STANDARD.encode(r#"{".runner": "%%%"}"#), ".runner: not base64"),
        ];
        for (encoded, want) in table {
            let cred = Credential::Jit { encoded: Secret::new(encoded.clone()) };
            let e = bind_message(&spec("rv-p-1", &cred)).unwrap_err().to_string();
            assert!(e.contains(want), "{encoded}: {e}");
        }
    }

    #[test]
    fn token_mode_configures_ephemeral_with_exact_labels_then_runs() {
        let cred = Credential::Token {
            url: "https://github.com/octo-org".into(),
            token: Secret::new("AABBCC"),
            labels: vec!["self-hosted".into(), "linux".into()],
            runner_group: Some("ci vms".into()),
            disable_update: true,
        };
        let v = parse_line(&bind_message(&spec("rv-p-2", &cred)).unwrap());
        assert_eq!(v["files"], json!({}));
        let config: Vec<&str> =
            v["runcmd"][0]["argv"].as_array().unwrap().iter().map(|x| x.as_str().unwrap()).collect();
        assert_eq!(&config[..5], ["runuser", "-u", "runner", "--", "/opt/actions-runner/config.sh"]);
        let after = |flag: &str| config[config.iter().position(|a| *a == flag).unwrap() + 1];
        assert_eq!(after("--url"), "https://github.com/octo-org");
        // The token is in config.sh's environment alone, never in an argument list.
        assert_eq!(v["runcmd"][0]["env"], json!({"ACTIONS_RUNNER_INPUT_TOKEN": "AABBCC"}));
        assert!(!config.iter().any(|a| a.contains("AABBCC") || *a == "--token"), "{config:?}");
        assert_eq!(after("--name"), "rv-p-2");
        assert_eq!(after("--labels"), "self-hosted,linux");
        assert_eq!(after("--runnergroup"), "ci vms");
        for flag in ["--unattended", "--ephemeral", "--no-default-labels", "--disableupdate"] {
            assert!(config.contains(&flag), "{flag}");
        }
        assert_eq!(v["runcmd"][1], json!({"argv": ["runuser", "-u", "runner", "--", "/opt/actions-runner/run.sh"]}));
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
        let v = parse_line(
            &bind_message(&RunnerSpec {
                vm_name: nasty,
                runner_user: "runner",
                runner_dir: "/opt/r",
                credential: &cred,
                fresh: None,
            })
            .unwrap(),
        );
        let config = v["runcmd"][0]["argv"].as_array().unwrap();
        assert_eq!(config.iter().filter(|a| a.as_str() == Some(nasty)).count(), 4);
        assert_eq!(v["runcmd"][0]["env"][TOKEN_ENV], nasty);
        let md: Value = serde_json::from_str(&meta_data(nasty)).unwrap();
        assert_eq!(md["instance-id"], nasty);
    }

    #[test]
    fn user_data_carries_nothing_to_run_and_nothing_secret() {
        let ud = user_data();
        let body = ud.strip_prefix("#cloud-config\n").expect("header");
        assert_eq!(serde_json::from_str::<Value>(body).unwrap(), json!({}));
    }

    #[test]
    fn meta_data_names_the_instance() {
        let md: Value = serde_json::from_str(&meta_data("rv-small-42")).unwrap();
        assert_eq!(md, json!({"instance-id": "rv-small-42", "local-hostname": "rv-small-42"}));
    }
}
