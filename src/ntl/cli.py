"""``ntl`` command line: ``ntl demo`` (the CE-vs-NTL experiment) and ``ntl bench``."""

from __future__ import annotations

import sys

USAGE = """usage: ntl <command> [options]

commands:
  demo    train a tiny LM on arithmetic with CE, CE+NTL-MSE, CE+NTL-W1 and compare (ntl demo --help)
  bench   speed and memory of ntl vs its peers (ntl bench --help)
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "demo":
        from .demo import main as demo_main

        return int(demo_main(rest) or 0)
    if cmd == "bench":
        from .bench.harness import main as bench_main

        return int(bench_main(rest) or 0)
    print(f"unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
