"""`pixart train` driven in-process for the training failure tests, and the one-line error they all expect."""

from __future__ import annotations

WEIGHTS = "diffusion_pytorch_model.safetensors"


def train_cli(*args: str):
    from typer.testing import CliRunner

    from flows.cli import app

    return CliRunner().invoke(app, ["train", *args])


def assert_one_error_line(result, *fragments: str) -> str:
    """`pixart train` failed with exit code 2 and a single `error:` line (no traceback) holding every fragment."""
    assert isinstance(result.exception, SystemExit) and result.exit_code == 2, (result.exception, result.output)
    assert "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]
