"""swan-serve command line (placeholder until the server lands)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("swan-serve: serving is not built yet", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
