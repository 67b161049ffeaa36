"""Generate the HumanEval grammars in llguidance's Lark dialect and in XGrammar's EBNF (GBNF).

Two grammars, each printed as a Lark and GBNF twin from the one definition below, so that the twins define
the same language and the two grammars share their statements and expressions:

- `python_body`: the function body that completes a HumanEval prompt (suite `humaneval`);
- `python_module_fenced`: a chat reply that is one fenced block of imports and complete function definitions
  (suite `humaneval_chat`); a top-level function is the body's function-definition rule at width 0.

    python3 tasks/grammars/generate.py          # (re)write the .lark and .gbnf files beside it
    python3 tasks/grammars/generate.py --check  # exit 1 if the committed files differ from its output

Standard library only, deterministic output. The generated files are committed; tests/unit/test_grammars.py
checks that they are up to date with this script. Edit this script, never the generated files.

How the definition maps to the two engines:

- Terminals (UPPER_CASE) are regular expressions, built from the small regex AST below. In Lark they become
  `NAME: /regex/` lexemes; in GBNF they become rules with the same structure.
- Rules (lower_case) only refer to terminals and rules. There is no `%ignore`: every space lives inside a
  terminal, so that llguidance's greedy lexer (it never backtracks into an earlier lexeme) and XGrammar's
  character-level matcher accept the same strings. The invariants that make this hold:
    1. A terminal that may end with spaces is only ever followed by terminals that may start without one.
    2. Where a keyword may be followed either by spaces and an operand, or directly by a non-identifier
       character (`return(x)`, `if(x)`), the two forms are two terminals (`K_RETURN_SP`, `K_RETURN`) and
       the operand after the bare form comes from an `_nw` rule whose first character is never a letter,
       digit or underscore. So `returnx` can only be a NAME, as in Python.
    3. Two identifier-like lexemes (names, keywords, numbers, prefixed strings) never touch.
- Indentation is unrolled by width: every statement rule exists once per indentation width and loop context;
  the body's statements are at width 4 and a block's children may step 2 to 8 spaces deeper (up to 32).
  Dedent is implicit: after a nested block the grammar continues with the parent's indentation literal.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent

BODY_WIDTH = 4  # the HumanEval prompt's function body is indented by 4 spaces
STOP_WORDS = ("def ", "class ", "if __name__", "print(", "#", "assert ")
"""How a top-level line may start right after the body: the `humaneval` suite's stop sequences without their
newline (tests/unit/test_grammars.py checks that they agree). A completion ends there in every arm: the stop
sequence ends an unconstrained one, and the grammar lets a constrained one write it, then only lets it end."""
MAX_WIDTH = 32  # deepest indentation of a statement line
STEPS = (2, 3, 4, 5, 6, 7, 8)  # how much deeper a nested block may be indented than its header

# Python 3.11's hard keywords (keyword.kwlist), written out so that the output does not depend on the running
# Python, plus the two names that compile() refuses in the places a NAME is used here (`__debug__ = 1`,
# `from __future__ import x` inside a function).
# fmt: off
EXCLUDED_NAMES = (
    "False", "None", "True", "and", "as", "assert", "async", "await", "break", "class", "continue", "def",
    "del", "elif", "else", "except", "finally", "for", "from", "global", "if", "import", "in", "is",
    "lambda", "nonlocal", "not", "or", "pass", "raise", "return", "try", "while", "with", "yield",
    "__debug__", "__future__",
)
# fmt: on


# ------------------------------------------------------------------------------------------------------------
# A tiny regular-expression / grammar AST with two printers.


class Node:
    pass


@dataclass(frozen=True)
class Lit(Node):
    s: str


@dataclass(frozen=True)
class Cls(Node):
    ranges: tuple[tuple[int, int], ...]
    neg: bool = False


@dataclass(frozen=True)
class Seq(Node):
    xs: tuple[Node, ...]


@dataclass(frozen=True)
class Alt(Node):
    xs: tuple[Node, ...]


@dataclass(frozen=True)
class Rep(Node):
    x: Node
    lo: int
    hi: int | None


@dataclass(frozen=True)
class Ref(Node):
    name: str


def seq(*xs: Node | str) -> Node:
    parts = tuple(Lit(x) if isinstance(x, str) else x for x in xs)
    return parts[0] if len(parts) == 1 else Seq(parts)


def alt(*xs: Node | str) -> Node:
    parts = tuple(Lit(x) if isinstance(x, str) else x for x in xs)
    return parts[0] if len(parts) == 1 else Alt(parts)


def star(x: Node | str) -> Node:
    return Rep(seq(x), 0, None)


def plus(x: Node | str) -> Node:
    return Rep(seq(x), 1, None)


def opt(x: Node | str) -> Node:
    return Rep(seq(x), 0, 1)


def rep(x: Node | str, lo: int, hi: int | None) -> Node:
    return Rep(seq(x), lo, hi)


def ref(name: str) -> Node:
    return Ref(name)


def _ranges(spec: str) -> list[tuple[int, int]]:
    """'a-zA-Z_' -> [(97, 122), (65, 90), (95, 95)]; a '-' first or last is literal."""
    out: list[tuple[int, int]] = []
    i = 0
    while i < len(spec):
        if i + 2 < len(spec) and spec[i + 1] == "-":
            out.append((ord(spec[i]), ord(spec[i + 2])))
            i += 3
        else:
            out.append((ord(spec[i]), ord(spec[i])))
            i += 1
    return out


def _normalise(ranges: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
        else:
            merged.append((lo, hi))
    return tuple(merged)


def cls(spec: str) -> Cls:
    return Cls(_normalise(_ranges(spec)))


def ncls(spec: str) -> Cls:
    """Any character (any Unicode scalar value) except those in spec."""
    return Cls(_normalise(_ranges(spec)), neg=True)


def cls_minus(c: Cls, chars: str) -> Cls:
    assert not c.neg
    out: list[tuple[int, int]] = []
    for lo, hi in c.ranges:
        cur = lo
        for ch in sorted({ord(x) for x in chars}):
            if cur <= ch <= hi:
                if cur < ch:
                    out.append((cur, ch - 1))
                cur = ch + 1
        if cur <= hi:
            out.append((cur, hi))
    return Cls(_normalise(out))


def _control_escape(c: int) -> str | None:
    """The escape both dialects share for newline, tab and other control characters; None for the rest."""
    if c == 0x0A:
        return "\\n"
    if c == 0x09:
        return "\\t"
    if c < 0x20 or c == 0x7F:
        return f"\\x{c:02x}"
    return None


def _regex_char(c: int, in_class: bool) -> str:
    ch = chr(c)
    if (escaped := _control_escape(c)) is not None:
        return escaped
    # Rust-regex metacharacters (plus `/`, which ends a Lark regex), but not `#&~`: XGrammar's Lark front end
    # warns about escaping those, and a normalised class never holds the `&&` / `~~` set operators
    special = "\\]-[^/" if in_class else "\\.+*?()|[]{}^$-/"
    return "\\" + ch if ch in special else ch


def _ebnf_char(c: int, in_class: bool) -> str:
    ch = chr(c)
    if (escaped := _control_escape(c)) is not None:
        return escaped
    if in_class and ch in "-^":
        return f"\\x{c:02x}"  # llguidance's GBNF reader knows no `\-` or `\^`; both engines read `\xHH`
    special = "\\][" if in_class else '\\"'
    return "\\" + ch if ch in special else ch


def _class_text(c: Cls, char: Callable[[int, bool], str]) -> str:
    body = "".join(char(lo, True) + ("" if lo == hi else "-" + char(hi, True)) for lo, hi in c.ranges)
    return "[" + ("^" if c.neg else "") + body + "]"


def _rep_suffix(n: Rep) -> str:
    if (n.lo, n.hi) == (0, None):
        return "*"
    if (n.lo, n.hi) == (1, None):
        return "+"
    if (n.lo, n.hi) == (0, 1):
        return "?"
    if n.hi is None:
        return f"{{{n.lo},}}"
    if n.lo == n.hi:
        return f"{{{n.lo}}}"
    return f"{{{n.lo},{n.hi}}}"


def to_regex(n: Node) -> str:
    """Rust-regex text (llguidance's regex syntax) for a terminal without references."""
    if isinstance(n, Lit):
        return "".join(_regex_char(ord(c), False) for c in n.s)
    if isinstance(n, Cls):
        return _class_text(n, _regex_char)
    if isinstance(n, Seq):
        return "".join("(?:" + to_regex(x) + ")" if isinstance(x, Alt) else to_regex(x) for x in n.xs)
    if isinstance(n, Alt):
        return "|".join(to_regex(x) for x in n.xs)
    if isinstance(n, Rep):
        inner = to_regex(n.x)
        atomic = isinstance(n.x, Cls) or (isinstance(n.x, Lit) and len(n.x.s) == 1)
        return (inner if atomic else "(?:" + inner + ")") + _rep_suffix(n)
    raise TypeError(n)


def has_ref(n: Node) -> bool:
    if isinstance(n, Ref):
        return True
    if isinstance(n, (Seq, Alt)):
        return any(has_ref(x) for x in n.xs)
    if isinstance(n, Rep):
        return has_ref(n.x)
    return False


def to_lark_term(n: Node) -> str:
    """Lark text for a terminal: one /regex/ where possible, else a terminal expression over /regex/ parts and
    other terminals (llguidance inlines those into the one lexeme)."""
    if not has_ref(n):
        return "/" + to_regex(n) + "/"
    if isinstance(n, Ref):
        return n.name
    if isinstance(n, Seq):
        return " ".join("(" + to_lark_term(x) + ")" if isinstance(x, Alt) else to_lark_term(x) for x in n.xs)
    if isinstance(n, Alt):
        return " | ".join(to_lark_term(x) for x in n.xs)
    if isinstance(n, Rep):
        inner = to_lark_term(n.x)
        return (inner if isinstance(n.x, Ref) or not has_ref(n.x) else "(" + inner + ")") + _rep_suffix(n)
    raise TypeError(n)


def to_ebnf(n: Node) -> str:
    """XGrammar EBNF text for a terminal or a rule body."""
    if isinstance(n, Lit):
        return '"' + "".join(_ebnf_char(ord(c), False) for c in n.s) + '"'
    if isinstance(n, Cls):
        return _class_text(n, _ebnf_char)
    if isinstance(n, Ref):
        return gbnf_name(n.name)
    if isinstance(n, Seq):
        return " ".join("(" + to_ebnf(x) + ")" if isinstance(x, Alt) else to_ebnf(x) for x in n.xs)
    if isinstance(n, Alt):
        return " | ".join(to_ebnf(x) for x in n.xs)
    if isinstance(n, Rep):
        inner = to_ebnf(n.x)
        atomic = isinstance(n.x, (Cls, Lit, Ref))
        return (inner if atomic else "(" + inner + ")") + _rep_suffix(n)
    raise TypeError(n)


def to_lark_rule(n: Node) -> str:
    """Lark text for a rule body (references and groups only)."""
    if isinstance(n, Ref):
        return n.name
    if isinstance(n, Seq):
        return " ".join("(" + to_lark_rule(x) + ")" if isinstance(x, Alt) else to_lark_rule(x) for x in n.xs)
    if isinstance(n, Alt):
        return " | ".join(to_lark_rule(x) for x in n.xs)
    if isinstance(n, Rep):
        assert n.hi is None or (n.lo, n.hi) == (0, 1), n
        inner = to_lark_rule(n.x)
        return (inner if isinstance(n.x, Ref) else "(" + inner + ")") + _rep_suffix(n)
    raise TypeError(f"rules may only contain references and groups, not {n!r}")


def gbnf_name(name: str) -> str:
    return "root" if name == "start" else name


# ------------------------------------------------------------------------------------------------------------
# Terminals.

FRAGS: dict[str, Node] = {}
TERMS: dict[str, Node] = {}
RULES: dict[str, Node] = {}


def frag(name: str, n: Node) -> Node:
    """A helper terminal: used inside other terminals, never directly by a rule."""
    assert name.isupper() and name not in FRAGS, name
    FRAGS[name] = seq(n)
    return Ref(name)


def term(name: str, n: Node | str) -> Node:
    assert name.isupper() and name not in TERMS, name
    TERMS[name] = seq(n)
    return Ref(name)


def rule(name: str, *alts: Node) -> Node:
    assert name.islower() and name not in RULES, name
    RULES[name] = alt(*alts)
    return Ref(name)


SP0 = star(" ")
SP1 = plus(" ")
CTRL = "\x00-\x08\n-\x1f"  # control characters allowed nowhere except tab (and newline in triple quotes)
COMMENT = frag("F_COMMENT", seq("#", star(ncls(CTRL))))
EOL_FRAG = frag("F_EOL", seq(SP0, opt(COMMENT), "\n"))
# A line that follows a newline never starts in column 0: a column-0 line is where a completion ends (the
# suite's stop sequences, `STOP_WORDS`), so inside the body every line, blank and comment-only ones included,
# starts with a space or is empty.
BLANK_FRAG = frag("F_BLANK", alt("\n", seq(SP1, opt(COMMENT), "\n")))
# inside brackets: any spaces, newlines and indented comment lines; a continuation line starts with a space
W0 = frag("F_W0", alt(SP0, seq(EOL_FRAG, star(BLANK_FRAG), SP1)))
W1 = frag("F_W1", alt(SP1, seq(EOL_FRAG, star(BLANK_FRAG), SP1)))  # the same, but not empty

IDSTART = cls("a-zA-Z_")
IDCHAR = cls("a-zA-Z0-9_")


def name_regex(excluded: tuple[str, ...]) -> Node:
    """ASCII identifiers except the excluded words, without negative lookahead: a regex over the word trie."""
    words = set(excluded)

    def node(prefix: str) -> Node:
        nexts = sorted({w[len(prefix)] for w in words if w.startswith(prefix) and len(w) > len(prefix)})
        first = IDSTART if not prefix else IDCHAR
        alts: list[Node] = [seq(c, node(prefix + c)) for c in nexts]
        other = cls_minus(first, "".join(nexts))
        alts.append(seq(other, star(IDCHAR)))
        body = alt(*alts)
        return opt(body) if prefix and prefix not in words else body

    return node("")


NAME = term("NAME", name_regex(EXCLUDED_NAMES))
NAME_FRAG = NAME
KWCONST = term("KWCONST", alt("None", "True", "False"))

DIGITS = seq(cls("0-9"), star(seq(opt("_"), cls("0-9"))))
EXPONENT = seq(cls("eE"), opt(cls("-+")), DIGITS)
FLOAT = alt(
    seq(DIGITS, ".", opt(DIGITS), opt(EXPONENT)),
    seq(".", DIGITS, opt(EXPONENT)),
    seq(DIGITS, EXPONENT),
)
NUMBER = term(
    "NUMBER",
    alt(
        seq(cls("1-9"), star(seq(opt("_"), cls("0-9")))),
        seq("0", star(seq(opt("_"), "0"))),
        seq("0", cls("xX"), plus(seq(opt("_"), cls("0-9a-fA-F")))),
        seq("0", cls("oO"), plus(seq(opt("_"), cls("0-7")))),
        seq("0", cls("bB"), plus(seq(opt("_"), cls("01")))),
        FLOAT,
        seq(alt(FLOAT, DIGITS), cls("jJ")),
    ),
)

HEX = cls("0-9a-fA-F")
# octal escapes start with 0-3: Python reads up to 3 digits, so the value stays <= 0o377 (more is deprecated)
ESC_COMMON = alt(cls("\\\\'\"abfnrtv"), seq(cls("0-3"), rep(cls("0-7"), 0, 2)), seq("x", rep(HEX, 2, 2)))
ESC_STR = frag(
    "F_ESC",
    seq(
        "\\",
        alt(
            ESC_COMMON,
            seq("u", rep(HEX, 4, 4)),
            seq("U", alt(seq("000", rep(HEX, 5, 5)), seq("0010", rep(HEX, 4, 4)))),
        ),
    ),
)
ESC_BYTES = seq("\\", ESC_COMMON)
ESC_RAW = seq("\\", ncls(CTRL))  # raw strings: a backslash protects any next character

FFIELD_EXPR = seq(
    NAME_FRAG,
    star(alt(seq(".", NAME_FRAG), seq("[", alt("0", seq(cls("1-9"), star(cls("0-9"))), NAME_FRAG), "]"))),
)
FFIELD = seq("{", FFIELD_EXPR, opt(seq("!", cls("rsa"))), opt(seq(":", star(ncls("'\"{}\\" + CTRL)))), "}")


def short_string(q: str, kind: str) -> Node:
    if kind == "bytes":
        char: Node = cls_minus(cls(" -~"), q + "\\")
        return seq(q, star(alt(char, "\t", ESC_BYTES)), q)
    char = ncls(q + "\\" + CTRL)
    if kind == "raw":
        return seq(q, star(alt(char, ESC_RAW)), q)
    if kind == "f":
        fchar = ncls(q + "\\{}" + CTRL)
        return seq(q, star(alt(fchar, ESC_STR, "{{", "}}", FFIELD)), q)
    return seq(q, star(alt(char, ESC_STR)), q)


def triple_string(q: str, raw: bool) -> Node:
    """Triple-quoted: a run of one or two quotes inside is always followed by a non-quote, so the content
    neither contains the closing run nor ends with a quote. A line inside starts with a space or a tab, or
    is empty, unless the closing quotes begin it: a column-0 line would be where the completion ends."""
    char = ncls(q + "\\\n\x00-\x08\x0b-\x1f")
    newlines = seq(plus("\n"), cls(" \t"))
    # a backslash-newline continues the string; in a raw string a backslash protects any other character
    continued = seq("\\", newlines)
    escape = alt(seq("\\", ncls("\n\x00-\x08\x0b-\x1f")), continued) if raw else alt(ESC_STR, continued)
    unit = alt(char, newlines, escape)
    return seq(q * 3, star(seq(rep(q, 0, 2), unit)), star("\n"), q * 3)


PLAIN_STR = frag(
    "F_PLAIN_STR",
    alt(
        triple_string("'", False),
        triple_string('"', False),
        short_string("'", "str"),
        short_string('"', "str"),
    ),
)
ANY_STR = frag(
    "F_ANY_STR",
    alt(
        PLAIN_STR,
        seq(
            cls("rR"),
            alt(
                triple_string("'", True),
                triple_string('"', True),
                short_string("'", "raw"),
                short_string('"', "raw"),
            ),
        ),
        seq(cls("fF"), alt(short_string("'", "f"), short_string('"', "f"))),
    ),
)
STR = term("STR", PLAIN_STR)  # an unprefixed string: may follow a bare keyword (`return'x'`)
STR_ANY = term("STR_ANY", ANY_STR)
STRCONT_O = term("STRCONT_O", seq(SP1, ANY_STR))  # implicit concatenation: `'a' 'b'` (never `'a''b'`)
STRCONT_I = term("STRCONT_I", seq(W1, ANY_STR))  # ... and across lines inside brackets
BYTES = term("BYTES", seq(cls("bB"), alt(short_string("'", "bytes"), short_string('"', "bytes"))))
ELLIPSIS = term("ELLIPSIS", "...")

NL = term("NL", EOL_FRAG)  # end of a logical line (with its comment, if any)
BLANK = term("BLANK", BLANK_FRAG)  # a blank or comment-only line after it, never starting in column 0
LPAR = term("LPAR", seq("(", W0))
CALL = term("CALL", seq(SP0, "(", W0))  # a call may have spaces before its parenthesis: `all (x for x in y)`
RPAR = term("RPAR", seq(W0, ")"))
LBRACK = term("LBRACK", seq("[", W0))
RBRACK = term("RBRACK", seq(W0, "]"))
LBRACE = term("LBRACE", seq("{", W0))
RBRACE = term("RBRACE", seq(W0, "}"))
CM_O = term("CM_O", seq(SP0, ",", SP0))
CM_I = term("CM_I", seq(W0, ",", W0))
COLON = term("COLON", seq(SP0, ":", SP0))
SEMI = term("SEMI", seq(SP0, ";", SP0))
EQ = term("EQ", seq(SP0, "=", SP0))
ARROW = term("ARROW", seq(SP0, "->", SP0))
BINARY_OPS = alt(
    *["+", "-", "*", "**", "/", "//", "%", "@", "<<", ">>", "&", "|", "^", "==", "!=", "<", "<=", ">", ">="]
)
BINOP_O = term("BINOP_O", seq(SP0, BINARY_OPS, SP0))
BINOP_I = term("BINOP_I", seq(W0, BINARY_OPS, W0))
AUGOP = term(
    "AUGOP",
    seq(SP0, alt(*["+=", "-=", "*=", "@=", "/=", "//=", "%=", "**=", ">>=", "<<=", "&=", "^=", "|="]), SP0),
)
UNARY = term("UNARY", cls("-+~"))
STAR = term("STAR", "*")
DSTAR = term("DSTAR", "**")
DOT = term("DOT", ".")
DOTS = term("DOTS", plus("."))


def kw(word: str) -> Node:
    """Statement or prefix keyword followed by a non-identifier character: K_WORD."""
    return term(f"K_{word.upper()}", word)


def kw_sp(word: str) -> Node:
    """The same keyword followed by spaces: K_WORD_SP."""
    return term(f"K_{word.upper()}_SP", seq(word, SP1))


K_RETURN, K_RETURN_SP = kw("return"), kw_sp("return")
K_RAISE, K_RAISE_SP = kw("raise"), kw_sp("raise")
K_PASS, K_BREAK, K_CONTINUE = kw("pass"), kw("break"), kw("continue")
K_DEL, K_DEL_SP = kw("del"), kw_sp("del")
K_ASSERT, K_ASSERT_SP = kw("assert"), kw_sp("assert")
K_IMPORT_SP, K_FROM_SP = kw_sp("import"), kw_sp("from")
K_IF, K_IF_SP = kw("if"), kw_sp("if")
K_ELIF, K_ELIF_SP = kw("elif"), kw_sp("elif")
K_ELSE = kw("else")
K_WHILE, K_WHILE_SP = kw("while"), kw_sp("while")
K_FOR_SP = kw_sp("for")
K_TRY = kw("try")
K_EXCEPT, K_EXCEPT_SP = kw("except"), kw_sp("except")
K_FINALLY = kw("finally")
K_WITH_SP, K_DEF_SP = kw_sp("with"), kw_sp("def")
K_NOT, K_NOT_SP = kw("not"), kw_sp("not")
K_LAMBDA, K_LAMBDA_SP = kw("lambda"), kw_sp("lambda")


def infix(name: str, words: Node | str, brs: str = "oi", bare: bool = True) -> None:
    """Infix keyword `x WORD y`: spaces (or, inside brackets, any whitespace) on the left; on the right
    either whitespace (X_NAME_BR_SP) or nothing, when the operand starts with a non-identifier character
    (X_NAME_BR)."""
    for br in brs:
        ws = SP1 if br == "o" else W1
        if bare:
            term(f"X_{name}_{br.upper()}", seq(ws, words))
        term(f"X_{name}_{br.upper()}_SP", seq(ws, words, ws))


infix("IF", "if")
infix("ELSE", "else")
infix("FOR", "for", brs="i", bare=False)
infix("IN", "in")
infix("BOOL", alt("and", "or"))
infix("CMP", alt("in", seq("not", SP1, "in")))
infix("IS", "is")
infix("AS", "as", brs="o", bare=False)
infix("FROM", "from", brs="o")
infix("IMPORT", "import", brs="o", bare=False)


def tm(name: str) -> Node:
    """A terminal, by name."""
    assert name in TERMS, name
    return Ref(name)


def rref(name: str) -> Node:
    """A rule, by name (it may be defined later)."""
    return Ref(name)


def xn(base: str, br: str, nw: bool = False) -> Node:
    """Reference to a rule variant: base_BR (any start) or base_BR_nw (first character not [A-Za-z0-9_])."""
    return Ref(f"{base}_{br}" + ("_nw" if nw else ""))


def kwop(name: str, br: str, base: str) -> Node:
    """`WORD operand` after an infix keyword: spaced, or bare before an operand starting with punctuation."""
    b = br.upper()
    return alt(seq(tm(f"X_{name}_{b}_SP"), xn(base, br)), seq(tm(f"X_{name}_{b}"), xn(base, br, True)))


def cm(br: str) -> Node:
    return CM_O if br == "o" else CM_I


# ------------------------------------------------------------------------------------------------------------
# Expressions. Binary operators and comparisons form one flat chain (precedence does not change which strings
# are valid); `not`, `and`/`or`, the conditional expression and lambda keep their own levels because they do.
# Suffix _o: outside brackets (no newlines), _i: inside brackets. Suffix _nw: cannot start with [A-Za-z0-9_].

for br in "oi":
    for nw in (False, True):
        sfx = f"_{br}" + ("_nw" if nw else "")
        test_alts: list[Node] = [
            seq(xn("ortest", br, nw), opt(seq(kwop("IF", br, "ortest"), kwop("ELSE", br, "test"))))
        ]
        if not nw:
            test_alts.append(xn("lambdef", br))
        rule("test" + sfx, *test_alts)
        rule("ortest" + sfx, seq(xn("nottest", br, nw), star(kwop("BOOL", br, "nottest"))))
        not_alts: list[Node] = [xn("comparison", br, nw)]
        if not nw:
            not_alts += [seq(K_NOT_SP, xn("nottest", br)), seq(K_NOT, xn("nottest", br, True))]
        rule("nottest" + sfx, *not_alts)
        rule("comparison" + sfx, seq(xn("factor", br, nw), star(xn("binop", br))))
        rule("factor" + sfx, seq(UNARY, xn("factor", br)), xn("atomexpr", br, nw))
        atom_alts: list[Node] = [seq(xn("atom", br, nw), star(rref("trailer")))]
        if not nw:
            atom_alts += [NUMBER, ELLIPSIS]
        rule("atomexpr" + sfx, *atom_alts)
        strcont = STRCONT_O if br == "o" else STRCONT_I
        atoms: list[Node] = [
            seq(STR if nw else STR_ANY, star(strcont)),
            rref("paren"),
            rref("list"),
            rref("dictset"),
        ]
        if not nw:
            atoms = [NAME, KWCONST, BYTES, *atoms]
        rule("atom" + sfx, *atoms)
    B = br.upper()
    rule(
        f"binop_{br}",
        seq(tm(f"BINOP_{B}"), xn("factor", br)),
        kwop("CMP", br, "factor"),
        kwop("IS", br, "factor"),
        seq(tm(f"X_IS_{B}_SP"), K_NOT_SP, xn("factor", br)),
        seq(tm(f"X_IS_{B}_SP"), K_NOT, xn("factor", br, True)),
    )
    # lambda: parameters without annotations; the body is an expression in the same bracket context
    rule(
        f"lambdef_{br}",
        seq(K_LAMBDA_SP, Ref(f"params_lam_{br}"), COLON, xn("test", br)),
        seq(alt(K_LAMBDA, K_LAMBDA_SP), COLON, xn("test", br)),
    )

rule("trailer", seq(CALL, opt(rref("args")), RPAR), seq(LBRACK, rref("subscripts"), RBRACK), seq(DOT, NAME))
rule("subscripts", seq(rref("subscript"), star(seq(CM_I, rref("subscript"))), opt(CM_I)))
rule(
    "subscript",
    rref("test_i"),
    seq(opt(rref("test_i")), COLON, opt(rref("test_i")), opt(seq(COLON, opt(rref("test_i"))))),
)
rule("star_i", seq(STAR, rref("factor_i")))
rule("item_i", rref("test_i"), rref("star_i"))
rule("items_i", seq(rref("item_i"), star(seq(CM_I, rref("item_i")))))
rule(
    "paren",
    seq(LPAR, RPAR),
    seq(LPAR, rref("test_i"), opt(rref("compfor")), RPAR),
    seq(LPAR, rref("item_i"), CM_I, opt(seq(rref("items_i"), opt(CM_I))), RPAR),
)
rule(
    "list",
    seq(LBRACK, RBRACK),
    seq(LBRACK, rref("test_i"), rref("compfor"), RBRACK),
    seq(LBRACK, rref("items_i"), opt(CM_I), RBRACK),
)
rule("dictitem", seq(rref("test_i"), COLON, rref("test_i")), seq(DSTAR, rref("factor_i")))
rule(
    "dictset",
    seq(LBRACE, RBRACE),
    seq(LBRACE, rref("dictitem"), star(seq(CM_I, rref("dictitem"))), opt(CM_I), RBRACE),
    seq(LBRACE, rref("test_i"), COLON, rref("test_i"), rref("compfor"), RBRACE),
    seq(LBRACE, rref("test_i"), rref("compfor"), RBRACE),
    seq(LBRACE, rref("items_i"), opt(CM_I), RBRACE),
)
# comprehension: `for TARGETS in OR_TEST (if OR_TEST)*`, repeated; no trailing comma before ` in`
rule(
    "compfor",
    plus(
        seq(tm("X_FOR_I_SP"), rref("tlistnt_i"), kwop("IN", "i", "ortest"), star(kwop("IF", "i", "ortest")))
    ),
)
# call arguments: positional (and *x), then keywords (and **x); a generator only as the sole argument
rule("parg", rref("test_i"), rref("star_i"))
rule("karg", seq(NAME, EQ, rref("test_i")), seq(DSTAR, rref("factor_i")))
rule(
    "args",
    seq(rref("test_i"), rref("compfor")),
    seq(
        rref("parg"),
        star(seq(CM_I, rref("parg"))),
        opt(seq(CM_I, rref("karg"), star(seq(CM_I, rref("karg"))))),
        opt(CM_I),
    ),
    seq(rref("karg"), star(seq(CM_I, rref("karg"))), opt(CM_I)),
)

# parameters: non-default before default, then *args / bare * with keyword-only ones, then **kwargs
for kind in ("def", "lam"):
    brs = "i" if kind == "def" else "oi"
    for br in brs:
        sfx = f"_{kind}_{br}"
        c = cm(br)
        plain = seq(NAME, opt(seq(COLON, rref("test_i")))) if kind == "def" else NAME
        dflt = seq(plain, EQ, xn("test", br))
        rule("pplain" + sfx, plain)
        rule("pdflt" + sfx, dflt)
        pp, pd = rref("pplain" + sfx), rref("pdflt" + sfx)
        kwonly = alt(pp, pd)
        kwargs = seq(DSTAR, pp)
        rule(
            "pstar" + sfx,
            seq(STAR, pp, star(seq(c, kwonly)), opt(seq(c, kwargs))),
            seq(STAR, plus(seq(c, kwonly)), opt(seq(c, kwargs))),
            kwargs,
        )
        pos = alt(seq(pp, star(seq(c, pp)), star(seq(c, pd))), seq(pd, star(seq(c, pd))))
        trailing = opt(c)
        rule(
            "params" + sfx,
            seq(pos, opt(seq(c, rref("pstar" + sfx))), trailing),
            seq(rref("pstar" + sfx), trailing),
        )

# statement-level expression lists (`return a, *b`, `x = 1, 2`): a lone starred item needs a comma
rule("titem_o", rref("test_o"), seq(STAR, rref("factor_o")))
rule("titems_o", seq(rref("titem_o"), star(seq(CM_O, rref("titem_o")))))
for nw in (False, True):
    sfx = "_nw" if nw else ""
    head = xn("test", "o", nw) if nw else rref("titem_o")
    rule(
        "testlist" + sfx,
        xn("test", "o", nw),
        seq(head, CM_O, opt(seq(rref("titems_o"), opt(CM_O)))),
    )

# ------------------------------------------------------------------------------------------------------------
# Targets: names, attributes and subscriptions (never calls or literals), tuples and lists of them, at most
# one starred target per level and never a lone one.

rule("ttail", seq(DOT, NAME), seq(LBRACK, rref("subscripts"), RBRACK))
rule("tref", NAME, seq(NAME, star(rref("trailer")), rref("ttail")))
for br in "oi":
    c = cm(br)
    rule(f"tatom_{br}", rref("tref"), seq(LPAR, rref("tlist_i"), RPAR), seq(LBRACK, rref("tlist_i"), RBRACK))
    ta = rref(f"tatom_{br}")
    rule(f"tns_{br}", seq(ta, star(seq(c, ta))))
    tns = rref(f"tns_{br}")
    tstar = seq(STAR, ta)
    rule(
        f"tlist_{br}",
        seq(tns, opt(c)),
        seq(tns, c, tstar, opt(seq(c, tns)), opt(c)),
        seq(tstar, c, opt(seq(tns, opt(c)))),
    )
    rule(
        f"tlistnt_{br}",
        tns,
        seq(tns, c, tstar, opt(seq(c, tns))),
        seq(tstar, c, tns),
    )
# del: no starred targets; the bare `del(` form starts with a bracket
rule("datom", rref("tref"), seq(LPAR, rref("dlist_i"), RPAR), seq(LBRACK, rref("dlist_i"), RBRACK))
rule("dlist_i", seq(rref("datom"), star(seq(CM_I, rref("datom"))), opt(CM_I)))
rule("dlist_o", seq(rref("datom"), star(seq(CM_O, rref("datom"))), opt(CM_O)))
rule(
    "dlist_o_nw",
    seq(
        alt(seq(LPAR, rref("dlist_i"), RPAR), seq(LBRACK, rref("dlist_i"), RBRACK)),
        star(seq(CM_O, rref("datom"))),
        opt(CM_O),
    ),
)

# ------------------------------------------------------------------------------------------------------------
# Simple statements. Suffix _n: not inside a loop, _l: inside a loop (break / continue allowed).

rule(
    "exprstmt",
    rref("testlist"),
    seq(plus(seq(rref("tlist_o"), EQ)), rref("testlist")),
    seq(rref("tref"), AUGOP, rref("testlist")),
    # annotated: a name or attribute, not a subscription (CPython refuses `d[(*a,)]: int`)
    seq(NAME, star(seq(DOT, NAME)), COLON, rref("test_o"), opt(seq(EQ, rref("testlist")))),
)
rule("dotted", seq(NAME, star(seq(DOT, NAME))))
rule("iname", seq(NAME, opt(seq(tm("X_AS_O_SP"), NAME))))
rule(
    "inames",
    seq(rref("iname"), star(seq(CM_O, rref("iname")))),
    seq(LPAR, rref("iname"), star(seq(CM_I, rref("iname"))), opt(CM_I), RPAR),
)
raise_from = opt(kwop("FROM", "o", "test"))
# `import a.b as c, d` and `from .a import (b as c)`: inside a function and at the top of a module alike
IMPORTS = [
    seq(
        K_IMPORT_SP,
        rref("dotted"),
        opt(seq(tm("X_AS_O_SP"), NAME)),
        star(seq(CM_O, rref("dotted"), opt(seq(tm("X_AS_O_SP"), NAME)))),
    ),
    seq(K_FROM_SP, alt(rref("dotted"), seq(DOTS, opt(rref("dotted")))), tm("X_IMPORT_O_SP"), rref("inames")),
]
common_small = [
    rref("exprstmt"),
    seq(K_RETURN_SP, rref("testlist")),
    seq(K_RETURN, rref("testlist_nw")),
    K_RETURN,
    K_RETURN_SP,
    seq(K_RAISE_SP, rref("test_o"), raise_from),
    seq(K_RAISE, rref("test_o_nw"), raise_from),
    K_RAISE,
    K_RAISE_SP,
    K_PASS,
    seq(K_DEL_SP, rref("dlist_o")),
    seq(K_DEL, rref("dlist_o_nw")),
    seq(K_ASSERT_SP, rref("test_o"), opt(seq(CM_O, rref("test_o")))),
    seq(K_ASSERT, rref("test_o_nw"), opt(seq(CM_O, rref("test_o")))),
    *IMPORTS,
]
rule("small_n", *common_small)
rule("small_l", *common_small, K_BREAK, K_CONTINUE)
for lp in "nl":
    sm = rref(f"small_{lp}")
    rule(f"simple_{lp}", seq(sm, star(seq(SEMI, sm)), opt(SEMI), NL))

# compound-statement headers (everything between the keyword and the colon), independent of the width
rule("if_head", seq(K_IF_SP, rref("test_o")), seq(K_IF, rref("test_o_nw")))
rule("elif_head", seq(K_ELIF_SP, rref("test_o")), seq(K_ELIF, rref("test_o_nw")))
rule("while_head", seq(K_WHILE_SP, rref("test_o")), seq(K_WHILE, rref("test_o_nw")))
rule(
    "for_head",
    seq(K_FOR_SP, rref("tlistnt_o"), tm("X_IN_O_SP"), rref("testlist")),
    seq(K_FOR_SP, rref("tlistnt_o"), tm("X_IN_O"), rref("testlist_nw")),
)
rule(
    "except_head",
    seq(K_EXCEPT_SP, rref("test_o"), opt(seq(tm("X_AS_O_SP"), NAME))),
    seq(K_EXCEPT, rref("test_o_nw"), opt(seq(tm("X_AS_O_SP"), NAME))),
)
rule("with_item", seq(rref("test_o"), opt(seq(tm("X_AS_O_SP"), rref("tatom_o")))))
rule("with_head", seq(K_WITH_SP, rref("with_item"), star(seq(CM_O, rref("with_item")))))
rule("def_head", seq(K_DEF_SP, NAME, LPAR, opt(rref("params_def_i")), RPAR, opt(seq(ARROW, rref("test_o")))))

# ------------------------------------------------------------------------------------------------------------
# Statements, unrolled by indentation width w and loop context lp.

WIDTHS = list(range(BODY_WIDTH, MAX_WIDTH + 1))


def children(w: int) -> list[int]:
    return [w + s for s in STEPS if w + s <= MAX_WIDTH]


def reachable_widths() -> list[int]:
    seen = {BODY_WIDTH}
    todo = [BODY_WIDTH]
    while todo:
        for c in children(todo.pop()):
            if c not in seen:
                seen.add(c)
                todo.append(c)
    return sorted(seen)


for w in reachable_widths():
    # `" "{w}`, not a w-space literal: XGrammar compiles the repetition far faster (0.4 s, not 10 s, at 16k)
    term(f"IND{w}", rep(" ", w, w))
MAX_BLANK_LINES = 4
"""Blank or comment-only lines in a row (HumanEval's canonical solutions have at most 2). Unbounded, a weak
model under the constraint can emit newlines until max_tokens instead of code (the built-in model did)."""


def upto(x: Node, n: int) -> Node:
    """0 to n repetitions as nested optionals: rules take those in both dialects, and no {m,n} in Lark."""
    node = opt(x)
    for _ in range(n - 1):
        node = opt(seq(x, node))
    return node


def suite_alts(lp: str, kids: list[int]) -> list[Node]:
    """A compound statement's `:` and then a simple statement on the same line, or a newline and a block
    indented to one of the widths `kids`."""
    alts: list[Node] = [seq(COLON, rref(f"simple_{lp}"))]
    if kids:
        blank = upto(BLANK, MAX_BLANK_LINES)
        alts.append(seq(COLON, NL, blank, alt(*(rref(f"block_{c}{lp}") for c in kids))))
    return alts


def define_def(w: int) -> None:
    """`def_{w}`: a function definition whose header is indented by w; its body is never inside a loop."""
    ind = [tm(f"IND{w}")] if w else []
    rule(f"def_{w}", seq(*ind, rref("def_head"), rref(f"suite_{w}n")))


for w in reachable_widths():
    ind = tm(f"IND{w}")
    blank = upto(BLANK, MAX_BLANK_LINES)
    for lp in "nl":
        s = f"_{w}{lp}"
        kids = children(w)
        rule("suite" + s, *suite_alts(lp, kids))
        suite = rref("suite" + s)
        loop_suite = rref(f"suite_{w}l")
        else_part = opt(seq(blank, ind, K_ELSE, suite))
        rule(
            "if" + s,
            seq(ind, rref("if_head"), suite, star(seq(blank, ind, rref("elif_head"), suite)), else_part),
        )
        rule("while" + s, seq(ind, rref("while_head"), loop_suite, else_part))
        rule("for" + s, seq(ind, rref("for_head"), loop_suite, else_part))
        handler = seq(blank, ind, rref("except_head"), suite)
        bare = seq(blank, ind, alt(K_EXCEPT, K_EXCEPT_SP), suite)
        final = seq(blank, ind, K_FINALLY, suite)
        rule(
            "try" + s,
            seq(
                ind,
                K_TRY,
                suite,
                alt(seq(alt(seq(plus(handler), opt(bare)), bare), else_part, opt(final)), final),
            ),
        )
        rule("with" + s, seq(ind, rref("with_head"), suite))
        rule(
            "stmt" + s,
            seq(ind, rref(f"simple_{lp}")),
            rref("if" + s),
            rref("while" + s),
            rref("for" + s),
            rref("try" + s),
            rref("with" + s),
            rref(f"def_{w}"),
        )
        rule("block" + s, seq(rref("stmt" + s), star(seq(blank, rref("stmt" + s)))))
    define_def(w)

edge = upto(BLANK, MAX_BLANK_LINES)
# The end: the text ends after the body's last newline, or goes on with the start of a top-level line (one of
# `STOP_WORDS`, where the suite's stop sequences end every arm's completion) and ends there.
END = term("END", alt(*STOP_WORDS))
rule("start", seq(edge, rref(f"block_{BODY_WIDTH}n"), edge, opt(END)))

# ------------------------------------------------------------------------------------------------------------
# The fenced module (`humaneval_chat`): a chat reply that is one fenced block holding a Python module of
# imports and top-level function definitions, built from the same statements as the body above: a top-level
# function is `def_0`, the same definition at width 0, its body a block at the body's width.

FENCE_LANGS = ("python", "python3", "py")
"""The info strings an opening fence may carry (and none: a bare ```` ``` ````)."""
FENCE_STOP = "\n```\n"
"""Where a reply ends in every arm: the `humaneval_chat` suite's stop sequence (tests/unit/test_grammars.py
checks that they agree). Only a closing fence matches it: every line inside the block starts with a space or
is empty or starts with `def`, `import`, `from` or `#` (no column-0 lines inside strings), and an opening
fence at the reply's start has no newline before it; where blank lines come first, the opening fence must
name its language, so that it is not `\n```\n`."""
MODULE_WIDTH = 0
MAX_IMPORTS_FIRST = 8
MAX_MORE_ITEMS = 3
"""Top-level lines before the first function (imports) and items after it (functions and imports), at most:
HumanEval's complete functions have at most 1 import and 2 functions. Unbounded, a weak model under the
constraint writes one function after another until max tokens instead of closing the fence (as it would
write blank lines without MAX_BLANK_LINES)."""

define_def(MODULE_WIDTH)
rule(f"suite_{MODULE_WIDTH}n", *suite_alts("n", [BODY_WIDTH]))
# A line between top-level items: blank, or a comment, which may start in column 0 here.
TOP_BLANK = term("TOP_BLANK", EOL_FRAG)
FENCE_OPEN = term(
    "FENCE_OPEN",
    alt(
        seq("```", opt(alt(*FENCE_LANGS)), "\n"),
        seq(rep("\n", 1, 2), "```", alt(*FENCE_LANGS), "\n"),
    ),
)
FENCE_CLOSE = term("FENCE_CLOSE", "```")
FENCE_END = term("FENCE_END", "\n")
rule("import_0", seq(alt(*IMPORTS), NL))
rule("item_0", rref("import_0"), rref(f"def_{MODULE_WIDTH}"))
top_blank = upto(TOP_BLANK, MAX_BLANK_LINES)
rule(
    "module",
    seq(
        top_blank,
        upto(seq(rref("import_0"), top_blank), MAX_IMPORTS_FIRST),
        rref(f"def_{MODULE_WIDTH}"),
        upto(seq(top_blank, rref("item_0")), MAX_MORE_ITEMS),
        top_blank,
    ),
)
# After the closing fence (and the newline after it, where the stop sequence ends the reply) only EOS.
rule("module_start", seq(FENCE_OPEN, rref("module"), FENCE_CLOSE, opt(FENCE_END)))


# ------------------------------------------------------------------------------------------------------------
# Output.

HEADER = """\
Python function body for a HumanEval-style completion: the text that follows a prompt ending with the
function's signature, its docstring and a newline. GENERATED by tasks/grammars/generate.py from the same
definition as its twin python_body.{twin} (same language); edit the generator and rerun it.

Accepts: one or more statements indented by 4 spaces, every line ending in a newline, then either the end of
the text or the start of a top-level line, one of {stop_words}, which ends the text: that is where the suite's
stop sequences end an unconstrained completion, so both arms can end at the same place. A nested block is
indented 2 to 8 spaces deeper than its header, at most 32 spaces. No %ignore: all spacing is part of the
terminals, so keywords and names never run together (`ifx` is a name, not `if x`).

Guarantees (`prompt + body` compiles for every accepted body, up to the holes below):
- balanced brackets; newlines only inside brackets (implicit line joining)
- terminated string literals with valid escapes; numbers without leading zeros or misplaced underscores
- consistent indentation: every block non-empty and deeper than its header, dedent only to an open level
- break/continue only inside a loop body (not in a nested def, not in the loop's else)
- keywords never used as names; nothing assigned to calls, literals, operators, None/True/False, __debug__
- positional before keyword arguments, a generator argument only alone, non-default parameters before
  default ones, a bare `*` followed by a parameter, at most one starred assignment target per level,
  a bare `except:` last, no `from __future__` or star-imports inside the function
- a proper end: the body ends right after a newline (then at most the start of a top-level line)
Cannot guarantee (not context-free): names defined, duplicate parameter names (`def g(a, a)`), repeated
keyword arguments (`f(a=1, a=2)`), runtime behaviour, CPython's nesting limits (~200 open brackets).
Not supported (rejected although valid Python): class, decorators, global/nonlocal, yield, async/await,
walrus (:=), match, positional-only `/` parameters, `except*`, `f(a=1, *b)`, backslash continuations, tabs
and form feeds outside strings, string prefixes other than r/f/b, triple-quoted f- and b-strings, f-string
fields other than `{{name.attr[index]!r:spec}}`, \\N{{...}} and \\4xx-\\7xx escapes, adjacent strings
without a space (`'a''b'`), annotated subscriptions (`d[k]: int`), non-ASCII identifiers, a keyword right
after a closing bracket or string (`(x)and y`), newlines inside brackets other than after an opening
bracket, around commas, operators and keywords, and before a closing bracket, more than {max_blank} blank
or comment-only lines in a row, and lines that start in column 0 inside the body (comment-only lines,
continuation lines in brackets or in multi-line strings): a column-0 line is where the completion ends.
"""


MODULE_HEADER = """\
A chat reply holding one complete Python function: a fenced code block with a Python module of imports and
top-level function definitions. GENERATED by tasks/grammars/generate.py from the same definition as its twin
python_module_fenced.{twin} (same language) and as python_body (the statements and expressions are shared);
edit the generator and rerun it.

Accepts: an opening fence ```` ``` ```` with the info string {langs} or none, then a newline (blank lines
before it only where it names its language); then `import` / `from ... import` lines and function definitions
in column 0 (at least one definition; up to {max_first} imports before it and {max_more} more items after it),
with up to {max_blank} blank or comment lines between them; each
function's body is a block indented by 4 spaces, with python_body's statements; then, in column 0, the
closing fence ```` ``` ````, an optional newline, and the end of the text. The reply ends there in every
arm: the suite's stop sequence `{stop}` can only match the closing fence, since no line inside the block
starts with ```` ``` ````.

Guarantees: the block's content compiles (up to python_body's holes), and `prompt + content` redefines the
prompt's function; every line inside the block ends with a newline.
Not supported (rejected although valid Python): top-level statements other than imports and function
definitions (assignments, classes, decorators, `if __name__ == ...`), `from x import *`, top-level lines
joined by `;`, continuation lines in column 0 (the `)` closing a multi-line import), a top-level function's
body indented by other than 4 spaces, prose before or after the block,
a second block; and everything python_body does not support inside a function body (see its header),
including column-0 lines inside strings.
"""


@dataclass(frozen=True)
class Grammar:
    """One output grammar: its root rule in the definition above and its files' stem and header."""

    stem: str
    root: str
    header: Callable[[str], str]

    @property
    def lark_path(self) -> Path:
        return HERE / f"{self.stem}.lark"

    @property
    def gbnf_path(self) -> Path:
        return HERE / f"{self.stem}.gbnf"


def _header(twin: str) -> str:
    stop_words = ", ".join(f"`{word}`" for word in STOP_WORDS)
    return HEADER.format(twin=twin, max_blank=MAX_BLANK_LINES, stop_words=stop_words)


def _module_header(twin: str) -> str:
    langs = ", ".join(f"`{lang}`" for lang in FENCE_LANGS)
    stop = FENCE_STOP.encode("unicode_escape").decode()
    return MODULE_HEADER.format(
        twin=twin,
        langs=langs,
        max_blank=MAX_BLANK_LINES,
        stop=stop,
        max_first=MAX_IMPORTS_FIRST,
        max_more=MAX_MORE_ITEMS,
    )


BODY = Grammar("python_body", "start", _header)
MODULE = Grammar("python_module_fenced", "module_start", _module_header)
GRAMMARS = (BODY, MODULE)


def refs(n: Node) -> Iterator[str]:
    """The names a rule or terminal refers to."""
    if isinstance(n, Ref):
        yield n.name
    elif isinstance(n, (Seq, Alt)):
        for x in n.xs:
            yield from refs(x)
    elif isinstance(n, Rep):
        yield from refs(n.x)


def reachable(root: str) -> set[str]:
    """The rules, terminals and fragments that `root` needs."""
    definitions = {**RULES, **TERMS, **FRAGS}
    seen: set[str] = set()
    todo = [root]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(refs(definitions[name]))
    return seen


def foreign(grammar: Grammar) -> set[str]:
    """What only the other grammars need: left out of this grammar's files. (Everything else is printed, the
    few rules no root reaches included, so that python_body's files stayed byte-identical when the module
    grammar was added.)"""
    own = reachable(grammar.root)
    return {name for other in GRAMMARS if other != grammar for name in reachable(other.root)} - own


def ordered_rules(grammar: Grammar = BODY) -> list[tuple[str, Node]]:
    """The root rule first (named `start`), then the others in definition order."""
    skip = foreign(grammar) | {grammar.root}
    return [("start", RULES[grammar.root])] + [(k, v) for k, v in RULES.items() if k not in skip]


def ordered_terminals(grammar: Grammar = BODY) -> list[tuple[str, Node]]:
    skip = foreign(grammar)
    return [(k, v) for k, v in [*TERMS.items(), *FRAGS.items()] if k not in skip]


def render_lark(grammar: Grammar = BODY) -> str:
    lines = ["// " + line if line else "//" for line in grammar.header("gbnf").splitlines()]
    lines += [
        "//",
        '// llguidance Lark dialect (vLLM `guidance` backend): llguidance.grammar_from("lark", text).',
        "",
    ]
    for name, body in ordered_rules(grammar):
        lines.append(f"{name}: {to_lark_rule(body)}")
    lines.append("")
    for name, body in ordered_terminals(grammar):
        lines.append(f"{name}: {to_lark_term(body)}")
    return "\n".join(lines) + "\n"


def render_gbnf(grammar: Grammar = BODY) -> str:
    lines = ["# " + line if line else "#" for line in grammar.header("lark").splitlines()]
    lines += ["#", "# XGrammar EBNF (GBNF), root rule `root`: xgrammar.Grammar.from_ebnf(text).", ""]
    for name, body in ordered_rules(grammar):
        lines.append(f"{gbnf_name(name)} ::= {to_ebnf(body)}")
    lines.append("")
    for name, body in ordered_terminals(grammar):
        lines.append(f"{name} ::= {to_ebnf(body)}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the files on disk are out of date")
    args = parser.parse_args(argv)
    outputs = {}
    for grammar in GRAMMARS:
        outputs[grammar.lark_path] = render_lark(grammar)
        outputs[grammar.gbnf_path] = render_gbnf(grammar)
    if args.check:
        stale = [p.name for p, text in outputs.items() if not p.exists() or p.read_text() != text]
        if stale:
            print(
                "out of date: " + ", ".join(stale) + "; run python3 tasks/grammars/generate.py",
                file=sys.stderr,
            )
            return 1
        return 0
    for path, text in outputs.items():
        path.write_text(text)
        print(f"wrote {path} ({len(text)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
