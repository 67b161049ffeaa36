"""The built-in model: a tiny Llama trained on this machine's Python standard library, for offline tests.

`builtin_model_dir()` builds it on first use, without network, from data every Python install carries: the
standard library's own `.py` files. It trains a byte-level BPE tokenizer and a small `LlamaForCausalLM` for
a fixed number of steps with fixed seeds, then saves both with `save_pretrained` into the cache. Its pass@k
is meaningless; its syntax validity and latency are not, which is what the engine needs to be exercised.

`build_random_model(dir)` makes a tiny randomly initialised Llama and a quickly trained tokenizer in about a
second, for tests.

Torch, tokenizers and transformers are imported only inside the builders, so asking whether the model is
already cached costs nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import shutil
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evalpipe.paths import cache_root

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"

RECIPE: dict[str, Any] = {
    "name": "builtin-v1",
    # The corpus depends on the Python version, so the model does too.
    "python": f"{sys.version_info.major}.{sys.version_info.minor}",
    "corpus": "stdlib *.py, without test/tests/idle_test/lib2to3/site-packages, sorted by path",
    "vocab_size": 8192,
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "seq_len": 256,
    "batch_size": 16,
    "steps": 150,
    "lr": 3e-3,
    "warmup_steps": 15,
    "weight_decay": 0.01,
    "seed": 1234,
}
"""Everything that decides the built-in model; its hash names the cache folder (any change: a new model)."""

_EXCLUDED_PARTS = frozenset({"test", "tests", "idle_test", "lib2to3", "site-packages", "dist-packages"})


def recipe_hash(recipe: dict[str, Any] | None = None) -> str:
    """Short, stable hash of a recipe (sorted JSON)."""
    payload = json.dumps(recipe if recipe is not None else RECIPE, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def builtin_model_dir(progress: bool = True) -> Path:
    """The built-in model's folder, building it first if it is not cached (a few minutes on 2 cores).

    The build writes into a temporary folder beside the final one and renames it into place, so a killed build
    never leaves a half model; a file lock makes a second process wait for the first build instead of
    repeating it.
    """
    models = cache_root() / "models"
    final = models / f"{RECIPE['name']}-{recipe_hash()}"
    if _complete(final):
        return final
    models.mkdir(parents=True, exist_ok=True)
    with _locked(models / f".{final.name}.lock"):
        if _complete(final):  # another process finished it while we waited
            return final
        # We hold the lock: any temporary folder of this recipe is left over from a killed build.
        for stale in models.glob(f".{final.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=models))
        try:
            _build_builtin(tmp, progress=progress)
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def _complete(folder: Path) -> bool:
    # Only a finished build is ever renamed to the final name; the check guards against a hand-made folder.
    return (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def stdlib_sources() -> list[Path]:
    """The standard library's `.py` files (without its test suites), sorted: the corpus, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(
        path for path in root.rglob("*.py") if not _EXCLUDED_PARTS.intersection(path.relative_to(root).parts)
    )


def read_corpus(paths: list[Path]) -> list[str]:
    """File texts in order; files that are not UTF-8 are skipped (the same ones on every run)."""
    texts = []
    for path in paths:
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    return texts


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2 style: every byte is representable) with EOS and PAD tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # BPE training breaks ties by pair order, so the same texts in the same order give the same tokenizer.
    tokenizer.train_from_iterator(texts, trainer, length=len(texts))
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, model_max_length=2048
    )


def _llama(tokenizer: PreTrainedTokenizerFast, seed: int, **sizes: Any) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **sizes,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)  # type: ignore[no-untyped-call]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def build_random_model(
    dir: Path,
    vocab_size: int = 1024,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    seed: int = 0,
    initializer_range: float = 0.3,
) -> Path:
    """A tiny random Llama and a BPE tokenizer trained on a few stdlib files, in about a second (for tests).

    `initializer_range` is large on purpose: with the usual 0.02 every logit is nearly equal and greedy
    decoding repeats one token, so tests would not see prompts change the output.
    """
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    root = Path(sysconfig.get_paths()["stdlib"])
    names = ["bisect.py", "heapq.py", "keyword.py", "string.py", "textwrap.py"]
    texts = read_corpus([root / name for name in names])
    tokenizer = train_tokenizer(texts, vocab_size)
    model = _llama(
        tokenizer,
        seed,
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=4096,
        initializer_range=initializer_range,
    )
    model.save_pretrained(dir)
    tokenizer.save_pretrained(dir)
    return dir


def _build_builtin(out: Path, progress: bool) -> None:
    """Train the tokenizer and the model of `RECIPE` and save them into `out`."""
    import torch
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    r = RECIPE
    started = time.perf_counter()
    bar = Progress(
        TextColumn("[bold]built-in model[/] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not progress,
        transient=False,
    )
    with bar:
        task = bar.add_task("reading the standard library", total=None, info="")
        paths = stdlib_sources()
        texts = read_corpus(paths)
        corpus_sha = hashlib.sha256("\0".join(texts).encode()).hexdigest()
        bar.update(task, info=f"{len(texts)} files, {sum(map(len, texts)) / 1e6:.1f} MB")

        bar.update(task, description="training the tokenizer")
        tokenizer = train_tokenizer(texts, r["vocab_size"])

        bar.update(task, description="tokenizing")
        eos = tokenizer.eos_token_id
        stream: list[int] = []
        # The backend tokenizer itself: whole files exceed model_max_length, fine for a token stream.
        for encoding in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
            stream += [*encoding.ids, eos]  # EOS between files: the model learns to end a document
        data = torch.tensor(stream, dtype=torch.long)
        bar.update(task, info=f"{len(stream) / 1e6:.2f} M tokens")

        model = _llama(
            tokenizer,
            r["seed"],
            hidden_size=r["hidden_size"],
            intermediate_size=r["intermediate_size"],
            num_hidden_layers=r["num_hidden_layers"],
            num_attention_heads=r["num_attention_heads"],
            num_key_value_heads=r["num_key_value_heads"],
            max_position_embeddings=r["max_position_embeddings"],
        )
        n_params = sum(p.numel() for p in model.parameters())
        bar.update(
            task, description="training", total=r["steps"], completed=0, info=f"{n_params / 1e6:.1f} M params"
        )
        loss_value = _train(model, data, bar, task)

        bar.update(task, description="saving", info=f"loss {loss_value:.2f}")
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        elapsed = time.perf_counter() - started
        info = {
            "recipe": r,
            "recipe_hash": recipe_hash(),
            "corpus_files": len(texts),
            "corpus_sha256": corpus_sha,
            "corpus_tokens": len(stream),
            "n_params": n_params,
            "final_loss": loss_value,
            "build_s": round(elapsed, 1),
            "torch": torch.__version__,
        }
        (out / "evalpipe-builtin.json").write_text(json.dumps(info, indent=2) + "\n")
        bar.update(task, description="done", info=f"loss {loss_value:.2f}, {elapsed:.0f} s")


def _train(model: Any, data: Any, bar: Any, task: Any) -> float:
    """A short AdamW run on random windows of the token stream (fixed seed: the same windows every build)."""
    import torch

    r = RECIPE
    generator = torch.Generator().manual_seed(r["seed"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=r["lr"], weight_decay=r["weight_decay"])

    def lr_at(step: int) -> float:
        # Linear warm-up, then cosine decay to a tenth: the usual schedule, which matters more for short runs.
        if step < r["warmup_steps"]:
            return float(r["lr"] * (step + 1) / r["warmup_steps"])
        progress = (step - r["warmup_steps"]) / max(1, r["steps"] - r["warmup_steps"])
        return float(r["lr"] * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))))

    model.train()
    smoothed = float("nan")
    for step in range(r["steps"]):
        starts = torch.randint(0, len(data) - r["seq_len"] - 1, (r["batch_size"],), generator=generator)
        batch = torch.stack([data[s : s + r["seq_len"]] for s in starts.tolist()])
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())
        smoothed = value if math.isnan(smoothed) else 0.9 * smoothed + 0.1 * value
        bar.update(task, advance=1, info=f"loss {smoothed:.2f}")
    model.eval()
    return smoothed
