"""The console module: --json documents that every JSON parser reads, plain aligned tables."""

import json

import pytest
from rich.text import Text

from macft.console import Column, make_console, plain_rows, print_json, print_table


def _strict(text: str):
    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_json_has_null_for_infinity_and_nan(capsys):
    print_json({"perplexity": float("inf"), "losses": [1.5, float("nan")], "n": 2})
    assert _strict(capsys.readouterr().out) == {"perplexity": None, "losses": [1.5, None], "n": 2}


def test_plain_rows_align_whole_values_and_right_justify_numbers():
    columns = [Column("name"), Column("GB", right=True), Column("what")]
    rows = [["weights", "10.25", "a long description, never cut"], [Text("total"), "0.5", ""]]
    assert plain_rows(columns, rows) == [
        "name        GB  what",
        "weights  10.25  a long description, never cut",
        "total      0.5",
    ]


@pytest.mark.parametrize("env", [{}, {"TTY_COMPATIBLE": "1", "TERM": "dumb"}])
def test_without_a_terminal_a_long_line_stays_one_line(monkeypatch, capsys, env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    console = make_console()
    console.print("word " * 60 + "[bold]/a/path/that/is/long[/]")
    print_table(console, [Column("a"), Column("b")], [["x" * 100, "y"]], "a title")
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["word " * 60 + "/a/path/that/is/long", "a title", "a" + " " * 101 + "b",
                     "x" * 100 + "  y"]  # fmt: skip
