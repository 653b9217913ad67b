#!/bin/sh
# dlq-check.sh MAILBOX: lists what MAILBOX's dead-letter mailbox holds, with the
# reasons, and exits 1 if it holds anything (run it from cron, or after a batch).
set -eu
dead=$(agentbus recv "$1.dlq")
[ -z "$dead" ] && exit 0
printf '%s\n' "$dead" | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    d = m["dead_letter"]
    seq = d["seq"] if d["seq"] is not None else (d["damaged"] or {}).get("first_seq")
    print("dead letter %s: %s seq %s: %s" % (m["seq"], d["mailbox"], seq, d["reason"]))'
exit 1
