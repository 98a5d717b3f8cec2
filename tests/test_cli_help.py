"""What ``shortv --help`` and each command's ``--help`` show a newcomer: plain text, no type tags on flags, the
demo's real default N."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from shortv.cli import DEMO_DEFAULT_NS, app

COMMANDS = ("bench", "calibrate", "eval", "demo")
RECORDED_DEMO = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "demo" / "results.json"


@pytest.mark.parametrize("command", COMMANDS)
def test_help_is_plain_and_has_no_type_tag_on_flags(command):
    result = CliRunner().invoke(app, [command, "--help"], terminal_width=120)
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.output  # a flag takes no value
    assert not any(char in result.output for char in "╭│╰")  # no boxes: readable when piped or narrow
    assert "--help" in result.output and "Show this message and exit." in result.output


def test_demo_help_shows_the_default_n_the_demo_uses():
    from shortv.demo import default_ns
    from shortv.flops import LayerDims, flops_ratio
    from shortv.tiny import embedded_model_path
    from transformers import AutoConfig

    dims = LayerDims.from_config(AutoConfig.from_pretrained(embedded_model_path(), local_files_only=True))
    recorded = json.loads(RECORDED_DEMO.read_text())  # token counts as the demo measured them on the test split
    visual, text = recorded["visual_tokens"], round(recorded["text_tokens"])
    ns = default_ns(dims.num_layers, lambda n: flops_ratio(dims, text, visual, list(range(n)), formula="exact"))
    assert ns == DEMO_DEFAULT_NS == tuple(sorted({row["n"] for row in recorded["rows"] if row["n"]}))
    result = CliRunner().invoke(app, ["demo", "--help"], terminal_width=200)
    assert "Default: " + ", ".join(map(str, ns)) + " (" in " ".join(result.output.split())


@pytest.mark.parametrize("command", COMMANDS)
def test_an_unsupported_transformers_is_one_line_before_any_work(command, tmp_path, monkeypatch):
    from packaging.version import Version

    from shortv import _compat

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(_compat, "TRANSFORMERS_VERSION", Version("5.23.0"))
    result = CliRunner().invoke(app, [command, "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert result.output.strip() == ("error: shortv supports transformers >=5.24.0,<6.0.0; found 5.23.0. Install a "
                                     "supported version: pip install 'transformers>=5.24.0,<6'")
    assert not (tmp_path / "out").exists()
