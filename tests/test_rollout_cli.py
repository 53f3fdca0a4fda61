"""``megacov verify sync`` refuses bad input with one line and exit code 2, before starting anything."""
from __future__ import annotations

import pytest

from megacov.cli import main


@pytest.mark.parametrize("extra, message", [
    ([], "no config.json there"),
    (["--tp", "0"], "--tp must be >= 1"),
    (["--engines", "0"], "--engines must be >= 1"),
    (["--length", "1"], "--length must be >= 2"),
    (["--bucket-mb", "-1"], "--bucket-mb must be positive"),
])
def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys, extra, message):
    hf = tmp_path / "model"
    hf.mkdir()
    if extra:
        (hf / "config.json").write_text("{}")
    assert main(["verify", "sync", "--hf", str(hf), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and err[0].startswith("megacov: error:")
