#!/bin/sh
# Runs inside the image once, as root, from the payload disk mounted at $1.
# Every line of output reaches the console prefixed "RVBAKE:"; the last is "RVBAKE: OK".
set -eu
payload=$1
say() { echo "RVBAKE: $*"; }
trap 'say "FAILED at line $LINENO"' EXIT

version=$(sed -n 1p "$payload/runner-version")
released=$(sed -n 2p "$payload/runner-version")

# The runner refuses to run as root: it gets its own user.
if ! id runner >/dev/null 2>&1; then
  useradd --create-home --shell /bin/bash runner
fi
say "user runner: $(id runner)"

rm -rf /opt/actions-runner
mkdir -p /opt/actions-runner
tar -xzf "$payload/runner.tar.gz" -C /opt/actions-runner
chown -R runner:runner /opt/actions-runner
say "runner $version unpacked: $(ls /opt/actions-runner | tr '\n' ' ')"

# Pre-warm and check: the runner's own binary must start in this image (its .NET
# dependencies, e.g. libicu, must be present in the base; bin/installdependencies.sh
# installs them where the image build may use the network).
if [ -x /opt/actions-runner/bin/Runner.Listener ]; then
  out=$(runuser -u runner -- /opt/actions-runner/bin/Runner.Listener --version)
  say "Runner.Listener --version: $out"
  [ "$out" = "$version" ] || { say "version mismatch: expected $version"; exit 1; }
else
  say "no bin/Runner.Listener in the tarball"
  exit 1
fi

# Warm VMs: the unit that waits for a job's runner command on the host's virtio-serial
# port (images/guest). Cold VMs have no such port and skip it.
install -D -m 0755 "$payload/runnervisor-warm" /usr/local/lib/runnervisor/runnervisor-warm
install -D -m 0644 "$payload/runnervisor-warm.service" /etc/systemd/system/runnervisor-warm.service
systemctl enable runnervisor-warm.service >/dev/null 2>&1
command -v python3 >/dev/null || { say "python3 missing (the warm unit and cloud-init need it)"; exit 1; }
say "warm-VM unit installed: $(systemctl is-enabled runnervisor-warm.service)"

printf 'runner_version=%s\nrunner_released=%s\n' "$version" "$released" > /etc/runnervisor-image

# Every job VM must be a first boot: forget this boot's instance, machine id, host keys.
cloud-init clean --logs >/dev/null 2>&1 || rm -rf /var/lib/cloud/instances /var/lib/cloud/instance
: > /etc/machine-id
rm -f /var/lib/dbus/machine-id /etc/ssh/ssh_host_*
sync
trap - EXIT
say "OK"
