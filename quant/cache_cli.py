"""`swan-quant cache ls | rm`: the quantized builds swan-serve keeps, with sizes and recipes."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .cache import CacheEntry, ModelCache


class CacheCommandError(Exception):
    """A cache subcommand failed; the message is one line."""


def add_cache(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cache", help="list or remove swan-serve's cached quantized builds")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="cache root (default: $SWAN_SERVE_CACHE or ~/.cache/swan-serve)")
    actions = p.add_subparsers(dest="cache_command", metavar="ACTION", required=True)
    actions.add_parser("ls", help="list entries: key, size, model, recipe, target bpw")
    rm = actions.add_parser("rm", help="remove entries by key (or key prefix), or --all")
    rm.add_argument("keys", nargs="*", metavar="KEY")
    rm.add_argument("--all", action="store_true", help="remove every entry")
    p.set_defaults(run=run_cache)


def run_cache(args: argparse.Namespace) -> int:
    cache = ModelCache(args.cache_dir)
    if args.cache_command == "ls":
        print(format_entries(cache.entries(), cache.root))
        return 0
    targets = select_entries(cache.entries(), args.keys, args.all)
    for entry in targets:
        size = entry.size_bytes()
        cache.remove(entry)
        print(f"removed {entry.key} ({entry.info.get('model', '?')}, {_size(size)})")
    return 0


def select_entries(
    entries: list[CacheEntry], keys: list[str], everything: bool
) -> list[CacheEntry]:
    if everything:
        return entries
    if not keys:
        raise CacheCommandError("name the KEY(s) to remove (see `swan-quant cache ls`) or --all")
    chosen = []
    for key in keys:
        matches = [e for e in entries if e.key.startswith(key)]
        if len(matches) != 1:
            found = "no entry" if not matches else f"{len(matches)} entries"
            raise CacheCommandError(f"{found} with a key starting with {key!r}")
        chosen.append(matches[0])
    return chosen


def format_entries(entries: list[CacheEntry], root: Path) -> str:
    if not entries:
        return f"no cached builds in {root}"
    rows = [("KEY", "SIZE", "MODEL", "RECIPE", "TARGET BPW", "CREATED")]
    for e in entries:
        recipe = (e.info.get("recipe") or {}).get("name", "?")
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.info.get("created", 0)))
        rows.append((e.key, _size(e.size_bytes()), str(e.info.get("model", "?")), recipe,
                     str(e.info.get("target_bpw", "-")), created))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    total = sum(e.size_bytes() for e in entries)
    return "\n".join([*lines, f"{len(entries)} entries, {_size(total)} in {root}"])


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"
