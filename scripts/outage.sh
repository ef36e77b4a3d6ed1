#!/bin/sh
# The database outage of docs/reliability.md: tests/test_outage.py with a
# 30 s outage (CONSOLED_OUTAGE_SECONDS), by blackhole and by refusal, printing
# the figures.  Needs PostgreSQL on 127.0.0.1:5432 (tests/databases.py).
set -e
cd "$(dirname "$0")/.."
out=$(mktemp)
CONSOLED_OUTAGE_SECONDS=${CONSOLED_OUTAGE_SECONDS:-30} CONSOLED_OUTAGE_FIGURES=$out \
    .venv/bin/python -m twisted.trial --temp-directory=/tmp/trial-outage-script tests.test_outage >/dev/null
cat "$out"
rm -f "$out"
