"""The `resnet-jax` command line: the group, its commands (one module per concern) and the one error boundary.

Each command parses its options (`options`) and calls the library (`resnet_jax.api` and the jobs).

Bad input raises `UserError` (or `ValueError` from the host-side packages); `main` prints it as
one line `error: ...` and exits with code 2. Set RESNET_JAX_DEBUG=1 for the full traceback.
"""
from __future__ import annotations

import os
import sys

import click

from resnet_jax.cli import audit, bench, explain, model, paper, stores
from resnet_jax.errors import failure_line


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def cli():
    """Evaluate ResNet image classifiers through their per-example gradients.

    Typical flow: `train` (or `convert` torchvision weights), `extract` per-example gradients (GW),
    predictions (P) and features (FM), then `gradcam` and `similarity` (Table 1); `reproduce` runs it all,
    clustering (Tables 2 and 3) included.
    """


for _command in (model.models_cmd, model.train, model.convert, model.info, stores.extract, stores.gradcam,
                 stores.similarity, paper.reproduce_cmd, paper.curvature, audit.audit_cmd, explain.explain_cmd,
                 bench.bench):
    cli.add_command(_command)


def _exit_now(code: int) -> None:
    """Exits without interpreter teardown, which can crash while XLA compiles in other threads."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv=None) -> None:
    """Entry point and the one error boundary: every failure becomes one line on stderr; exit code 2 for
    expected failures, 1 for unexpected ones (the traceback only with RESNET_JAX_DEBUG=1), 130 on Ctrl-C."""
    try:
        cli.main(args=argv, standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("interrupted: run the same command again to resume (finished work is kept)", err=True)
        if argv is None:  # the console script: no teardown racing the compiler threads
            _exit_now(130)
        sys.exit(130)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:
        if os.environ.get("RESNET_JAX_DEBUG"):
            raise
        line, code = failure_line(e)
        click.echo(line, err=True)
        sys.exit(code)

