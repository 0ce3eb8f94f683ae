"""The one ``gpufleet`` command; each feature registers its sub-command group."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from gpufleet import __version__
from gpufleet.core.config import CommonSettings, load_settings
from gpufleet.core.errors import ConfigError, GpufleetError
from gpufleet.core.extras import missing_extra
from gpufleet.core.logging import configure_logging
from gpufleet.deviceapi.cli import app as device_api_app
from gpufleet.deviceapi.cli import gpus_app
from gpufleet.exporter.cli import exporter as exporter_command
from gpufleet.gpu.cli import app as gpu_app
from gpufleet.inventory.cli import app as inventory_app
from gpufleet.kcache.cli import app as cache_app

app = typer.Typer(
    name="gpufleet",
    help="Know the GPUs in your Kubernetes fleet.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Help texts say `[env NAME; default]`: plain text, not rich markup.
    rich_markup_mode=None,
)
app.add_typer(gpu_app, name="gpu")
app.add_typer(inventory_app, name="inventory")
app.add_typer(device_api_app, name="device-api")
app.add_typer(gpus_app, name="gpus")
app.add_typer(cache_app, name="cache")
app.command("exporter")(exporter_command)


def _version(value: bool) -> None:
    if value:
        sys.stdout.write(f"gpufleet {__version__}\n")
        raise typer.Exit()


@app.callback()
def _main(
    ctx: typer.Context,
    log_level: Annotated[
        str | None, typer.Option("--log-level", help="debug, info, warning, error [env LOG_LEVEL].")
    ] = None,
    log_format: Annotated[
        str | None, typer.Option("--log-format", help="json or text [env LOG_FORMAT].")
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print version.")
    ] = False,
) -> None:
    """Configure logging for whichever sub-command runs."""
    settings = load_settings(CommonSettings, log_level=log_level, log_format=log_format)
    service = "gpufleet" if ctx.invoked_subcommand is None else f"gpufleet-{ctx.invoked_subcommand}"
    configure_logging(service, level=settings.log_level.value, fmt=settings.log_format.value)


def main() -> None:
    """Console entry point: gpufleet errors become one line on stderr, not a traceback."""
    try:
        # Standalone mode: usage errors, --help and typer.Exit end the process
        # here with click's own exit codes; our errors come through to us.
        app()
    except ConfigError as exc:
        print(f"gpufleet: configuration error: {exc}", file=sys.stderr)
        sys.exit(2)
    except GpufleetError as exc:
        print(f"gpufleet: error: {exc}", file=sys.stderr)
        sys.exit(1)
    except Exception as exc:
        # The modules of an optional extra are imported where they are used,
        # so a command that needs one finds out here, not at start-up.
        needed = missing_extra(exc)
        if needed is None:
            raise
        print(f"gpufleet: configuration error: {needed}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
