"""Speed and quality benchmarks of xrayfusion; prints markdown tables (docs/benchmarks.md holds them).

    python scripts/benchmark.py speed     # (a) joint vs (b) seed-style ImageFolder loops vs (c) lean loops, (d)
    python scripts/benchmark.py switches  # precision x channels-last x compile x workers for joint training
    python scripts/benchmark.py precision # per branch: float32 vs bfloat16 step time (model.bf16_branches)
    python scripts/benchmark.py profile   # where the time of one joint training step goes (torch.profiler)
    python scripts/benchmark.py quality   # trains experiment=kermany_cpu, prints the Kermany test table
    python scripts/benchmark.py bootstrap # evaluate's bootstrap intervals: all resamples at once vs a loop
    python scripts/benchmark.py feature-cache  # the same ensemble with and without model.feature_cache
    python scripts/benchmark.py speed --device cuda   # GPU: bf16 + channels-last at 224 px

Every contender trains the same models (timm, 1-channel input, fresh weights), at the same image size, batch size
and epochs, on the same files, with the same optimizer (AdamW + one-cycle), class-weighted loss and augmentation
taken from the composed xrayfusion config. Contenders alternate within each round so machine drift hits all.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from bench import bootstrap, feature_cache, precision, profile, quality, speed, switches

# one module per subcommand (scripts/bench/), each with add_arguments(parser) and run(args)
COMMANDS = {
    "speed": speed,
    "switches": switches,
    "profile": profile,
    "precision": precision,
    "quality": quality,
    "bootstrap": bootstrap,
    "feature-cache": feature_cache,
}


def build_parser() -> argparse.ArgumentParser:
    """The command line: one subcommand per COMMANDS entry (tests/test_docs.py parses the documented commands)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in COMMANDS.items():
        module.add_arguments(sub.add_parser(name))
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    COMMANDS[args.command].run(args)


if __name__ == "__main__":
    main()
