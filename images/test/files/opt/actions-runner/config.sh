#!/bin/sh
# Test stand-in for actions/runner's config.sh (same command-line surface).
exec /usr/bin/python3 "$(dirname "$(readlink -f "$0")")/bin/fake_runner.py" config "$@"
