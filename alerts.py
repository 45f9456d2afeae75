"""Alerts: what an operator must hear about without looking (an instance
found corrupt or missing, a file with no good copy anywhere, a task that
failed for good, a store filling up), sent as JSON to `[librarian]
alert_webhook_url`. The body carries `text` (what a Slack-compatible
receiver shows) and the fields `kind`, `librarian` and `detail`. Sending is
best effort, in a thread of its own with a short timeout: an unreachable
receiver is logged and never slows or fails the work that raised the
alert. Every alert is also logged at WARNING.
"""

import json
import logging
import threading

import requests

log = logging.getLogger("librarian")

TIMEOUT = 10.0  # seconds for the receiver to answer


def send(ctx, kind, text, **detail):
    """Alert `kind` ("corrupt", "no_good_copy", "task_failed",
    "store_full", ...) with the human-readable `text` and the JSON-able
    `detail`; returns the sending thread (None without a webhook)."""
    log.warning("alert %s: %s", kind, text)
    url = ctx.settings.librarian["alert_webhook_url"]
    if not url:
        return None
    site = ctx.settings.server["displayed_site_name"]
    body = json.dumps({"text": "[%s] %s" % (site, text), "kind": kind, "librarian": site,
                       "detail": detail}, sort_keys=True, default=str).encode("utf-8")
    thread = threading.Thread(target=_post, args=(url, body), name="alert", daemon=True)
    thread.start()
    return thread


def _post(url, body):
    try:
        requests.post(url, data=body, timeout=TIMEOUT,
                      headers={"Content-Type": "application/json"}).raise_for_status()
    except requests.RequestException as e:
        log.warning("the alert webhook %s did not take an alert: %s", url, e)
