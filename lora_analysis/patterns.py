"""User regexes on module names, matched in linear time with PEFT's (Python `re`) semantics.

Regexes come from files and users: `rank_pattern` / `alpha_pattern` keys of an
`adapter_config.json`, a `target_modules` regex. Python's backtracking `re` takes exponential
time on some of them (`(a*)*b` against a long name never returns), so they are matched by
RE2 (`google-re2`), whose time is linear in the name. The two engines differ in syntax and
meaning (`$` before a final newline, `a{,3}`, Unicode `\\d`/`\\w`/`\\s`, ...), so a pattern is
never handed to RE2 as written: Python's own parser reads it (what it accepts is exactly what
PEFT accepts), and each node of the parse is written out in RE2 syntax with Python's meaning —
character categories as the explicit code-point sets Python's `re` matches, literals as code
points. What has no linear-time equivalent is refused with the reason: backreferences,
lookaround, conditionals, atomic groups and possessive repeats, the case-insensitive and
multi-line flags, repeat counts above RE2's 1000.

PEFT's rule for `rank_pattern` / `alpha_pattern` (peft.utils.other.get_pattern_key): the first
key (in the config's order) for which `re.match(rf"(.*\\.)?({key})$", name)` matches — the key
matches the end of the module name at a dot boundary — else the key equal to the name itself,
else the default. The key is pasted into that template as text, as PEFT does, so a key's
unbalanced parentheses mean what they mean to PEFT. `target_modules` as a string: PEFT's
`re.fullmatch(target_modules, name)`.

Two subject-side limits keep the translation exact: a name ending in a line break (Python's
`$` also matches before it) and, for patterns using `\\b`/`\\B`, a name that is not ASCII
(Python's word boundary is Unicode, RE2's ASCII) or is empty (Python's `\\B` never matches
there) are refused rather than guessed.
"""

from __future__ import annotations

import functools
import re
import sys
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from .errors import LoraAnalysisError, shown

if sys.version_info >= (3, 11):
    from re import _constants as sre
    from re import _parser as sre_parse
else:  # pragma: no cover - Python 3.10
    import sre_constants as sre
    import sre_parse

RE2_MAX_REPEAT = 1000  # RE2's limit on a counted repeat {m,n}
RE2_MAX_MEMORY = 64 << 20  # bytes for one compiled pattern; larger patterns are refused
MAX_PATTERN_CHARS = 10_000

_UNSUPPORTED_FLAGS = {sre.SRE_FLAG_IGNORECASE: "the case-insensitive flag (?i)",
                      sre.SRE_FLAG_MULTILINE: "the multi-line flag (?m)",
                      sre.SRE_FLAG_LOCALE: "the locale flag (?L)"}
_REFUSED_NODES = {
    sre.GROUPREF: "a backreference", sre.GROUPREF_EXISTS: "a conditional group (?(n)...)",
    sre.ASSERT: "a lookahead/lookbehind", sre.ASSERT_NOT: "a negative lookahead/lookbehind",
}
for _name, _what in (("ATOMIC_GROUP", "an atomic group (?>...)"), ("POSSESSIVE_REPEAT", "a possessive repeat")):
    if hasattr(sre, _name):  # Python ≥ 3.11
        _REFUSED_NODES[getattr(sre, _name)] = _what


class PatternError(LoraAnalysisError):
    """A regex that cannot be matched (invalid, or without a linear-time equivalent), or a name
    it cannot be matched against exactly. `reason` is the problem without the pattern."""

    def __init__(self, pattern: str, reason: str):
        self.pattern, self.reason = pattern, reason
        super().__init__(f"regex {shown(pattern, 60)!s}: {reason}")


@dataclass(frozen=True)
class Pattern:
    """A compiled user regex: `match` anchors at the start as `re.match` does, `fullmatch` at
    both ends as `re.fullmatch` does, both with Python's meaning and RE2's linear time."""

    source: str
    _regex: Any  # re2._Regexp
    _ascii_subjects_only: bool  # \b / \B: Python's Unicode word boundary = RE2's on non-empty ASCII only

    def match(self, name: str) -> bool:
        return self._regex.match(self._subject(name)) is not None

    def fullmatch(self, name: str) -> bool:
        return self._regex.fullmatch(self._subject(name)) is not None

    def _subject(self, name: str) -> str:
        if "\n" in name:
            raise PatternError(self.source, f"cannot be matched exactly against the name {shown(name, 60)}, "
                                            "which holds a line break")
        if self._ascii_subjects_only and not (name.isascii() and name):
            raise PatternError(self.source, f"uses \\b or \\B, matched exactly only on non-empty ASCII names, "
                                            f"not {shown(name, 60)!r}")
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise PatternError(self.source, f"cannot be matched against {shown(name, 60)}, which is not valid Unicode") from None
        return name


@functools.lru_cache(maxsize=1024)
def compile_pattern(pattern: str, shown_as: str | None = None) -> Pattern:
    """`pattern` (Python `re` syntax) compiled for linear-time matching; `PatternError` says why
    not. Errors show `shown_as` (default: the pattern) as the regex."""
    import re2

    if not isinstance(pattern, str):
        raise PatternError(str(pattern), "is not a string")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise PatternError(pattern, f"is {len(pattern)} characters long (at most {MAX_PATTERN_CHARS})")
    try:
        re.compile(pattern)
        parsed = sre_parse.parse(pattern)
    except (re.error, RecursionError, OverflowError, ValueError) as err:
        raise PatternError(pattern, f"is not a valid regex ({shown(err, 80)})") from None
    translator = _Translator()
    try:
        translated = translator.nodes(parsed, parsed.state.flags)
    except PatternError as err:  # raised without the pattern, deep in the tree
        raise PatternError(pattern, err.reason) from None
    except RecursionError:
        raise PatternError(pattern, "is nested too deeply") from None
    options = re2.Options()
    options.log_errors = False  # RE2 would print its own error lines on stderr
    options.max_mem = RE2_MAX_MEMORY
    try:
        regex = re2.compile(translated, options)
    except re2.error as err:
        raise PatternError(pattern, f"is too large to match in linear time ({shown(err, 80)})") from None
    return Pattern(pattern if shown_as is None else shown_as, regex, translator.uses_word_boundary)


def peft_key(key: str) -> Pattern:
    """The pattern PEFT builds from a `rank_pattern` / `alpha_pattern` key (errors name the key)."""
    try:
        return compile_pattern(rf"(.*\.)?({key})$", shown_as=key)
    except PatternError as err:  # positions in Python's message count the template: drop them
        raise PatternError(key, re.sub(r" at position \d+", "", err.reason)) from None


def pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    """PEFT's value for module `name`: that of the first key matching the end of `name` at a dot
    boundary (`peft_key`), else of the key equal to `name`, else `default`."""
    for key, value in patterns.items():
        if peft_key(key).match(name):
            return value
    return patterns.get(name, default)


def fullmatch(pattern: str, name: str) -> bool:
    """`re.fullmatch(pattern, name)`, in linear time (a `target_modules` regex)."""
    return compile_pattern(pattern).fullmatch(name)


def check_pattern_keys(keys: Iterable[str]) -> None:
    """Compile every key as PEFT would (`peft_key`), so a bad one fails before any work."""
    for key in keys:
        peft_key(key)


class _Translator:
    """Python `re` parse tree → RE2 syntax with Python's meaning (see the module docstring)."""

    def __init__(self) -> None:
        self.uses_word_boundary = False

    def nodes(self, nodes: Any, flags: int) -> str:  # a parse tree: a SubPattern or a list of (opcode, argument)
        for flag, what in _UNSUPPORTED_FLAGS.items():
            if flags & flag:
                raise PatternError("", f"uses {what}")
        return "".join(self.node(op, arg, flags) for op, arg in nodes)

    def node(self, op: Any, arg: Any, flags: int) -> str:  # noqa: C901 - one branch per opcode
        if op in _REFUSED_NODES:
            raise PatternError("", f"uses {_REFUSED_NODES[op]}, which has no linear-time matching")
        if op is sre.LITERAL:
            return _char(arg)
        if op is sre.NOT_LITERAL:
            return f"[^{_char(arg)}]"
        if op is sre.ANY:
            return "(?s:.)" if flags & sre.SRE_FLAG_DOTALL else "[^\\n]"
        if op is sre.IN:
            return self.char_class(arg, flags)
        if op is sre.BRANCH:
            return "(?:" + "|".join(self.nodes(branch, flags) for branch in arg[1]) + ")"
        if op is sre.SUBPATTERN:
            _group, add_flags, del_flags, body = arg
            return "(?:" + self.nodes(body, (flags | add_flags) & ~del_flags) + ")"
        if op in (sre.MAX_REPEAT, sre.MIN_REPEAT):
            low, high, body = arg
            if low > RE2_MAX_REPEAT or (high != sre.MAXREPEAT and high > RE2_MAX_REPEAT):
                raise PatternError("", f"repeats {low}..{high} times; at most {RE2_MAX_REPEAT} can be matched in linear time")
            count = f"{{{low},}}" if high == sre.MAXREPEAT else f"{{{low},{high}}}"
            return "(?:" + self.nodes(body, flags) + ")" + count + ("?" if op is sre.MIN_REPEAT else "")
        if op is sre.AT:
            return self.position(arg)
        raise PatternError("", f"uses {op}, which is not supported")

    def position(self, at: Any) -> str:
        if at in (sre.AT_BEGINNING, sre.AT_BEGINNING_STRING):
            return "\\A"  # no multi-line flag: ^ is the start of the name
        if at in (sre.AT_END, sre.AT_END_STRING):
            return "\\z"  # = Python's $ on names without a line break (`Pattern._subject`)
        if at in (sre.AT_BOUNDARY, sre.AT_NON_BOUNDARY):
            self.uses_word_boundary = True
            return "\\b" if at is sre.AT_BOUNDARY else "\\B"
        raise PatternError("", f"uses the position {at}, which is not supported")

    def char_class(self, items: list[tuple[Any, Any]], flags: int) -> str:
        negate = bool(items) and items[0][0] is sre.NEGATE
        parts = []
        for op, arg in items[1:] if negate else items:
            if op is sre.LITERAL:
                parts.append(_char(arg))
            elif op is sre.RANGE:
                parts.append(f"{_char(arg[0])}-{_char(arg[1])}")
            elif op is sre.CATEGORY:
                parts.append(_category_ranges(arg, bool(flags & sre.SRE_FLAG_ASCII)))
            else:
                raise PatternError("", f"uses {op} in a character class, which is not supported")
        body = "".join(parts)
        if not body:  # only possible for a category with no members: match nothing / anything
            return "(?s:.)" if negate else "[^\\x{0}-\\x{10FFFF}]"
        return f"[{'^' if negate else ''}{body}]"


def _char(code: int) -> str:
    if 0xD800 <= code <= 0xDFFF:
        raise PatternError("", f"holds the lone surrogate U+{code:04X}, which is not a character")
    return chr(code) if chr(code).isascii() and chr(code).isalnum() else f"\\x{{{code:X}}}"


@functools.lru_cache(maxsize=None)
def _category_ranges(category: Any, ascii_only: bool) -> str:
    """The code points Python's `re` matches for `\\d`, `\\w`, `\\s` (and their negations) under
    the given flags, as RE2 class ranges — read from Python's `re` itself, so the set is exact
    for the running Python's Unicode tables. Surrogates never appear in a valid name."""
    escape = {"CATEGORY_DIGIT": r"\d", "CATEGORY_NOT_DIGIT": r"\D", "CATEGORY_WORD": r"\w",
              "CATEGORY_NOT_WORD": r"\W", "CATEGORY_SPACE": r"\s", "CATEGORY_NOT_SPACE": r"\S"}[str(category)]
    regex = re.compile(escape, re.ASCII if ascii_only else 0)
    members = [m.start() for m in regex.finditer(_all_characters()) if not 0xD800 <= m.start() <= 0xDFFF]
    ranges: list[list[int]] = []
    for code in members:
        if ranges and ranges[-1][1] == code - 1:
            ranges[-1][1] = code
        else:
            ranges.append([code, code])
    return "".join(_char(lo) if lo == hi else f"{_char(lo)}-{_char(hi)}" for lo, hi in ranges)


@functools.lru_cache(maxsize=1)
def _all_characters() -> str:
    """Every code point in order, index = code point; the surrogates' places hold U+0000 (their
    matches are dropped by the caller)."""
    return "".join(chr(c) if not 0xD800 <= c <= 0xDFFF else "\x00" for c in range(0x110000))
