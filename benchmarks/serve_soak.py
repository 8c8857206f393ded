"""Soak test for `minigpt serve`: 16 clients for 60 s, some hanging up mid-stream, some sending
malformed requests. Passes when no well-formed request fails, no response is a 5xx, and the
server's memory is flat (resident set at the end within 10% + 20 MB of after the warm-up).

Starts its own server on 127.0.0.1 and stops it; bounded in time.

    python benchmarks/serve_soak.py --checkpoint runs/tiny [--seconds 60] [--clients 16]
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from serve_load import free_port, wait_healthy  # beside this script, so on sys.path

BAD = [b"{not json", b'{"prompt": 5}', b'{"prompt": "x", "temperature": -3}',
       b'{"prompt": "x", "max_tokens": "many"}', b'{"messages": []}', b"[]"]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def client(port: int, seed: int, deadline: float, stats: Counter, lock: threading.Lock) -> None:
    rng = random.Random(seed)
    while time.monotonic() < deadline:
        kind = rng.choices(["ok", "stream", "hangup", "bad"], [3, 3, 1, 1])[0]
        try:
            if kind == "hangup":  # start a long stream, read a little, vanish
                s = socket.create_connection(("127.0.0.1", port), timeout=30)
                body = json.dumps({"prompt": "ROMEO:", "max_tokens": 2000, "stream": True})
                s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                          f"application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}"
                          .encode())
                s.recv(2048)
                s.close()
                status = 200
            else:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                if kind == "bad":
                    body = rng.choice(BAD)
                else:
                    body = json.dumps({"prompt": rng.choice(["ROMEO:", "the", "O"]),
                                       "max_tokens": rng.randint(8, 64),
                                       "temperature": rng.choice([0, 0.8]),
                                       "stream": kind == "stream"}).encode()
                conn.request("POST", "/v1/completions", body=body,
                             headers={"Content-Type": "application/json"})
                r = conn.getresponse()
                data = r.read()
                status = r.status
                if kind != "bad" and (status != 200 or (kind == "stream" and
                                                        b"data: [DONE]" not in data)):
                    status = -status or -1
                conn.close()
        except OSError:
            status = -2
        with lock:
            stats[(kind, status)] += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--clients", type=int, default=16)
    args = ap.parse_args()
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "minigpt_cli", "serve", "--checkpoint",
                             args.checkpoint, "--port", str(port), "--max-batch", "16"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(port, 30)
        stats: Counter = Counter()
        lock = threading.Lock()
        warm = time.monotonic() + 5
        threads = [threading.Thread(target=client, args=(port, i, warm, stats, lock))
                   for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rss0 = rss_mb(proc.pid)
        stats.clear()
        t0 = time.monotonic()
        threads = [threading.Thread(target=client, args=(port, 100 + i, t0 + args.seconds,
                                                         stats, lock))
                   for i in range(args.clients)]
        samples = []
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            time.sleep(1)
            samples.append(rss_mb(proc.pid))
        rss1 = rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
    failed = sum(n for (kind, status), n in stats.items() if kind != "bad" and status != 200)
    fivexx = sum(n for (_, status), n in stats.items() if abs(status) >= 500)
    bad_ok = sum(n for (kind, status), n in stats.items() if kind == "bad" and status == 400)
    bad = sum(n for (kind, _), n in stats.items() if kind == "bad")
    print(f"{args.clients} clients, {args.seconds:.0f} s: " +
          ", ".join(f"{k[0]} {k[1]}: {n}" for k, n in sorted(stats.items())))
    print(f"well-formed failures: {failed}; 5xx: {fivexx}; malformed answered 400: "
          f"{bad_ok}/{bad}")
    print(f"server RSS after warm-up {rss0:.0f} MB, end {rss1:.0f} MB, "
          f"max {max(samples, default=rss1):.0f} MB")
    flat = rss1 <= rss0 * 1.1 + 20
    ok = failed == 0 and fivexx == 0 and bad_ok == bad and flat
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
