"""The ``cvnet`` command line: one sub-command per user job.

Each job lives in its own module under ``jobs/`` and exposes ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``. Job modules import only the standard
library at module level, and a sub-command's arguments are added only when it is the one
chosen (a typed config's flags need pydantic), so ``cvnet --help`` stays fast; heavy imports
happen in ``run``.
The same module is the entrypoint that ``ray job submit`` runs (``python -m jobs.<name>``).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from types import ModuleType

# sub-command -> module (kept in the order users meet them)
COMMANDS: dict[str, str] = {
    "demo": "jobs.demo",
    "synth": "jobs.synth",
    "manifest": "jobs.manifest",
    "extract": "jobs.extract",
    "mine": "jobs.mine",
    "audit-overlap": "jobs.audit_overlap",
    "train-global": "jobs.train_global",
    "train-rerank": "jobs.train_rerank",
    "evaluate": "jobs.evaluate",
    "rerank": "jobs.rerank",
    "evaluate-gldv2": "jobs.evaluate_gldv2",
    "report": "jobs.report",
    "promote": "jobs.promote",
    "rollback": "jobs.rollback",
    "refresh": "jobs.refresh",
    "submit": "jobs.submit",
}


def available_commands() -> dict[str, ModuleType]:
    """The sub-commands whose modules are present, by name."""
    found = {}
    for name, module in COMMANDS.items():
        try:
            found[name] = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise
    return found


class _LazyCommands(argparse._SubParsersAction):
    """Sub-commands whose ``add_arguments`` runs only when the command is chosen."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pending: dict[str, ModuleType] = {}

    def __call__(self, parser, namespace, values, option_string=None):
        module = self.pending.pop(values[0], None)
        if module is not None:
            module.add_arguments(self.choices[values[0]])
        super().__call__(parser, namespace, values, option_string)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cvnet", description="CVNet retrieval pipeline")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", action=_LazyCommands)
    for name, module in available_commands().items():
        job = sub.add_parser(name, help=module.HELP, description=module.HELP)
        job.set_defaults(_run=module.run)
        sub.pending[name] = module
    return parser


def add_store_arguments(parser: argparse.ArgumentParser) -> None:
    """``--store`` and ``--tracking-uri`` of a job with hand-written flags (a typed config has
    them as keys); the registry and MLflow runs follow ``cvnet.tracking.resolve_tracking_uri``."""
    parser.add_argument("--store", default=None, help="store root (default CVNET_STORE or ./cvnet-store)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default MLFLOW_TRACKING_URI, else SQLite in the store)")


QUIET_LOGGERS = ("faiss.loader",)  # INFO lines about which CPU build it loads


def configure_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not verbose:
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)


def run_job(run, args: argparse.Namespace, name: str) -> int:
    """Run a job; an exception ends it with a one-line error (``-v`` shows the traceback)."""
    from pipelines.ray_runtime import use_local_ray_env

    use_local_ray_env(getattr(args, "address", None))  # before any job code imports ray
    try:
        return int(run(args) or 0)
    except KeyboardInterrupt:
        logging.getLogger("cvnet").error("%s: interrupted", name)
        return 130
    except Exception as err:  # the job's own errors name the bad item; keep them readable
        if args.verbose:
            raise
        from cvnet.storage import redact

        logging.getLogger("cvnet").error("%s failed: %s: %s (run with -v for the traceback)",
                                         name, type(err).__name__, redact(str(err)))
        return 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    return run_job(args._run, args, f"cvnet {args.command}")


def entrypoint(module_name: str, argv: list[str] | None = None) -> int:
    """Run one job module as a script (``python -m jobs.extract ...``)."""
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"python -m {module_name}", description=module.HELP)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    module.add_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    return run_job(module.run, args, module_name)


if __name__ == "__main__":
    sys.exit(main())
