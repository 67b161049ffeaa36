"""The built-in model's recipe and training documents (cheap: no training here)."""

from __future__ import annotations

import ast
import sysconfig
from pathlib import Path

from evalpipe.completion import code_block, json_field
from evalpipe.engines import builtin
from evalpipe.prompting import CHAT_INSTRUCTION, instruction
from evalpipe.suites import load_suite

MODULE = '''"""A module."""
import os
import sys as system
from collections import deque, OrderedDict
from typing import *


def plain(path: str) -> str:
    """Join."""
    return os.path.join(path, "x")


@decorated
def skipped():
    pass


class Klass:
    def method(self):
        return deque()


def uses_two(items):
    queue = deque(items)
    return system.version, queue


def column_zero():
    return """
text at column zero
"""


async def awaiting():
    await thing()
'''


def _functions(document: str) -> list[ast.stmt]:
    tree = ast.parse(document)
    assert all(isinstance(node, ast.Import | ast.ImportFrom) for node in tree.body[:-1])
    return [node for node in tree.body if not isinstance(node, ast.Import | ast.ImportFrom)]


def test_a_document_is_one_top_level_function_with_the_imports_it_uses() -> None:
    documents = builtin.function_documents(MODULE)
    assert documents == [
        'import os\n\n\ndef plain(path: str) -> str:\n    """Join."""\n    return os.path.join(path, "x")\n',
        "import sys as system\nfrom collections import deque, OrderedDict\n\n\n"
        "def uses_two(items):\n    queue = deque(items)\n    return system.version, queue\n",
        "async def awaiting():\n    await thing()\n",
    ]


def test_every_stdlib_document_parses_and_is_one_function_with_an_indented_body() -> None:
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = builtin.read_corpus([root / name for name in ("textwrap.py", "bisect.py", "heapq.py", "ast.py")])
    documents = builtin.training_documents(texts, seed=1)
    assert len(documents) >= 30
    for document in documents:
        (function,) = _functions(document)
        assert isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef)
        assert document.endswith("\n") and not document.endswith("\n\n")
        body = document[document.index("def ") :].splitlines()[1:]
        assert all(not line or line.startswith(" ") for line in body)
    assert builtin.training_documents(texts, seed=1) == documents  # the same order every build
    assert sorted(builtin.training_documents(texts, seed=2)) == sorted(documents)


def test_a_module_that_does_not_parse_gives_no_documents() -> None:
    assert builtin.function_documents("def broken(:\n    pass\n") == []


def test_any_recipe_change_is_a_new_model() -> None:
    assert builtin.RECIPE["name"] == "builtin-v2"
    assert builtin.recipe_hash() == builtin.recipe_hash(dict(builtin.RECIPE))
    for key, value in builtin.RECIPE.items():
        changed = {**builtin.RECIPE, key: f"{value}-changed"}
        assert builtin.recipe_hash(changed) != builtin.recipe_hash()


def test_the_chat_instructions_are_the_chat_suites_own() -> None:
    # A copy in the recipe, so that the recipe hash covers what the model was taught; a suite that changes
    # its instruction needs a new recipe (and this test says so).
    instructions = {answer: text for text, answer in builtin.RECIPE["chat_instructions"]}
    assert instructions["fence"] == CHAT_INSTRUCTION
    assert instructions["json"] == instruction(load_suite("humaneval_json"))


def test_a_chat_exchange_asks_with_the_docstring_and_answers_with_the_function() -> None:
    document = 'import os\n\n\ndef f(path):\n    """Doc\n    more."""\n    return os.sep\n'
    user, reply = builtin.chat_reply(document, "Do it:\n{prompt}END", "fence") or ("", "")
    assert user == 'Do it:\nimport os\n\n\ndef f(path):\n    """Doc\n    more."""\nEND'
    assert code_block(reply) == document
    _, answer = builtin.chat_reply(document, "{prompt}", "json") or ("", "")
    assert json_field(answer, "code") == document
    assert builtin.chat_reply("def g():\n    return 1\n", "{prompt}", "fence") is None


def test_chat_documents_follow_the_chat_template() -> None:
    root = Path(sysconfig.get_paths()["stdlib"])
    documents = builtin.training_documents(builtin.read_corpus([root / "textwrap.py"]), seed=1)
    tokenizer = builtin.train_tokenizer(documents, 400, builtin.ROLE_TOKENS)
    tokenizer.chat_template = builtin.CHAT_TEMPLATE
    instructions = builtin.RECIPE["chat_instructions"]
    chats = builtin.chat_documents(tokenizer, documents, 0.5, instructions)
    assert len(chats) == round(0.5 * len(documents))
    for chat, (text, answer) in zip(chats, instructions * len(chats), strict=False):
        user, _, reply = chat.removeprefix("<|user|>\n").partition("<|assistant|>\n")
        assert user.startswith(text[:40]) and user.endswith('"""\n```')
        code = json_field(reply, "code") if answer == "json" else code_block(reply)
        assert code is not None and code in documents
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<|user|>\nhi<|assistant|>\n"
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert tokens[0] == "<|user|>" and "<|assistant|>" in tokens


def test_a_document_is_encoded_as_the_engine_encodes_its_prompt_and_then_the_rest() -> None:
    root = Path(sysconfig.get_paths()["stdlib"])
    documents = builtin.training_documents(builtin.read_corpus([root / "textwrap.py"]), seed=1)
    tokenizer = builtin.train_tokenizer(documents, 400, builtin.ROLE_TOKENS)
    document = 'import os\n\n\ndef f(path):\n    """Doc."""\n    return os.sep\n'
    prompt = document[: builtin.prompt_length(document)]
    assert prompt == 'import os\n\n\ndef f(path):\n    """Doc."""\n'
    assert builtin.prompt_length("def g(a,\n      b):\n    return a\n") == len("def g(a,\n      b):\n")
    (ids,) = builtin.encode_documents(tokenizer, [document])
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids and tokenizer.decode(ids) == document
    assert tokenizer.convert_ids_to_tokens(prompt_ids)[-1] == "Ċ"  # the lone newline a prompt ends with
    chat = "<|user|>\nask<|assistant|>\n```python\nx = 1\n```"
    assert chat[: builtin.prompt_length(chat)] == "<|user|>\nask<|assistant|>\n"
