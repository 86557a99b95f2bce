"""Language-model training: next-token cross-entropy, AdamW, warm-up + cosine, clipping.

Seeded and reproducible on CPU; the best checkpoint by validation loss is written atomically
in the Hugging Face format after every evaluation that improves it.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import Gpt2EdgeError
from ..fsutil import check_output
from ..progress import Progress
from ..runtime.tokenizer import Tokenizer
from .checkpoint import save_checkpoint
from .config import GPTConfig, TrainConfig
from .evaluate import read_text
from .gpt import GPT


@dataclass
class TrainResult:
    out_dir: Path
    best_val_loss: float
    best_step: int
    steps: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def best_val_ppl(self) -> float:
        return math.exp(self.best_val_loss)


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """First (1 - val_fraction) for training, the rest held out (split on characters)."""
    cut = int(len(text) * (1 - val_fraction))
    return text[:cut], text[cut:]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``min_lr`` at ``max_steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def _batch(
    data: torch.Tensor, block: int, batch: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    ix = torch.randint(len(data) - block - 1, (batch,), generator=gen)
    x = torch.stack([data[i : i + block] for i in ix])  # (B, T)
    y = torch.stack([data[i + 1 : i + 1 + block] for i in ix])  # (B, T)
    return x, y


@torch.no_grad()
def _val_loss(model: GPT, data: torch.Tensor, block: int, batches: int, batch: int) -> float:
    """Mean loss over fixed, evenly spaced windows of the held-out tokens (same every call)."""
    model.eval()
    n = batches * batch
    starts = torch.linspace(0, len(data) - block - 1, n).long()
    total = 0.0
    for i in range(0, n, batch):
        s = starts[i : i + batch]
        x = torch.stack([data[j : j + block] for j in s])
        y = torch.stack([data[j + 1 : j + 1 + block] for j in s])
        logits, _ = model(x)
        total += F.cross_entropy(logits.flatten(0, 1), y.flatten()).item() * len(s)
    model.train()
    return total / n


def train(
    text_path: str | Path,
    out_dir: str | Path,
    cfg: TrainConfig = TrainConfig(),
    tokenizer: Tokenizer | None = None,
    progress: bool = True,
    overwrite: bool = False,
    tokenizer_dir: str | Path | None = None,
) -> TrainResult:
    """Train a GPT-2 on a text file; returns where the best checkpoint went and its val loss.

    ``out_dir`` may not be the text file or ``tokenizer_dir``, contain them or lie inside them;
    an existing one is replaced only with ``overwrite``, and only if it is a checkpoint.
    ``progress`` shows a bar on a terminal.
    """
    out_dir = check_output(
        out_dir, [text_path, tokenizer_dir], overwrite, marker="config.json", what="checkpoint"
    )
    torch.manual_seed(cfg.seed)
    text = read_text(text_path, min_chars=64)
    train_text, val_text = split_text(text, cfg.val_fraction)
    if tokenizer is None:
        tokenizer = Tokenizer.train([train_text], vocab_size=cfg.vocab_size)
    train_ids = torch.tensor(tokenizer.encode(train_text), dtype=torch.long)
    val_ids = torch.tensor(tokenizer.encode(val_text), dtype=torch.long)
    for name, ids in (("training", train_ids), ("validation", val_ids)):
        if len(ids) <= cfg.block_size + 1:
            raise Gpt2EdgeError(
                f"{text_path}: the {name} split has {len(ids)} tokens, fewer than block_size + 2 "
                f"({cfg.block_size + 2}); use a longer text or a smaller --block-size"
            )
    config = GPTConfig(
        vocab_size=tokenizer.vocab_size,
        n_positions=cfg.block_size,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        dropout=cfg.dropout,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = GPT(config).train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    best, best_step, history = float("inf"), -1, []
    t0 = time.perf_counter()
    bar = Progress(range(cfg.max_steps), enabled=progress, desc="train", unit="step")
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        x, y = _batch(train_ids, cfg.block_size, cfg.batch_size, gen)
        logits, _ = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        last = step == cfg.max_steps - 1
        if (step + 1) % cfg.eval_interval == 0 or last:
            vl = _val_loss(model, val_ids, cfg.block_size, cfg.eval_batches, cfg.batch_size)
            history.append(
                {
                    "step": step + 1,
                    "train_loss": loss.item(),
                    "val_loss": vl,
                    "seconds": time.perf_counter() - t0,
                }
            )
            bar.log(
                print,
                f"step {step + 1}: train loss {loss.item():.4f}  val loss {vl:.4f}  "
                f"val ppl {math.exp(vl):.2f}",
            )
            if vl < best:
                best, best_step = vl, step + 1
                meta = {
                    "train_config": asdict(cfg),
                    "step": best_step,
                    "val_loss": best,
                    "history": history,
                    "text": str(text_path),
                }
                save_checkpoint(
                    model.eval(),
                    out_dir,
                    tokenizer,
                    dtype=getattr(torch, cfg.save_dtype),
                    extra_files={"training.json": json.dumps(meta, indent=2) + "\n"},
                )
                model.train()
    bar.close()
    return TrainResult(out_dir, best, best_step, cfg.max_steps, time.perf_counter() - t0, history)
