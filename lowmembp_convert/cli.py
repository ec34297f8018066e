"""``lowmembp-convert ckpt_in ckpt_out``: fold norm affines into a checkpoint on disk, shard by shard.

The output loads with the stock library (``AutoModel*.from_pretrained``, ``timm.create_model`` +
``load_state_dict``) and computes the same outputs; ``lowmembp_convert.convert`` then recognises the
folded norms. Exit codes: 0 done, 1 bad input or failed ``--verify`` (nothing written), 2 usage,
130 interrupted (nothing written).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from .checkpoint.atomic import sigterm_as_interrupt
from .checkpoint.errors import CheckpointError

PROG = "lowmembp-convert"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Fold LayerNorm/RMSNorm affine weights into the Linear layers that consume them, streaming a "
            "checkpoint shard by shard. The result loads with the stock library and computes the same outputs."
        ),
        epilog=(
            "examples:\n"
            f"  {PROG} --demo      (builds small models locally, converts and verifies them, no downloads)\n"
            f"  {PROG} ./Llama-3-8B ./Llama-3-8B-lowmembp\n"
            f"  {PROG} vit_b16.safetensors vit_b16_lowmembp.safetensors --arch vit_base_patch16_224\n"
            f"  {PROG} ./roberta-base ./roberta-base-lowmembp --untie-embeddings --verify\n"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("ckpt_in", help="transformers model directory, or a .safetensors/.bin/.pth state dict")
    parser.add_argument("ckpt_out", help="where to write the converted checkpoint (same kind as ckpt_in)")
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
        help="extra timm.create_model arguments, e.g. '{\"num_classes\": 10}'",
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
    parser.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="load both checkpoints with the stock library and compare outputs on a random batch "
        "before the output is moved into place (skipped when they do not fit in memory)",
    )
    parser.add_argument("--verify-rtol", type=float, default=None, metavar="X", help="tolerance of --verify")
    parser.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def format_report(report: dict[str, Any]) -> str:
    """The report as a few human-readable lines (the plan table for --dry-run)."""
    size = report["bytes"] / 2**30
    lines = [
        f"{'plan for' if report['dry_run'] else 'converted'} {report['input']}",
        f"  model: {report['model']}; {report['format']}, {len(report['shards'])} shard(s), {size:.2f} GiB",
    ]
    width = max((len(s["module"]) for s in report["norms"]), default=0)
    for site in report["norms"]:
        action = "folded" if site["action"] == "fold" and site["already_folded"] else site["action"]
        detail = f"-> {', '.join(site['consumers'])}" if site["action"] == "fold" else site["reason"]
        lines.append(f"  {action:<12} {site['module']:<{width}}  {detail}")
    lines.append(
        f"  {len(report['folded'])} norm(s) folded now, {len(report['already_folded'])} already folded; "
        f"{len(report['changed_tensors'])} tensor(s) changed, {len(report['added_tensors'])} added"
    )
    if report["untied"]:
        lines.append(f"  untied from the input embedding: {', '.join(report['untied'])}")
    if report["skipped_files"]:
        lines.append(f"  not carried over (unconverted weights): {', '.join(report['skipped_files'])}")
    verify = report.get("verify")
    if verify:
        err = verify.get("max_rel_error")
        detail = f"max relative error {err:.3g} (rtol {verify['rtol']:.3g})" if err is not None else verify["reason"]
        lines.append(f"  verify: {verify['status']}, {detail}")
    where = "(nothing written: --dry-run)" if report["dry_run"] else f"in {report.get('seconds', 0):.1f} s"
    lines.append(f"  output: {report['output']} {where}")
    return "\n".join(lines)


def _fail(message: str, as_json: bool, code: int) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    if as_json:
        print(json.dumps({"error": message, "exit_code": code}))
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit code (the console script passes it to ``sys.exit``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv == ["--demo"]:
        from .demo import main as demo

        return demo()
    args = build_parser().parse_args(argv)
    from .checkpoint.conversion import convert_checkpoint  # heavy imports after argument errors

    try:
        with sigterm_as_interrupt():
            report = convert_checkpoint(
                args.ckpt_in,
                args.ckpt_out,
                arch=args.arch,
                model_kwargs=args.model_kwargs,
                untie_embeddings=args.untie_embeddings,
                force=args.force,
                dry_run=args.dry_run,
                verify=args.verify,
                verify_rtol=args.verify_rtol,
                progress=not (args.quiet or args.json),
            )
    except CheckpointError as exc:
        return _fail(str(exc), args.json, 1)
    except KeyboardInterrupt:
        return _fail(f"{args.ckpt_out}: interrupted; nothing was written and ckpt_in is unchanged", args.json, 130)
    except OSError as exc:  # disk full, permission denied: the output was removed by atomic_output
        where = exc.filename or args.ckpt_out
        return _fail(f"{where}: {exc.strerror or exc}; fix: check free space and permissions", args.json, 1)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
