//! The production image recipe, run on the Debian test image with a stand-in runner
//! tarball: it must boot the base, install the runner for user `runner`, check it, reset
//! first-boot state, flatten the image and write the manifest the agent reads.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::agent::tempdir;
use common::*;

#[test]
fn production_recipe_bakes_a_runner_image() {
    let img = test_image();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let work = tempdir("bake");
    // A stand-in for actions-runner-linux-x64-2.330.0.tar.gz: the fake runner plus a
    // bin/Runner.Listener that answers --version like the real one.
    let tree = work.join("runner");
    assert!(
        Command::new("cp")
            .arg("-a")
            .arg(root.join("images/test/files/opt/actions-runner"))
            .arg(&tree)
            .status()
            .unwrap()
            .success()
    );
    std::fs::write(tree.join("bin/Runner.Listener"), "#!/bin/sh\n[ \"$1\" = --version ] && echo 2.330.0\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(tree.join("bin/Runner.Listener"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let tarball = work.join("actions-runner-linux-x64-2.330.0.tar.gz");
    assert!(Command::new("tar").arg("-czf").arg(&tarball).arg("-C").arg(&tree).arg(".").status().unwrap().success());

    // The base: the test image without its warm-VM unit, which the recipe must install.
    let base_raw = work.join("base.raw");
    assert!(
        Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(&img.golden)
            .arg(&base_raw)
            .status()
            .unwrap()
            .success()
    );
    for path in [
        "/usr/local/lib/runnervisor/runnervisor-warm",
        "/etc/systemd/system/runnervisor-warm.service",
        "/etc/systemd/system/multi-user.target.wants/runnervisor-warm.service",
    ] {
        let o = Command::new("debugfs").args(["-w", "-R", &format!("rm {path}")]).arg(&base_raw).output().unwrap();
        assert!(o.status.success(), "{o:?}");
    }
    let base = work.join("base.qcow2");
    assert!(
        Command::new("qemu-img").args(["convert", "-O", "qcow2"]).arg(&base_raw).arg(&base).status().unwrap().success()
    );
    let _ = std::fs::remove_file(&base_raw);

    let out = work.join("runner.qcow2");
    let status = Command::new(root.join("images/production/build"))
        .arg("--base")
        .arg(&base)
        .arg("--runner-tarball")
        .arg(&tarball)
        .arg("--out")
        .arg(&out)
        .arg("--runner-released")
        .arg("2026-11-01")
        .arg("--kernel")
        .arg(&img.kernel)
        .arg("--initrd")
        .arg(&img.initrd)
        .args([
            "--domain-type",
            domain_type().as_str(),
            "--disk-gib",
            "3",
            "--memory-mib",
            "512",
            "--timeout-secs",
            "300",
        ])
        .env("RUNNERVISOR_BIN", env!("CARGO_BIN_EXE_runnervisor"))
        .status()
        .unwrap();
    assert!(status.success());

    let manifest = runnervisor::images::read_manifest(&out).expect("manifest");
    assert_eq!(manifest.runner_version, "2.330.0");
    assert_eq!(manifest.runner_released, "2026-11-01");
    assert_eq!(runnervisor::images::bind_protocol_problem(&manifest), None, "{manifest:?}");
    assert_eq!(
        manifest.bind_protocol,
        Some(runnervisor::cloudinit::GUEST_FRESHENS),
        "its guest freshens itself at bind"
    );
    assert!(runnervisor::hypervisor::check_image(&out).is_ok(), "a qcow2 image");
    let info =
        String::from_utf8(Command::new("qemu-img").args(["info", "--output=json"]).arg(&out).output().unwrap().stdout)
            .unwrap();
    assert!(!info.contains("backing-filename"), "flattened: {info}");

    // Look inside without booting: the root filesystem, via debugfs.
    let raw = work.join("root.raw");
    assert!(Command::new("qemu-img").args(["convert", "-O", "raw"]).arg(&out).arg(&raw).status().unwrap().success());
    let cat = |path: &str| {
        let o = Command::new("debugfs").args(["-R", &format!("cat {path}")]).arg(&raw).output().unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    assert!(cat("/etc/runnervisor-image").contains("runner_version=2.330.0"));
    assert!(cat("/opt/actions-runner/bin/Runner.Listener").contains("--version"));
    assert!(cat("/etc/passwd").contains("runner:"));
    assert_eq!(cat("/etc/machine-id").trim(), "", "machine-id reset for first boot");
    // The warm-VM guest unit, installed and enabled (images/guest).
    assert_eq!(
        cat("/usr/local/lib/runnervisor/runnervisor-warm"),
        std::fs::read_to_string(root.join("images/guest/runnervisor-warm")).unwrap()
    );
    assert!(cat("/etc/systemd/system/runnervisor-warm.service").contains("dev.runnervisor.bind.0"));
    let wants = Command::new("debugfs")
        .args(["-R", "stat /etc/systemd/system/multi-user.target.wants/runnervisor-warm.service"])
        .arg(&raw)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&wants.stdout).contains("Type: symlink"), "enabled: {wants:?}");
    let stat = Command::new("debugfs").args(["-R", "stat /opt/actions-runner/run.sh"]).arg(&raw).output().unwrap();
    let stat = String::from_utf8_lossy(&stat.stdout);
    let passwd = cat("/etc/passwd");
    let uid = passwd.lines().find(|l| l.starts_with("runner:")).and_then(|l| l.split(':').nth(2)).unwrap().to_string();
    assert!(
        stat.contains(&format!("User: {uid:>5}"))
            || stat.contains(&format!("User:  {uid}"))
            || stat.contains(&format!("User: {uid}")),
        "owned by runner ({uid}): {stat}"
    );
    let _ = std::fs::remove_file(&raw);
}

/// The guest unit's check of a bind message (`valid` in `images/guest/runnervisor-warm`,
/// run by python3 as the guest runs it): what it takes, and what it ignores before
/// acknowledging anything — including times Python's JSON reader accepts (NaN, Infinity)
/// and entropy the kernel interface cannot take.
#[test]
fn the_guest_unit_takes_well_formed_bind_messages_only() {
    let unit = concat!(env!("CARGO_MANIFEST_DIR"), "/images/guest/runnervisor-warm");
    let check = r#"
import importlib.machinery, importlib.util, json, sys
loader = importlib.machinery.SourceFileLoader("unit", sys.argv[1])
spec = importlib.util.spec_from_loader("unit", loader)
unit = importlib.util.module_from_spec(spec)
loader.exec_module(unit)
base = '"runnervisor": 2, "vm": "rv-p-1", "user": "runner", "dir": "/opt/r", "files": {}, "runcmd": [{"argv": ["/bin/true"]}]'
for line in sys.stdin.read().splitlines():
    extra, want = line.rsplit(" ", 1)
    got = unit.valid(json.loads("{" + base + extra + "}"))
    print("%s %s" % ("ok" if got == (want == "take") else "WRONG", line))
"#;
    let table = [
        (r#""#, "take"),
        (r#", "entropy": "AAAA", "time": 1764720000.123"#, "take"),
        (r#", "time": 1764720000"#, "take"),
        (r#", "entropy": 5"#, "ignore"),
        (r#", "entropy": "not base64!""#, "ignore"),
        (r#", "time": NaN"#, "ignore"),
        (r#", "time": Infinity"#, "ignore"),
        (r#", "time": -1"#, "ignore"),
        (r#", "time": 1e300"#, "ignore"),
        (r#", "time": true"#, "ignore"),
        (r#", "time": "1764720000""#, "ignore"),
    ];
    let mut lines: Vec<String> = table.iter().map(|(extra, want)| format!("{extra} {want}")).collect();
    // More than the kernel interface takes through fcntl.ioctl.
    let big = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, vec![7u8; 1017]);
    lines.push(format!(r#", "entropy": "{big}" ignore"#));
    let mut child = Command::new("python3")
        .args(["-c", check, unit])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(lines.join("\n").as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(text.lines().count(), lines.len(), "{text}");
    assert!(!text.contains("WRONG"), "{text}");
}
