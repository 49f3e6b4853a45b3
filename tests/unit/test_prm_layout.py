"""PRM step splitting and input layout (services/prm/layout.py), hand-derived cases."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from puremesh.contract import steps as layout

S, T, E, NL = 90, 91, 99, 10  # separators S and T, EOS E, "\n" NL
SEPS = frozenset({S, T})
DROP = SEPS | {E}
PROMPT = [1, 2]


def test_separator_ids_from_every_vocabulary_form() -> None:
    texts = ["a", "\n\n", "b\n\n", "\n", "\n\nc", "x\n\n\n"]
    expected = frozenset({1, 2, 5})
    assert layout.separator_ids(texts) == expected
    assert layout.separator_ids(dict(enumerate(texts))) == expected
    assert layout.separator_ids({text: i for i, text in enumerate(texts)}) == expected
    assert layout.separator_ids([]) == frozenset()


@pytest.mark.parametrize(
    ("response", "spans"),
    [
        ([], []),
        ([5], [(0, 1)]),
        ([5, 6, 7], [(0, 3)]),  # no separator: one step
        ([5, 6, S, 7, E], [(0, 3), (3, 5)]),  # EOS ends the final step
        ([5, S], [(0, 2)]),  # separator as last token: no empty trailing step
        ([5, S, 6, T, 7], [(0, 2), (2, 4), (4, 5)]),  # every separator id counts
        ([S, S], [(0, 1), (1, 2)]),
        ([5, S, E], [(0, 2), (2, 3)]),  # a lone EOS after a separator is a step of its own
        ([E], [(0, 1)]),
    ],
)
def test_split_steps(response: list[int], spans: list[tuple[int, int]]) -> None:
    assert layout.split_steps(response, SEPS) == spans
    layout.check_spans(spans, len(response))


@pytest.mark.parametrize(
    ("response", "input_ids", "positions"),
    [
        # the module docstring's example: S and the final EOS are replaced by "\n"
        ([5, 6, S, 7, E], [1, 2, 5, 6, NL, 7, NL], [4, 6]),
        # no separator, truncated (last token is plain content): it is kept
        ([5, 6, 7], [1, 2, 5, 6, 7, NL], [5]),
        # no separator, EOS final
        ([5, 6, E], [1, 2, 5, 6, NL], [4]),
        # separator as the last token: dropped
        ([5, S], [1, 2, 5, NL], [3]),
        # truncated after a separator: the final step keeps its last token
        ([5, S, 6, 7], [1, 2, 5, NL, 6, 7, NL], [3, 6]),
        # a step with no content: "\n" right after the previous one
        ([5, S, E], [1, 2, 5, NL, NL], [3, 4]),
        ([S, T], [1, 2, NL, NL], [2, 3]),
        # empty response: the prompt alone, nothing to read
        ([], [1, 2], []),
    ],
)
def test_prm_input(response: list[int], input_ids: list[int], positions: list[int]) -> None:
    spans = layout.split_steps(response, SEPS)
    got_ids, got_positions = layout.prm_input(PROMPT, response, spans, NL, DROP)
    assert got_ids == input_ids
    assert got_positions == positions
    assert len(got_positions) == len(spans)
    assert all(got_ids[p] == NL for p in got_positions)


def test_prm_input_drops_a_final_separator_only_when_told() -> None:
    # Non-final steps always lose their end token; the final one only if it is in drop_ids.
    response = [5, S, 6, S]
    spans = layout.split_steps(response, SEPS)
    assert layout.prm_input([], response, spans, NL, {E}) == ([5, NL, 6, S, NL], [1, 4])
    assert layout.prm_input([], response, spans, NL, DROP) == ([5, NL, 6, NL], [1, 3])


@pytest.mark.parametrize("spans", [[(0, 2)], [(0, 2), (1, 3)], [(1, 3)], [(0, 0), (0, 3)], [(0, 4)]])
def test_prm_input_rejects_spans_that_do_not_tile_the_response(spans: list[tuple[int, int]]) -> None:
    with pytest.raises(ValueError, match="steps must"):
        layout.prm_input(PROMPT, [5, 6, 7], spans, NL, DROP)


def test_layout_is_pure_stdlib() -> None:
    tree = ast.parse(Path(layout.__file__).read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    imported |= {
        node.module.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module
    }
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}, imported
