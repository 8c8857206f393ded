"""The `generate` command's terminal side: validate flags, run the engine, show the result.

Streaming writes each piece of text as soon as it is safe (whole UTF-8 characters, never part
of a stop string). On a terminal the prompt is dim and the continuation bold; piped output is
plain text.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import tiktoken
from rich.console import Console
from rich.markup import escape
from rich.rule import Rule
from rich.text import Text

from minigpt_cli import tokenizer as tok
from minigpt_cli.errors import UserError
from minigpt_cli.inference import constraints, native
from minigpt_cli.inference.engine import lookup
from minigpt_cli.inference.generate import Completion, StepInfo, Timings, beam_search, generate
from minigpt_cli.inference.loading import load_draft, load_for_inference
from minigpt_cli.inference.sampling import SamplerSettings


def _token_repr(enc: tiktoken.Encoding, token: int) -> str:
    """A token as a quoted literal, escaped for rich: model output may contain '[/' etc."""
    return escape(repr(enc.decode_single_token_bytes(token).decode("utf-8", errors="replace")))


def _stats_line(timings: Timings, completions: list[Completion]) -> str:
    n = sum(len(c.tokens) for c in completions)
    reasons = ", ".join(sorted({c.finish_reason for c in completions}))
    return (f"{n} tokens · finish: {reasons} · "
            f"first token {timings.time_to_first_token_s * 1e3:.0f} ms · "
            f"decode {timings.decode_tokens_per_s:,.0f} tok/s ({timings.engine}) · "
            f"total {timings.total_s:.2f} s"
            + (f" · {'draft model' if timings.draft_steps else 'prompt lookup'}: "
               f"{timings.accepted}/{timings.drafted} drafts kept, "
               f"{(n - len(completions)) / max(1, timings.steps - 1):.2f} tokens a step"
               if timings.drafted else ""))


def _json_record(c: Completion) -> dict:
    return {"prompt": c.prompt, "text": c.text, "prompt_token_ids": c.prompt_tokens,
            "token_ids": c.tokens, "finish_reason": c.finish_reason}


MAX_ROWS = 4096  # beams or samples decoded as one batch: each holds a KV cache of its own


def _check_options(*, max_new_tokens: int, num_beams: int, num_samples: int,
                   stop: list[str] | None, several: bool, prompt_lookup: int, draft_k: int,
                   draft: str | None) -> None:
    """Every flag's range and every combination that cannot work, before any loading."""
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if not 1 <= num_beams <= MAX_ROWS:
        raise UserError(f"--num-beams must be in [1, {MAX_ROWS}], got {num_beams}")
    lookup.check_options(prompt_lookup, draft_k, draft)
    if not 1 <= num_samples <= MAX_ROWS:
        raise UserError(f"--num-samples must be in [1, {MAX_ROWS}], got {num_samples}")
    if stop and not all(stop):
        raise UserError("--stop must not be empty: an empty string would stop before the "
                        "first token")
    if num_beams > 1 and several:
        raise UserError("--num-beams takes a single prompt: drop --num-samples/--prompts-file/"
                        "--trace")
    if num_beams > 1 and (prompt_lookup or draft):
        raise UserError("--num-beams does not speculate: drop --prompt-lookup/--draft")


def _grammar(json_schema: Path | None, regex: str | None, num_beams: int
             ) -> constraints.Grammar | None:
    """The grammar --json-schema or --regex names, checked before the model loads."""
    if json_schema is not None and regex is not None:
        raise UserError("--json-schema and --regex each set the output's grammar: give one")
    if (json_schema is not None or regex is not None) and num_beams > 1:
        raise UserError("--num-beams does not follow a grammar: drop --json-schema/--regex")
    if regex is not None:
        grammar = constraints.Grammar("regex", regex)
    elif json_schema is not None:
        grammar = constraints.from_file(str(json_schema))
    else:
        return None
    flag = "--regex" if regex is not None else "--json-schema"
    try:
        constraints.constraint(grammar, tok.byte_encoding(), frozenset({256}))
    except UserError as e:
        raise UserError(f"{flag}: {e}") from None
    return grammar


def _encode_prompts(texts: list[str], enc: tiktoken.Encoding, block: int, err: Console
                    ) -> list[list[int]]:
    """Token ids for each prompt; one longer than the context keeps its last `block` tokens."""
    prompts = []
    for text in texts:
        ids = tok.encode(enc, text) or [enc.eot_token]  # empty prompt: start a new document
        if len(ids) > block:
            err.print(f"[yellow]warning:[/] prompt is {len(ids)} tokens, longer than block_size "
                      f"{block}: keeping the last {block}")
            ids = ids[-block:]
        prompts.append(ids)
    return prompts


def run_generate(
    *, prompt: str, checkpoint: str | None, max_new_tokens: int, temperature: float, top_k: int,
    top_p: float, min_p: float, repetition_penalty: float, repeat_last_n: int, seed: int | None,
    num_beams: int, stop: list[str] | None, num_samples: int, prompts_file: Path | None,
    cache: bool, stream: bool, json_out: bool, trace: bool, device: str, dtype: str,
    engine: str = "auto", quantize: str = "none", prompt_lookup: int = 0, draft_k: int = 4,
    draft: str | None = None, json_schema: Path | None = None, regex: str | None = None,
) -> None:
    settings = SamplerSettings(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                               repetition_penalty=repetition_penalty,
                               repeat_last_n=repeat_last_n)
    settings.validate()
    _check_options(max_new_tokens=max_new_tokens, num_beams=num_beams, num_samples=num_samples,
                   stop=stop, several=bool(num_samples > 1 or prompts_file or trace),
                   prompt_lookup=prompt_lookup, draft_k=draft_k, draft=draft)
    grammar = _grammar(json_schema, regex, num_beams)
    texts = _read_prompts(prompts_file) if prompts_file else [prompt] * num_samples

    out = Console(highlight=False, soft_wrap=True)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    model, enc, _, path = load_for_inference(checkpoint, device, dtype, quantize)
    drafter = load_draft(draft, model, enc, device, dtype, quantize) if draft else None
    prompts = _encode_prompts(texts, enc, model.config.block_size, err)

    # Check the engine before anything is printed, so a refusal is the only output.
    native.choose_engine(engine, model, cache)
    if drafter is not None:
        native.choose_engine(engine, drafter)
    single = len(prompts) == 1
    live = stream and single and not json_out and not trace and num_beams == 1
    if live:
        _show_prompt(out, texts[0])

    def on_text(row: int, piece: str) -> None:
        out.print(Text(piece, style="bold" if out.is_terminal else ""), end="")

    def on_step(info: StepInfo) -> None:
        cands = " · ".join(f"{_token_repr(enc, t)} {p:.0%}" for t, p in info.candidates)
        who = f"[{info.row}] " if not single else ""
        out.print(f"{who}step {info.step:>4} │ positions {info.positions:>4} │ {cands} "
                  f"→ [bold]{_token_repr(enc, info.chosen)}[/]", markup=True)

    if trace and not json_out:
        out.print(f"[dim]{escape(str(path))} · KV cache {'on' if cache else 'off'} · positions = "
                  "tokens this forward pass computed; candidates are after the sampler's "
                  "filters[/]")
    if num_beams > 1:
        completion, timings = beam_search(model, enc, prompts[0], num_beams, max_new_tokens,
                                          use_cache=cache, engine=engine)
        completions = [completion]
    else:
        completions, timings = generate(
            model, enc, prompts, settings, max_new_tokens, use_cache=cache, seed=seed,
            engine=engine, stops=stop or [], on_text=on_text if live else None,
            on_step=on_step if trace and not json_out else None, prompt_lookup=prompt_lookup,
            draft_k=draft_k, draft=drafter, grammar=grammar)

    if json_out:
        timing = asdict(timings)
        body = ({**_json_record(completions[0]), "timings": timing} if single else
                {"samples": [_json_record(c) for c in completions], "timings": timing})
        sys.stdout.write(json.dumps(body, ensure_ascii=False) + "\n")
        return
    if live:
        out.print()
    else:
        for i, c in enumerate(completions):
            if not single:
                out.print(Rule(f"sample {i + 1}" if prompts_file is None else f"prompt {i + 1}"))
            _show_prompt(out, c.prompt if prompts_file else texts[i])
            out.print(Text(c.text, style="bold" if out.is_terminal else ""))
    err.print(f"[dim]{_stats_line(timings, completions)}[/]")


def _show_prompt(out: Console, text: str) -> None:
    out.print(Text(text, style="dim" if out.is_terminal else ""), end="")


def _read_prompts(path: Path) -> list[str]:
    """One prompt per line, or JSONL objects with a 'prompt' (or 'text') field."""
    if not path.is_file():
        raise UserError(f"--prompts-file {path} not found")
    prompts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                obj = json.loads(line)
                prompts.append(obj["prompt"] if "prompt" in obj else obj["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"--prompts-file {path}:{n}: expected a JSON object with a "
                                "'prompt' field") from None
        else:
            prompts.append(line)
    if not prompts:
        raise UserError(f"--prompts-file {path} holds no prompts")
    return prompts
