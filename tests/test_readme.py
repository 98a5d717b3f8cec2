"""The README as a newcomer uses it: its Python blocks and commands run as pasted, its figures are the recorded ones,
its links lead somewhere, and it stays short.

A fenced block whose info string is ``python hub`` needs a model download: it is the one kind of block skipped (and
still checked to compile and to import only names that exist). Every other ``python`` block runs, in a fresh folder.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def blocks(info: str | None = None) -> list[tuple[str, str]]:
    """(info string, body) of every fenced block, in order; only those whose info string is ``info`` if given."""
    found = [(match.group(1).strip(), match.group(2)) for match in FENCE.finditer(README.read_text())]
    return [block for block in found if info is None or block[0] == info]


def commands(body: str) -> list[str]:
    """The command lines of a bash block: continuations joined, comments dropped."""
    joined = body.replace("\\\n", " ")
    return [line.split("  #")[0].strip() for line in joined.splitlines() if line.strip()]


PYTHON = [body for info, body in blocks() if info == "python"]


@pytest.fixture
def fresh_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


@pytest.mark.parametrize("index", range(len(PYTHON)))
def test_python_blocks_run_as_pasted(index, fresh_folder, capsys):
    exec(compile(PYTHON[index], f"README.md python block {index + 1}", "exec"), {"__name__": "__main__"})
    assert capsys.readouterr().out or index > 0  # the first block prints what it did


def test_the_first_block_runs_the_whole_api_on_the_embedded_model():
    names = {"load_embedded", "layer_contribution", "select_layers", "apply_shortv", "generate", "evaluate"}
    first = PYTHON[0]
    assert all(f"{name}(" in first for name in names)
    assert "n=" in first and "flops_ratio=" in first  # selected by number and by FLOPs budget


def test_only_hub_blocks_are_skipped_and_they_are_complete():
    skipped = [(info, body) for info, body in blocks() if info.startswith("python") and info != "python"]
    assert [info for info, _ in skipped] == ["python hub"]
    for _, body in skipped:
        tree = ast.parse(body)  # compiles
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                module = importlib.import_module(node.module)
                for alias in node.names:  # a name or a submodule (`from PIL import Image`, not imported yet)
                    assert hasattr(module, alias.name) or importlib.util.find_spec(f"{node.module}.{alias.name}"), \
                        f"{node.module}.{alias.name}"
        for needed in ("AutoProcessor", "processor(", "inputs", "generate("):
            assert needed in body


def test_the_first_two_commands_are_the_demo_and_what_ci_runs():
    bash = [body.strip() for _, body in blocks("bash")]
    assert bash[0] == 'pip install torch==2.13.0 && pip install -e ".[plot]" && shortv demo --out shortv_demo'
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert bash[1] in ci  # the README's test command is CI's, exactly
    text = README.read_text()
    assert text.index(bash[0]) < text.index(bash[1]) < text.index("```python")  # the first screen


def test_readme_is_short_and_narrow():
    lines = README.read_text().splitlines()
    first_commands = {body.strip() for _, body in blocks("bash")[:2]}
    assert len(lines) <= 250
    wide = [number for number, line in enumerate(lines, 1) if len(line) > 120 and line not in first_commands]
    assert not wide, f"lines over 120 characters: {wide}"
    cells = [cell for line in lines if line.startswith("|") for cell in line.split("|")]
    assert max(map(len, cells)) <= 120


def test_demo_rows_are_the_recorded_run():
    """Every ``text`` block of the README (the demo's ablation rows, its method comparison) is lines of the recorded
    demo run."""
    recorded = (REPO / "benchmarks" / "results" / "demo" / "console.txt").read_text().splitlines()
    tables = [body.strip().splitlines() for _, body in blocks("text")]
    assert tables and all(len(rows) >= 4 for rows in tables)
    missing = [row for rows in tables for row in rows if row not in recorded]
    assert not missing, f"README rows not in benchmarks/results/demo/console.txt: {missing}"


def test_links_lead_to_files():
    for page in [README, *sorted((REPO / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            path = (page.parent / target).resolve()
            assert path.exists(), f"{page.name} links to {target}, which does not exist"


def test_the_transformers_line_is_what_an_older_release_sees(monkeypatch):
    from packaging.version import Version

    from shortv import _compat

    monkeypatch.setattr(_compat, "TRANSFORMERS_VERSION", Version("5.23.0"))
    with pytest.raises(RuntimeError) as error:
        _compat.check_transformers_version()
    said = " ".join(README.read_text().split())
    assert f"`RuntimeError: {error.value}`" in said
    assert f"Tested with {_compat.MIN_TRANSFORMERS} (the declared minimum" in said


def shortv_lines() -> list[str]:
    [body] = [body for _, body in blocks("bash") if body.lstrip().startswith("shortv calibrate")]
    return commands(body)


def test_calibrate_eval_bench_commands_run_on_the_embedded_model(fresh_folder):
    from shortv.cli import app

    lines = shortv_lines()
    assert [line.split()[1] for line in lines] == ["calibrate", "eval", "bench"]
    for line in lines:
        result = CliRunner().invoke(app, shlex.split(line)[1:] + (["--quiet"] if " bench" in line else []))
        assert result.exit_code == 0, f"{line}\n{result.output}"
    assert json.loads((fresh_folder / "cal" / "shortv_config.json").read_text())["layers"]
    assert (fresh_folder / "ev" / "summary.json").is_file()


def test_lmms_eval_recipe_runs_and_scores_as_shortv_eval(fresh_folder):
    """The README's lmms-eval recipe, verbatim: the task block, then the command, on the config of the calibrate
    command above (made here directly); lmms-eval's accuracy equals `shortv.evaluate`'s on the same questions."""
    pytest.importorskip("lmms_eval")
    from shortv import ShortVConfig, evaluate
    from shortv.data import read_jsonl
    from shortv.tiny import embedded_split_path, load_embedded

    [task_block] = [body for body in PYTHON if "write_task(" in body]
    exec(compile(task_block, "README.md lmms-eval task block", "exec"), {"__name__": "__main__"})
    [command] = [line for _, body in blocks("bash") for line in commands(body) if line.startswith("lmms-eval ")]
    layers = [11, 10, 5, 7, 1, 8]
    (fresh_folder / "cal").mkdir()
    ShortVConfig(layers).save(fresh_folder / "cal" / "shortv_config.json")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "HF_DATASETS_CACHE": str(fresh_folder / "hf"), "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    argv = [sys.executable, "-m", "lmms_eval", *shlex.split(command)[1:]]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env, cwd=fresh_folder)
    assert run.returncode == 0, textwrap.shorten(run.stdout + run.stderr, 4000)
    [results_file] = (fresh_folder / "lmms_results").rglob("*_results.json")
    results = json.loads(results_file.read_text())
    task = re.search(r"--tasks (\S+)", command).group(1)
    questions = results["n-samples"][task]["effective"]
    model, processor = load_embedded()
    samples = read_jsonl(embedded_split_path("test"), require_answer=True)[:questions]
    summary = evaluate(model, processor, samples, ShortVConfig(layers), progress=False)
    assert questions == 16 and results["results"][task]["exact_match,none"] == pytest.approx(summary.shortv.accuracy)


def test_method_comparison_is_the_recorded_run():
    """The README's methods-at-matched-FLOPs table: each cell's accuracy and FLOPs (or the lowest FLOPs a method
    reaches) and the bold winner of each target are those of the recorded demo's results.json."""
    results = json.loads((REPO / "benchmarks" / "results" / "demo" / "results.json").read_text())
    rows = {(row["target"], row["method"]): row for row in results["comparison"]}
    lines = [line for line in README.read_text().splitlines() if re.match(r"\| \d+% \|", line)]
    header = next(line for line in README.read_text().splitlines() if line.startswith("| target | ShortV |"))
    methods = {"ShortV": "shortv", "operator-level ShortV": "operators", "FastV": "fastv", "VTW": "vtw",
               "ShortV + FastV": "shortv+fastv"}
    columns = [methods[name.strip()] for name in header.strip("|").split("|")[1:]]
    assert len(lines) == 3 and len(columns) == 5
    for line in lines:
        target, *cells = [cell.strip() for cell in line.strip("|").split("|")]
        target = int(target.rstrip("%")) / 100
        best = max(row["accuracy"] for (at, _), row in rows.items() if at == target and row["accuracy"] is not None)
        for method, cell in zip(columns, cells):
            row = rows[(target, method)]
            if row["accuracy"] is None:
                assert cell == f"min {100 * row['lowest']:.1f}%", (target, method, cell)
                continue
            accuracy, flops = re.fullmatch(r"\**([\d.]+)%\** \(([\d.]+)%\)", cell).group(1, 2)
            assert (accuracy, flops) == (f"{100 * row['accuracy']:.1f}", f"{100 * row['flops_ratio']:.1f}"), cell
            assert cell.startswith("**") == (row["accuracy"] == best), cell
