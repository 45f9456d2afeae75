"""Alerts: what an operator must hear about without looking (an instance
found corrupt or missing, a file with no good copy anywhere, a task that
failed for good, a store filling up), sent as JSON to `[librarian]
alert_webhook_url`. The body carries `text` (what a Slack-compatible
receiver shows) and the fields `kind`, `librarian` and `detail`. Sending is
best effort, by one thread of the process from a bounded queue, with short
timeouts and the reply's body never read: a receiver that is slow, silent
or answers without end delays only the alerts behind it (beyond QUEUE_SIZE
waiting, new ones are only logged) and never slows or fails the work that
raised them. Every alert is also logged at WARNING.
"""

import json
import logging
import queue
import threading

import requests

log = logging.getLogger("librarian")

TIMEOUT = (5.0, 10.0)  # seconds to connect, and for the reply to begin
QUEUE_SIZE = 1000
_queue = queue.Queue(QUEUE_SIZE)
_sender = None
_sender_lock = threading.Lock()


def send(ctx, kind, text, **detail):
    """Alert `kind` ("corrupt", "no_good_copy", "task_failed",
    "store_full", ...) with the human-readable `text` and the JSON-able
    `detail`; queued for the sending thread. Returns whether it was
    queued (False without a webhook, or with the queue full)."""
    log.warning("alert %s: %s", kind, text)
    url = ctx.settings.librarian["alert_webhook_url"]
    if not url:
        return None
    site = ctx.settings.server["displayed_site_name"]
    body = json.dumps({"text": "[%s] %s" % (site, text), "kind": kind, "librarian": site,
                       "detail": detail}, sort_keys=True, default=str).encode("utf-8")
    _start_sender()
    try:
        _queue.put_nowait((url, body))
    except queue.Full:
        log.warning("%d alerts wait for the webhook %s: this one is only logged", QUEUE_SIZE,
                    url)
        return False
    return True


def _start_sender():
    global _sender
    with _sender_lock:
        if _sender is None or not _sender.is_alive():
            _sender = threading.Thread(target=_send_forever, name="alerts", daemon=True)
            _sender.start()


def _send_forever():
    while True:
        url, body = _queue.get()
        _post(url, body)


def _post(url, body):
    """POST one alert; only the status line is looked at (stream=True: the
    body is never read), and the connection closed."""
    try:
        with requests.post(url, data=body, timeout=TIMEOUT, stream=True,
                           headers={"Content-Type": "application/json"}) as reply:
            reply.raise_for_status()
    except requests.RequestException as e:
        log.warning("the alert webhook %s did not take an alert: %s", url, e)
