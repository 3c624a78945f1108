#!/usr/bin/env python3
"""A stand-in for GitHub's actions/runner, for runnervisor's test image.

It has the real runner's command-line surface:

    config.sh --url URL --token TOKEN [--name NAME] [--labels a,b] [--ephemeral]
              --unattended [--no-default-labels] [--disableupdate]
              [--runnergroup GROUP] [--work DIR] [--replace]
    run.sh
    run.sh --jitconfig ENCODED

and talks to github-sim the way the real runner talks to GitHub: the registration
token is exchanged at `<api>/actions/runner-registration` (`Authorization: RemoteAuth`),
the runner registers, writes `.runner` and `.credentials`, then long-polls for one job
its labels satisfy, runs it, reports the result and (ephemeral) exits 0.
Like the real runner it refuses to run as root unless RUNNER_ALLOW_RUNASROOT is set.
Only the Python standard library is used.
"""

import base64
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

RUNNER_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER_FILE = os.path.join(RUNNER_DIR, ".runner")
CREDENTIALS_FILE = os.path.join(RUNNER_DIR, ".credentials")
VERSION = "2.330.0"

CONFIG_FLAGS_WITH_VALUE = {"url", "token", "name", "labels", "runnergroup", "work", "pat"}
CONFIG_SWITCHES = {"ephemeral", "unattended", "no-default-labels", "disableupdate", "replace"}


def say(msg):
    print(msg, flush=True)


def fail(msg, code=1):
    print(msg, file=sys.stderr, flush=True)
    sys.exit(code)


def now():
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime())


def parse_args(argv, with_value, switches):
    opts = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            fail("Unrecognized command-line input arguments: '%s'" % arg)
        key = arg[2:]
        if key in switches:
            opts[key] = True
            i += 1
        elif key in with_value:
            if i + 1 >= len(argv):
                fail("Missing value for argument '%s'" % arg)
            opts[key] = argv[i + 1]
            i += 2
        else:
            fail("Unrecognized command-line input arguments: '%s'" % key)
    # As the real runner: ACTIONS_RUNNER_INPUT_<ARG> gives an argument's value (a secret
    # then stays off the command line), and is removed from the environment once read.
    for key in with_value:
        env = "ACTIONS_RUNNER_INPUT_" + key.upper()
        value = os.environ.pop(env, "").strip()
        if value and key not in opts:
            opts[key] = value
    return opts


def http(method, url, body=None, headers=None, timeout=60):
    """Returns (status, parsed JSON or None). Network errors raise OSError."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("User-Agent", "GitHubActionsRunner-fake/" + VERSION)
    req.add_header("Accept", "application/json")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            return resp.status, (json.loads(raw) if raw else None)
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = None
        return e.code, parsed


def api_base(url):
    """github.com -> api.github.com; GHES (and the simulator) -> <host>/api/v3."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        fail("Invalid configuration provided for url. Terminating unattended configuration.")
    if parts.hostname in ("github.com", "www.github.com"):
        return "https://api.github.com"
    return "%s://%s/api/v3" % (parts.scheme, parts.netloc)


def write_private(path, obj):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f)


def refuse_root():
    if os.geteuid() == 0 and not os.environ.get("RUNNER_ALLOW_RUNASROOT"):
        fail("Must not run with sudo")


def cmd_config(argv):
    refuse_root()
    opts = parse_args(argv, CONFIG_FLAGS_WITH_VALUE, CONFIG_SWITCHES)
    if not opts.get("unattended"):
        fail("Interactive configuration is not supported by this test runner: pass --unattended")
    for required in ("url", "token"):
        if not opts.get(required):
            fail("Invalid configuration provided for %s. Terminating unattended configuration." % required)
    if os.path.exists(RUNNER_FILE) and not opts.get("replace"):
        fail("Cannot configure the runner because it is already configured.")
    name = opts.get("name") or os.uname().nodename
    labels = [l.strip() for l in opts.get("labels", "").split(",") if l.strip()]
    if not opts.get("no-default-labels"):
        labels = ["self-hosted", "Linux", "X64"] + labels
    say("--------------------------------------------------------------------------------")
    say("|        ____ _ _   _   _       _          _        _   _                      |")
    say("|  Self-hosted runner registration (runnervisor test image, fake %s)    |" % VERSION)
    say("--------------------------------------------------------------------------------")
    api = api_base(opts["url"])
    reg_url = api + "/actions/runner-registration"
    status, body = http("POST", reg_url, {"url": opts["url"], "runner_event": "register"},
                        {"Authorization": "RemoteAuth " + opts["token"]})
    if status != 200 or not body:
        fail("Http response code: %s from 'POST %s'" % (status, reg_url))
    tenant, session = body["url"], body["token"]
    say("√ Connected to GitHub")
    status, reg = http("POST", tenant.rstrip("/") + "/register", {
        "name": name,
        "labels": labels,
        "ephemeral": bool(opts.get("ephemeral")),
        "runner_group": opts.get("runnergroup"),
        "replace": bool(opts.get("replace")),
        "disable_update": bool(opts.get("disableupdate")),
        "work_folder": opts.get("work", "_work"),
    }, {"Authorization": "Bearer " + session})
    if status == 409:
        fail("A runner exists with the same name %s." % name)
    if status != 201 or not reg:
        message = (reg or {}).get("message", "")
        fail("Http response code: %s from 'POST %s/register' %s" % (status, tenant, message))
    write_private(RUNNER_FILE, {
        "agentId": reg["id"], "agentName": name, "poolId": reg.get("runner_group_id", 1),
        "serverUrl": reg["server_url"], "gitHubUrl": opts["url"],
        "workFolder": opts.get("work", "_work"), "ephemeral": bool(opts.get("ephemeral")),
        "disableUpdate": bool(opts.get("disableupdate")),
    })
    write_private(CREDENTIALS_FILE, {"scheme": "OAuth", "data": {"token": reg["credential"]}})
    say("√ Runner successfully added")
    say("√ Runner connection is good")
    say("√ Settings Saved.")


def load_jitconfig(encoded):
    try:
        files = json.loads(base64.b64decode(encoded, validate=True))
        for fname in (".runner", ".credentials"):
            json.loads(base64.b64decode(files[fname]))
    except Exception:
        fail("Failed to decode the JIT configuration: it is not a valid encoded runner config.")
    for fname, content in files.items():
        if "/" in fname or not fname.startswith("."):
            fail("Failed to decode the JIT configuration: bad file name.")
        fd = os.open(os.path.join(RUNNER_DIR, fname), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(base64.b64decode(content))


def cmd_run(argv):
    refuse_root()
    opts = parse_args(argv, {"jitconfig"}, {"once"})
    if "jitconfig" in opts:
        load_jitconfig(opts["jitconfig"])
    try:
        with open(RUNNER_FILE) as f:
            runner = json.load(f)
        with open(CREDENTIALS_FILE) as f:
            token = json.load(f)["data"]["token"]
    except (OSError, ValueError, KeyError):
        fail("Not configured. Run config.(sh/cmd) to configure the runner.")
    server = runner["serverUrl"].rstrip("/")
    auth = {"Authorization": "Bearer " + token}
    say("√ Connected to GitHub")
    say("")
    say("Current runner version: '%s'" % VERSION)
    say("%s: Listening for Jobs" % now())
    backoff = 1
    while True:
        try:
            status, job = http("GET", server + "/jobs/next?wait=20", headers=auth, timeout=45)
        except OSError as e:
            say("%s: Runner connect error: %s. Retrying until reconnected." % (now(), e))
            time.sleep(backoff)
            backoff = min(backoff * 2, 15)
            continue
        backoff = 1
        if status == 204:
            continue
        if status == 401:
            fail("%s: Runner registration has been deleted from the server, please re-configure. "
                 "Runner listener exit with terminated error, stop the service, no retry needed." % now())
        if status != 200 or not job:
            say("%s: Unexpected response %s while polling for jobs; retrying." % (now(), status))
            time.sleep(2)
            continue
        conclusion = run_job(server, auth, job)
        if not runner.get("ephemeral", False) and not job.get("runner_hangs_after"):
            say("%s: Listening for Jobs" % now())
            continue
        if job.get("runner_hangs_after"):
            say("%s: runner hangs after its job (test mode)" % now())
            while True:
                time.sleep(3600)
        say("%s: Runner is ephemeral: exiting after one job (%s)." % (now(), conclusion))
        return 0


def run_job(server, auth, job):
    say("%s: Running job: %s" % (now(), job.get("name", job["id"])))
    conclusion = "success"
    cancelled = False
    if job.get("script"):
        rc = subprocess.call(["/bin/sh", "-c", job["script"]])
        conclusion = "success" if rc == 0 else "failure"
    else:
        deadline = time.monotonic() + float(job.get("duration_secs", 0))
        last_beat = 0.0
        while time.monotonic() < deadline:
            if time.monotonic() - last_beat >= 5:
                last_beat = time.monotonic()
                try:
                    status, _ = http("POST", "%s/jobs/%s/heartbeat" % (server, job["id"]), {}, auth)
                    if status == 410:
                        cancelled = True
                        break
                except OSError:
                    pass
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        if job.get("conclusion"):
            conclusion = job["conclusion"]
    if cancelled:
        conclusion = "cancelled"
    else:
        for attempt in range(30):
            try:
                status, _ = http("POST", "%s/jobs/%s/complete" % (server, job["id"]),
                                 {"conclusion": conclusion}, auth)
                if status in (200, 204, 410):
                    break
            except OSError:
                pass
            time.sleep(min(2 ** attempt, 10))
    label = {"success": "Succeeded", "failure": "Failed", "cancelled": "Canceled"}.get(conclusion, conclusion)
    say("%s: Job %s completed with result: %s" % (now(), job.get("name", job["id"]), label))
    return conclusion


def main():
    if len(sys.argv) < 2 or sys.argv[1] not in ("config", "run"):
        fail("usage: fake_runner.py config|run [args]")
    if sys.argv[1] == "config":
        cmd_config(sys.argv[2:])
    else:
        sys.exit(cmd_run(sys.argv[2:]) or 0)


if __name__ == "__main__":
    main()
