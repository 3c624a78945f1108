# A job's script, run as root inside a runnervisor VM (the fake runner runs it through
# sudo, as a job that becomes root would): is the runner's credential anywhere a job can
# read it? Searches every regular file (but /proc, /sys and /dev), every process's
# argument list and environment, and the journal as journalctl exports it (its files may
# hold large fields compressed) for the given markers, and reports to the simulator.
#
# argv[1]: base64 of {"sim": URL, "markers": [HEX of the marker's bytes reversed, ...],
#                     "kept": [paths the runner itself keeps, not searched]}
# The markers are passed reversed so that no argument list (this one's included) holds
# them. Exit status 1 when anything is found.
import base64
import json
import os
import socket
import stat
import subprocess
import sys
import urllib.request

CHUNK = 1 << 20

cfg = json.loads(base64.b64decode(sys.argv[1]))
markers = [bytes.fromhex(m)[::-1] for m in cfg["markers"]]
longest = max(len(m) for m in markers)
kept = set(cfg["kept"])


def holds(path):
    """Whether the file at `path` holds a marker (read in chunks that overlap)."""
    with open(path, "rb") as f:
        tail = b""
        while True:
            chunk = f.read(CHUNK)
            if not chunk:
                return False
            data = tail + chunk
            if any(m in data for m in markers):
                return True
            tail = data[-(longest - 1):]


hits, files = [], 0
for root, dirs, names in os.walk("/"):
    if root == "/":
        dirs[:] = [d for d in dirs if d not in ("proc", "sys", "dev")]
    for name in names:
        path = os.path.join(root, name)
        if path in kept:
            continue
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):
                continue
            files += 1
            if holds(path):
                hits.append(path)
        except OSError:
            continue

processes = 0
for pid in os.listdir("/proc"):
    if not pid.isdigit():
        continue
    processes += 1
    for what in ("cmdline", "environ"):
        try:
            with open("/proc/%s/%s" % (pid, what), "rb") as f:
                data = f.read()
        except OSError:
            continue
        if any(m in data for m in markers):
            hits.append("/proc/%s/%s" % (pid, what))

try:
    journal = subprocess.run(["journalctl", "-o", "export", "--no-pager"], capture_output=True, timeout=120).stdout
    if any(m in journal for m in markers):
        hits.append("journal (journalctl -o export)")
except (OSError, subprocess.SubprocessError):
    hits.append("journal: journalctl failed")

# The VM's own name resolves from its /etc/hosts, not through DNS (sudo looks it up, and
# the lab's DNS has no answer: each sudo would wait for its timeout).
try:
    resolved = socket.gethostbyname(socket.gethostname())
except OSError as e:
    resolved = "error: %s" % e
report = {"role": "credential-search", "vm": socket.gethostname(), "hits": hits, "files": files,
          "processes": processes, "uid": os.getuid(), "resolved": resolved}
print("credential search: %s" % json.dumps(report), flush=True)
req = urllib.request.Request(cfg["sim"] + "/_sim/reports", data=json.dumps(report).encode(),
                             headers={"Content-Type": "application/json"}, method="POST")
urllib.request.urlopen(req, timeout=30).read()
sys.exit(1 if hits else 0)
