"""docs/errors.md, run: every bad input it lists gives its exit code and its line, and writes no image."""

import re
import shlex
from pathlib import Path

import pytest

from attnreg.cli import main

DOC = Path(__file__).resolve().parents[1] / "docs" / "errors.md"


def cases():
    rows = []
    for line in DOC.read_text().splitlines():
        if not line.startswith("| `attnreg"):
            continue
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        command, code, message = cells[0].strip("`"), int(cells[1]), cells[2].strip("`")
        rows.append(pytest.param(command, code, message, id=command[8:60]))
    assert len(rows) >= 15, "docs/errors.md lost its table"
    return rows


@pytest.mark.parametrize("command,code,message", cases())
def test_documented_error(command, code, message, tmp_path, capsys):
    places = {"OUT": tmp_path / "out", "EMPTY": tmp_path / "empty", "FILE": tmp_path / "file.txt"}
    places["EMPTY"].mkdir()
    places["FILE"].write_text("not a folder")
    argv = [str(places.get(a, a)) for a in shlex.split(command)[1:]]
    assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    for name, path in places.items():
        message = message.replace(name, str(path))
    assert len(err) >= 1 and message in err[-1]
    assert not list(tmp_path.rglob("*.png"))
