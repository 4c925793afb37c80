"""The documentation stays a usable front page plus a reference that matches the code.

README.md is the front page (at most 200 lines); docs/*.md hold the reference. These tests check
what can drift silently: relative links (and their #anchors), the CLI table against the real Typer
app, the settings table against ``Settings``, the config reference against the config dataclasses,
and the README's first request against the request schema.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest
import typer
from modelkit import ROOT

from model.config import (
    ConditionedConfig,
    DataConfig,
    FeatureDecl,
    GradNormConfig,
    MMoEConfig,
    ModelConfig,
    ObjectiveConfig,
    PLEConfig,
    PromotionConfig,
    SeparateConfig,
    SequenceDecl,
    SharedBottomConfig,
    TaskConfig,
    TrainConfig,
    WorstCaseConfig,
)
from service.cli import app
from service.schemas import RankedItem, RankRequest, RankResponse
from service.settings import Settings

README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_README_LINES = 200


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md")), *sorted((ROOT / "loadtest").glob("*.md"))]


def strip_code(text: str) -> str:
    """The text outside fenced code blocks and inline code spans (links there are not links)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    s = heading.strip().lower().replace("`", "")
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, flags=re.M):
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def section(text: str, heading: str) -> str:
    """The body of the ``## heading`` section of a markdown text."""
    m = re.search(rf"^## {re.escape(heading)}\s*$(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert m, f"no '## {heading}' section"
    return m.group(1)


def table_rows(text: str) -> list[list[str]]:
    """Cells of the body rows of every markdown table in ``text`` (header and rule rows skipped)."""
    rows = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if not line.startswith("|") or re.fullmatch(r"\|[\s|:-]+\|", line.strip()):
            continue
        if i + 1 < len(lines) and re.fullmatch(r"\|[\s|:-]+\|", lines[i + 1].strip()):
            continue  # a header row
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


# --------------------------------------------------------------------------------------------


def test_readme_is_a_front_page_of_at_most_200_lines() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, (
        f"README.md has {len(lines)} lines: move reference material to docs/"
    )
    assert lines[0].startswith("# mtrank")


def test_readme_links_every_doc() -> None:
    text = README.read_text()
    docs = sorted(DOCS.glob("*.md"))
    assert docs, "docs/ holds no markdown"
    for doc in docs:
        assert f"](docs/{doc.name})" in text, f"README.md does not link docs/{doc.name}"


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_existing_files_and_headings(path: Path) -> None:
    links = LINK.findall(strip_code(path.read_text()))
    broken = []
    for target in links:
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{path.relative_to(ROOT)}: " + "; ".join(broken)


def test_link_checker_sees_a_broken_link(tmp_path: Path) -> None:
    """The checker itself: a missing file and a missing heading are both found."""
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## A `code` heading: here\n\n[ok](#a-code-heading-here) [bad](#nope)\n")
    assert anchors(page) == {"title", "a-code-heading-here"}
    assert LINK.findall(strip_code(page.read_text())) == ["#a-code-heading-here", "#nope"]


# -- the CLI table ------------------------------------------------------------------------------


def cli_table() -> list[tuple[list[str], str]]:
    """(command path, the whole row) for each row of the README's CLI table."""
    out = []
    for cells in table_rows(section(README.read_text(), "CLI at a glance")):
        m = re.fullmatch(r"`mtrank ([^`]+)`", cells[0])
        assert m, f"CLI table row does not start with `mtrank <command>`: {cells[0]!r}"
        words = m.group(1).split()
        path = []
        for w in words:
            if not re.fullmatch(r"[a-z][a-z0-9-]*", w):
                break  # an option or a placeholder (C, V, KIND)
            path.append(w)
        out.append((path, " | ".join(cells)))
    return out


def is_group(cmd: Any) -> bool:
    """A click-style group (Typer ships its own click core, so no isinstance against click's)."""
    return isinstance(getattr(cmd, "commands", None), dict)


def resolve(path: list[str]) -> Any:
    cmd = typer.main.get_command(app)
    for word in path:
        assert is_group(cmd), f"`mtrank {' '.join(path)}`: {cmd.name!r} has no subcommands"
        sub = cmd.commands.get(word)
        assert sub is not None, (
            f"`mtrank {' '.join(path)}`: no command {word!r} (have {sorted(cmd.commands)})"
        )
        cmd = sub
    return cmd


def test_cli_table_names_real_commands_and_options() -> None:
    rows = cli_table()
    assert len(rows) >= 5
    for path, row in rows:
        cmd = resolve(path)
        assert not is_group(cmd), f"`mtrank {' '.join(path)}` is a group, name a command"
        options = {o for p in cmd.params for o in p.opts if o.startswith("--")}
        named = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", row))
        assert named <= options, f"`mtrank {' '.join(path)}`: no option(s) {sorted(named - options)}"


def test_cli_table_lists_every_command() -> None:
    """A command added to the app gets a row in the README's CLI table."""

    def leaves(cmd: Any, prefix: tuple[str, ...]) -> set[tuple[str, ...]]:
        if is_group(cmd):
            return {leaf for name, sub in cmd.commands.items() for leaf in leaves(sub, (*prefix, name))}
        return {prefix}

    listed = {tuple(path) for path, _ in cli_table()}
    missing = leaves(typer.main.get_command(app), ()) - listed
    assert not missing, f"README's CLI table lacks: {sorted(' '.join(p) for p in missing)}"


# -- reference tables against the code ---------------------------------------------------------


def test_first_request_in_readme_is_a_valid_rank_request() -> None:
    text = section(README.read_text(), "A first request")
    m = re.search(r"localhost:8000/rank .*?-d '(\{.*?\})'", text, flags=re.S)
    assert m, "no curl ... /rank -d '{...}' in the README's first request"
    req = RankRequest.model_validate_json(m.group(1))
    assert req.candidates and req.user_id is not None
    block = re.search(r"```json\n(.*?)```", text, flags=re.S)
    assert block, "no response shown"
    shown = json.loads(block.group(1).replace("    ...\n", "").replace("},\n  ]", "}\n  ]"))
    assert set(shown) == set(RankResponse.model_fields)
    assert all(set(item) == set(RankedItem.model_fields) for item in shown["items"])
    assert [item["rank"] for item in shown["items"]] == list(range(1, len(shown["items"]) + 1))


def test_settings_table_lists_every_setting() -> None:
    text = (DOCS / "operations.md").read_text()
    table = section(text, "Settings")
    missing = [
        f"MTRANK_{name.upper()}" for name in Settings.model_fields if f"MTRANK_{name.upper()}" not in table
    ]
    assert not missing, f"docs/operations.md settings table lacks {missing}"


@pytest.mark.parametrize(
    ("heading", "cls"),
    [
        ("`[data]`", DataConfig),
        ("`[[data.features]]`", FeatureDecl),
        ("`[[data.sequences]]`", SequenceDecl),
        ("`[[tasks]]`", TaskConfig),
        ("`[model]`", ModelConfig),
        ("`[model.shared_bottom]`, `[model.separate]`", SharedBottomConfig),
        ("`[model.shared_bottom]`, `[model.separate]`", SeparateConfig),
        ("`[model.mmoe]`", MMoEConfig),
        ("`[model.ple]`", PLEConfig),
        ("`[model.conditioned]`", ConditionedConfig),
        ("`[train]`", TrainConfig),
        ("`[train.weighting.worst_case]`", WorstCaseConfig),
        ("`[train.weighting.gradnorm]`", GradNormConfig),
        ("`[promotion]`", PromotionConfig),
        ("`[objective]`", ObjectiveConfig),
    ],
)
def test_config_reference_lists_every_key(heading: str, cls: type) -> None:
    text = (DOCS / "data-and-config.md").read_text()
    m = re.search(rf"^#{{3,4}} {re.escape(heading)}\s*$(.*?)(?=^#{{2,4}} |\Z)", text, flags=re.M | re.S)
    assert m, f"docs/data-and-config.md has no '### {heading}' section"
    keys = {re.sub(r"`", "", cells[0]) for cells in table_rows(m.group(1))}
    fields = {f.name for f in dataclasses.fields(cls)} - {"features"}  # [[data.features]] has its own
    # a part's tag is its table's name; [model] names its part by arch
    if heading.startswith("`[model.") or heading.startswith("`[train."):
        fields -= {"arch", "kind"}
    fields = {"arch" if f == "net" else f for f in fields}
    assert fields <= keys, f"{heading}: undocumented keys {sorted(fields - keys)}"
    assert keys <= fields, f"{heading}: documented keys that do not exist {sorted(keys - fields)}"
