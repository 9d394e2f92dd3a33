#!/bin/sh
# Install, configure and start a real Postfix for the mail tests.
#
# Local delivery only: Postfix listens on loopback, relays nothing
# (default_transport = error) and delivers mail for the local user
# "ttmail" (ttmail@localhost) into /home/ttmail/Maildir/, one file per
# message, which tests/test_alerts_mail.py reads.
#
# Idempotent: safe to run again on a machine where it already ran; it then
# only re-applies the settings and makes sure the master process runs.
# Needs root and a Debian-like system; there is no systemd here, so Postfix
# is started with "postfix start", not through the service manager.
#
# Usage: sh .ci/postfix.sh        (exit status 0 = a test mail was delivered)
set -eu

MAILUSER=ttmail
MAILDIR=/home/$MAILUSER/Maildir

log() { echo "postfix.sh: $*"; }

if [ "$(id -u)" != 0 ]; then
    log "must run as root (it installs a package and starts a daemon)"
    exit 1
fi

# 1. Package, without any question on the terminal.
if ! dpkg-query -W -f='${Status}' postfix 2>/dev/null | grep -q 'ok installed'; then
    log "installing postfix"
    echo "postfix postfix/main_mailer_type select Local only" | debconf-set-selections
    echo "postfix postfix/mailname string localhost" | debconf-set-selections
    # A fresh machine may have no package lists yet: update once and retry.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q postfix \
        || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postfix; }
fi

# 2. The local user whose Maildir receives the test mails.
if ! id "$MAILUSER" >/dev/null 2>&1; then
    log "creating user $MAILUSER"
    useradd --create-home --shell /usr/sbin/nologin "$MAILUSER"
fi

# 3. Configuration: local delivery only, one file per message.
#    (postconf -e rewrites the value in place, so repeating it is harmless.)
echo localhost > /etc/mailname
postconf -e \
    "myhostname = localhost" \
    "myorigin = localhost" \
    "mydestination = localhost, localhost.localdomain, \$myhostname" \
    "inet_interfaces = loopback-only" \
    "inet_protocols = ipv4" \
    "relayhost =" \
    "default_transport = error:local delivery only" \
    "relay_transport = error:local delivery only" \
    "home_mailbox = Maildir/" \
    "mailbox_command =" \
    "recipient_delimiter = +" \
    "maillog_file = /var/log/postfix.log"
newaliases

# 4. Start the master process (or reload it so it sees the settings).
postfix check
if postfix status >/dev/null 2>&1; then
    log "postfix already running: reloading"
    postfix reload >/dev/null 2>&1
else
    log "starting postfix"
    postfix start
fi

# 5. Self-check: a mail handed to sendmail must land in the Maildir.
token="postfix-sh-check-$$-$(date +%s)"
printf 'From: root@localhost\nTo: %s@localhost\nSubject: %s\n\nself-check\n' \
    "$MAILUSER" "$token" | /usr/sbin/sendmail -oi -f root@localhost -- "$MAILUSER@localhost"
i=0
while [ $i -lt 30 ]; do
    if grep -rlq "$token" "$MAILDIR/new" 2>/dev/null; then
        # Remove the self-check mail so the tests start from a clean box.
        grep -rl "$token" "$MAILDIR/new" | xargs rm -f
        log "ok: local delivery to $MAILDIR works"
        exit 0
    fi
    i=$((i + 1))
    sleep 0.5
done
log "FAILED: the self-check mail did not arrive in $MAILDIR/new within 15 s"
tail -n 20 /var/log/postfix.log 2>/dev/null || true
exit 1
