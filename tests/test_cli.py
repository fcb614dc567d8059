import argparse
import io
import sys

import pytest

from galaxyvae.cli import main, show_progress
from tests.helpers import write_blob_dataset


def test_info_prints_a_summary(tmp_path, capsys):
    path = write_blob_dataset(tmp_path / "d.h5", n=20, n_held_out=4)
    assert main(["info", str(path)]) == 0
    assert "16 train, 4 held out" in capsys.readouterr().out


def test_show_writes_a_png_contact_sheet(tmp_path):
    path = write_blob_dataset(tmp_path / "d.h5", n=20, n_held_out=4)
    out = tmp_path / "sheet.png"
    assert main(["show", str(path), "--out", str(out), "--n", "4", "--by-family"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_errors_are_one_line_with_exit_status_2(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nope.h5")]) == 2
    err = capsys.readouterr().err
    assert "nope.h5: no such data-set file" in err and "Traceback" not in err


def test_unknown_command_is_a_usage_error():
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("quiet, terminal, shown", [(0, True, True), (1, True, False), (0, False, False)])
def test_progress_bars_only_on_a_terminal_and_never_with_quiet(monkeypatch, quiet, terminal, shown):
    monkeypatch.setattr(sys, "stderr", _Terminal() if terminal else io.StringIO())
    assert show_progress(argparse.Namespace(quiet=quiet)) is shown
