"""The examples in README.md and docs/*.md are tests (Sybil): ```python blocks run (``>>>`` ones as
doctests), ```console blocks run in a shell and their shown output is compared (tests/docs/console.py
says how). ``<!-- skip: next "reason" -->`` before a block skips it with that reason (where it needs a
GPU, TensorRT, a Ray cluster, Docker or the network); ``<!-- slow -->`` marks it ``slow``."""

from __future__ import annotations

import doctest
import importlib.util
import re

import pytest

# The torch-free run (`make test-lite`, .ci/run) installs no docs tools and runs tests/runtime,
# tests/serve and tests/engine only: without Sybil there is nothing here for it.
if importlib.util.find_spec("sybil") is not None:
    from sybil import Sybil
    from sybil.parsers.markdown import CodeBlockParser, PythonCodeBlockParser, SkipParser

    from tests.docs import console

    pytest_collect_file = Sybil(
        parsers=[
            PythonCodeBlockParser(doctest_optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE),
            CodeBlockParser(language="console", evaluator=console.evaluate_console),
            SkipParser(),
        ],
        patterns=["README.md", "docs/*.md"],
        setup=console.setup,
        teardown=console.teardown,
    ).pytest()

_SLOW = re.compile(r"<!-- slow\b[^>]*-->\s*(<!--[^>]*-->\s*)*\Z")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        example = getattr(item, "example", None)  # a SybilItem's
        if example is not None:
            if _SLOW.search(example.document.text[max(0, example.start - 300) : example.start]):
                item.add_marker(pytest.mark.slow)
