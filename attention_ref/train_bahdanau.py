"""Train the date translator of stage 01 and save its weights.

    python -m attention_ref.train_bahdanau --steps 1500 --seed 0 \
        --output attention_ref/data/date_translator.npz

Every step draws a fresh mini-batch from :func:`attention_ref.date_translator.make_date_dataset`'s
distribution (seeded), runs the hand-written forward and backward passes, clips the gradient
norm and takes an Adam step; the learning rate decays with a cosine schedule. At the end it
reports the exact-match accuracy on 1,000 held-out dates (a seed the training never uses).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .date_translator import (
    Adam,
    DateTranslator,
    clip_gradients,
    encode_sources,
    encode_targets,
    exact_match_accuracy,
    init_date_translator,
    make_date_dataset,
    save_date_translator,
    translator_loss_and_gradients,
)

HELD_OUT_SEED = 2_000_000_001
"""Seed of the 1,000 held-out dates the command evaluates on (training seeds stay small)."""


def train_date_translator(
    steps: int = 1500,
    seed: int = 0,
    *,
    batch_size: int = 96,
    lr: float = 1e-2,
    min_lr: float = 5e-4,
    clip: float = 1.0,
    model: DateTranslator | None = None,
    progress: bool = True,
    callback: Callable[[int, float], None] | None = None,
    blas_threads: int | None = 1,
) -> tuple[DateTranslator, list[float]]:
    """Train (or continue training) a translator; returns ``(model, losses)``.

    Batches of ``batch_size`` fresh examples per step, Adam with learning rate decaying from
    ``lr`` to ``min_lr`` (cosine), global gradient norm clipped at ``clip``. ``progress`` shows a
    tqdm bar with the running loss; ``callback(step, loss)`` is called after every step.
    ``blas_threads`` limits BLAS threads while training (needs threadpoolctl; ignored without it):
    the matrices are small, and one thread is several times faster than two on two busy cores.
    """
    with _blas_limit(blas_threads):
        return _train(steps, seed, batch_size, lr, min_lr, clip, model, progress, callback)


def _blas_limit(threads: int | None) -> contextlib.AbstractContextManager:
    if threads is None:
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: only a speed-up
        return contextlib.nullcontext()
    return threadpool_limits(limits=threads, user_api="blas")


def _train(steps, seed, batch_size, lr, min_lr, clip, model, progress, callback):
    rng = np.random.default_rng(seed)
    if model is None:
        model = init_date_translator(rng)
    opt = Adam(lr=lr)
    losses: list[float] = []
    steps_iter = range(steps)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(steps_iter, desc="training", unit="step")
        steps_iter = bar
    smooth = None
    for step in steps_iter:
        # batch seeds derived from (seed, step): reproducible, never the held-out seed
        pairs = make_date_dataset(batch_size, seed=[seed, step])
        src, mask = encode_sources(model, [s for s, _ in pairs])
        tgt = encode_targets(model, [t for _, t in pairs])
        loss, grads = translator_loss_and_gradients(model, src, mask, tgt)
        clip_gradients(grads, clip)
        frac = step / max(steps - 1, 1)
        opt.step(
            model.params, grads, lr=min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * frac))
        )
        losses.append(loss)
        smooth = loss if smooth is None else 0.95 * smooth + 0.05 * loss
        if bar is not None and step % 10 == 0:
            bar.set_postfix(loss=f"{smooth:.4f}")
        if callback is not None:
            callback(step, loss)
    if bar is not None:
        bar.close()
    return model, losses


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m attention_ref.train_bahdanau",
        description="Train the Bahdanau-attention date translator (NumPy, hand-written backprop).",
    )
    parser.add_argument("--steps", type=int, default=1500, help="optimiser steps (default 1500)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the initial weights and batches"
    )
    parser.add_argument(
        "--output",
        default=str(Path(__file__).resolve().parent / "data" / "date_translator.npz"),
        help="where to write the weights (.npz; default: the committed model inside the package)",
    )
    parser.add_argument("--batch-size", type=int, default=96)
    parser.add_argument("--lr", type=float, default=1e-2, help="initial Adam learning rate")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")

    start = time.perf_counter()
    model, losses = train_date_translator(
        args.steps, args.seed, batch_size=args.batch_size, lr=args.lr, progress=not args.no_progress
    )
    elapsed = time.perf_counter() - start
    held_out = make_date_dataset(1000, seed=HELD_OUT_SEED)
    acc = exact_match_accuracy(model, held_out)
    save_date_translator(model, args.output)
    print(
        f"trained {args.steps} steps in {elapsed:.1f} s; final loss {np.mean(losses[-50:]):.4f}; "
        f"exact match on 1,000 held-out dates: {acc:.1%}; {model.num_parameters} parameters "
        f"saved to {args.output}"
    )


if __name__ == "__main__":
    main()
