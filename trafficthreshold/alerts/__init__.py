"""Alerts by mail: the rules, one engine, two queues, the mail.

* :mod:`.rules`: pure evaluation, counts + now + state -> new state + mails
  (everything it defines is importable from ``trafficthreshold.alerts``
  itself, as before).
* :mod:`.engine`: :class:`~.engine.AlertEngine`, each tick's sequence, over
  the declared queue interface :class:`~.engine.MailQueue`.
* :mod:`.store`: the host rules' queue, the ``alert_*`` tables of this
  host's SQLite file (:class:`~.store.AlertStore`).
* :mod:`.farm`: the farm rules: the leader lease, their queue in the farm's
  Redis fenced by it (:class:`~.farm.FencedQueue`), :class:`~.farm.FarmAlerts`.
* :mod:`.mail`: templates, message building, sendmail / SMTP, the delivery
  thread (:class:`~.mail.Outbox`).
"""
from trafficthreshold.alerts.rules import *  # noqa: F401,F403
