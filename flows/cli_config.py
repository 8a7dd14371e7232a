"""How every `pixart` command reads its config and reports failure: PRESET + `key=value` overrides into the command's
config model (imported only when the command runs or shows its help, so `pixart --help` imports no torch), one
`error:` line and an exit code for anything wrong, and help that ends with the presets and every config key.
The commands themselves are in `flows/cli.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import import_module
from typing import Annotated, Any

import typer
from typer.core import TyperCommand

from storage.errors import PipelineError

# Each command's config model, imported when the command runs or prints its help.
CONFIGS = {
    "ingest": "storage.ingest.config:IngestConfig",
    "caption": "captioning.config:CaptionConfig",
    "extract": "pixart.features.config:ExtractConfig",
    "train": "pixart.train.config:TrainConfig",
    "sample": "pixart.train.config:SampleConfig",
    "export": "pixart.train.config:ExportConfig",
    "audit": "captioning.audit:AuditConfig",
    "pipeline": "flows.pipeline_config:PipelineConfig",
    "setup": "flows.setup:SetupConfig",
    "status": "flows.pipeline_config:PipelineConfig",
}

# The arguments every command but `demo` takes.
Preset = Annotated[str, typer.Argument(show_default=False, help="A preset under configs/<command>/ (listed "
                                                                 "below) or a YAML path.")]
Overrides = Annotated[list[str] | None, typer.Argument(show_default=False, help="key=value overrides, applied last "
                                                                                "(keys listed below).")]
Force = Annotated[bool, typer.Option("--force", help="The same as force=true.")]


# ---------------------------------------------------------------------------------------------------------------------
# The one way a command reads its config and reports errors
# ---------------------------------------------------------------------------------------------------------------------


def fail(message: str, code: int = 2) -> None:
    """One `error:` line (a multi-line message, such as a config error's one line per key, joined) and exit."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()] or ["failed"]
    typer.secho(f"error: {lines[0]}{' ' + '; '.join(lines[1:]) if lines[1:] else ''}", fg=typer.colors.RED,
                err=True)
    raise typer.Exit(code)


@contextmanager
def errors() -> Iterator[None]:
    """A PipelineError (ConfigError included) or an OS error (a full disk, a lost mount) -> one line, exit 2."""
    try:
        yield
    except PipelineError as e:
        fail(str(e))
    except OSError as e:
        fail(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}")


def config_class(command: str) -> type:
    module, name = CONFIGS[command].split(":")
    return getattr(import_module(module), name)


def load_command_config(command: str, preset: str, overrides: list[str] | None, force: bool = False,
            load: Callable[[str, list[str]], Any] | None = None) -> Any:
    """The command's config from PRESET + overrides (+ force=true); anything wrong exits 2 with one line.
    `load(preset, overrides)` replaces the plain `load_config` where a command has its own loader."""
    from storage.configio import load_config, preset_names
    from storage.errors import ConfigError

    extra = [*(overrides or []), *(["force=true"] if force else [])]
    with errors():
        if "=" in preset and not preset.endswith((".yaml", ".yml")):
            raise ConfigError(f"{preset!r} is an override, but a preset comes first: pixart {command} PRESET "
                              f"[key=value ...]; presets: {', '.join(preset_names(command))}")
        if load is not None:
            return load(preset, extra)
        return load_config(config_class(command), preset, extra, kind=command)


def config_keys(model, prefix: str = "") -> list[str]:
    """'key: description' lines for every field of a config model (nested models flattened with dots)."""
    lines = []
    for name, field in model.model_fields.items():
        sub = field.annotation if isinstance(field.annotation, type) else None
        if sub is not None and hasattr(sub, "model_fields"):
            lines += config_keys(sub, f"{prefix}{name}.")
        else:
            lines.append(f"{prefix}{name}: {field.description or ''}{' (required)' if field.is_required() else ''}")
    return lines


class ConfigCommand(TyperCommand):
    """A command whose help ends with its presets and config keys, read from its config model only when the help
    is shown (so listing the commands imports no config class, and no torch)."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        from storage.configio import preset_names

        kind = "pipeline" if self.name == "status" else self.name  # status reads the pipeline's presets
        paragraphs = [f"Presets (configs/{kind}/): {', '.join(preset_names(kind))}",
                      "Config keys (override with key=value):", *config_keys(config_class(self.name))]
        if self.rich_markup_mode == "rich":
            from rich.markup import escape

            paragraphs = [escape(p) for p in paragraphs]
        self.epilog = "\n\n".join(paragraphs)
        super().format_help(ctx, formatter)
