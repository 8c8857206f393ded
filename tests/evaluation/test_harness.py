"""lm-evaluation-harness on a minigpt run: in process (`minigpt eval --tasks`) its numbers are
the log-probabilities a plain forward pass gives, and they equal lm-eval's own
`local-completions` client run against `minigpt serve` on the same run. The tasks are tiny
ones of our own, offline (`dataset_path: json`), on a corpus no one tuned for."""

from __future__ import annotations

import io
import json
import math
import random
from pathlib import Path

import pytest
import torch
from rich.console import Console

from minigpt_cli import tokenizer as tok
from minigpt_cli.convert.hf import export_hf
from minigpt_cli.evaluation.harness import run_harness
from minigpt_cli.model import store
from tests.conftest import WORDS, write_jsonl
from tests.inference.serving import serving


def _task(folder: Path, name: str, kind: str, data: Path, extra: str) -> None:
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: {kind}\n{extra}")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three tasks: which speaker's name follows (multiple choice), a speech's perplexity
    (rolling log-likelihood), and the next word (generation, exact match)."""
    root = tmp_path_factory.mktemp("tasks")
    rng = random.Random(3)
    speakers = ["ROMEO", "JULIET", "NURSE", "FRIAR"]
    mc = [{"context": f"{rng.choice(WORDS).capitalize()},\n\n", "choices": speakers,
           "answer": rng.randrange(4)} for _ in range(12)]
    speeches = [{"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 4)))}
                for _ in range(6)]
    words = [{"q": f"{rng.choice(speakers)}:\n{rng.choice(WORDS)}", "a": rng.choice(WORDS)}
             for _ in range(6)]
    _task(root, "mg_speaker", "multiple_choice", write_jsonl(root / "mc.jsonl", mc),
          'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\n'
          'doc_to_target: "{{answer}}"\nmetric_list:\n  - metric: acc\n')
    _task(root, "mg_speech", "loglikelihood_rolling", write_jsonl(root / "sp.jsonl", speeches),
          'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n'
          '  - metric: word_perplexity\n  - metric: bits_per_byte\n')
    _task(root, "mg_word", "generate_until", write_jsonl(root / "w.jsonl", words),
          'doc_to_text: "{{q}}"\ndoc_to_target: " {{a}}"\n'
          'generation_kwargs:\n  until: [","]\n  max_gen_toks: 8\n  do_sample: false\n'
          'metric_list:\n  - metric: exact_match\n')
    return root


def _harness(run: Path, task_dir: Path, tasks: str, json_path: Path | None = None) -> dict:
    return run_harness(checkpoint=str(run), tasks=tasks, include_path=task_dir, limit=None,
                       num_fewshot=None, batch_size=4, json_path=json_path, device="cpu",
                       dtype="float32", console=Console(file=io.StringIO(), width=200))


def _logprob(model, ids: list[int], n: int) -> float:
    """log p(last n tokens | the rest), one plain forward pass."""
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids[:-1]]))
    lp = torch.log_softmax(logits[0].double(), -1)
    return float(sum(lp[i, ids[i + 1]] for i in range(len(ids) - 1 - n, len(ids) - 1)))


def test_in_process_numbers_are_the_models_log_probabilities(run: Path, task_dir: Path,
                                                             tmp_path: Path) -> None:
    out = tmp_path / "lm_eval.json"
    res = _harness(run, task_dir, "mg_speaker,mg_speech", out)["results"]
    model, meta = store.load_model(run / store.MODEL_FILE)
    enc = tok.load(meta["tokenizer"], run)
    right = 0
    docs = [json.loads(x) for x in (task_dir / "mc.jsonl").read_text().splitlines()]
    for d in docs:  # lm-eval moves the context's trailing space into the continuation
        ctx = tok.encode(enc, d["context"].rstrip())
        scores = [_logprob(model, ctx + tok.encode(enc, d["context"][len(d["context"].rstrip()):]
                                                   + " " + c), len(tok.encode(enc, " " + c)))
                  for c in d["choices"]]
        right += max(range(4), key=scores.__getitem__) == d["answer"]
    assert res["mg_speaker"]["acc,none"] == pytest.approx(right / len(docs))
    texts = [json.loads(x)["text"] for x in (task_dir / "sp.jsonl").read_text().splitlines()]
    total = 0.0
    for t in texts:  # each shorter than the context: one window, after <|endoftext|>
        ids = [enc.eot_token, *tok.encode(enc, t)]
        assert len(ids) <= model.config.block_size + 1
        total += _logprob(model, ids, len(ids) - 1)
    words = sum(len(t.split()) for t in texts)
    assert res["mg_speech"]["word_perplexity,none"] == pytest.approx(math.exp(-total / words),
                                                                     rel=1e-5)
    assert json.loads(out.read_text())["results"]["mg_speaker"]["acc,none"] == \
        res["mg_speaker"]["acc,none"]


def test_in_process_equals_local_completions_against_the_server(run: Path, task_dir: Path,
                                                                 tmp_path: Path) -> None:
    import lm_eval
    from lm_eval.tasks import TaskManager

    ours = _harness(run, task_dir, "mg_speaker,mg_word")
    folder = export_hf(run, tmp_path / "hf")  # the tokenizer lm-eval's client reads
    with serving(run) as server:
        theirs = lm_eval.simple_evaluate(
            model="local-completions",
            model_args={"base_url": f"{server.base}/v1/completions", "model": "run",
                        "tokenizer": str(folder), "tokenizer_backend": "huggingface",
                        "max_length": 32, "tokenized_requests": True, "num_concurrent": 1},
            tasks=["mg_speaker", "mg_word"], bootstrap_iters=0,
            task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        )
    for name, metric in (("mg_speaker", "acc,none"), ("mg_word", "exact_match,none")):
        assert theirs["results"][name][metric] == ours["results"][name][metric]
    # and request by request: each choice's log-likelihood and greediness, each generation
    mine, served = (sorted(r["samples"]["mg_speaker"], key=lambda d: d["doc_id"])
                    for r in (ours, theirs))
    for a, b in zip(mine, served, strict=True):
        for (lp_a, greedy_a), (lp_b, greedy_b) in zip(*(
                [tuple(x[0]) for x in d["resps"]] for d in (a, b)), strict=True):
            assert lp_a == pytest.approx(lp_b, abs=1e-4) and greedy_a == greedy_b
    texts = [[d["resps"][0][0] for d in sorted(r["samples"]["mg_word"],
                                               key=lambda d: d["doc_id"])]
             for r in (ours, theirs)]
    assert texts[0] == texts[1] and any(texts[0])
