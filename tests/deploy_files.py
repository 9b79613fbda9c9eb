"""Readers for the deployment files (Dockerfile, Makefile, .dockerignore), for tests/test_deploy.py.

They read just enough of each format to let the tests check, without a Docker engine,
what `docker build` and `make install` would do: the stages and their instructions,
ENV with `$VAR` expansion, exec-form commands, and the `pip install` steps.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

VAR_REF = re.compile(r"\$(?:\{(\w+)\}|(\w+))")
PIP_VALUE_FLAGS = {"-i", "--index-url", "--extra-index-url", "-c", "--constraint", "-f"}


@dataclass
class Stage:
    """One FROM ... stage: its base, name and (keyword, argument text) instructions."""

    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        """The argument text of every `keyword` instruction, in order."""
        return [text for kw, text in self.instructions if kw == keyword]


@dataclass
class Dockerfile:
    """Global ARGs (with defaults) and the stages, in file order."""

    global_args: dict[str, str | None]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        """The stage `docker build` produces by default (the last one)."""
        return self.stages[-1]


def logical_lines(text: str, continuation: str = "\\") -> Iterator[str]:
    """Lines with comments dropped and backslash continuations joined."""
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):  # also comments inside a continued instruction
            continue
        if line.endswith(continuation):
            pending += line[:-1] + " "
            continue
        yield pending + line
        pending = ""
    if pending.strip():
        yield pending.strip()


def parse_dockerfile(text: str) -> Dockerfile:
    """Split a Dockerfile into global ARGs and stages of (KEYWORD, text) instructions."""
    global_args: dict[str, str | None] = {}
    stages: list[Stage] = []
    for line in logical_lines(text):
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            words = rest.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
        elif not stages:
            if keyword != "ARG":
                raise ValueError(f"Dockerfile: {keyword} before the first FROM")
            key, eq, value = rest.partition("=")
            global_args[key] = value if eq else None
        else:
            stages[-1].instructions.append((keyword, rest))
    if not stages:
        raise ValueError("Dockerfile: no FROM instruction")
    return Dockerfile(global_args, stages)


def expand(value: str, env: Mapping[str, str]) -> str:
    """Expand $VAR and ${VAR} the way Dockerfile ENV does (unknown names expand to '')."""
    return VAR_REF.sub(lambda m: env.get(m.group(1) or m.group(2), ""), value)


def stage_env(stage: Stage, base_env: Mapping[str, str]) -> dict[str, str]:
    """The environment after the stage's ENV instructions, starting from `base_env`."""
    env = dict(base_env)
    for text in stage.args("ENV"):
        words = shlex.split(text)
        if words and "=" not in words[0]:  # legacy `ENV KEY value`
            env[words[0]] = expand(" ".join(words[1:]), env)
            continue
        updates = {}
        for word in words:
            key, _, value = word.partition("=")
            updates[key] = expand(value, env)  # all of one ENV line see the old values
        env.update(updates)
    return env


def exec_form(text: str, keyword: str) -> list[str]:
    """The JSON array of an exec-form instruction; a shell form raises."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{keyword} must use the exec (JSON array) form, got {text!r}") from exc
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{keyword} must be a JSON array of strings, got {text!r}")
    return value


def last_exec_form(stage: Stage, keyword: str) -> list[str]:
    """The exec-form array of the stage's last `keyword` instruction ([] if none)."""
    texts = stage.args(keyword)
    return exec_form(texts[-1], keyword) if texts else []


def healthcheck(stage: Stage) -> tuple[dict[str, str], list[str]]:
    """The last HEALTHCHECK's --options and its exec-form command."""
    texts = stage.args("HEALTHCHECK")
    if not texts:
        raise ValueError("no HEALTHCHECK in the final stage")
    options: dict[str, str] = {}
    rest = texts[-1]
    while rest.startswith("--"):
        option, _, rest = rest.partition(" ")
        key, _, value = option[2:].partition("=")
        options[key] = value
        rest = rest.strip()
    keyword, _, command = rest.partition(" ")
    if keyword.upper() != "CMD":
        raise ValueError(f"HEALTHCHECK must run CMD [...], got {rest!r}")
    return options, exec_form(command.strip(), "HEALTHCHECK CMD")


def shell_commands(script: str) -> list[list[str]]:
    """A shell command line split into simple commands at &&, || and ; (words via shlex)."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in {"&&", "||", ";", "|", "&"}:
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def pip_install_items(words: list[str]) -> list[str] | None:
    """What a `... pip install ...` command installs, as 'req:FILE', 'path:DIR', 'pkg:NAME'.

    None when the command is not a pip install. Option values (index URLs, constraint
    files) are not items; the CLI spelling (`pip`, `python -m pip`) does not matter.
    """
    for i in range(len(words) - 1):
        if words[i].endswith("pip") and words[i + 1] == "install":
            args = words[i + 2 :]
            break
    else:
        return None
    items, k = [], 0
    while k < len(args):
        word = args[k]
        if word in ("-r", "--requirement"):
            items.append(f"req:{args[k + 1]}")
            k += 2
        elif word in ("-e", "--editable"):
            items.append(f"path:{normalise_path(args[k + 1])}")
            k += 2
        elif word in PIP_VALUE_FLAGS:
            k += 2
        elif word.startswith("-"):
            k += 1
        elif word.startswith((".", "/")):
            items.append(f"path:{normalise_path(word)}")
            k += 1
        else:
            items.append(f"pkg:{word}")
            k += 1
    return items


def normalise_path(path: str) -> str:
    """'./client/' -> 'client'; '.' stays '.'."""
    path = path.rstrip("/")
    while path.startswith("./"):
        path = path[2:]
    return path or "."


def pip_flags(words: list[str]) -> set[str]:
    """The option words of a pip install command."""
    return {w for w in words if w.startswith("-")}


def makefile_variables(text: str) -> dict[str, str]:
    """Simple `NAME := value`, `NAME = value` and `NAME ?= value` assignments, expanded."""
    variables: dict[str, str] = {}
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)\s*(?::=|\?=|=)\s*(.*)$", line)
        if m:
            variables[m.group(1)] = expand_make(m.group(2).strip(), variables)
    return variables


def expand_make(text: str, variables: Mapping[str, str]) -> str:
    """Expand $(NAME) references (repeatedly, for nested definitions)."""
    for _ in range(10):
        new = re.sub(r"\$\((\w+)\)", lambda m: variables.get(m.group(1), m.group(0)), text)
        if new == text:
            return new
        text = new
    return text


def make_recipes(text: str) -> dict[str, tuple[list[str], list[str]]]:
    """target -> (prerequisites, recipe lines), with variables expanded."""
    variables = makefile_variables(text)
    rules: dict[str, tuple[list[str], list[str]]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("\t") and current is not None:
            current.append(expand_make(line.strip(), variables))
            continue
        m = re.match(r"^([^\s:=#][^:=]*?)\s*:(?!=)\s*(.*)$", line)
        if m and not line.startswith("."):
            target = expand_make(m.group(1).strip(), variables)
            prereqs = expand_make(m.group(2).strip(), variables).split()
            current = []
            rules[target] = (prereqs, current)
        elif not line.startswith("\t"):
            current = None
    return rules


def make_target_commands(text: str, target: str) -> list[str]:
    """Recipe lines `make TARGET` runs: prerequisites defined in the file first, in order."""
    rules = make_recipes(text)
    seen: set[str] = set()
    lines: list[str] = []

    def visit(name: str) -> None:
        if name in seen or name not in rules:
            return
        seen.add(name)
        prereqs, recipe = rules[name]
        for prereq in prereqs:
            visit(prereq)
        lines.extend(recipe)

    if target not in rules:
        raise ValueError(f"Makefile: no target {target!r}")
    visit(target)
    return lines


def dockerignore_patterns(text: str) -> list[str]:
    """The exclusion patterns of a .dockerignore (no '!' exceptions are supported)."""
    patterns = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("!"):
            raise ValueError(f".dockerignore: exceptions are not supported here: {line!r}")
        patterns.append(line.strip("/"))
    return patterns


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether `path` (relative, '/'-separated) or a folder above it matches a pattern."""
    parts = normalise_path(path).split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        if pattern.startswith("**/"):
            if any(fnmatch.fnmatchcase(p, pattern[3:]) for p in parts):
                return True
        elif any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes):
            return True
    return False
