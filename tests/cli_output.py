"""Reading what a `shortv` command printed (typer's CliRunner results)."""


def single_error_line(result):
    """The CLI's report of a user mistake: exit code 1 and exactly one `error:` line, no traceback."""
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def warning_lines(result):
    """The `warning:` lines of a command that succeeded."""
    assert result.exit_code == 0, result.output
    return [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
