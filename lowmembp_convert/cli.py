"""``lowmembp-convert ckpt_in ckpt_out``: fold norm affines into a checkpoint on disk, shard by shard.

The output loads with the stock library (``AutoModel*.from_pretrained``, ``timm.create_model`` +
``load_state_dict``) and computes the same outputs; ``lowmembp_convert.convert`` then recognises the
folded norms. Also runs as ``python -m lowmembp_convert``. Exit codes (``EXIT_CODES``):

- 0: done (also when an interrupt arrives after the output is complete: the output is valid);
- 1: bad input, unwritable ckpt_out or failed ``--verify``: nothing written;
- 2: usage error;
- 3: nothing to fold (a post-norm model such as BERT): nothing written, ``--force-copy`` writes a copy;
- 130: interrupted (Ctrl-C, SIGTERM) before the output was complete: nothing written.

This module imports only the standard library at load time; torch and the converter are imported
after the arguments are checked, and an interrupt during those imports is one line, not a traceback.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Sequence
from typing import Any

PROG = "lowmembp-convert"

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOTHING_TO_FOLD = 3
EXIT_INTERRUPTED = 130
EXIT_CODES = (
    (EXIT_OK, "converted (or --dry-run / --demo done; also Ctrl-C after the output was complete)"),
    (EXIT_ERROR, "bad input, ckpt_out not writable, or --verify failed: nothing written"),
    (EXIT_USAGE, "bad command line"),
    (EXIT_NOTHING_TO_FOLD, "nothing to fold (post-norm model such as BERT): nothing written, unless --force-copy"),
    (EXIT_INTERRUPTED, "interrupted (Ctrl-C, SIGTERM) before the output was complete: nothing written"),
)


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("lowmembp-convert")
    except metadata.PackageNotFoundError:
        return str(getattr(sys.modules.get("lowmembp_convert"), "__version__", "unknown"))


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from exc
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    exit_codes = "\n".join(f"  {code:<4} {meaning}" for code, meaning in EXIT_CODES)
    parser = argparse.ArgumentParser(
        prog=PROG,
        usage=(
            "%(prog)s [options] ckpt_in ckpt_out\n"
            "       %(prog)s --dry-run [options] ckpt_in [ckpt_out]\n"
            "       %(prog)s --demo | --version | --help"
        ),
        description=(
            "Fold LayerNorm/RMSNorm affine weights into the Linear layers that consume them, streaming a "
            "checkpoint shard by shard. The result loads with the stock library and computes the same outputs."
        ),
        epilog=(
            "examples:\n"
            f"  {PROG} --demo      (builds small models locally, converts and verifies them, no downloads)\n"
            f"  {PROG} ./Llama-3-8B ./Llama-3-8B-lowmembp\n"
            f"  {PROG} ./Llama-3-8B --dry-run\n"
            f"  {PROG} vit_b16.safetensors vit_b16_lowmembp.safetensors --arch vit_base_patch16_224\n"
            f"  {PROG} model_best.pth.tar model_best_lowmembp.pth.tar --arch vit_base_patch16_224 "
            "--model-kwargs '{\"num_classes\": 10}'\n"
            f"  {PROG} ./roberta-base ./roberta-base-lowmembp --untie-embeddings --verify\n"
            "\n"
            "exit codes:\n"
            f"{exit_codes}\n"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "ckpt_in", nargs="?", help="transformers model directory, or a .safetensors/.bin/.pth/.pth.tar state dict"
    )
    parser.add_argument(
        "ckpt_out",
        nargs="?",
        help="where to write the converted checkpoint (same kind as ckpt_in); optional with --dry-run",
    )
    parser.add_argument(
        "--arch",
        metavar="NAME",
        help="for a bare state dict: a timm model name (e.g. vit_base_patch16_224) or a transformers config directory",
    )
    parser.add_argument(
        "--model-kwargs",
        metavar="JSON",
        type=_json_object,
        default=None,
        help="extra timm.create_model arguments, e.g. '{\"num_classes\": 10}'; with --arch CONFIG_DIR, config "
        "attributes to override (e.g. '{\"num_labels\": 3}'); refused for a transformers model directory, "
        "whose config.json defines the model",
    )
    parser.add_argument(
        "--untie-embeddings",
        action="store_true",
        help="fold a norm into an output layer tied to the input embedding (e.g. a masked-LM head's "
        "LayerNorm) by giving that layer its own weight (config gets tie_word_embeddings=false); without "
        "it that norm keeps its affine. A decoder's final norm always keeps it: its output is the last "
        "hidden state the model returns",
    )
    parser.add_argument("--force", action="store_true", help="replace ckpt_out if it exists")
    parser.add_argument(
        "--force-copy",
        action="store_true",
        help="write ckpt_out even when nothing can be folded (a post-norm model such as BERT or MiniLM: "
        "an unchanged copy); without it such a run writes nothing and exits 3",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan, write nothing (ckpt_out is optional); reads the norm weights (small), so "
        "the plan decides as convert() will",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="load both checkpoints with the stock library and compare outputs on a random batch "
        "before the output is moved into place (skipped when they do not fit in memory)",
    )
    parser.add_argument(
        "--verify-rtol", type=_positive_float, default=None, metavar="X", help="tolerance of --verify (> 0)"
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--demo",
        action="store_true",
        help="build small models locally, convert and verify them, print the reports (no downloads); "
        "takes no other arguments",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> None:
    """What argparse cannot express: the positionals needed depend on --demo and --dry-run."""
    if args.demo:
        if [a for a in argv if a != "--demo"]:
            parser.error("--demo takes no other arguments")
        return
    if args.ckpt_in is None:
        parser.error("the following arguments are required: ckpt_in, ckpt_out")
    if args.ckpt_out is None and not args.dry_run:
        parser.error("the following arguments are required: ckpt_out (optional only with --dry-run)")


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def print_report(report, as_json: bool) -> None:
    """The Report on stdout: its text, or ``to_json()`` with --json."""
    print(report.to_json(indent=2) if as_json else str(report))


def _note(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def _fail(message: str, as_json: bool, code: int) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    if as_json:
        print(json.dumps({"error": message, "exit_code": code}))
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit code (the console script passes it to ``sys.exit``).

    ``argv`` None means this is the process's own command line (the console script,
    ``python -m lowmembp_convert``): then an interrupt during interpreter shutdown after a complete
    output is ignored too, so the exit code stays 0.
    """
    as_process = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args, argv)
    committed: list[Any] = []
    target = args.ckpt_out or args.ckpt_in
    try:
        code = _run(args, committed)
    except KeyboardInterrupt:
        _forget_interrupt()
        if not committed:
            what = f"{target}: interrupted" if target else "interrupted"
            return _fail(f"{what}; nothing was written and ckpt_in is unchanged", args.json, EXIT_INTERRUPTED)
        _note(f"interrupted after {committed[0]} was complete; the output is valid")
        code = EXIT_OK
    if as_process:
        _forget_interrupt()  # an interrupt some library caught must not turn our exit code into -2 either
        if committed:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # the output is in place: exit 0 even if Ctrl-C lands now
    return code


def _forget_interrupt() -> None:
    """Undo CPython's record of a KeyboardInterrupt raised inside a nested ``PyRun_*`` call (torch runs
    some during import and tracing): even when caught, it makes the interpreter kill itself with
    SIGINT at exit, so the exit code would be -2 instead of ours. Any later ``PyRun_*`` resets it."""
    try:
        import ctypes

        ctypes.pythonapi.PyRun_SimpleString(b"pass")
    except Exception:  # not CPython: nothing recorded
        pass


def _run(args: argparse.Namespace, committed: list[Any]) -> int:
    from .checkpoint.atomic import deferred_interrupts, interrupt_guard

    with interrupt_guard(_note):
        if args.demo:
            from .demo import main as demo

            return demo()
        # heavy imports (torch, transformers) only after argument errors; an interrupt in the middle
        # of torch's import can abort the process or be swallowed, so it is held until they are done
        with deferred_interrupts():
            from .checkpoint.conversion import convert_checkpoint
            from .checkpoint.errors import CheckpointError
        target = args.ckpt_out or args.ckpt_in
        try:
            report = convert_checkpoint(
                args.ckpt_in,
                args.ckpt_out,
                arch=args.arch,
                model_kwargs=args.model_kwargs,
                untie_embeddings=args.untie_embeddings,
                force=args.force,
                force_copy=args.force_copy,
                dry_run=args.dry_run,
                verify=args.verify,
                verify_rtol=args.verify_rtol,
                progress=not (args.quiet or args.json),
                log=_note,
                on_commit=committed.append,
            )
        except CheckpointError as exc:
            return _fail(str(exc), args.json, EXIT_ERROR)
        except OSError as exc:  # not raised while writing (those are CheckpointErrors): name ckpt_out anyway
            return _fail(
                f"{target}: {exc.strerror or exc}; fix: check free space and permissions", args.json, EXIT_ERROR
            )
        print_report(report, args.json)
        code = EXIT_OK
        summary = report.checkpoint
        if not summary.dry_run and not summary.written and summary.nothing_to_fold:
            _note(f"{summary.nothing_to_fold}; nothing written (--force-copy writes an unchanged copy)")
            code = EXIT_NOTHING_TO_FOLD
    return code


if __name__ == "__main__":
    sys.exit(main())
