"""Command line: `python -m sims figures` (the theory figures) and `python -m sims plot`.

    python -m sims figures [--draws 200] [--steps 2000] [--seed 0] [--device auto]
                           [--dtype float64] [--threads 1] [--out figures] [--only f1,f4]
                           [--resume]
    python -m sims plot [--out figures] [--only ...]     redraw from the CSVs only
    python -m sims.speed                                  the speed benchmark

Bad input (an option, an --out that is not a folder, a CSV that does not hold what its
figure reads) ends with exit status 2 and one `error:` line naming it, as does a second
run into an --out that another run is writing (it names the other run's pid). Ctrl-C ends
with exit status 130 and one line saying how to resume.
"""
import argparse
import sys

import torch

from .experiments import Settings
from .figures import make_figures, resolve_only


def build_parser():
    """The two commands and their options; docs/api.md's option table is checked against it."""
    parser = argparse.ArgumentParser(prog="python -m sims", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    figures = commands.add_parser("figures", help="simulate and draw F1..F6")
    defaults = Settings()
    figures.add_argument("--draws", type=int, default=defaults.draws,
                         help=f"random draws per curve point (default {defaults.draws})")
    figures.add_argument("--steps", type=int, default=defaults.steps,
                         help=f"the step budget S (default {defaults.steps}): F2, F3, F6 run "
                              "S steps per phase (lp-ft: S + S), F1 and F5 2 S, F4 10 S (all) "
                              "and 1000 S (first, exact)")
    figures.add_argument("--seed", type=int, default=defaults.seed)
    figures.add_argument("--device", default=defaults.device, help="auto | cpu | cuda[:i]")
    figures.add_argument("--dtype", default=defaults.dtype, choices=["float64", "float32"])
    figures.add_argument("--threads", type=int, default=1,
                         help="torch CPU threads (default 1: the tensors are small, and on a "
                              "shared machine extra threads cost more than they give)")
    figures.add_argument("--resume", action="store_true",
                         help="reuse CSVs already made with the same settings")
    plot = commands.add_parser("plot", help="redraw the figures from the CSVs in --out")
    for sub in (figures, plot):
        sub.add_argument("--out", default="figures", help="output folder (default figures/)")
        sub.add_argument("--only", default=None, help="comma-separated figures, e.g. f1,f4")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        resolve_only(args.only)
        if args.command == "plot":
            make_figures(Settings(), args.out, args.only, resume=True, log=print,
                         simulate=False)
            return 0
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
        settings = Settings(draws=args.draws, steps=args.steps, seed=args.seed,
                            dtype=args.dtype, device=args.device)
        make_figures(settings, args.out, args.only, resume=args.resume)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:   # every finished CSV and figure is already written, atomically
        again = ("`python -m sims plot` with the same arguments redraws them"
                 if args.command == "plot" else
                 "rerun the same command with --resume to keep the finished experiments")
        print(f"\ninterrupted; {again}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
