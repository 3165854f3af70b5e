"""``python -m course {doctor,demo}``."""

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
    args = parser.parse_args(argv)
    if args.command == "doctor":
        from course.doctor import run_doctor

        return run_doctor()
    from course.demo import run_demo

    return run_demo(
        model_name=args.model,
        device=args.device,
        steps=args.steps,
        prefix_len=args.prefix_len,
        n_eval=args.n_eval,
        seed=args.seed,
    )


if __name__ == "__main__":
    sys.exit(main())
