#!/bin/sh
# drain.sh MAILBOX GROUP HANDLER: at the start of a session, handle every message
# waiting for GROUP, one at a time: claim it, check its artifacts, run HANDLER with
# the message JSON on stdin, ack it (or give it back for later if HANDLER fails).
# Run as the agent:  AGENTBUS_AGENT=reviewer ./drain.sh main reviewers ./review.sh
set -eu
mailbox=$1 group=$2 handler=$3
while :; do
  msg=$(agentbus recv "$mailbox" --group "$group" --verify)   # an error stops here
  [ -n "$msg" ] || break                                      # nothing left waiting
  seq=$(printf '%s' "$msg" | jq -r .seq)
  claim="$mailbox --group $group $seq --attempt $(printf '%s' "$msg" | jq -r .delivery.attempt)"
  if [ "$(printf '%s' "$msg" | jq -r .verified)" != true ]; then
    agentbus term $claim --reason "$(printf '%s' "$msg" | jq -r .verify_error.message)" >/dev/null
  elif printf '%s\n' "$msg" | "$handler"; then
    agentbus ack "$mailbox" --group "$group" "$seq" >/dev/null
  else
    agentbus nack $claim --delay 300 --reason "$handler failed" >/dev/null
  fi
done
