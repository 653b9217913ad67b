#!/bin/sh
# alert.sh: pages someone for each message of a mailbox, run by
#   agentbus watch alerts --group pager --exec ./alert.sh
# Exit 0: paged (acked). 75: the pager is down, retry later (after the group's
# backoff). 65: not an alert, do not retry (dead-lettered at once). Any other exit is
# retried with the backoff too, unless the last line on stderr starts with a class
# the group does not retry (`group create --no-retry-on unauthorized`).
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
if [ -e "$spool/REVOKED" ]; then         # the pager withdrew our access
  echo "unauthorized: the pager revoked this sender" >&2
  exit 1
fi
printf '%s\n' "$AGENTBUS_SUBJECT" > "$spool/$AGENTBUS_ID.txt" || exit 75
echo "paged (attempt $AGENTBUS_ATTEMPT): $AGENTBUS_SUBJECT"   # to watch's stderr
