"""The built-in model: a tiny Llama trained on this machine's Python standard library, for offline tests.

`builtin_model_dir()` builds it on first use, without network, from data every Python install carries: the
standard library's own `.py` files. Its training documents are the modules' top-level functions, each with
the imports it uses before it and EOS after it, shaped like a HumanEval prompt and its solution, so that the
model ends a function body where code ends one (EOS, or a new top-level line) instead of running on to max
tokens; a share of them are also chat exchanges in the chat suites' formats (the tokenizer has a chat
template). It trains a byte-level BPE tokenizer and a small `LlamaForCausalLM` for a fixed number of steps
with fixed seeds, then saves both with `save_pretrained` into the cache. Its pass@k is meaningless; its syntax
validity, stopping behaviour and latency are not, which is what the engine needs to be exercised.

`build_random_model(dir)` makes a tiny randomly initialised Llama and a quickly trained tokenizer in about a
second, for tests.

Torch, tokenizers and transformers are imported only inside the builders, so asking whether the model is
already cached costs nothing.
"""

from __future__ import annotations

import ast
import contextlib
import fcntl
import hashlib
import json
import math
import random
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
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
"""Special tokens that open a chat message (`CHAT_TEMPLATE`)."""

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
"""The built-in model's chat template: each message opens with its role's token and a newline; a reply ends
with EOS. The chat training documents are rendered with it, so a change to it needs a new RECIPE name."""

RECIPE: dict[str, Any] = {
    "name": "builtin-v2",
    # The corpus depends on the Python version, so the model does too.
    "python": f"{sys.version_info.major}.{sys.version_info.minor}",
    "corpus": "stdlib *.py, without test/tests/idle_test/lib2to3/site-packages, sorted by path",
    "documents": "each top-level function with the imports it uses, then EOS (function_documents); "
    "prompt and rest encoded apart (encode_documents)",
    # A share of the functions also appear as chat exchanges, in the chat suites' instruction formats (copies
    # of evalpipe.prompting.CHAT_INSTRUCTION and tasks/humaneval_json.toml's instruction; the unit test checks
    # them): the user asks with the signature and docstring, the reply is the function, fenced or as JSON.
    "chat_share": 0.15,
    "chat_instructions": [
        [
            "Complete the following Python function. Reply with the complete function, signature included, "
            "in a single ```python code block.\n\n```python\n{prompt}```",
            "fence",
        ],
        [
            'Complete the following Python function. Reply with only a JSON object {"code": "..."} whose '
            '"code" string is the complete function, signature included, as Python source.\n\n'
            "```python\n{prompt}```",
            "json",
        ],
    ],
    "vocab_size": 2048,
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "seq_len": 256,
    "batch_size": 8,
    "steps": 400,
    "lr": 3e-3,
    "warmup_steps": 30,
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


def function_documents(source: str) -> list[str]:
    """One training document per top-level function of a module, shaped like a HumanEval prompt + solution.

    A document is the module's imports that the function uses (one per line), two blank lines, and the
    function's own lines, ending with a newline; nothing follows it but EOS. Trained on these, the model ends
    a function body the way a file ends, instead of running on. Decorated functions (HumanEval has none) and
    functions with a line at column 0 inside them (a multi-line string's text: the body grammar forbids
    such lines) are left out. A module that does not parse gives no documents.
    """
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines = source.splitlines()
    imports: list[tuple[set[str], str]] = []  # (names the statement binds, the statement)
    documents = []
    for node in tree.body:
        if isinstance(node, ast.Import | ast.ImportFrom) and node.end_lineno == node.lineno:
            bound = {(alias.asname or alias.name).partition(".")[0] for alias in node.names}
            imports.append((bound, lines[node.lineno - 1].rstrip()))
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or node.decorator_list:
            continue
        assert node.end_lineno is not None
        body = lines[node.lineno - 1 : node.end_lineno]
        if not body[0].startswith(("def ", "async def ")) or any(
            line[:1] not in ("", " ") for line in body[1:]
        ):
            continue
        used = {name.id for name in ast.walk(node) if isinstance(name, ast.Name)}
        header = [statement for bound, statement in imports if bound & used and "*" not in bound]
        text = "\n".join(line.rstrip() for line in body) + "\n"
        documents.append("\n".join(header) + "\n\n\n" + text if header else text)
    return documents


def train_tokenizer(
    texts: list[str], vocab_size: int, extra_special_tokens: tuple[str, ...] = ()
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2 style: every byte is representable) with EOS, PAD and any extra
    special tokens (the built-in model's chat roles)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN, *extra_special_tokens],
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
    build_builtin(out, RECIPE, progress=progress)


def build_builtin(out: Path, recipe: dict[str, Any], progress: bool = True) -> dict[str, Any]:
    """Train the tokenizer and the model of `recipe` and save them into `out`; returns the build's record.

    `builtin_model_dir` builds `RECIPE` into the cache; benchmarks/bench_builtin.py builds variants.
    """
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

    r = recipe
    started, cpu_started = time.perf_counter(), time.process_time()
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
        texts = read_corpus(stdlib_sources())
        corpus_sha = hashlib.sha256("\0".join(texts).encode()).hexdigest()
        documents = training_documents(texts, r["seed"])
        bar.update(task, info=f"{len(texts)} files, {len(documents)} functions")

        bar.update(task, description="training the tokenizer")
        tokenizer = train_tokenizer(documents, r["vocab_size"], ROLE_TOKENS)
        tokenizer.chat_template = CHAT_TEMPLATE
        chats = chat_documents(tokenizer, documents, r["chat_share"], r["chat_instructions"])
        documents = documents + chats
        random.Random(r["seed"]).shuffle(documents)

        bar.update(task, description="tokenizing")
        eos = tokenizer.eos_token_id
        stream: list[int] = []
        starts: list[int] = []
        for ids in encode_documents(tokenizer, documents):
            starts.append(len(stream))
            stream += [*ids, eos]  # EOS after each function: the model learns to end one
        data = torch.tensor(stream, dtype=torch.long)
        # Training windows begin where a document begins, as a prompt does.
        window_starts = torch.tensor([s for s in starts if s + r["seq_len"] <= len(stream)], dtype=torch.long)
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
        loss_value = _train(model, data, window_starts, r, bar, task)

        bar.update(task, description="saving", info=f"loss {loss_value:.2f}")
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        elapsed = time.perf_counter() - started
        info = {
            "recipe": r,
            "recipe_hash": recipe_hash(r),
            "corpus_files": len(texts),
            "corpus_sha256": corpus_sha,
            "documents": len(documents),
            "chat_documents": len(chats),
            "corpus_tokens": len(stream),
            "n_params": n_params,
            "final_loss": loss_value,
            "build_s": round(elapsed, 1),
            # CPU time of this process (all threads): on a shared machine, wall time alone says little.
            "build_cpu_s": round(time.process_time() - cpu_started, 1),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
        }
        (out / "evalpipe-builtin.json").write_text(json.dumps(info, indent=2) + "\n")
        bar.update(task, description="done", info=f"loss {loss_value:.2f}, {elapsed:.0f} s")
    return info


def training_documents(texts: list[str], seed: int) -> list[str]:
    """Every module's function documents (`function_documents`), in an order shuffled with `seed`."""
    documents = [document for text in texts for document in function_documents(text)]
    random.Random(seed).shuffle(documents)
    return documents


def prompt_length(document: str) -> int:
    """Where the prompt of a training document ends, as a suite's prompt would end it.

    A function document's prompt is its imports, signature and docstring (the signature alone where it has
    no docstring), through the newline that ends them: what a HumanEval prompt is. A chat document's prompt
    is the rendered conversation through the generation prompt.
    """
    marker = f"{ROLE_TOKENS[2]}\n"
    if document.startswith(ROLE_TOKENS[1]):
        return document.index(marker) + len(marker)
    function = ast.parse(document).body[-1]
    assert isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef)
    first = function.body[0]
    has_docstring = (
        isinstance(first, ast.Expr)
        and isinstance(first.value, ast.Constant)
        and isinstance(first.value.value, str)
    )
    assert first.end_lineno is not None
    n_lines = first.end_lineno if has_docstring else first.lineno - 1
    return sum(map(len, document.splitlines(keepends=True)[:n_lines]))


def encode_documents(tokenizer: PreTrainedTokenizerFast, documents: list[str]) -> list[list[int]]:
    """Each document's token ids, its prompt (`prompt_length`) and the rest encoded apart.

    The engine encodes a prompt on its own, so the prompt's last token is the one that ends its text: a
    prompt that ends with a newline ends with a lone newline token, where the whole file would have merged
    that newline with the next line's indentation. Encoded whole, the only lone newline in training would be
    the one before EOS, and the model would end every completion at once.
    """
    cuts = [prompt_length(document) for document in documents]
    backend = tokenizer.backend_tokenizer
    # The backend tokenizer itself: long documents exceed model_max_length, fine for a token stream.
    heads = backend.encode_batch(
        [d[:cut] for d, cut in zip(documents, cuts, strict=True)], add_special_tokens=False
    )
    tails = backend.encode_batch(
        [d[cut:] for d, cut in zip(documents, cuts, strict=True)], add_special_tokens=False
    )
    return [[*head.ids, *tail.ids] for head, tail in zip(heads, tails, strict=True)]


def chat_reply(document: str, instruction: str, answer: str) -> tuple[str, str] | None:
    """A chat exchange made from a function document, in the shape the chat suites ask for.

    The user message is `instruction` around the document up to the end of its docstring (as a HumanEval
    prompt is); the reply is the whole document, in a ```python fence (`answer="fence"`) or as the JSON object
    {"code": ...} (`answer="json"`). None for a function without a docstring.
    """
    function = ast.parse(document).body[-1]
    assert isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef)
    if ast.get_docstring(function, clean=False) is None:
        return None
    user = instruction.replace("{prompt}", document[: prompt_length(document)])
    if answer == "fence":
        return user, f"```python\n{document}```"
    if answer == "json":
        return user, json.dumps({"code": document})
    raise ValueError(f"unknown answer shape {answer!r}")


def chat_documents(
    tokenizer: PreTrainedTokenizerFast, documents: list[str], share: float, instructions: list[list[str]]
) -> list[str]:
    """Chat documents for the first `share` of `documents` that have a docstring, the instructions in turn.

    Each is the chat template's rendering of the user message (with the generation prompt) followed by the
    reply; the caller appends EOS, as the template does after an assistant message.
    """
    made: list[str] = []
    wanted = round(share * len(documents))
    for document in documents:
        if len(made) >= wanted:
            break
        instruction, answer = instructions[len(made) % len(instructions)]
        exchange = chat_reply(document, instruction, answer)
        if exchange is None:
            continue
        user, reply = exchange
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
        made.append(str(prompt) + reply)
    return made


def _train(model: Any, data: Any, window_starts: Any, r: dict[str, Any], bar: Any, task: Any) -> float:
    """A short AdamW run on random windows of the token stream (fixed seed: the same windows every build)."""
    import torch

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
        picks = torch.randint(0, len(window_starts), (r["batch_size"],), generator=generator)
        batch = torch.stack([data[s : s + r["seq_len"]] for s in window_starts[picks].tolist()])
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
