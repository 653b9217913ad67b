#!/usr/bin/env python3
"""drain.py MAILBOX GROUP: at the start of a session, handle every message waiting
for GROUP, one at a time: claim it, check its artifacts, handle it, ack it (or give
it back for later if handling fails). Only the standard library and the agentbus CLI.
Run as the agent:  AGENTBUS_AGENT=reviewer python3 drain.py main reviewers"""
import json
import subprocess
import sys


def agentbus(*args):
    """Runs one agentbus command; its JSON lines, or the error it printed."""
    run = subprocess.run(["agentbus", *args], capture_output=True, text=True)
    if run.returncode != 0:
        error = json.loads(run.stderr.splitlines()[-1])
        sys.exit(f"agentbus {args[0]}: {error['error']}: {error['message']}")
    return [json.loads(line) for line in run.stdout.splitlines()]


def handle(msg):
    """The work. Here: note what came, and how big its artifacts are."""
    sizes = sum(a["size"] for a in msg["artifacts"])
    with open("handled.log", "a") as log:
        print(msg["seq"], msg["subject"] or msg["type"], sizes, file=log)


mailbox, group = sys.argv[1:3]
while claimed := agentbus("recv", mailbox, "--group", group, "--verify"):
    msg = claimed[0]
    claim = [mailbox, "--group", group, str(msg["seq"]),
             "--attempt", str(msg["delivery"]["attempt"])]
    if not msg["verified"]:
        agentbus("term", *claim, "--reason", msg["verify_error"]["message"])
        continue
    try:
        handle(msg)
    except Exception as e:  # give it back: redelivered in 5 minutes
        agentbus("nack", *claim, "--delay", "300", "--reason", repr(e))
        continue
    agentbus("ack", mailbox, "--group", group, str(msg["seq"]))
