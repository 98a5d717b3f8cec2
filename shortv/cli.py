"""``shortv`` command line. Each subcommand is one self-contained function below: parse options, call the library,
print the result. Add a subcommand by writing another ``@app.command()`` function; share only the helpers at the top.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(
    name="shortv",
    help="ShortV: freeze visual tokens in ineffective layers of multimodal LLMs (arXiv 2504.00502).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain click help: no type tags such as <bool> on flags, no boxes
)
console = Console()
errors = Console(stderr=True, soft_wrap=True)  # one line per error, whatever the terminal width

#: Options shared by the commands that load a checkpoint.
TrustRemoteCode = Annotated[bool, typer.Option(
    help="Let the model folder or hub repo run its own Python code (transformers' trust_remote_code). Only for "
    "sources you trust; off by default.")]


@app.callback()
def _main() -> None:
    """ShortV: freeze visual tokens in ineffective layers of multimodal LLMs (arXiv 2504.00502)."""
    import warnings

    from shortv.fingerprint import WeightsWarning

    shown = warnings.showwarning
    if not getattr(shown, "shortv", False):  # shortv's warnings: one `warning:` line each on stderr
        def show(message, category, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202 - warnings' signature
            if issubclass(category, WeightsWarning):
                errors.print(f"[bold yellow]warning:[/] {escape(' '.join(str(message).split()))}")
            else:
                shown(message, category, *args, **kwargs)

        show.shortv = True
        warnings.showwarning = show
    # Every command says it each time, even when the process said it before (a library caller running commands in
    # one process, a test suite): Python's default shows a warning once per place in the code.
    warnings.simplefilter("always", WeightsWarning)
    if "--help" in sys.argv[1:]:  # help is shown whatever the version
        return
    from shortv._compat import check_transformers_version

    try:  # an unsupported transformers: one line before any work, whichever command
        check_transformers_version()
    except RuntimeError as error:
        raise fail(str(error)) from None


def fail(message: str) -> typer.Exit:
    """Print an error (one ``error:`` line on stderr) and return the exit to raise: ``raise fail("...")``."""
    errors.print(f"[bold red]error:[/] {escape(' '.join(message.split()))}")
    return typer.Exit(code=1)


def pick_threads(threads: Optional[int]) -> int:
    """``--threads``, else torch's default, lowered to the free cores on a busy machine (saying so on stderr)."""
    import torch

    from shortv.benchmark.machine import threads_for_load

    if threads is not None:
        return threads
    chosen, hint = threads_for_load(torch.get_num_threads())
    if hint:
        errors.print(f"[yellow]note:[/] {escape(hint)}")
    return chosen


#: The demo's default --n on the shipped model (`shortv.demo.default_ns`; tests/test_demo.py recomputes it).
DEMO_DEFAULT_NS = (3, 6, 9)
#: ``--threads`` of the commands that run the model on the CPU for long (demo, bench).
Threads = Annotated[Optional[int], typer.Option(
    help="torch CPU threads (default: torch's choice, lowered to the free cores on a busy machine).", min=1)]
#: ``--overwrite`` of the commands that write results (demo, bench).
Overwrite = Annotated[bool, typer.Option(help="Replace what --out already holds (refused otherwise).")]


def load_config_option(path: Optional[Path], any_method: bool = False):  # noqa: ANN201 - imported lazily
    """The ShortVConfig from a ``--config`` path (``any_method``: any method's config, `shortv.methods.load_config`),
    or None."""
    if path is None:
        return None
    from shortv import ShortVConfig
    from shortv.methods import load_config

    if not path.is_file():
        raise fail(f"config file not found: {path}")
    try:
        return load_config(path) if any_method else ShortVConfig.load(path)
    except (ValueError, OSError) as error:
        raise fail(str(error)) from None


# ------------------------------------------------------------------------------------------------------------------
# bench
# ------------------------------------------------------------------------------------------------------------------
def _print_bench(result) -> None:  # noqa: ANN001 - shortv.benchmark.BenchResult
    from shortv.benchmark import layers_line, speedup_lines, summary_rows

    name = "ShortV" if result.method_name == "shortv" else result.method_name
    table = Table(title=f"{name} benchmark: {result.model}", title_justify="left")
    for column in ("metric", "baseline", name, f"{name} vs baseline"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for row in summary_rows(result):
        table.add_row(*(escape(cell) for cell in row))
    console.print(table)
    setup = (
        f"{result.dtype} on {result.device}, batch {result.batch_size}, {result.new_tokens} new tokens, "
        f"median [min-max] of {result.repeats} interleaved repetitions after {result.warmup} warm-up; "
        f"{result.machine.get('torch_threads')} torch threads; peak memory: {result.memory_method}"
    )
    console.print(f"[dim]{escape(setup)}[/]")
    console.print(f"[dim]layers: {escape(layers_line(result))}[/]")
    for line in speedup_lines(result):
        console.print(escape(line))
    for note in result.notes:
        console.print(f"[yellow]note:[/] {escape(note)}")


@app.command()
def bench(
    model: Annotated[Optional[str], typer.Option(help="Local checkpoint folder (multimodal or causal LM).")] = None,
    shape: Annotated[
        Optional[str], typer.Option(help="Random-weight model with a paper model's dims, e.g. llava-1.5-7b.")
    ] = None,
    layers: Annotated[
        Optional[int], typer.Option(help="Shape mode: run only the first K decoder layers.", min=1)
    ] = None,
    n: Annotated[
        Optional[int], typer.Option("--n", help="Number of ShortV layers (default: 19 for 7B, 24 for 13B).", min=0)
    ] = None,
    proportional: Annotated[
        bool, typer.Option(help="Shape mode with --layers: freeze the full model's share of the prefix.")
    ] = False,
    config: Annotated[Optional[Path], typer.Option(
        help="shortv_config.json with the ShortV layers (overrides --n), or a FastV/VTW config to measure.")] = None,
    method: Annotated[Optional[str], typer.Option(
        help="Measure this method instead of ShortV: fastv, vtw, shortv+fastv, shortv+vtw, optionally with "
        "parameters (fastv:k=2,ratio=0.5); a ShortV part takes the ShortV layers chosen as without it.")] = None,
    k: Annotated[Optional[int], typer.Option("--k", help="FastV/VTW: the first pruned layer K.")] = None,
    ratio: Annotated[Optional[float], typer.Option(help="FastV: the fraction R of visual tokens pruned.")] = None,
    rank: Annotated[Optional[str], typer.Option(help="FastV: rank by the last prompt token (last) or all (mean).")
                    ] = None,
    visual_tokens: Annotated[Optional[int], typer.Option(
        help="Visual tokens per sample (shape mode: default the shape's own, 576 or 2880; causal LM: 576; a multimodal "
        "checkpoint's processor sets its own).", min=0)] = None,
    text_tokens: Annotated[int, typer.Option(help="Text tokens per sample (shape mode / causal LM).", min=0)] = 64,
    batch_size: Annotated[int, typer.Option(help="Samples per batch.", min=1)] = 1,
    new_tokens: Annotated[int, typer.Option(help="Tokens generated per sample (greedy, KV cache).", min=1)] = 16,
    repeats: Annotated[int, typer.Option(help="Measured repetitions per variant.", min=1)] = 5,
    warmup: Annotated[int, typer.Option(help="Untimed warm-up rounds per variant.", min=0)] = 1,
    dtype: Annotated[str, typer.Option(help="bf16, fp32 or fp16.")] = "bf16",
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    threads: Threads = None,
    out: Annotated[Optional[str], typer.Option(
        help="Write the result as JSON to this file (a folder: shortv_bench.json in it).")] = None,
    overwrite: Overwrite = False,
    quiet: Annotated[bool, typer.Option(help="No per-repetition progress lines.")] = False,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Time to first token, decode tokens/s, latency and peak memory: baseline vs ShortV (or --method) on the same
    model.

    Without --model or --shape, benchmarks the embedded tiny LLaVA.
    """
    from shortv import benchmark as bench_lib
    from shortv.files import refuse_existing

    if model is not None and shape is not None:
        raise fail("give either --model or --shape, not both")
    if model is not None and not (Path(model).expanduser() / "config.json").is_file():
        raise fail(f"model not found: {model} is not a local checkpoint folder (with config.json)")
    if shape is None and (layers is not None or proportional):
        raise fail("--layers and --proportional apply to --shape only")
    shortv_config = load_config_option(config, any_method=True)
    if method is not None or (k, ratio, rank) != (None, None, None):  # the method's parameters, before any model loads
        from shortv import ShortVConfig
        from shortv.methods import plan_runs

        try:
            plan_runs([method] if method is not None else [], shortv=ShortVConfig(layers=[0]), k=k, ratio=ratio,
                      rank=rank)
        except ValueError as error:
            raise fail(str(error)) from None
    if out is not None:  # checked writable before the run, not after it
        from shortv.files import output_file

        try:
            out, created = output_file(out, "shortv_bench.json")
        except OSError as error:
            raise fail(f"--out: {error}") from None
        if created is not None:
            console.print(f"created folder {escape(str(created))} for --out")
        try:
            refuse_existing(out, overwrite)
        except FileExistsError as error:
            raise fail(str(error)) from None
    progress = None if quiet else (lambda message: console.print(f"[dim]{escape(message)}[/]"))
    common = dict(
        config=shortv_config, n=n, batch_size=batch_size, new_tokens=new_tokens, repeats=repeats, warmup=warmup,
        dtype=dtype, device=device, threads=pick_threads(threads), progress=progress, method=method, k=k, ratio=ratio,
        rank=rank,
    )
    try:
        if shape is not None:
            result = bench_lib.bench_shape(
                shape, num_layers=layers, proportional=proportional, visual_tokens=visual_tokens,
                text_tokens=text_tokens, **common,
            )
        elif model is not None:
            result = bench_lib.bench_pretrained(
                model, visual_tokens=visual_tokens, text_tokens=text_tokens, trust_remote_code=trust_remote_code,
                **common,
            )
        else:
            result = bench_lib.bench_embedded(**common)
    except (ValueError, RuntimeError, OSError) as error:
        raise fail(str(error)) from error
    _print_bench(result)
    if out is not None:
        console.print(f"wrote {result.save(out)}")


# ------------------------------------------------------------------------------------------------------------------
# calibrate
# ------------------------------------------------------------------------------------------------------------------
@app.command()
def calibrate(
    model: Annotated[Optional[str], typer.Option(help="Local folder or hub id (default: the embedded tiny LLaVA).")] = None,
    data: Annotated[
        Optional[Path], typer.Option(help="Calibration JSONL (default: the embedded model's calib split).")
    ] = None,
    num_samples: Annotated[Optional[int], typer.Option(help="Seeded subsample of the data.", min=1)] = None,
    out: Annotated[Path, typer.Option(help="Output folder: lc.json, shortv_config.json, lc.png.")] = Path(
        "shortv_calibration"
    ),
    n: Annotated[
        Optional[int],
        typer.Option("--n", "-n", help="ShortV layers in shortv_config.json (default: 19/32 of the depth)."),
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run in --out.")] = False,
    position: Annotated[str, typer.Option(help="last_prompt (paper) or answer (teacher-forced answer tokens).")] = (
        "last_prompt"
    ),
    divergence: Annotated[str, typer.Option(help="kl (paper: KL(P_frozen || P)), kl_reversed or js.")] = "kl",
    seed: Annotated[int, typer.Option(help="Seed of the subsample.")] = 0,
    dtype: Annotated[Optional[str], typer.Option(help="fp32, bf16 or fp16 (LC is computed in fp32).")] = None,
    device_map: Annotated[Optional[str], typer.Option(help="accelerate device map, e.g. auto or cuda.")] = None,
    trust_remote_code: TrustRemoteCode = False,
    operators: Annotated[bool, typer.Option(
        help="Also per-operator LC (attention and MLP of visual tokens), lc_operators.png and "
        "shortv_operators_config.json (operators by LC per FLOP saved).")] = False,
    flops: Annotated[Optional[float], typer.Option(
        help="With --operators: prefill FLOPs ratio target (default: that of the N ShortV layers).", min=0.0,
        max=1.0)] = None,
    vtw_threshold: Annotated[Optional[float], typer.Option(
        help="Also choose VTW's K by its own rule on the same samples: the first K whose mean KL is below this; "
        "writes vtw_config.json (for eval/bench --config).")] = None,
) -> None:
    """Measure Layer Contribution of every decoder layer and pick the ShortV layers.

    Under torchrun or accelerate launch, the processes share the samples.
    """
    from shortv.calibrate import calibrate as run_calibration
    from shortv.processes import is_main_process

    try:
        result = run_calibration(
            model, data=data, out_dir=out, num_samples=num_samples, n=n, resume=resume, position=position,
            divergence=divergence, seed=seed, dtype=dtype, device_map=device_map, trust_remote_code=trust_remote_code,
            operators=operators, flops=flops, vtw_threshold=vtw_threshold,
        )
    except (ValueError, OSError) as error:
        raise fail(str(error)) from error
    if not is_main_process():  # a multi-process run: the main process reports
        return
    chosen = set(result.config.layers)
    table = Table(title=f"Layer Contribution ({len(result.lc.sample_ids)} samples, {divergence})", title_justify="left")
    for column in ("layer", "visual LC", "text LC", "rank", "ShortV"):
        table.add_column(column, justify="right")
    for layer, visual, text, rank in result.table():
        table.add_row(str(layer), f"{visual:.3e}", "" if text is None else f"{text:.3e}", str(rank),
                      "frozen" if layer in chosen else "")
    console.print(table)
    console.print(f"ShortV layers (N={len(result.config.layers)}): {result.config.layers}")
    console.print(f"wrote {out / 'lc.json'}, {out / 'shortv_config.json'}, {out / 'lc.png'}")
    if result.operator_config is not None:
        _print_operators(result.lc, result.operator_config, out)
    if result.vtw_config is not None:
        rule = result.vtw_config.provenance
        console.print(f"VTW by its KL rule: K={result.vtw_config.k} (mean KL {rule['kl'][-1]:.3g} < {rule['threshold']}"
                      f" on {rule['samples']} samples; K={rule['first_k']}..{result.vtw_config.k}: "
                      f"{', '.join(f'{v:.3g}' for v in rule['kl'])})")
        console.print(f"wrote {out / 'vtw_config.json'}")


def _print_operators(lc: Any, config: Any, out: Path) -> None:
    """The per-operator LC table and the operator-level selection of `shortv calibrate --operators`."""
    means, frozen = lc.mean, config.frozen_operators
    table = Table(title="Per-operator visual LC", title_justify="left")
    for column in ("layer", "attention LC", "MLP LC", "frozen"):
        table.add_column(column, justify="right")
    for layer in range(lc.num_layers):
        table.add_row(str(layer), f"{means['visual_attention'][layer]:.3e}", f"{means['visual_mlp'][layer]:.3e}",
                      " + ".join(sorted(frozen.get(layer, ()))))
    console.print(table)
    provenance = config.provenance
    console.print(f"operator-level selection at {100 * provenance['flops_ratio']:.1f}% prefill FLOPs "
                  f"(target {100 * provenance['flops_ratio_target']:.1f}%, t={provenance['text_tokens']}, "
                  f"v={provenance['visual_tokens']}): layers {config.layers}, "
                  f"attention-only {config.attention_layers}, MLP-only {config.mlp_layers}")
    console.print(f"wrote {out / 'shortv_operators_config.json'}, {out / 'lc_operators.png'}")


# ------------------------------------------------------------------------------------------------------------------
# eval
# ------------------------------------------------------------------------------------------------------------------
@app.command("eval")
def evaluate_command(
    model: Annotated[Optional[str], typer.Option(help="Local folder or hub id (default: the embedded tiny LLaVA).")] = None,
    data: Annotated[Optional[Path], typer.Option(help="VQA JSONL with answers (default: embedded test split).")] = None,
    config: Annotated[Optional[list[Path]], typer.Option(
        help="A config file to evaluate, one method each (repeatable): shortv_config.json, "
        "shortv_operators_config.json, a FastV/VTW config. With --method, a lone ShortV config is also the ShortV "
        "part of shortv+fastv / shortv+vtw.")] = None,
    method: Annotated[Optional[list[str]], typer.Option(
        help="A method to compare (repeatable): shortv, fastv, vtw, shortv+fastv or shortv+vtw, optionally with "
        "parameters: fastv:k=2,ratio=0.5,rank=last, vtw:k=16, shortv+fastv:n=19 (n: the first N layers of --lc). "
        "ShortV layers come from --lc/--n or the ShortV --config.")] = None,
    k: Annotated[Optional[int], typer.Option(
        "--k", help="FastV/VTW: the first pruned layer K, for the --method specs without k=.")] = None,
    ratio: Annotated[Optional[float], typer.Option(
        help="FastV: the fraction R of visual tokens pruned, in [0, 1), for the specs without ratio=.")] = None,
    rank: Annotated[Optional[str], typer.Option(
        help="FastV: rank by the last prompt token's attention (last) or the mean over all queries (mean).")] = None,
    n: Annotated[
        Optional[int], typer.Option("--n", "-n", help="With --lc: freeze the first N layers of the order.")
    ] = None,
    lc: Annotated[Optional[Path], typer.Option(help="lc.json from shortv calibrate (with --n).")] = None,
    num_samples: Annotated[Optional[int], typer.Option(help="Seeded subsample of the data.", min=1)] = None,
    batch_size: Annotated[int, typer.Option(help="Generation batch size (left padding).", min=1)] = 8,
    max_new_tokens: Annotated[int, typer.Option(help="Greedy tokens per answer.", min=1)] = 8,
    out: Annotated[Path, typer.Option(help="Output folder: predictions.jsonl, summary.json, summary.md.")] = Path(
        "shortv_eval"
    ),
    resume: Annotated[bool, typer.Option(help="Continue from an interrupted run's predictions.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the subsample.")] = 0,
    dtype: Annotated[Optional[str], typer.Option(help="fp32, bf16 or fp16.")] = None,
    device_map: Annotated[Optional[str], typer.Option(help="accelerate device map, e.g. auto or cuda.")] = None,
    trust_remote_code: TrustRemoteCode = False,
    allow_other_model: Annotated[bool, typer.Option(
        help="Accept a --config/--lc file made on other weights (same layer count), with a warning naming "
        "both.")] = False,
) -> None:
    """Accuracy of the unpatched model vs one or several methods on the same samples, side by side.

    One row per method: each --config file, each --method, and ShortV from --lc/--n when no --method is given.
    Under torchrun or accelerate launch, the processes share the samples.
    """
    from shortv.evaluation import evaluate_files
    from shortv.processes import is_main_process

    try:
        summary = evaluate_files(
            model, data=data, config=config, lc=lc, n=n, num_samples=num_samples, batch_size=batch_size,
            max_new_tokens=max_new_tokens, out_dir=out, resume=resume, seed=seed, dtype=dtype, device_map=device_map,
            trust_remote_code=trust_remote_code, allow_other_model=allow_other_model, methods=method or (), k=k,
            ratio=ratio, rank=rank,
        )
    except (ValueError, OSError) as error:
        raise fail(str(error)) from error
    if not is_main_process():  # a multi-process run: the main process reports
        return
    typer.echo(summary.markdown())  # plain text: the table survives a pipe
    console.print(f"wrote {out / 'predictions.jsonl'}, {out / 'summary.json'}, {out / 'summary.md'}")


# ------------------------------------------------------------------------------------------------------------------
# demo
# ------------------------------------------------------------------------------------------------------------------
@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Output folder: report.md, results.json, metrics.json, plots.")] = Path(
        "shortv_demo"),
    num_calib: Annotated[int, typer.Option(help="Calibration samples.", min=1)] = 32,
    num_test: Annotated[int, typer.Option(help="Test questions.", min=1)] = 700,
    n: Annotated[Optional[list[int]], typer.Option("--n", help=(
        "ShortV layer counts to try (repeatable). Default: {} (a quarter, half and three quarters of the 12 layers, "
        "and the N nearest 55% of the prefill FLOPs).".format(", ".join(map(str, DEMO_DEFAULT_NS)))))] = None,
    batch_size: Annotated[int, typer.Option(help="Generation batch size.", min=1)] = 50,
    speed_repeats: Annotated[int, typer.Option(help="Repetitions of the prefill timing (0: skip).", min=0)] = 5,
    seed: Annotated[int, typer.Option(help="Seed of subsamples and random layer choices.")] = 0,
    threads: Threads = None,
    overwrite: Overwrite = False,
) -> None:
    """The method and the paper's ablation on the embedded tiny LLaVA: LC, layer selections, FLOPs, speed, report;
    then ShortV, operator-level ShortV, FastV, VTW and ShortV + FastV at matched FLOPs."""
    from shortv.demo import SPEED_CAVEAT, run_demo
    from shortv.loading import resolve_model

    import torch

    try:
        num_layers = resolve_model(None).num_layers if n else 0
        outside = [value for value in n or () if not 1 <= value <= num_layers]
        if outside:
            raise ValueError(f"--n {outside[0]}: the embedded model has {num_layers} decoder layers; "
                             f"give N in 1..{num_layers}")
        torch.set_num_threads(pick_threads(threads))  # after the checks: a mistake is one error line, busy or not
        report = run_demo(out, num_calib=num_calib, num_test=num_test, ns=tuple(n) if n else None,
                          batch_size=batch_size, seed=seed, speed_repeats=speed_repeats, overwrite=overwrite)
    except (ValueError, OSError) as error:
        raise fail(str(error)) from error
    # Plain text, never wrapped or re-styled, so that the tables survive a pipe.
    typer.echo(f"LC order: {report.lc_order}")
    typer.echo(report.markdown())
    typer.echo(report.comparison_markdown())
    typer.echo("\n".join(report.verdicts) + "\n")
    if report.speed:
        typer.echo(report.speed_markdown())
        typer.echo(SPEED_CAVEAT + "\n")
    typer.echo(f"demo took {report.timing['wall_s']} s wall, {report.timing['cpu_s']} s CPU")
    typer.echo(f"wrote {out / 'report.md'}, {out / 'results.json'}, {out / 'metrics.json'}, "
               f"{out / 'accuracy_vs_flops.png'}, {out / 'methods_vs_flops.png'}, {out / 'calibration'}/ (lc.json, "
               "shortv_config.json, lc.png, shortv_operators_config.json, lc_operators.png)")


if __name__ == "__main__":  # pragma: no cover
    app()
