"""Shared ending of the benchmark scripts: the machine line every report starts with, and print-then-save."""

from __future__ import annotations

from pathlib import Path

from shortv.benchmark import machine_info


def machine_line() -> str:
    """Where the numbers were taken, read when the report is written (load average included: it may be shared)."""
    info = machine_info()
    return (
        f"Machine: {info['cpu']}, {info['cpu_usable']} usable cores, {info['torch_threads']} torch threads, "
        f"load average {info.get('load_average')}; torch {info['torch']}; {info['date']}."
    )


def emit_report(lines: list[str], out: Path | None) -> None:
    """Print the markdown report and, when ``out`` is given, save it there too."""
    report = "\n".join(lines) + "\n"
    print(report)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report)
        print(f"wrote {out}")
