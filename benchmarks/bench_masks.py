"""What token masks cost in evalpipe's `hf` engine, measured against baselines taken in the same run.

1. **Mask overhead.** The engine decodes HumanEval prompts greedily (batch size 1) with each grammar backend
   and reports `mask_s_per_token`. The same output token sequences are replayed through a bare loop over the
   backend's own API (fill the bitmask, apply it to a logits row, accept the token), timing fill + apply as
   the engine does. Two comparisons, each the median over repeats of engine / bare (target: at most 1.10):
   - *while decoding*: the engine's figure against the bare loop with an untimed one-token forward pass of the
     same model between tokens, as in decoding (the pass evicts the matcher's data from the CPU caches, which
     makes the mask 2-4x slower than back to back: the hardware's cost, not evalpipe's);
   - *back to back*: the engine's own mask step (`HFEngine._start_masks`, `_apply_masks`) against the bare
     loop, both without the model, hot caches: evalpipe's code overhead alone.
2. **Speed.** Constrained vs unconstrained decoding of the same model and prompts, with the same work shape
   (`none` runs without stop sequences, so every run decodes max_tokens per prompt): output tokens per second
   of wall time per backend and batch size, and the median TPOT; ratio against `none` (targets, issue 14:
   guidance at least 0.97 at batch sizes 1 and 8; xgrammar at least 0.9 at 1 and 0.6 at 8).
   Backends alternate batch by batch within each repeat, in a rotating order; medians and the best run are
   printed (the host is shared), and the *paired* ratio: the median over all batches of a backend's speed on
   a batch against `none`'s on the same prompts right next to it (the estimate a shared host disturbs least).
   With each grammar backend, the engine's mask time per token is split into the part hidden behind the
   forward pass (the engine fills the next step's masks on its mask threads while the forward pass runs;
   `EVALPIPE_MASK_THREADS`, none by default on 2 cores) and the part that was not
   (`mask_unhidden_s_per_token`: handing the fill over, waiting for it, applying it).

    python benchmarks/bench_masks.py                       # built-in model, the suite's grammar
    python benchmarks/bench_masks.py --lark G.lark --gbnf G.gbnf --tasks 6 --max-tokens 96
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--suite", default="humaneval")
    parser.add_argument("--lark", help="grammar for llguidance (default: the suite's)")
    parser.add_argument("--gbnf", help="the same grammar as GBNF for XGrammar (default: the suite's)")
    parser.add_argument("--tasks", type=int, default=8, help="prompts (8: a full batch at batch size 8)")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-sizes", default="1,6")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    from evalpipe.engines.hf import HFEngine, cpu_threads, mask_threads
    from evalpipe.pipeline import load_tasks
    from evalpipe.records import RunConfig
    from evalpipe.suites import ConstraintSpec, load_suite

    suite = load_suite(args.suite)
    if args.lark or args.gbnf:
        spec = ConstraintSpec(
            kind="grammar",
            lark=str(Path(args.lark).resolve()) if args.lark else None,
            gbnf=str(Path(args.gbnf).resolve()) if args.gbnf else None,
        )
        suite = suite.model_copy(update={"constraint": spec})
    if suite.constraint is None:
        sys.exit(f"suite {suite.name!r} has no constraint: give --lark and --gbnf")
    tasks = load_tasks(suite)[0][: args.tasks]

    def engine(suite: Any, backend: str, batch_size: int) -> Any:
        config = RunConfig(
            suite=suite.name,
            engine="hf",
            models=(args.model,),
            backends=(backend,),
            max_tokens=args.max_tokens,
        )
        return HFEngine(config, suite, args.model, backend, batch_size=batch_size)

    print(f"model {args.model}, {len(tasks)} HumanEval prompts, max_tokens {args.max_tokens}, greedy, "
          f"torch threads {cpu_threads()}, mask threads {mask_threads()}")  # fmt: skip
    results: dict[str, Any] = {
        "torch_threads": cpu_threads(),
        "mask_threads": mask_threads(),
        "overhead": {},
        "speed": {},
    }

    # 1. Mask overhead: engine vs bare loops over the same tokens.
    for backend in ("guidance", "xgrammar"):
        eng = engine(suite, backend, 1)
        info = eng.describe()
        hit = info["grammar_cache_hit"]
        print(f"\n[{backend}] grammar compile {info['grammar_compile_s']:.2f} s (disk cache hit: {hit})")
        bare = _bare_loop(backend, info, suite)
        list(eng.generate(eng.plan(tasks[:1])))  # warm-up (first-call allocations), not measured
        measured: dict[str, list[float]] = {"engine": [], "forward": [], "engine_hot": [], "hot": []}
        for _ in range(args.repeats):
            produced = list(eng.generate_with_ids(eng.plan(tasks)))
            tokens = sum(g.n_output_tokens or 0 for g, _ in produced)
            spent = sum((g.mask_s_per_token or 0) * (g.n_output_tokens or 0) for g, _ in produced)
            measured["engine"].append(spent / tokens)
            sequences = [ids for _, ids in produced]
            measured["forward"].append(bare(sequences, between_steps=True))
            measured["engine_hot"].append(_engine_mask_code(eng, sequences))
            measured["hot"].append(bare(sequences, between_steps=False))
        eng.close()
        row: dict[str, Any] = {
            "tokens": tokens,
            "finish": _counts(g.finish_reason for g, _ in produced),
            **{f"{name}_us_per_token": statistics.median(v) * 1e6 for name, v in measured.items()},
        }
        for name, (numerator, denominator) in {
            "in_decoding": ("engine", "forward"),
            "code_only": ("engine_hot", "hot"),
        }.items():
            ratios = [e / b for e, b in zip(measured[numerator], measured[denominator], strict=True)]
            row[f"ratio_{name}"] = statistics.median(ratios)
            row[f"ratios_{name}"] = ratios
        results["overhead"][backend] = row
        print(f"  mask (fill + apply) per token, {tokens} tokens {row['finish']}, median of {args.repeats}:\n"
              f"    while decoding: engine {row['engine_us_per_token']:7.1f} us, bare loop with a forward "
              f"pass between tokens {row['forward_us_per_token']:7.1f} us: "
              f"ratio {row['ratio_in_decoding']:.3f}\n"
              f"    back to back:   engine code {row['engine_hot_us_per_token']:7.1f} us, bare loop "
              f"{row['hot_us_per_token']:7.1f} us: ratio {row['ratio_code_only']:.3f}")  # fmt: skip

    # 2. Speed: the same work shape for every backend. `none` runs without stop sequences, so that every
    # sequence decodes max_tokens tokens as the grammar runs do (a smoke model seldom ends a function).
    unstopped = suite.model_copy(update={"prompt": suite.prompt.model_copy(update={"stop": ()})})
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        engines = {
            backend: engine(unstopped if backend == "none" else suite, backend, batch_size)
            for backend in ("none", "guidance", "xgrammar")
        }
        for eng in engines.values():
            list(eng.generate(eng.plan(tasks[:1])))  # warm-up
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in engines}
        masking: dict[str, list[tuple[float, float]]] = {name: [] for name in engines}
        tokens_of: dict[str, int] = {}
        paired: dict[str, list[float]] = {name: [] for name in engines}
        names = list(engines)
        chunks = [tasks[i : i + batch_size] for i in range(0, len(tasks), batch_size)]
        for repeat in range(args.repeats):
            # Backends alternate batch by batch (each a second or so), in an order that rotates, so that the
            # load of a shared host hits all of them alike; a repeat's figures sum over its batches.
            walls = dict.fromkeys(names, 0.0)
            produced: dict[str, list[Any]] = {name: [] for name in names}
            for index, chunk in enumerate(chunks):
                shift = (repeat + index) % len(names)
                speed: dict[str, float] = {}
                for name in names[shift:] + names[:shift]:
                    eng = engines[name]
                    started = time.perf_counter()
                    generations = list(eng.generate(eng.plan(chunk)))
                    wall = time.perf_counter() - started
                    produced[name] += generations
                    walls[name] += wall
                    speed[name] = sum(g.n_output_tokens or 0 for g in generations) / wall
                for name in names:
                    paired[name].append(speed[name] / speed["none"])
            for name, generations in produced.items():
                tokens_of[name] = sum(g.n_output_tokens or 0 for g in generations)
                tpot = statistics.median(g.tpot_s for g in generations if g.tpot_s is not None)
                runs[name].append((tokens_of[name] / walls[name], tpot))
                if name != "none":
                    masking[name].append(_mask_split(generations))
        for eng in engines.values():
            eng.close()
        base_tps = statistics.median(r[0] for r in runs["none"])
        base_tpot = statistics.median(r[1] for r in runs["none"])
        best_tps = max(r[0] for r in runs["none"])
        print(f"\nspeed, batch size {batch_size} (median of {args.repeats}; best run in brackets; "
              f"paired: the median ratio of one batch against `none`'s next to it, over "
              f"{len(paired['none'])} batches)")  # fmt: skip
        table: dict[str, Any] = {}
        for name, measured in runs.items():
            tps = statistics.median(r[0] for r in measured)
            best = max(r[0] for r in measured)
            tpot = statistics.median(r[1] for r in measured)
            table[name] = {
                "tokens": tokens_of[name],
                "tokens_per_s": tps,
                "tokens_per_s_best": best,
                "tpot_ms": tpot * 1e3,
                "ratio": tps / base_tps,
                "ratio_best": best / best_tps,
                "tpot_ratio": base_tpot / tpot,
                "runs_tokens_per_s": [r[0] for r in measured],
                "ratio_paired": statistics.median(paired[name]),
            }
            split = ""
            if masking[name]:
                mask = statistics.median(m[0] for m in masking[name])
                unhidden = statistics.median(m[1] for m in masking[name])
                table[name] |= {
                    "mask_us_per_token": mask * 1e6,
                    "mask_unhidden_us_per_token": unhidden * 1e6,
                    "mask_hidden_us_per_token": (mask - unhidden) * 1e6,
                    "runs_mask_unhidden_us_per_token": [m[1] * 1e6 for m in masking[name]],
                }
                split = (f"   mask {mask * 1e6:6.1f} us/token: hidden {(mask - unhidden) * 1e6:6.1f}, "
                         f"unhidden {unhidden * 1e6:6.1f}")  # fmt: skip
            print(f"  {name:9} {tps:7.1f} tok/s [{best:7.1f}] ({tokens_of[name]} tokens): "
                  f"×{tps / base_tps:.3f} [×{best / best_tps:.3f}] paired ×{table[name]['ratio_paired']:.3f} "
                  f"TPOT {tpot * 1e3:6.2f} ms: ×{base_tpot / tpot:.3f}{split}")  # fmt: skip
        results["speed"][str(batch_size)] = table
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def _mask_split(generations: list[Any]) -> tuple[float, float]:
    """(mask seconds per output token, the part of it not hidden behind the forward pass) over a run."""
    tokens = sum(g.n_output_tokens or 0 for g in generations)
    mask = sum((g.mask_s_per_token or 0) * (g.n_output_tokens or 0) for g in generations)
    unhidden = sum((g.mask_unhidden_s_per_token or 0) * (g.n_output_tokens or 0) for g in generations)
    return mask / tokens, unhidden / tokens


def _engine_mask_code(eng: Any, sequences: list[list[int]]) -> float:
    """The engine's own mask step (`HFEngine._start_masks` on its mask threads, then `_apply_masks`: fill,
    apply, per-sequence timing) run back to back over the sequences, without the model: evalpipe's code
    against the bare loop, with hot caches for both."""
    import torch

    from evalpipe.engines.hf import _MaskThreads, _Slot, mask_threads

    logits = torch.zeros(1, eng.describe()["vocab_size"])
    bitmask = eng._new_bitmask(1)
    spent, steps = 0.0, 0
    threads = _MaskThreads(mask_threads())
    try:
        for ids in sequences:
            slot = _Slot(request=None, prompt_ids=[], generator=None, matcher=eng._grammar.matcher())
            for token in ids:
                eng._apply_masks(logits, eng._start_masks(threads, bitmask, [slot]))
                slot.matcher.accept(token)
            spent, steps = spent + slot.mask_s, steps + slot.mask_steps
    finally:
        threads.close()
    return spent / steps


def _counts(values: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return counts


def _bare_loop(backend: str, info: dict[str, Any], suite: Any) -> Any:
    """A function timing fill + apply per token over token sequences, straight on the backend's API."""
    import llguidance
    import llguidance.hf
    import llguidance.torch
    import torch
    import xgrammar
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evalpipe import constraints

    tokenizer = AutoTokenizer.from_pretrained(info["model_path"], local_files_only=True)
    width = max(info["vocab_size"], len(tokenizer))
    vocab = info["vocab_size"]
    logits = torch.zeros(1, vocab)
    bitmask = torch.full((1, (width + 31) // 32), -1, dtype=torch.int32)
    if backend == "guidance":
        lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=width)
        grammar = constraints.llguidance_grammar(constraints.load_constraint(suite))
        template = llguidance.LLMatcher(lltok, grammar, log_level=0)

        def fresh() -> tuple[Any, Any, Any]:
            m = template.deep_copy()
            return m, lambda: llguidance.torch.fill_next_token_bitmask(m, bitmask, 0), m.consume_token
    else:
        tokenizer_info = xgrammar.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=width, stop_token_ids=[tokenizer.eos_token_id]
        )
        compiler = xgrammar.GrammarCompiler(tokenizer_info)
        compiled = constraints.xgrammar_compiled(constraints.load_constraint(suite), compiler)

        def fresh() -> tuple[Any, Any, Any]:
            m = xgrammar.GrammarMatcher(compiled)
            return m, lambda: m.fill_next_token_bitmask(bitmask, 0), m.accept_token

    network = AutoModelForCausalLM.from_pretrained(info["model_path"], local_files_only=True).eval()
    one_token = torch.tensor([[tokenizer.eos_token_id]])

    def run(sequences: list[list[int]], between_steps: bool) -> float:
        """Mean fill + apply time per token; `between_steps` runs an untimed one-token forward pass between
        tokens, as decoding does, so that the model's weights pass through the CPU caches in between."""
        spent, steps = 0.0, 0
        for ids in sequences:
            _, fill, accept = fresh()
            for token in ids:
                if between_steps:
                    with torch.inference_mode():
                        network(input_ids=one_token, logits_to_keep=1)
                started = time.perf_counter()
                fill()
                xgrammar.apply_token_bitmask_inplace(logits, bitmask, vocab_size=vocab, backend="cpu")
                spent += time.perf_counter() - started
                steps += 1
                if not accept(token):
                    raise RuntimeError(f"{backend} rejected a token the engine produced")
        return spent / steps

    return run


if __name__ == "__main__":
    main()
