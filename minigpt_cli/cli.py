"""The `minigpt` command line: parse flags, call one function per command, nothing more.

User errors (`UserError`) are caught once here and printed as a single line with exit code 2;
a write the machine refused (`SaveError`) is one line too, with exit code 1.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.text import Text

# typer vendors its own click (pinned in constraints.txt); its exceptions live here.
from typer._click import exceptions as click_errors

from minigpt_cli.errors import SaveError, UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="Train small GPT language models on your own text, and run them.",
)
err = Console(stderr=True)
ENGINE_HELP = ("Cached decode steps: auto (the fused C step on CPU float32 when a C compiler "
               "is present, else PyTorch) | native | torch")
QUANTIZE_HELP = ("none | int8 | int4: llama.cpp's Q8_0 (or Q4_0) products: weights rounded in "
                 "groups of 32 input rows, a scale each, inputs to int8 the same way; the C "
                 "step reads 1 byte (or half of one) a weight instead of 4.")
# Every command that reads a run takes it the same way.
Checkpoint = Annotated[str | None, typer.Option(help="Run directory or .safetensors file "
                                                     "(default: newest run under runs/).")]


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="YAML config, e.g. configs/tiny.yaml")],
    resume: Annotated[bool, typer.Option(help="Continue the run in out_dir from its last "
                                               "checkpoint.")] = False,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a key: "
                                                   "--set train.max_steps=500 (repeatable).")
                    ] = None,
) -> None:
    """Teacher-forced training: one pass over all positions per batch, dropout on."""
    from minigpt_cli.config import load_config

    cfg = load_config(config, set_)  # before torch is imported: a bad config fails at once
    from minigpt_cli.training.distributed import PeerLost
    from minigpt_cli.training.loop import Interrupted
    from minigpt_cli.training.loop import train as run_train

    objective = None
    if cfg.train.objective == "grpo":
        from minigpt_cli.rl.grpo import GRPO

        objective = GRPO(cfg)
    try:
        run_train(cfg, resume=resume, console=err, objective=objective)
    except Interrupted as e:
        err.print(Text(str(e), style="yellow"))
        raise typer.Exit(130) from None
    except PeerLost as e:
        err.print(Text.assemble(("error:", "bold red"), " ", str(e)), soft_wrap=True)
        raise typer.Exit(1) from None


@app.command()
def prepare(
    source: Annotated[str, typer.Argument(help="Corpus to fetch; only 'shakespeare' needs it.")
                      ] = "shakespeare",
) -> None:
    """Fetch and convert the built-in corpus now, so training later needs no network."""
    from minigpt_cli.training.data import prepare_shakespeare

    if source != "shakespeare":
        raise UserError(f"nothing to prepare for '{source}': only 'shakespeare' is built in")
    path = prepare_shakespeare()
    err.print(f"corpus ready: {path} ({path.stat().st_size / 1e6:.1f} MB)")


@app.command()
def generate(
    prompt: Annotated[str, typer.Option(help="Text to continue; empty starts a new document.")
                      ] = "",
    checkpoint: Checkpoint = None,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = 200,
    temperature: Annotated[float, typer.Option(help="0 is greedy; <1 sharper, >1 flatter.")
                           ] = 0.8,
    top_k: Annotated[int, typer.Option(help="Keep the k most likely tokens (0 = off).")] = 0,
    top_p: Annotated[float, typer.Option(help="Nucleus: smallest set with this much "
                                              "probability (1 = off).")] = 0.95,
    min_p: Annotated[float, typer.Option(help="Drop tokens below min_p x the top "
                                              "probability (0 = off).")] = 0.0,
    repetition_penalty: Annotated[float, typer.Option(help="Penalise recent tokens "
                                                           "(1 = off).")] = 1.0,
    repeat_last_n: Annotated[int, typer.Option(help="How many recent tokens count as "
                                                    "repeats.")] = 64,
    seed: Annotated[int | None, typer.Option(help="Same seed, same text.")] = None,
    num_beams: Annotated[int, typer.Option(help="Beam search with N beams (1 = sampling).")] = 1,
    stop: Annotated[list[str] | None, typer.Option(help="Stop at this string, not printed "
                                                        "(repeatable).")] = None,
    num_samples: Annotated[int, typer.Option(help="Continuations of the prompt, in one batch.")
                           ] = 1,
    prompts_file: Annotated[Path | None, typer.Option(help="One prompt per line (or JSONL), "
                                                           "generated as one batch.")] = None,
    cache: Annotated[bool, typer.Option(help="--no-cache re-runs the whole sequence every "
                                             "step (the naive loop).")] = True,
    stream: Annotated[bool, typer.Option(help="Print tokens as they come.")] = True,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    trace: Annotated[bool, typer.Option(help="Show each step: top candidates, choice, and "
                                             "positions computed.")] = False,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | mps")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto | float32 | bfloat16 | float16")] = "auto",
    engine: Annotated[str, typer.Option(help=ENGINE_HELP)] = "auto",
    quantize: Annotated[str, typer.Option(help=QUANTIZE_HELP)] = "none",
    prompt_lookup: Annotated[int, typer.Option(help="Speculative decoding: draft tokens "
                                                    "copied from after the last earlier "
                                                    "occurrence of the last N tokens, "
                                                    "verified in the same step; the output "
                                                    "is unchanged (0 = off; C step).")] = 0,
    draft_k: Annotated[int, typer.Option(help="Most draft tokens verified per step.")] = 4,
    draft: Annotated[str | None, typer.Option(help="Speculative decoding: a smaller run with "
                                                   "the same tokenizer drafts --draft-k "
                                                   "tokens a step; greedy output is "
                                                   "unchanged, sampled output keeps the "
                                                   "model's distribution.")] = None,
    json_schema: Annotated[Path | None, typer.Option(help="Output follows this JSON schema "
                                                           "(a file): a grammar masks every "
                                                           "token that could not lead to "
                                                           "valid JSON.")] = None,
    regex: Annotated[str | None, typer.Option(help="Output matches this regular "
                                                    "expression (a token mask, as "
                                                    "--json-schema).")] = None,
) -> None:
    """Generate text: prefill the prompt once, then one token per step through a KV cache."""
    options = dict(locals())  # every flag above, by name: run_generate's keyword arguments
    from minigpt_cli.inference.generate_cli import run_generate

    run_generate(**options)


@app.command()
def chat(
    checkpoint: Checkpoint = None,
    system: Annotated[str, typer.Option(help="A system message kept at the start of the "
                                             "conversation.")] = "",
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens per answer.")] = 256,
    temperature: Annotated[float, typer.Option(help="0 is greedy; <1 sharper, >1 flatter.")
                           ] = 0.7,
    top_k: Annotated[int, typer.Option(help="Keep the k most likely tokens (0 = off).")] = 0,
    top_p: Annotated[float, typer.Option(help="Nucleus: smallest set with this much "
                                              "probability (1 = off).")] = 0.95,
    seed: Annotated[int | None, typer.Option(help="Same seed, same answers.")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | mps")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto | float32 | bfloat16 | float16")] = "auto",
    engine: Annotated[str, typer.Option(help=ENGINE_HELP)] = "auto",
) -> None:
    """Talk to a run: each line is a turn, answers stream (through its chat template)."""
    from minigpt_cli.inference import native
    from minigpt_cli.inference.chat_cli import run_chat
    from minigpt_cli.inference.sampling import SamplerSettings

    native.check_engine_name(engine)
    run_chat(checkpoint, system, max_new_tokens,
             SamplerSettings(temperature=temperature, top_k=top_k, top_p=top_p), seed, device,
             dtype, engine)


@app.command("import-hf")
def import_hf(
    hf_dir: Annotated[Path, typer.Argument(help="Folder from save_pretrained: config.json + "
                                                "model.safetensors.")],
    out_dir: Annotated[Path, typer.Argument(help="New minigpt run directory.")],
) -> None:
    """Import a Hugging Face GPT-2 or Llama-architecture folder as a minigpt run."""
    from minigpt_cli.convert.hf import import_hf as run_import

    path = run_import(hf_dir, out_dir)
    err.print(f"imported {hf_dir} → {path}")


@app.command("export-hf")
def export_hf(
    run_dir: Annotated[Path, typer.Argument(help="minigpt run directory or .safetensors file.")],
    out_dir: Annotated[Path, typer.Argument(help="Folder for transformers' from_pretrained.")],
) -> None:
    """Export a run as a Hugging Face folder (GPT-2 or Llama: config.json, weights, tokenizer)."""
    from minigpt_cli.convert.hf import export_hf as run_export

    path = run_export(run_dir, out_dir)
    err.print(f"exported {run_dir} → {path}")


@app.command("export-gguf")
def export_gguf(
    run_dir: Annotated[Path, typer.Argument(help="minigpt run directory or .safetensors file.")],
    out: Annotated[Path, typer.Argument(help="The .gguf file to write.")],
    type_: Annotated[str, typer.Option("--type", help="f32 | f16 | q8_0 | q4_0 (llama.cpp's "
                                                      "block formats)")] = "f32",
) -> None:
    """Export a run as one GGUF file for llama.cpp, ollama and LM Studio (GPT-2 or Llama)."""
    from minigpt_cli.convert.gguf_export import export_gguf as run_export

    path = run_export(run_dir, out, type_)
    err.print(f"exported {run_dir} → {path} ({path.stat().st_size / 1e6:.1f} MB)")


@app.command()
def quantize(
    run: Annotated[str, typer.Argument(help="Run directory or .safetensors file.")],
    out_dir: Annotated[Path, typer.Argument(help="New folder for the rounded weights.")],
    type_: Annotated[str, typer.Option("--type", help="int8 (a quarter of the size) | int4 "
                                                      "(Q4_0, two weights a byte; the head "
                                                      "int8)")] = "int8",
) -> None:
    """Save a run's weights rounded (groups of 32, a scale each; safetensors). Every command
    loads the folder as a run, and the C step multiplies the rounded bytes directly."""
    from minigpt_cli.convert.quantize import quantize_run

    path = quantize_run(run, out_dir, type_)
    err.print(f"quantized {run} → {path}")


@app.command()
def serve(
    checkpoint: Checkpoint = None,
    host: Annotated[str, typer.Option(help="Address to bind; 0.0.0.0 exposes it to the "
                                           "network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    max_batch: Annotated[int, typer.Option(help="KV-cache slots: requests decoded at once.")
                         ] = 16,
    max_queue: Annotated[int, typer.Option(help="Requests that may wait for a slot; more get "
                                                "429.")] = 64,
    api_key: Annotated[str | None, typer.Option(envvar="MINIGPT_API_KEY", help="Require "
                                                "'Authorization: Bearer KEY' on /v1/*.")
                       ] = None,
    max_tokens: Annotated[int, typer.Option(help="Largest max_tokens a request may ask for.")
                          ] = 4096,
    max_body_bytes: Annotated[int, typer.Option(help="Largest request body; more gets 413.")
                              ] = 1 << 20,
    model_name: Annotated[str | None, typer.Option(help="Name in /v1/models (default: the "
                                                        "run directory's).")] = None,
    max_prefill_tokens: Annotated[int, typer.Option(help="Prompt tokens started per engine "
                                                         "step; a burst is spread over steps "
                                                         "(0 = no limit).")] = 16,
    prefill_first: Annotated[bool, typer.Option(help="A step that starts prompts runs them "
                                                     "alone, decoding rows one step later; "
                                                     "else they share the step.")
                             ] = False,
    prefix_cache: Annotated[bool, typer.Option(help="A prompt that begins with what a "
                                                    "slot's cache holds (its own, or "
                                                    "another's by copy) computes only the "
                                                    "rest (fused C step; exact).")] = True,
    join_mid_step: Annotated[bool, typer.Option(help="A request that arrives in the first "
                                                     "half of a step joins it instead of "
                                                     "waiting for the next (fused C step; "
                                                     "exact).")] = True,
    engine: Annotated[str, typer.Option(help=ENGINE_HELP)] = "auto",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | mps")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto | float32 | bfloat16 | float16")] = "auto",
    quantize: Annotated[str, typer.Option(help=QUANTIZE_HELP)] = "none",
    prompt_lookup: Annotated[int, typer.Option(help="Speculative decoding by prompt lookup "
                                                    "for every request, as in generate "
                                                    "(0 = off).")] = 0,
    draft_k: Annotated[int, typer.Option(help="Most draft tokens verified per step.")] = 4,
    draft: Annotated[str | None, typer.Option(help="Speculative decoding with this draft run "
                                                   "for every request, as in generate.")
                     ] = None,
) -> None:
    """Serve the model over OpenAI's HTTP API with continuous batching, and a web page at /."""
    from minigpt_cli.inference.serve.app import ServeOptions
    from minigpt_cli.inference.serve.server import run_serve

    options = ServeOptions(max_batch=max_batch, max_queue=max_queue, api_key=api_key,
                           engine=engine, max_body_bytes=max_body_bytes, max_tokens=max_tokens,
                           model_name=model_name,
                           max_prefill_tokens=max_prefill_tokens or None,
                           prefill_first=prefill_first, prefix_cache=prefix_cache,
                           join_mid_step=join_mid_step, prompt_lookup=prompt_lookup,
                           draft_k=draft_k, draft=draft)
    run_serve(checkpoint=checkpoint, host=host, port=port, options=options, device=device,
              dtype=dtype, quantize=quantize)


@app.command("eval")
def eval_(
    checkpoint: Checkpoint = None,
    data: Annotated[str | None, typer.Option(help="Text to score, any data.source form "
                                                  "(default: the run's validation split).")
                    ] = None,
    stride: Annotated[int | None, typer.Option(help="Tokens a window advances (default: half "
                                                    "the context; the context itself = no "
                                                    "overlap).")] = None,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = 8,
    exposure: Annotated[bool, typer.Option("--exposure", help="Measure exposure bias: error "
                                                              "on the model's own prefixes "
                                                              "against the data's.")] = False,
    oracle: Annotated[str | None, typer.Option(help="--exposure: a stronger run with the same "
                                                    "tokenizer, standing in for the text's "
                                                    "true distribution.")] = None,
    context: Annotated[int, typer.Option(help="--exposure: tokens of held-out context.")] = 32,
    length: Annotated[int, typer.Option(help="--exposure: continuation tokens (L).")] = 64,
    samples: Annotated[int, typer.Option(help="--exposure: sampled continuations per window; "
                                              "--task: samples per prompt (pass@k).")] = 4,
    windows: Annotated[int, typer.Option(help="--exposure: held-out windows.")] = 64,
    seed: Annotated[int, typer.Option(help="--exposure, --task: seed for sampling (and the "
                                           "bootstrap).")] = 0,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write every number here.")
                         ] = None,
    plot_path: Annotated[Path | None, typer.Option("--plot", help="Write a PNG plot here.")
                         ] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | mps")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto | float32 | bfloat16 | float16")] = "auto",
    quantize: Annotated[str, typer.Option(help=QUANTIZE_HELP)] = "none",
    task: Annotated[str | None, typer.Option(help="Score answers instead: a built-in task "
                                                  "(reverse, addition, exact) or "
                                                  "module:function, on --prompts.")] = None,
    prompts: Annotated[str | None, typer.Option(help="--task: a prompt a line, or JSONL with "
                                                     "'prompt' (and fields such as "
                                                     "'answer').")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="--task: most tokens per answer.")] = 32,
    temperature: Annotated[float, typer.Option(help="--task: of the sampled answers.")] = 1.0,
    tasks: Annotated[str | None, typer.Option(help="Run lm-evaluation-harness tasks "
                                                   "(comma-separated) in process.")] = None,
    include_path: Annotated[Path | None, typer.Option(help="--tasks: a folder of your own "
                                                           "lm-eval task YAMLs.")] = None,
    limit: Annotated[int | None, typer.Option(help="--tasks: at most N documents per "
                                                   "task.")] = None,
    num_fewshot: Annotated[int | None, typer.Option(help="--tasks: examples shown before "
                                                         "each question.")] = None,
) -> None:
    """Score a whole text (loss, perplexity, bits per byte), measure exposure bias, score a
    task's answers (--task), or run lm-evaluation-harness tasks (--tasks)."""
    if task is None and prompts is not None:
        raise UserError("--prompts is for --task: name the reward that scores the answers")
    if tasks is None and (include_path, limit, num_fewshot) != (None, None, None):
        raise UserError("--include-path, --limit and --num-fewshot are for --tasks")
    if tasks is not None:
        from minigpt_cli.evaluation.harness import run_harness

        run_harness(checkpoint=checkpoint, tasks=tasks, include_path=include_path,
                    limit=limit, num_fewshot=num_fewshot, batch_size=batch_size,
                    json_path=json_path, device=device, dtype=dtype,
                    console=Console(highlight=False))
        return
    if task is not None:
        from minigpt_cli.evaluation.task_eval import run_task_eval

        run_task_eval(checkpoint=checkpoint, task=task, prompts=prompts, samples=samples,
                      max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                      json_path=json_path, device=device, dtype=dtype,
                      console=Console(highlight=False))
        return
    from minigpt_cli.evaluation.eval_cli import run_eval

    run_eval(checkpoint=checkpoint, data=data, stride=stride, batch_size=batch_size,
             json_path=json_path, plot_path=plot_path, device=device, dtype=dtype,
             console=Console(highlight=False), exposure=exposure, oracle=oracle,
             context=context, length=length, samples=samples, windows=windows, seed=seed,
             quantize=quantize)


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--lengths expects comma-separated integers, got '{text}'") from None


@app.command()
def bench(
    checkpoint: Annotated[str | None, typer.Option(help="Run directory or .safetensors file.")
                          ] = None,
    config: Annotated[str | None, typer.Option(help="Random-weight model of this config's "
                                                    "shape (default: configs/tiny.yaml).")
                      ] = None,
    lengths: Annotated[str, typer.Option(help="New-token counts to measure.")
                       ] = "64,128,256,512,1024",
    prompt_len: Annotated[int, typer.Option(help="Prompt tokens before generation.")] = 16,
    batch_size: Annotated[int, typer.Option(help="Sequences decoded together.")] = 1,
    repeats: Annotated[int, typer.Option(help="Timed runs per point; the median is kept.")] = 3,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | mps")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto | float32 | bfloat16 | float16")] = "auto",
    json_path: Annotated[Path | None, typer.Option("--json", help="Write every number here.")
                         ] = None,
    plot_path: Annotated[Path | None, typer.Option("--plot", help="Write a PNG plot here.")
                         ] = None,
    train_too: Annotated[bool, typer.Option("--train", help="Also compare a training step "
                                                            "with generation.")] = False,
    engine: Annotated[str, typer.Option(help=ENGINE_HELP)] = "auto",
    quantize: Annotated[str, typer.Option(help="none | int8 | int4: also time cached "
                                               "decoding with those weights beside float32, "
                                               "with the bytes a step streams and the GB/s "
                                               "achieved.")
                        ] = "none",
    prompt_lookup: Annotated[int, typer.Option(help="Also time greedy decoding with prompt "
                                                    "lookup on N-grams against plain (needs "
                                                    "--checkpoint).")] = 0,
    draft: Annotated[str | None, typer.Option(help="Also time greedy decoding with this draft "
                                                   "run against plain (needs --checkpoint).")
                     ] = None,
    draft_k: Annotated[int, typer.Option(help="Most draft tokens verified per step.")] = 4,
) -> None:
    """Measure generation with the KV cache on against off, and show why they differ."""
    from minigpt_cli.bench.run import run_bench

    if checkpoint is None and config is None and Path("configs/tiny.yaml").is_file():
        config = "configs/tiny.yaml"
    code = run_bench(checkpoint=checkpoint, config=config, lengths=_int_list(lengths),
                     prompt_len=prompt_len, batch_size=batch_size, repeats=repeats,
                     device=device, dtype=dtype, json_path=json_path, plot_path=plot_path,
                     train=train_too, console=Console(highlight=False), engine=engine,
                     quantize=quantize, prompt_lookup=prompt_lookup, draft=draft,
                     draft_k=draft_k)
    raise typer.Exit(code)


def _fail(message: str, code: int = 2) -> NoReturn:
    # Plain text: paths or ranges like "(0, 1]" must not be read as markup.
    err.print(Text.assemble(("error:", "bold red"), " ", message), soft_wrap=True)
    sys.exit(code)


def main() -> None:
    """Entry point: run the app, turning user errors into one line and exit code 2.

    Click's own refusals (a value of the wrong type, an unknown option, a missing argument)
    get the same one line as ours, instead of a usage banner and a framed box, so every bad
    input reads alike and a script can rely on a single line naming the option.
    """
    try:
        code = app(standalone_mode=False)
    except click_errors.NoArgsIsHelpError as e:
        e.show()  # bare `minigpt`: the help text, as before
        sys.exit(2)
    except click_errors.ClickException as e:
        where = f" (see {e.ctx.command_path} --help)" if getattr(e, "ctx", None) else ""
        _fail(" ".join(e.format_message().split()) + where)
    except typer.Abort:
        sys.exit(130)
    except SaveError as e:  # the machine refused a write: not bad input
        _fail(str(e), code=1)
    except UserError as e:
        _fail(str(e))
    sys.exit(code if isinstance(code, int) else 0)
