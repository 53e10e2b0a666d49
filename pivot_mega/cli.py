"""``pivot-mega`` command line: assembles the commands, each defined next to the code it runs."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import MutableMapping

from . import signals

# A train job may be signalled (scancel, Slurm's pre-timeout warning) while the imports below run:
# its stop handlers come first, so that the signal stops it cleanly instead of killing it.
if __name__ == "__main__" or os.path.basename(sys.argv[0]) == "pivot-mega":
    if sys.argv[1:2] == ["train"]:
        signals.install_early()

from . import demo  # noqa: E402 - after the handlers
from .convert import commands as convert_commands  # noqa: E402
from .data import commands as data_commands  # noqa: E402
from .eval import commands as eval_commands  # noqa: E402
from .training import commands as training_commands  # noqa: E402

# Each ``register(sub)`` adds its subparsers and returns {command name: run(args) -> exit code}; what a
# command runs is imported when it runs. In this order ``pivot-mega --help`` lists the commands.
REGISTRARS = (
    convert_commands.register,
    data_commands.register,
    training_commands.register,
    eval_commands.register,
    convert_commands.register_transplant,
    demo.register,
)


# Freed blocks are remapped into growing segments: far less fragmentation with packed rows of varying
# length and FSDP's gather/free cycle. Read once, at the first CUDA allocation: set before any command
# runs; a setting of the user's (either name: torch reads both) is kept as it is.
CUDA_ALLOC_CONF = ("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
ALLOC_CONF_NAMES = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


def default_cuda_alloc_conf(environ: MutableMapping[str, str]) -> bool:
    """Sets ``CUDA_ALLOC_CONF`` in ``environ`` unless an allocator setting is there; → whether it did."""
    if any(name in environ for name in ALLOC_CONF_NAMES):
        return False
    name, value = CUDA_ALLOC_CONF
    environ[name] = value
    return True


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(prog="pivot-mega", description="PIVOT MLLM training system")
    sub = parser.add_subparsers(dest="command", required=True)
    runners = {}
    for register in REGISTRARS:
        runners.update(register(sub))
    return parser, runners


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.checkpoint.api import CheckpointException

    from .config import ConfigError
    from .models import CheckpointError
    from .training.checkpoint.dcp import describe_dcp_failure
    from .training.metrics import MetricsFileError

    default_cuda_alloc_conf(os.environ)
    parser, runners = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return runners[args.command](args) or 0
    except (CheckpointError, ConfigError, MetricsFileError) as e:
        print(f"pivot-mega {args.command}: error: {e}", file=sys.stderr)
        return 2
    except CheckpointException as e:  # DCP's, a BaseException: each rank's failure on one line
        print(f"pivot-mega {args.command}: error: checkpoint: {describe_dcp_failure(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
