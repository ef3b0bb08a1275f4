"""Test helper: remove an adapter over HTTP while clients keep sending requests."""
from __future__ import annotations

import threading
import time

import httpx


def adapter_in_use(url: str, key: str) -> str:
    """The adapter `key`'s load requests are served with (seqr's default routes a request to one adapter)."""
    r = httpx.post(url + "/v1/completions", json={"prompt": "busy", "max_tokens": 3},
                   headers={"Authorization": f"Bearer {key}"}, timeout=60)
    (name,) = r.json()["seqr"]["routing"]
    return name


def remove_under_load(url: str, key: str, adapter: str, admin_key: str, *, clients: int = 3, warm_s: float = 1.0):
    """Clients of `key` send completions back to back; after warm_s an admin DELETEs `adapter`; they go on for
    warm_s more. Returns (results [(sent, status, body)], t_sent, removed_at, delete response)."""
    results, stop = [], threading.Event()

    def load():
        while not stop.is_set():
            sent = time.monotonic()
            r = httpx.post(url + "/v1/completions", json={"prompt": "busy", "max_tokens": 3},
                           headers={"Authorization": f"Bearer {key}"}, timeout=60)
            results.append((sent, r.status_code, r.json()))

    threads = [threading.Thread(target=load) for _ in range(clients)]
    for t in threads:
        t.start()
    time.sleep(warm_s)
    t_sent = time.monotonic()
    resp = httpx.delete(url + f"/admin/adapters/{adapter}", headers={"Authorization": f"Bearer {admin_key}"},
                        timeout=120)
    removed_at = time.monotonic()
    time.sleep(warm_s)
    stop.set()
    for t in threads:
        t.join()
    return results, t_sent, removed_at, resp
