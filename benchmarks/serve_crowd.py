"""A crowd at once: N streaming clients start together against `minigpt serve` (default
options: 16 slots, a queue of 64), so most are refused with 429 and `Retry-After: 1`, and each
refused client waits that long and tries again on a fresh connection, as a polite client does.
What is counted is what the server owes every client: a whole stream ending in `[DONE]`, or a
429. Anything else (a reset connection, a server that hung up without answering, a cut
stream) is a lost request. Bounded in clients and time; 127.0.0.1 only.

    python benchmarks/serve_crowd.py --checkpoint RUN [--clients 1000] [--tokens 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import subprocess
import sys
import threading
import time

from serve_load import free_port, wait_healthy  # beside this script, so on sys.path


def client(port: int, tokens: int, deadline: float, out: collections.Counter,
           lock: threading.Lock, start: threading.Barrier) -> None:
    start.wait()
    body = json.dumps({"prompt": "KING:", "max_tokens": tokens, "stream": True,
                       "temperature": 0})
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            conn.request("POST", "/v1/completions", body=body,
                         headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            if r.status == 429:
                r.read()
                conn.close()
                with lock:
                    out["429 (retried)"] += 1
                time.sleep(float(r.getheader("Retry-After", "1")))
                continue
            data = r.read()
            conn.close()
            ok = r.status == 200 and data.rstrip().endswith(b"data: [DONE]")
            with lock:
                out["complete" if ok else f"bad answer {r.status}"] += 1
            return
        except (OSError, http.client.HTTPException) as e:
            with lock:
                out[f"lost: {type(e).__name__}"] += 1
            return
    with lock:
        out["gave up (time)"] += 1


def crowd(port: int, clients: int, tokens: int, limit: float) -> tuple[dict, float]:
    out: collections.Counter = collections.Counter()
    lock, start = threading.Lock(), threading.Barrier(clients)
    deadline = time.monotonic() + limit
    threads = [threading.Thread(target=client, args=(port, tokens, deadline, out, lock, start))
               for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return dict(out), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--limit", type=float, default=300.0, help="seconds a round may take")
    args = ap.parse_args()
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "minigpt_cli", "serve", "--checkpoint",
                               args.checkpoint, "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(port)
        for i in range(args.rounds):
            counts, seconds = crowd(port, args.clients, args.tokens, args.limit)
            lost = sum(v for k, v in counts.items() if not k.startswith(("complete", "429")))
            print(f"round {i + 1}: {args.clients} clients in {seconds:.1f} s, lost {lost}: "
                  f"{counts}", flush=True)
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
