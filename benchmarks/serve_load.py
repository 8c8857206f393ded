"""Load generator for an OpenAI-compatible server, from outside the server's process.

Reports what vLLM's serving benchmark reports: request throughput, output tokens/s, time to
first token (TTFT), time per output token after the first (TPOT) and inter-token latency
(ITL), p50 and p99, at each concurrency. Every client streams greedy /v1/completions asking
for a fixed number of tokens; a request that ends early at end-of-text shows in the mean
tokens column. Bounded in requests and time; 127.0.0.1 only.

    python benchmarks/serve_load.py --port 8000 --concurrency 1,2,4,8,16 --tokens 48
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import threading
import time


def free_port() -> int:
    """A port on 127.0.0.1 nobody holds now, for a server the benchmark starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(port: int, seconds: float = 60.0) -> None:
    """Until the server on `port` answers /health with 200 (its model loaded), or `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)


def one_request(port: int, prompt: str, tokens: int, model: str | None) -> dict:
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True}
    if model:
        body["model"] = model
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body=json.dumps(body),
                 headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        return {"error": r.status}
    times = []
    for line in r:
        if line.startswith(b"data: ") and not line.startswith(b"data: [DONE]"):
            chunk = json.loads(line[6:])
            # A chunk that carries text is a token arriving (servers differ in whether they
            # send an empty closing chunk; counting those would flatter them).
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                times.append(time.perf_counter())
    conn.close()
    return {"start": t0, "times": times}


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def numbered(prompt: str, n: int) -> str:
    """Request n's prompt: `prompt` with n in place of "{n}", or after it. A different text
    each time, so no server answers from a cache of whole prompts; with the number last the
    prompts share their beginning, which a server's prefix cache may reuse (llama-server's
    and minigpt's do), and with it first they share nothing."""
    return prompt.replace("{n}", str(n)) if "{n}" in prompt else f"{prompt} {n}"


def run_level(port: int, concurrency: int, requests: int, tokens: int, prompt: str,
              model: str | None) -> dict:
    results: list[dict] = []
    lock = threading.Lock()
    todo = iter(range(requests))

    def client() -> None:
        while True:
            with lock:
                n = next(todo, None)
            if n is None:
                return
            out = one_request(port, numbered(prompt, n), tokens, model)
            with lock:
                results.append(out)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [r for r in results if r.get("times")]
    ttft = [r["times"][0] - r["start"] for r in ok]
    tpot = [(r["times"][-1] - r["times"][0]) / (len(r["times"]) - 1) for r in ok
            if len(r["times"]) > 1]
    itl = [b - a for r in ok for a, b in zip(r["times"], r["times"][1:], strict=False)]
    out_tokens = sum(len(r["times"]) for r in ok)
    return {"concurrency": concurrency, "requests": len(results), "failed": len(results) - len(ok),
            "wall_s": wall, "req_per_s": len(ok) / wall, "output_tok_per_s": out_tokens / wall,
            "mean_tokens": out_tokens / max(1, len(ok)),
            "ttft_p50_ms": 1e3 * pct(ttft, 0.5), "ttft_p99_ms": 1e3 * pct(ttft, 0.99),
            "tpot_p50_ms": 1e3 * pct(tpot, 0.5), "tpot_p99_ms": 1e3 * pct(tpot, 0.99),
            "itl_p50_ms": 1e3 * pct(itl, 0.5), "itl_p99_ms": 1e3 * pct(itl, 0.99)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--concurrency", default="1,2,4,8,16")
    ap.add_argument("--requests-per-client", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--prompt", default="ROMEO:",
                    help='request n sends this with n after it, or in place of "{n}"')
    ap.add_argument("--model", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    one_request(args.port, args.prompt, 4, args.model)  # warm-up
    rows = []
    print(f"{'conc':>4} {'req/s':>7} {'out tok/s':>9} {'tokens':>6} {'TTFT p50':>9} "
          f"{'TTFT p99':>9} {'TPOT p50':>9} {'ITL p50':>8} {'ITL p99':>8} {'fail':>4}")
    for c in (int(x) for x in args.concurrency.split(",")):
        r = run_level(args.port, c, c * args.requests_per_client, args.tokens, args.prompt,
                      args.model)
        rows.append(r)
        print(f"{c:>4} {r['req_per_s']:>7.2f} {r['output_tok_per_s']:>9.1f} "
              f"{r['mean_tokens']:>6.1f} {r['ttft_p50_ms']:>7.1f}ms {r['ttft_p99_ms']:>7.1f}ms "
              f"{r['tpot_p50_ms']:>7.2f}ms {r['itl_p50_ms']:>6.2f}ms {r['itl_p99_ms']:>6.2f}ms "
              f"{r['failed']:>4}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
