"""Train the bundled demo model (swan_serve/demo_model) from scratch on the CPU.

Dev only: needs torch (`pip install -e .[train]`). Re-running with the same
arguments on the same Python version gives the same data, tokenizer and batches;
an interrupted run continues with --resume, and every checkpoint is also exported,
so the output directory always holds a loadable model.

    nice -n 5 python scripts/train_demo_model.py            # the committed model
    python scripts/train_demo_model.py --smoke              # 2-minute check
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from demo_training.model import Qwen3Shape  # noqa: E402
from demo_training.train import TrainConfig, run  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "swan_serve" / "demo_model")
    parser.add_argument("--work-dir", type=Path, default=REPO / "build" / "demo_training")
    parser.add_argument("--steps", type=int, default=480)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--lr", type=float, default=4e-3)
    parser.add_argument("--warmup", type=int, default=40)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=768)
    parser.add_argument("--chat-share", type=float, default=0.35)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-minutes", type=float, default=36.0)
    parser.add_argument(
        "--stop-at", type=int, help="stop after this step (the schedule still plans --steps)"
    )
    parser.add_argument("--resume", action="store_true", help="continue from --work-dir")
    parser.add_argument(
        "--smoke", action="store_true", help="a tiny 2-minute run into build/ (checks the path)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shape = Qwen3Shape(
        vocab_size=args.vocab_size,
        num_hidden_layers=args.layers,
        intermediate_size=args.intermediate,
    )
    config = TrainConfig(
        out_dir=args.out,
        work_dir=args.work_dir,
        shape=shape,
        steps=args.steps,
        batch=args.batch,
        seq_len=args.seq_len,
        lr=args.lr,
        warmup=args.warmup,
        chat_share=args.chat_share,
        seed=args.seed,
        threads=args.threads,
        max_minutes=args.max_minutes,
        resume=args.resume,
        stop_at=args.stop_at,
        command="python scripts/train_demo_model.py " + shlex.join(argv or sys.argv[1:]),
    )
    if args.smoke:
        smoke_dir = REPO / "build" / "demo_smoke"
        config = replace(
            config,
            out_dir=smoke_dir / "model",
            work_dir=smoke_dir,
            steps=40,
            batch=8,
            seq_len=256,
            warmup=10,
            eval_every=20,
            save_every=20,
            eval_windows=8,
            max_minutes=2.0,
        )
    result = run(config)
    figures = result["figures"]
    keys = ("steps_done", "minutes", "train_loss", "heldout_source_loss", "heldout_chat_loss")
    print(json.dumps({key: figures[key] for key in keys} | {"mlx": figures["mlx"]}, indent=2))
    print(f"size: {figures['size_mb']:.2f} MB in {config.out_dir}")
    for sample in result["samples"]:
        print(f"--- {sample['kind']} t={sample['temp']} {sample['prompt']!r}\n{sample['output']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
