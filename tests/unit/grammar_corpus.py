"""Hand-written function bodies for tests/unit/test_grammars.py.

Every body follows PROMPT (a signature and docstring ending in a newline), as a HumanEval completion does.
- VALID: Python compiles them and both grammars must accept them.
- INVALID: Python refuses them (SyntaxError) and both grammars must reject them.
- UNSUPPORTED: Python compiles them, but both grammars must reject them: they are not a completion (empty, no
  final newline) or use a construct outside the grammar's language (listed in its header).
"""

from __future__ import annotations

import textwrap

PROMPT = 'def f(x, y=1, *args, **kw):\n    """Docstring."""\n'


def body(src: str) -> str:
    """Dedent a block, then indent it by the body's 4 spaces (blank lines stay empty)."""
    return textwrap.indent(textwrap.dedent(src).lstrip("\n"), "    ")


VALID: dict[str, str] = {
    "return": "    return x\n",
    "return_bare": "    return\n",
    "return_trailing_space": "    return \n",
    "return_comment": "    return  # done\n",
    "return_paren": "    return(x)\n",
    "return_string_nw": "    return'x'\n",
    "return_tuple_star": "    return *args, x\n",
    "name_starting_with_keyword": "    returned = x\n    iffy = notx = 1\n    return returned\n",
    "assignments": body(
        """
        a = b = [1, 2.5, .5, 1., 1e-3, 0x1F, 0o17, 0b101, 1_000, 3j]
        a, *rest = x
        [c, d] = (e) = y
        x.attr[0] = kw['k'] = None
        total: int = 0
        x.attr: str
        a += 1; a //= 2; a **= 3
        """
    ),
    "strings": body(
        r'''
        s = 'a\n\t\\\'' + "b\"" + r'\d+\.' + R"\w"
        t = """multi
        line 'quoted' ""inside""
        """
        u = f'{x!r:>10} {{literal}} {kw[k]} {args[0]}' + F"{y.real}"
        v = b'\x00\xff' + B"bytes"
        w = 'implicit' "concatenation" f'{x}'
        z = ('across'
             'lines')
        '''
    ),
    "docstring_like": '    """Nested docstring-like statement."""\n    return\n',
    "if_elif_else": body(
        """
        if x > 0:
            return 1
        elif x < 0:
            return -1

        else:
            return 0
        """
    ),
    "if_paren_nw": body(
        """
        if(x):
            pass
        elif(y):
            pass
        while(False):
            pass
        assert(x), 'msg'
        del(x)
        """
    ),
    "inline_suites": "    if x: return 1\n    else: pass\n    while y: y -= 1; continue_ = 1\n",
    "for_else_break": body(
        """
        for i in range(10):
            if i == x:
                break
            continue
        else:
            return None
        """
    ),
    "while_else": body(
        """
        while x:
            x -= 1
            if x == 3: break
        else:
            x = 0
        return x
        """
    ),
    "nested_loops_and_def": body(
        """
        for i in range(3):
            for j in range(i):
                def g(a, b=2, *c, d, e=5, **kw) -> int:
                    for k in a:
                        break
                    return a
                if j: continue
        """
    ),
    "try_full": body(
        """
        try:
            y = int(x)
        except (ValueError, TypeError) as e:
            raise RuntimeError('bad') from e
        except KeyError:
            raise
        except:
            pass
        else:
            return y
        finally:
            x = None
        """
    ),
    "try_finally": "    try:\n        pass\n    finally:\n        return x\n",
    "except_space_colon": "    try:\n        pass\n    except :\n        pass\n",
    "with": body(
        """
        with open(x) as fh, open(y) as (gh):
            data = fh.read()
        """
    ),
    "imports": body(
        """
        import os.path as osp, sys
        from collections import Counter, defaultdict as dd
        from . import sibling
        from .pkg.mod import (a,
                              b as c,)
        """
    ),
    "expressions": body(
        """
        a = not x and y or not (z)
        b = x if y else lambda q, r=1, *s, **t: q
        c = 1 < x <= 10 != y
        d = x is not None and x not in y and x is(y)
        e = -x ** -2 + ~y // 3 % 4 @ z << 1 >> 2 & 3 | 4 ^ 5
        f = x[1:2, ::3][::-1][a:][:b]
        g = [i * j for i in x if i for j in y if j if not j]
        h = {k: v for k, v in x.items()}
        i = {*x, *y} | {1, 2}
        j = {**x, 'k': 1}
        k = (i for i in x)
        l = sum(i for i in x)
        m = print(*args, sep='', **kw)
        n = ((), [], {}, (1,), ..., None, True, False)
        o = lambda: 0
        p = lambda *a, **k: (a, k)
        """
    ),
    "call_space_before_paren": "    return all (int(c) % 2 == 1 for c in str(x))\n",
    "multiline_brackets": body(
        """
        result = [
            1,  # one
            2,

            3,
        ]
        total = (x
                 + y
                 and z)
        call(a,
             b=1,
        )
        return result
        """
    ),
    "comments_and_blank_lines": (
        "\n    # leading comment\n   \n    x = 1  # trailing\n        # deeper comment\n\n    return x\n\n"
    ),
    "semicolons": "    a = 1; b = 2;\n",
    "two_space_steps": "    if x:\n      y = 1\n      for i in y:\n        pass\n    return y\n",
    "eight_space_steps": "    if x:\n            y = 1\n    return y\n",
    "deep_nesting": body(
        """
        if x:
            if x:
                if x:
                    if x:
                        if x:
                            if x:
                                pass
        """
    ),
    "dedent_two_levels": "    if x:\n        if y:\n            pass\n    z = 1\n",
    "ellipsis_and_pass": "    ...\n    pass\n",
    "is_not_name": "    return x is notx\n",
    "keyword_infix_nw": "    return [i for i in(x) if(i)] or(y) and(x) or not(x)\n",
    "for_in_nw": "    for i in(x):\n        pass\n",
    "raise_forms": "    if x:\n        raise\n    raise ValueError(x)\n",
    "string_then_keyword": "    return 'a' if x else 'b' 'c'\n",
    "string_method": "    return ' '.join(sorted(x)) + '{}'.format(y) + 'abc'[0]\n",
    "unicode_in_strings_comments": "    s = 'héllo ✓ 中文'  # ünïcode\n    return s\n",
    "nested_def_closure": body(
        """
        def helper(a: int, *, key=None) -> str:
            return str(a)
        return helper(x)
        """
    ),
}

INVALID: dict[str, str] = {
    "column_zero": "return x\n",
    "unexpected_indent": "    x = 1\n     y = 2\n",
    "wrong_dedent": "    if x:\n        y = 1\n      z = 2\n",
    "dedent_below_body": "    if x:\n        pass\n  y = 1\n",
    "missing_block": "    if x:\n    y = 1\n",
    "missing_colon": "    if x\n        pass\n",
    "keyword_glued_to_name": "    ifx:\n        pass\n",
    "assign_to_call": "    f() = 1\n",
    "assign_to_operator": "    a + 1 = 2\n",
    "assign_to_none": "    None = 1\n",
    "assign_to_true": "    True = 1\n",
    "assign_to_debug": "    __debug__ = 1\n",
    "augassign_tuple": "    a, b += 1\n",
    "break_outside_loop": "    break\n",
    "continue_outside_loop": "    continue\n",
    "break_in_nested_def": "    for i in x:\n        def g():\n            break\n",
    "break_in_loop_else": "    while x:\n        pass\n    else:\n        break\n",
    "unterminated_string": "    x = 'abc\n",
    "unterminated_triple": "    x = '''a'\n",
    "unbalanced_paren": "    x = (1, 2\n",
    "mismatched_brackets": "    x = [1, 2)\n",
    "extra_closing": "    x = 1)\n",
    "leading_zero": "    x = 01\n",
    "bad_underscore": "    x = 1_\n",
    "positional_after_keyword": "    f(a=1, b)\n",
    "default_before_non_default": "    def g(a=1, b):\n        pass\n",
    "bare_star_param": "    def g(*):\n        pass\n",
    "kwargs_before_param": "    def g(**k, a):\n        pass\n",
    "lone_starred": "    x = *args\n",
    "lone_starred_paren": "    x = (*args)\n",
    "two_starred_targets": "    *a, *b = x\n",
    "del_call": "    del f()\n",
    "bare_except_not_last": body(
        """
        try:
            pass
        except:
            pass
        except ValueError:
            pass
        """
    ),
    "try_alone": "    try:\n        pass\n    x = 1\n",
    "else_without_if": "    else:\n        pass\n",
    "genexp_not_alone": "    f(i for i in x, 1)\n",
    "comprehension_ternary_filter": "    [i for i in x if i else 0]\n",
    "two_names": "    return x y\n",
    "dangling_operator": "    x = 1 +\n",
    "ternary_without_else": "    x = 1 if y\n",
    "keyword_in_fstring": "    x = f'{if}'\n",
    "future_import": "    from __future__ import annotations\n",
    "star_import_in_function": "    from os import *\n",
    "compound_after_semicolon": "    x = 1; if y: pass\n",
    "nested_inline_compound": "    if x: if y: pass\n",
    "tab_indent": "    if x:\n\ty = 1\n",
}

UNSUPPORTED: dict[str, str] = {
    # not a completion: nothing generated, or the last line never ended (Python still compiles the prompt)
    "empty_body": "",
    "only_blank_lines": "\n\n",
    "only_comment": "    # nothing\n",
    "missing_final_newline": "    return x",
    # constructs outside the grammar's language
    "class": "    class A:\n        pass\n",
    "decorator": "    @staticmethod\n    def g():\n        pass\n",
    "yield": "    yield x\n",
    "async_def": "    async def g():\n        pass\n",
    "walrus": "    if (n := len(x)) > 1:\n        pass\n",
    "global": "    global z\n",
    "match": "    match x:\n        case 1:\n            pass\n",
    "backslash_continuation": "    x = 1 + \\\n        2\n",
    "adjacent_strings_without_space": "    x = 'a''b'\n",
    "one_space_step": "    if x:\n     pass\n",
    "invalid_escape": "    x = '\\d'\n",
    "named_unicode_escape": "    x = '\\N{BULLET}'\n",
    "fstring_expression_field": "    x = f'{x + 1}'\n",
    "keyword_after_paren_without_space": "    return (x)and(y)\n",
    "positional_only_params": "    def g(a, /, b):\n        pass\n",
}


# ------------------------------------------------------------------------------------------------------------
# Chat replies for tests/unit/test_module_grammar.py (python_module_fenced): each is a whole reply, a fenced
# block whose content follows MODULE_PROMPT (`prompt + content` redefines its function), or not.
# - MODULE_VALID: the content compiles after MODULE_PROMPT and both grammars must accept the reply.
# - MODULE_INVALID: the content does not compile and both grammars must reject the reply.
# - MODULE_UNSUPPORTED: not the reply's shape (prose, no fence, no function, two blocks) or a construct
#   outside the grammar's language (listed in its header): both grammars must reject it.

MODULE_PROMPT = 'def f(x):\n    """Docstring."""\n'


def fenced(src: str, opening: str = "```python\n", closing: str = "```") -> str:
    """A reply: the dedented source between an opening and a closing fence."""
    return opening + textwrap.dedent(src).lstrip("\n") + closing


MODULE_VALID: dict[str, str] = {
    "one_function": fenced("def f(x):\n    return x\n"),
    "newline_after_closing_fence": fenced("def f(x):\n    return x\n", closing="```\n"),
    "bare_fence": fenced("def f(x):\n    return x\n", opening="```\n"),
    "py_fence": fenced("def f(x):\n    return x\n", opening="```py\n"),
    "python3_fence": fenced("def f(x):\n    return x\n", opening="```python3\n"),
    "blank_lines_before_a_named_fence": fenced("def f(x):\n    return x\n", opening="\n\n```python\n"),
    "one_line_function": fenced("def f(x): return x\n"),
    "imports_helpers_and_comments": fenced(
        """
        import math
        from typing import List, Optional as Opt
        from collections import (Counter,
                                 deque)

        # a helper, in column 0
        def helper(a: int, b: int = 2) -> int:
            '''Adds.'''
            return a + b


        def f(x: List[int], *rest, key=None, **kw) -> Opt[int]:
            \"\"\"The answer.

            More text, indented.
            \"\"\"
            # an indented comment
            total = 0
            for item in x:
                if item > 0:
                    total += helper(item)
                else:
                    continue
            return math.floor(total)
        """
    ),
    "import_after_function": fenced("def f(x):\n    return os.sep\nimport os\n"),
    "nested_function": fenced(
        """
        def f(x):
            def inner(y):
                return y * 2
            return inner(x)
        """
    ),
    "blank_lines_at_the_edges": fenced("\ndef f(x):\n    return x\n\n"),
    "trailing_comment_line": fenced("def f(x):\n    return x\n# done\n"),
    "eight_space_body": fenced("def f(x):\n    if x:\n            return x\n    return 0\n"),
    "four_functions_and_eight_imports": fenced(
        "import os\n" * 8
        + "".join(f"def g{i}():\n    pass\n" for i in range(3))
        + "def f(x):\n    return x\n"
    ),
}

MODULE_INVALID: dict[str, str] = {
    "unclosed_bracket": fenced("def f(x):\n    return (x\n"),
    "missing_colon": fenced("def f(x)\n    return x\n"),
    "empty_body": fenced("def f(x):\n\ndef g():\n    pass\n"),
    "dedent_to_nowhere": fenced("def f(x):\n    if x:\n        return 1\n  return 2\n"),
    "return_at_top_level": fenced("def f(x):\n    pass\nreturn x\n"),
    "keyword_as_name": fenced("def class(x):\n    pass\n"),
    "unterminated_string": fenced("def f(x):\n    return 'abc\n"),
    "break_outside_loop": fenced("def f(x):\n    break\n"),
}

MODULE_UNSUPPORTED: dict[str, str] = {
    # not the reply's shape
    "no_fence": "def f(x):\n    return x\n",
    "prose_before": "Here it is:\n" + fenced("def f(x):\n    return x\n"),
    "prose_after": fenced("def f(x):\n    return x\n", closing="```\nDone.\n"),
    "two_blocks": fenced("def f(x):\n    return x\n") + "\n" + fenced("def g():\n    pass\n"),
    "unclosed_fence": "```python\ndef f(x):\n    return x\n",
    "only_imports": fenced("import os\n"),
    "empty_block": "```python\n```",
    "closing_fence_not_in_column_0": "```python\ndef f(x):\n    return x\n    ```",
    "last_line_without_newline": "```python\ndef f(x):\n    return x```",
    "other_language": fenced("def f(x):\n    return x\n", opening="```javascript\n"),
    "blank_line_before_a_bare_fence": fenced("def f(x):\n    return x\n", opening="\n```\n"),
    "indented_top_level_function": "```python\n  def f(x):\n      return x\n```",
    # valid Python outside the grammar's language
    "top_level_assignment": fenced("LIMIT = 3\ndef f(x):\n    return x\n"),
    "class": fenced("class A:\n    pass\ndef f(x):\n    return x\n"),
    "decorator": fenced("import functools\n@functools.cache\ndef f(x):\n    return x\n"),
    "main_guard": fenced("def f(x):\n    return x\nif __name__ == '__main__':\n    f(1)\n"),
    "star_import": fenced("from math import *\ndef f(x):\n    return x\n"),
    "column_0_closing_bracket": fenced("from c import (\n    a,\n)\ndef f(x):\n    return a\n"),
    "column_0_line_in_docstring": fenced('def f(x):\n    """Doc.\nmore\n    """\n    return x\n'),
    "two_space_body": fenced("def f(x):\n  return x\n"),
    "five_functions": fenced(
        "".join(f"def g{i}():\n    pass\n" for i in range(4)) + "def f(x):\n    return x\n"
    ),
    "nine_imports_first": fenced("import os\n" * 9 + "def f(x):\n    return x\n"),
}
