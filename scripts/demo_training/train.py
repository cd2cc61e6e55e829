"""The training loop: deterministic batches, held-out evaluation, resumable checkpoints."""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from tqdm import tqdm

from . import data
from .card import model_card
from .export import compare_with_mlx, directory_megabytes, write_checkpoint
from .model import Qwen3ForCausalLM, Qwen3Shape
from .samples import format_samples, generate_samples


@dataclass
class TrainConfig:
    out_dir: Path
    work_dir: Path
    shape: Qwen3Shape = field(default_factory=Qwen3Shape)
    steps: int = 1000
    batch: int = 16
    seq_len: int = 512
    lr: float = 3e-3
    warmup: int = 60
    weight_decay: float = 0.1
    chat_share: float = 0.35
    seed: int = 0
    threads: int = 2
    eval_every: int = 100
    save_every: int = 100
    eval_windows: int = 24
    max_minutes: float = 35.0
    stop_at: int | None = None  # stop after this step; the schedule still plans `steps`
    resume: bool = False
    command: str = ""


def lr_at(step: int, config: TrainConfig) -> float:
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def loss_of(model: Qwen3ForCausalLM, batch: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(batch[:, :-1])
    return F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())


@torch.no_grad()
def evaluate(model: Qwen3ForCausalLM, windows: torch.Tensor, rows: int = 8) -> float:
    model.eval()
    losses = [loss_of(model, windows[i : i + rows]).item() for i in range(0, len(windows), rows)]
    model.train()
    return sum(losses) / len(losses)


def _tokenizer(config: TrainConfig, train_docs: data.Documents) -> Tokenizer:
    # Trained once per work dir, so a resumed run keeps the same token ids.
    path = config.work_dir / f"tokenizer-{config.shape.vocab_size}.json"
    if config.resume and path.exists():
        return Tokenizer.from_file(str(path))
    tokenizer = data.build_tokenizer(train_docs, config.shape.vocab_size)
    tokenizer.save(str(path))
    return tokenizer


def run(config: TrainConfig) -> dict:
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    config.work_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    print("reading the corpus and training the tokenizer ...", flush=True)
    train_docs, heldout_docs = data.Documents.of("train"), data.Documents.of("heldout")
    tokenizer = _tokenizer(config, train_docs)
    train = data.Streams.of(tokenizer, train_docs, seed=config.seed)
    heldout = data.Streams.of(tokenizer, heldout_docs, seed=None)
    eval_source = data.fixed_windows(heldout.source, config.seq_len, config.eval_windows)
    eval_chat = data.fixed_windows(heldout.chat, config.seq_len, config.eval_windows)
    print(f"train tokens: {len(train.source):,} source, {len(train.chat):,} chat", flush=True)

    model = Qwen3ForCausalLM(config.shape)
    optimizer = torch.optim.AdamW(
        model.param_groups(config.weight_decay), lr=config.lr, betas=(0.9, 0.95)
    )
    sampler = data.BatchSampler(train, config.seq_len, config.chat_share, config.seed)
    state_path = config.work_dir / "state.pt"
    step, log, elapsed_before, resumed_at = 0, [], 0.0, []
    if config.resume and state_path.exists():
        state = torch.load(state_path, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        sampler.rng.bit_generator.state = state["sampler"]
        step, log, elapsed_before = state["step"], state["log"], state["elapsed"]
        resumed_at = state.get("resumed_at", []) + [step]
        print(f"resumed at step {step}", flush=True)

    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters, {config.shape}", flush=True)
    loop_start = time.perf_counter()
    recent: list[float] = []

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - loop_start

    def save() -> None:
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "sampler": sampler.rng.bit_generator.state,
            "step": step,
            "log": log,
            "elapsed": elapsed(),
            "resumed_at": resumed_at,
            "config": {k: str(v) for k, v in asdict(config).items()},
        }
        torch.save(state, str(state_path) + ".tmp")
        os.replace(str(state_path) + ".tmp", state_path)
        write_checkpoint(model, tokenizer, config.out_dir, "Training in progress.\n")

    last_step = min(config.steps, config.stop_at or config.steps)
    progress = tqdm(total=last_step, initial=step, desc="train", unit="step")
    while step < last_step:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        loss = loss_of(model, sampler.batch(config.batch))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        recent = (recent + [loss.item()])[-50:]
        progress.update(1)
        progress.set_postfix(loss=f"{sum(recent) / len(recent):.3f}")
        out_of_time = elapsed() > config.max_minutes * 60
        if step % config.eval_every == 0 or step == last_step or out_of_time:
            entry = {
                "step": step,
                "train_loss": sum(recent) / len(recent),
                "heldout_source_loss": evaluate(model, eval_source),
                "heldout_chat_loss": evaluate(model, eval_chat),
                "minutes": elapsed() / 60,
            }
            log.append(entry)
            progress.write(json.dumps(entry))
        if step % config.save_every == 0 or step == last_step or out_of_time:
            save()
        if out_of_time:
            progress.write(f"stopping: past the {config.max_minutes} minute budget")
            break
    progress.close()
    return finish(config, model, tokenizer, train, log, step, elapsed(), started, resumed_at)


def finish(
    config: TrainConfig,
    model: Qwen3ForCausalLM,
    tokenizer: Tokenizer,
    train: data.Streams,
    log: list[dict],
    step: int,
    train_seconds: float,
    started: float,
    resumed_at: list[int],
) -> dict:
    last = log[-1]
    # A resumed run sees the same batches and schedule as one uninterrupted run.
    command = config.command.replace(" --resume", "")
    if step < config.steps and f"--stop-at {step}" not in command:
        # Stopped by the time budget: the same batches and schedule, stopped at the same
        # step, reproduce it on any machine speed.
        command = f"{command} --stop-at {step}"
    probe = tokenizer.encode("def main(argv=None):\n    parser = argparse.ArgumentParser(").ids
    mlx_check = compare_with_mlx(model, config.out_dir, probe)
    samples = generate_samples(config.out_dir)
    figures = {
        "shape": config.shape.to_dict(),
        "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "size_mb": directory_megabytes(config.out_dir),
        "python_version": platform.python_version(),
        "train_source_tokens": len(train.source),
        "train_chat_tokens": len(train.chat),
        "threads": config.threads,
        "weight_decay": config.weight_decay,
        "lr": config.lr,
        "warmup": config.warmup,
        "batch": config.batch,
        "seq_len": config.seq_len,
        "chat_share": config.chat_share,
        "seed": config.seed,
        "steps": config.steps,
        "steps_done": step,
        "tokens_seen": step * config.batch * config.seq_len,
        "minutes": train_seconds / 60,
        "train_loss": last["train_loss"],
        "heldout_source_loss": last["heldout_source_loss"],
        "heldout_source_ppl": math.exp(last["heldout_source_loss"]),
        "heldout_chat_loss": last["heldout_chat_loss"],
        "heldout_chat_ppl": math.exp(last["heldout_chat_loss"]),
        "uniform_loss": math.log(config.shape.vocab_size),
        "mlx": mlx_check,
        "command": command,
        "resumed_at": resumed_at,
        "total_minutes": (time.perf_counter() - started) / 60,
    }
    card = model_card(figures, format_samples(samples))
    tmp = config.out_dir / ".README.md.tmp"
    tmp.write_text(card, encoding="utf-8")
    os.replace(tmp, config.out_dir / "README.md")
    (config.work_dir / "figures.json").write_text(json.dumps(figures, indent=2) + "\n")
    (config.work_dir / "samples.md").write_text(format_samples(samples) + "\n")
    return {"figures": figures, "samples": samples}
