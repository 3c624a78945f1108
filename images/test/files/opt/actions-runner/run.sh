#!/bin/sh
# Test stand-in for actions/runner's run.sh (same command-line surface, incl. --jitconfig).
exec /usr/bin/python3 "$(dirname "$(readlink -f "$0")")/bin/fake_runner.py" run "$@"
