"""The docs' examples are run by Sybil (the root conftest.py, tests/docs/console.py); these tests keep
that honest: no shell example hides in a block kind Sybil does not run, every skip says why, and the
console comparison allows exactly what tests/docs/console.py documents."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.docs.console import matches, normalise, parse_session

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# Run by Sybil: python, console. Listings that are not examples: text (diagrams), json, toml, yaml.
KINDS = {"python", "console", "text", "json", "toml", "yaml"}
FENCE = re.compile(r"^```(\S*)", re.MULTILINE)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_code_block_is_an_example_sybil_runs_or_a_listing(page: Path) -> None:
    fences = FENCE.findall(page.read_text())
    openings = fences[0::2]  # a fence opens, the next one closes
    assert len(fences) % 2 == 0, f"{page.name}: an unclosed code block"
    assert all(not close for close in fences[1::2]), f"{page.name}: a closing fence with a language"
    bad = [kind or "(none)" for kind in openings if kind not in KINDS]
    assert not bad, f"{page.name}: code blocks of kinds {bad}; use console (shell), python, or text"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_skip_says_why(page: Path) -> None:
    for match in re.finditer(r"<!-- skip: (start|next)(.*?)-->", page.read_text()):
        assert re.fullmatch(r'\s+"[^"]{10,}"\s*', match.group(2)), (
            f"{page.name}: {match.group(0)!r} needs a reason: <!-- skip: {match.group(1)} \"needs ...\" -->"
        )


def test_mkdocs_nav_lists_every_page() -> None:
    nav = (REPO / "mkdocs.yml").read_text()
    missing = [p.name for p in PAGES[1:] if p.name not in nav]
    assert not missing, f"pages not in mkdocs.yml's nav: {missing}"


def test_a_console_session_is_commands_and_what_they_print() -> None:
    session = parse_session("$ echo a \\\n  b\na b\n$ true\n")
    assert [(c.text, c.shown) for c in session] == [("echo a \\\n  b", "a b\n"), ("true", "")]
    with pytest.raises(ValueError, match="starts with"):
        parse_session("output before any command\n")


@pytest.mark.parametrize(
    ("shown", "printed"),
    [
        ("load 154 ms | 24 new tokens, 1.00 ms per step (1004.3 steps/s)",
         "load 97 ms | 24 new tokens, 12.5 ms per step (80.0 steps/s)"),
        ("exported in 9.1 s", "exported in 21 s"),
        ("perplexity 141.3 over 35004 tokens (3231 tokens/s, 10.8 s)", "perplexity 141.3 over 35004 tokens (98 tokens/s, 1 s)"),
        ('{"id":"cmpl-...","created":...}', '{"id":"cmpl-69eb","created":1795690228}'),
        ("vs .../gpt2_edge/default_model: PASS", "vs /site-packages/gpt2_edge/default_model: PASS"),
        ("text  \n\n", "text"),
    ],
)
def test_what_the_comparison_allows(shown: str, printed: str) -> None:
    assert matches(shown, printed)


@pytest.mark.parametrize(
    ("shown", "printed"),
    [
        ("perplexity 141.322", "perplexity 141.323"),  # a number that is not a timing is compared
        ("24 new tokens", "23 new tokens"),
        ("top-1 100.0%", "top-1 99.9%"),
        ("greedy identical: True", "greedy identical: False"),
        ("a\nb", "a\n\nb"),  # blank lines inside the output count
        ('{"id":"cmpl-..."}', '{"id":"cmpl-1"} and more'),  # ... matches only where it stands
    ],
)
def test_what_the_comparison_does_not_allow(shown: str, printed: str) -> None:
    assert not matches(shown, printed)


def test_the_timing_pattern_leaves_other_numbers_alone() -> None:
    assert normalise("2 steps, 38 decode steps, 4 layers x 256, 5 s") == "2 steps, 38 decode steps, 4 layers x 256, <time>"
