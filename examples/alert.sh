#!/bin/sh
# alert.sh: pages someone for each message of a mailbox, run by
#   agentbus watch alerts --group pager --exec ./alert.sh
# Exit 0: paged (acked). 75: the pager is down, retry later. 65: not an alert, do
# not retry (dead-lettered at once). Anything else (a crash) is retried too.
set -u
cat >/dev/null   # the message JSON; this handler needs only the AGENTBUS_* fields
if [ -z "${AGENTBUS_SUBJECT:-}" ]; then
  echo "alert $AGENTBUS_SEQ has no subject" >&2
  exit 65
fi
spool=${ALERT_SPOOL:-/var/spool/pager}   # what the pager sends out
if [ ! -d "$spool" ]; then
  echo "pager spool $spool is missing" >&2
  exit 75
fi
printf '%s\n' "$AGENTBUS_SUBJECT" > "$spool/$AGENTBUS_ID.txt" || exit 75
echo "paged (attempt $AGENTBUS_ATTEMPT): $AGENTBUS_SUBJECT"   # to watch's stderr
