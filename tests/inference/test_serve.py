"""`minigpt serve` as a real process: OpenAI's wire format, the load oracles, bad input,
disconnects, slow clients, and a clean stop.

Oracles: with temperature 0 each request's text under concurrent load equals its text alone
and equals `minigpt generate --temperature 0`; with a seed, sampled text is the same alone or
under load. Every bad input gets its status and OpenAI error object, and the server stays up.
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from minigpt_cli import tokenizer as tok
from minigpt_cli.inference.generate import generate
from minigpt_cli.inference.loading import load_for_inference
from minigpt_cli.inference.sampling import SamplerSettings
from tests.inference.serving import ROOT, Server, serving

PROMPTS = ["ROMEO:\n", "JULIET:\nGood", "the king", "NURSE:\nMy lord, sweet", "O", "FRIAR:",
           "Come, gentle night", "love"]


@pytest.fixture(scope="module")
def run_dir(served_run: Path) -> Path:
    return served_run


@pytest.fixture(scope="module")
def server(run_dir: Path):
    with serving(run_dir, "--max-batch", "4", "--max-queue", "32") as s:
        yield s


def _complete(server: Server, prompt: str, max_tokens: int, **extra: object) -> dict:
    status, body = server.post("/v1/completions", {"prompt": prompt, "max_tokens": max_tokens,
                                                   "temperature": 0, **extra})
    assert status == 200, body
    return body


def test_openai_client_completions_streams_and_chat(server: Server, run_dir: Path) -> None:
    client = openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    assert model == "tiny"
    whole = client.completions.create(model=model, prompt="ROMEO:", max_tokens=24,
                                      temperature=0)
    _, enc, _, _ = load_for_inference(str(run_dir), "cpu")
    assert whole.usage.prompt_tokens == len(tok.encode(enc, "ROMEO:"))
    assert whole.usage.completion_tokens == len(tok.encode(enc, whole.choices[0].text)) or \
        whole.usage.completion_tokens <= 24
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    pieces, usage = [], None
    for chunk in client.completions.create(model=model, prompt="ROMEO:", max_tokens=24,
                                           temperature=0, stream=True,
                                           stream_options={"include_usage": True}):
        if chunk.choices:
            pieces.append(chunk.choices[0].text)
        if chunk.usage:
            usage = chunk.usage
    assert "".join(pieces) == whole.choices[0].text and len(pieces) > 3
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens
    messages = [{"role": "system", "content": "A play."}, {"role": "user", "content": "Speak"}]
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=20,
                                          temperature=0)
    deltas = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=model, messages=messages, max_tokens=20, temperature=0, stream=True)]
    assert "".join(deltas) == chat.choices[0].message.content
    assert chat.usage.prompt_tokens == len(tok.encode(enc, "System: A play.\nUser: Speak\n"
                                                           "Assistant:"))


def test_greedy_under_load_equals_alone_and_generate(server: Server, run_dir: Path) -> None:
    sizes = [40, 12, 55, 30, 8, 48, 20, 36]  # 8 requests, 4 slots: some wait, all slide
    alone = [_complete(server, p, n)["choices"][0]["text"]
             for p, n in zip(PROMPTS, sizes, strict=True)]
    with ThreadPoolExecutor(8) as pool:
        loaded = list(pool.map(lambda a: _complete(server, *a)["choices"][0]["text"],
                               zip(PROMPTS, sizes, strict=True)))
    assert loaded == alone
    model, enc, _, _ = load_for_inference(str(run_dir), "cpu")
    for p, n, text in zip(PROMPTS, sizes, alone, strict=True):
        out, _ = generate(model, enc, [tok.encode(enc, p)], SamplerSettings(temperature=0), n)
        assert out[0].text == text
    cli = subprocess.run([sys.executable, "-m", "minigpt_cli", "generate", "--checkpoint",
                          str(run_dir), "--prompt", PROMPTS[0], "--max-new-tokens",
                          str(sizes[0]), "--temperature", "0", "--json"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert json.loads(cli.stdout)["text"] == alone[0]


def test_seeded_sampling_under_load_equals_alone(server: Server) -> None:
    def sample(i: int) -> list[str]:
        body = _complete(server, PROMPTS[i], 30, temperature=1.0, top_p=0.9, seed=1000 + i,
                         n=2)
        return [c["text"] for c in body["choices"]]

    alone = [sample(i) for i in range(6)]
    with ThreadPoolExecutor(6) as pool:
        loaded = list(pool.map(sample, range(6)))
    assert loaded == alone
    assert all(a[0] != a[1] for a in alone)  # the n choices are different samples


def test_logprobs_echo_and_stop(server: Server) -> None:
    body = _complete(server, "ROMEO:", 10, logprobs=3, echo=True)
    choice = body["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"].startswith("ROMEO:")
    assert lp["token_logprobs"][0] is None and len(lp["tokens"]) == 6 + 10
    assert "".join(lp["tokens"]) == choice["text"]
    assert all(len(t) == 3 for t in lp["top_logprobs"][1:])
    for top, chosen in zip(lp["top_logprobs"][6:], lp["token_logprobs"][6:], strict=True):
        assert abs(max(top.values()) - chosen) < 1e-5  # greedy picks the most likely token
    text = _complete(server, "ROMEO:", 40)["choices"][0]["text"]
    stop = text[10:13]
    stopped = _complete(server, "ROMEO:", 40, stop=[stop])["choices"][0]
    assert stopped["text"] == text[:text.find(stop)] and stopped["finish_reason"] == "stop"
    streamed = [c for c in server.stream({"prompt": "ROMEO:", "max_tokens": 40,
                                          "temperature": 0, "stop": stop}) if c != "[DONE]"]
    assert "".join(c["choices"][0]["text"] for c in streamed) == stopped["text"]


BAD = [
    ({"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "top_k": -2}, 400, "top_k"),
    ({"prompt": "x", "min_p": 1.5}, 400, "min_p"),
    ({"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 10 ** 6}, 400, "max_tokens"),
    ({"prompt": "x", "n": 0}, 400, "n"),
    ({"prompt": "x", "logprobs": 50}, 400, "logprobs"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"prompt": "x", "stop": [""]}, 400, "stop"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": [1, 99999]}, 400, "prompt"),
    ({"prompt": "x" * 200}, 400, "prompt"),
    ({"max_tokens": 5}, 400, "prompt"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ({"prompt": "x", "response_format": {"type": "xml"}}, 400, "response_format"),
    ({"prompt": "x", "response_format": {"type": "json_schema"}}, 400,
     "response_format.json_schema.json_schema"),
    ({"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {
        "name": "t", "schema": {"type": "nonsense"}}}}, 400, "response_format"),
    ({"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {
        "name": "t", "schema": {"type": "string", "pattern": "[0-9"}}}}, 400,
     "response_format"),
]

CITY = {"type": "object", "additionalProperties": False, "required": ["city", "rank"],
        "properties": {"city": {"type": "string", "maxLength": 8},
                       "rank": {"type": "integer", "minimum": 1, "maximum": 99}}}


def test_response_format_through_the_openai_client(server: Server) -> None:
    """json_schema on chat (streamed and whole, sampled, n=3) and json_object on completions:
    every choice parses and follows its schema."""
    import jsonschema_rs

    client = openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0)
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY,
                                                   "strict": True}}
    messages = [{"role": "user", "content": "A city?"}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=40,
                                          temperature=1.0, n=3, seed=1, response_format=fmt)
    validator = jsonschema_rs.validator_for(CITY)
    for choice in chat.choices:
        assert choice.finish_reason == "stop"
        assert validator.is_valid(json.loads(choice.message.content)), choice.message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=40, temperature=1.0, seed=1,
        response_format=fmt, stream=True))
    assert streamed == chat.choices[0].message.content  # choice 0 samples with seed + 0
    text = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=40,
                                     temperature=0, extra_body={
                                         "response_format": {"type": "json_object"}})
    assert text.choices[0].text.startswith("{")
    if text.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text.choices[0].text), dict)


@pytest.mark.parametrize(("body", "status", "param"), BAD)
def test_bad_completion_requests(server: Server, body: dict, status: int, param: str) -> None:
    got, err = server.post("/v1/completions", body)
    assert got == status, err
    assert set(err["error"]) == {"message", "type", "param", "code"}
    assert err["error"]["param"] == param and err["error"]["message"]


def test_malformed_bodies_and_routes(server: Server) -> None:
    for raw in (b"{not json", b"", b"[1, 2]", b'"text"'):
        status, _, data = server.request("POST", "/v1/completions", raw=raw)
        assert status == 400 and "error" in json.loads(data), raw
    status, body = server.post("/v1/chat/completions", {"messages": []})
    assert status == 400 and body["error"]["param"] == "messages"
    status, body = server.post("/v1/chat/completions",
                               {"messages": [{"role": "robot", "content": "x"}]})
    assert status == 400 and body["error"]["param"].startswith("messages")
    status, _, data = server.request("POST", "/v1/completions", raw=b"x" * (2 << 20))
    assert status == 413 and json.loads(data)["error"]["code"] == "body_too_large"
    status, _, data = server.request("GET", "/v1/nothing")
    assert status == 404 and json.loads(data)["error"]["type"] == "not_found_error"
    # Unknown fields are ignored, as OpenAI-compatible servers do; the server is still up.
    assert _complete(server, "x", 2, frequency_penalty=0.5, user="me")["choices"]
    assert server.request("GET", "/health")[0] == 200


def test_disconnect_frees_the_slot(server: Server) -> None:
    sock = socket.create_connection(("127.0.0.1", server.port))
    # Greedy from "O" runs thousands of tokens without an end of text (the slow-reader test
    # below reads one such stream whole), so only the disconnect can end this one early.
    body = json.dumps({"prompt": "O", "max_tokens": 4000, "stream": True,
                       "temperature": 0}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                 b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    received = b""
    while b"data: " not in received:
        received += sock.recv(4096)
    sock.close()  # gone after the first token, with thousands still to come
    deadline = time.monotonic() + 5
    while server.metric("minigpt_num_requests_running") != 0:
        assert time.monotonic() < deadline, "the slot of a gone client was never freed"
        time.sleep(0.02)
    cancelled = 'minigpt_request_success_total{finish_reason="cancelled"}'
    while True:  # the counter follows the slot's release by a moment
        try:
            if server.metric(cancelled) >= 1:
                break
        except KeyError:
            pass
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert _complete(server, "x", 3)["choices"][0]["finish_reason"] in ("length", "stop")


def test_slow_reader_does_not_stall_others(server: Server) -> None:
    """A client that opens a long stream and does not read: other requests are served
    meanwhile, and it still gets its whole stream later. (Measured with `ss`: the kernel's
    send buffer grows to hold most of these ~220 KB; a longer stream is read back through the
    4 KB window at about 35 KB/s, which is why this one is short.)"""
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    body = json.dumps({"prompt": "O", "max_tokens": 500, "stream": True, "temperature": 0,
                       "logprobs": 5}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                 b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    try:
        t0 = time.monotonic()
        for p in PROMPTS[:4]:
            assert len(_complete(server, p, 30)["choices"][0]["text"]) > 0
        assert time.monotonic() - t0 < 30
        sock.settimeout(30)
        received = b""
        while b"data: [DONE]" not in received:
            chunk = sock.recv(1 << 16)
            assert chunk, "the slow client's stream was cut"
            received += chunk
        assert received.count(b'"finish_reason": null') == 499
        assert b'"finish_reason": "length"' in received
    finally:
        sock.close()


def test_an_idle_keep_alive_connection_outlives_a_client_pool(server: Server) -> None:
    """A client that keeps its connection for the next request after 5.5 s idle (httpx's pool
    keeps one 5 s) finds it open: the server does not close it under the client's feet."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    for wait in (5.5, 0):
        conn.request("GET", "/health")
        r = conn.getresponse()
        assert r.status == 200 and r.getheader("connection", "").lower() != "close"
        r.read()
        time.sleep(wait)
    conn.close()


def test_metrics_report_latencies_and_batches(server: Server) -> None:
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda p: _complete(server, p, 20), PROMPTS[:4]))
    _, _, data = server.request("GET", "/metrics")
    text = data.decode()
    for name in ("minigpt_time_to_first_token_seconds_count",
                 "minigpt_inter_token_latency_seconds_count",
                 "minigpt_e2e_request_latency_seconds_count", "minigpt_batch_size_count",
                 "minigpt_generation_tokens_total", "minigpt_num_requests_waiting"):
        assert name in text
    assert server.metric("minigpt_generation_tokens_total") >= 80
    assert server.metric("minigpt_inter_token_latency_seconds_count") > 0
    # Four requests at once through four slots: some step decoded more than one of them.
    buckets = {ln.split('le="')[1].split('"')[0]: float(ln.rsplit(" ", 1)[1])
               for ln in text.splitlines() if ln.startswith("minigpt_batch_size_bucket")}
    assert buckets["1.0"] < buckets["+Inf"]


@pytest.mark.needs_c_step
def test_a_repeated_prompt_is_served_from_the_cache(server: Server) -> None:
    """The same prompt twice in a row: the second computes only its last token (the slot
    the first one left holds the rest), /metrics counts the reused tokens, and the text is
    the same."""
    prompt = "ROMEO: what light through yonder window breaks"
    first = _complete(server, prompt, 8)
    before = server.metric("minigpt_prompt_tokens_cached_total")
    second = _complete(server, prompt, 8)
    cached = server.metric("minigpt_prompt_tokens_cached_total") - before
    assert second["choices"][0]["text"] == first["choices"][0]["text"]
    assert cached == first["usage"]["prompt_tokens"] - 1


def test_api_key_and_full_queue(run_dir: Path) -> None:
    with serving(run_dir, "--api-key", "sekrit", "--max-batch", "1", "--max-queue", "1") as s:
        status, body = s.post("/v1/completions", {"prompt": "x"})
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        status, body = s.post("/v1/completions", {"prompt": "x"},
                              headers={"Authorization": "Bearer wrong"})
        assert status == 401
        assert s.request("GET", "/health")[0] == 200  # health and the page need no key
        auth = {"Authorization": "Bearer sekrit"}
        long = {"prompt": "O", "max_tokens": 3000, "temperature": 0}
        answers: list[tuple[int, dict[str, str], bytes]] = []
        lock = threading.Lock()

        def send() -> None:
            got = s.request("POST", "/v1/completions", long, headers=auth)
            with lock:
                answers.append(got)

        # Six at once into one slot and one queue place: two are served, the rest refused.
        threads = [threading.Thread(target=send) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        statuses = sorted(a[0] for a in answers)
        assert statuses.count(200) >= 2 and 429 in statuses, statuses
        for status, headers, data in answers:
            if status == 429:
                assert headers["retry-after"] == "1"
                assert json.loads(data)["error"]["code"] == "queue_full"
        assert s.request("GET", "/health")[0] == 200


def test_sigterm_ends_streams_with_an_error_event(run_dir: Path) -> None:
    with serving(run_dir) as s:
        events = s.stream({"prompt": "ROMEO:", "max_tokens": 4000, "temperature": 0})
        first = next(events)
        assert isinstance(first, dict) and first["choices"][0]["finish_reason"] is None
        s.proc.send_signal(signal.SIGTERM)
        rest = list(events)
        assert rest[-1] == "[DONE]"
        assert any(isinstance(e, dict) and "error" in e for e in rest), rest[-3:]
        # uvicorn re-raises the signal once shut down, so the exit status says "SIGTERM".
        assert s.proc.wait(15) in (0, -signal.SIGTERM)
        log = s.proc.stdout.read()  # type: ignore[union-attr]
        assert "Traceback" not in log and "Application shutdown complete" in log


def test_draft_model_through_generate_and_serve(run_dir: Path) -> None:
    """--draft on both commands: a run drafting for itself keeps greedy text as it is (in the
    server, under load), and the drafts show in --json and /metrics."""
    model, enc, _, _ = load_for_inference(str(run_dir), "cpu")
    sizes = [40, 12, 55, 30, 8, 48]
    plain = [generate(model, enc, [tok.encode(enc, p)], SamplerSettings(temperature=0), n
                      )[0][0].text for p, n in zip(PROMPTS, sizes, strict=False)]
    cli = subprocess.run([sys.executable, "-m", "minigpt_cli", "generate", "--checkpoint",
                          str(run_dir), "--draft", str(run_dir), "--draft-k", "3", "--prompt",
                          PROMPTS[0], "--max-new-tokens", str(sizes[0]), "--temperature", "0",
                          "--json"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    out = json.loads(cli.stdout)
    assert out["text"] == plain[0]
    timings = out["timings"]
    assert timings["draft_steps"] > 0 and timings["accepted"] > 0
    assert timings["acceptance"] == timings["accepted"] / timings["drafted"]
    assert timings["tokens_per_verify_step"] == 1 + timings["accepted"] / timings["verify_steps"]
    with serving(run_dir, "--max-batch", "4", "--draft", str(run_dir), "--draft-k", "3") as s:
        with ThreadPoolExecutor(6) as pool:
            loaded = list(pool.map(lambda a: _complete(s, *a)["choices"][0]["text"],
                                   zip(PROMPTS, sizes, strict=False)))
        assert loaded == plain
        assert s.metric("minigpt_spec_accepted_tokens_total") > 0
        assert s.metric("minigpt_spec_draft_tokens_total") >= s.metric(
            "minigpt_spec_accepted_tokens_total")
