"""`cirron-otel`: the command line for spools (inspect, validate, export, replay, tail).

Never imported by `import cirron_otel` (start-up cost): only the console script and
`python -m cirron_otel` load it. Each command lives in its own module and imports what it
needs (OpenTelemetry, protobuf, gRPC) only when it runs.

Exit codes scripts can rely on: 0 ok, 1 problems found (or the command failed), 2 usage
error (click's own code for a bad option or argument).
"""

from __future__ import annotations

import click

from .export_cmd import export
from .inspect_cmd import inspect
from .replay_cmd import replay
from .tail_cmd import tail
from .validate_cmd import validate

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="cirron-otel", prog_name="cirron-otel")
def main() -> None:
    """Work with Cirron spools (the `<output_dir>/spool/*.json` batches `ci.profile()` writes).

    PATH is an output directory (`./.cirron`), its `spool/` directory, or one batch file.

    Exit codes: 0 ok, 1 problems found, 2 usage error.
    """


for _command in (inspect, validate, export, replay, tail):
    main.add_command(_command)

__all__ = ["EXIT_OK", "EXIT_PROBLEMS", "EXIT_USAGE", "main"]
