"""medssl.cli and the tools wired through it: user mistakes are one line ``error: ...`` (exit 2), ``--debug`` shows
the traceback; sha256 arguments survive python-fire turning an all-digit hash into an int."""

from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

import fire
import pytest
import torch
import torch.nn as nn

from medssl.cli import as_sha256, run
from medssl.downstream.setup import prepare_network
from medssl.utils.io import file_sha256
from medssl.weights import load_pretrained_encoder

from conftest import TOOLS, subprocess_env

DIGITS_SHA = "1" + "0" * 10 + "7" * 53  # an all-digit sha256: python-fire turns it into an int
PADDED_SHA = "0" * 3 + "7" * 61  # what a config file may hold as the int 777...7 (leading zeros lost)


def _tool(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(TOOLS / args[0]), *map(str, args[1:])],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=timeout,
    )


def _bad_inputs(tmp: Path, write: bool = True) -> dict[str, tuple[list[str], str]]:
    """tool case -> (command line, text the one-line error must hold); the input files are written in ``tmp``."""
    not_json = tmp / "not_json.json"
    plain_file = tmp / "a_file"
    if write:
        not_json.write_text("image,modality\na.png,XR\n")
        plain_file.write_text("x")
    missing = tmp / "missing"
    return {
        "datalist build: no such folder": (["datalist.py", "build", "--root", missing, "--out", tmp / "o.json"], str(missing)),
        "datalist build: bad fractions": (
            ["datalist.py", "build", "--root", tmp, "--out", tmp / "o.json", "--val_fraction", "1.5"],
            "val_fraction=1.5",
        ),
        "datalist build: unknown modality": (
            ["datalist.py", "build", "--root", tmp, "--out", tmp / "o.json", "--modality", "XX"],
            "unknown modality 'XX'",
        ),
        "datalist check: not JSON": (["datalist.py", "check", not_json], f"{not_json}: not valid JSON"),
        "export_encoder: no such bundle": (
            ["export_encoder.py", "--bundle", missing, "--checkpoint", missing / "c.pt", "--out", tmp / "e.pt"],
            str(missing),
        ),
        "probe: no such encoder": (["probe.py", "--encoder", missing / "e.json", "--datalist", not_json], "e.json"),
        "plot_embeddings: no such encoder": (
            ["plot_embeddings.py", "--encoder", missing / "e.json", "--datalist", not_json, "--out", tmp / "f.png"],
            "e.json",
        ),
        "energy_reference: no such datalist": (["energy_reference.py", "--datalist", missing / "d.json"], "d.json"),
        "convert_weights: no such checkpoint": (
            ["convert_weights.py", "unimiss", "--checkpoint", missing / "u.pth", "--out", tmp / "u.pt"],
            "u.pth",
        ),
        "compare_pretraining: unknown method": (["compare_pretraining.py", "--methods", "byol"], "byol"),
        "benchmark: no such bundle": (["benchmark.py", "step", "--bundle", missing], str(missing)),
        "demo_data: output under a file": (["demo_data.py", "--out", plain_file / "demo"], str(plain_file)),
    }


CASES = list(_bad_inputs(Path("unused"), write=False))  # names only: the files are made per test in tmp_path


@pytest.mark.parametrize("case", CASES)
def test_user_mistake_is_one_line_with_exit_status_2(tmp_path, monkeypatch, capsys, case):
    """The real command (the tool's ``__main__`` block, run in this process: torch is imported once)."""
    args, expected = _bad_inputs(tmp_path)[case]
    monkeypatch.setattr(sys, "argv", [str(TOOLS / args[0]), *map(str, args[1:])])
    monkeypatch.setenv("PYTHONUNBUFFERED", "1")  # set by compare_pretraining: restored after the test
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(TOOLS / args[0]), run_name="__main__")
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert exit_info.value.code == 2, (case, captured.out[-2000:], captured.err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (case, lines)
    assert lines[0].endswith("(--debug shows the traceback)")


def test_exit_status_and_debug_traceback_of_a_real_process(tmp_path):
    args, _ = _bad_inputs(tmp_path)["datalist check: not JSON"]
    result = _tool(*args)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    result = _tool(*args, "--debug")
    assert result.returncode == 1 and "Traceback" in result.stderr and "JSONDecodeError" in result.stderr


def test_run_returns_results_and_keeps_tracebacks_of_bugs(capsys):
    def ok(x: int = 1):
        return {"x": x}

    def bad_value(path: str = "in.json"):
        raise ValueError(f"{path}: not valid JSON\n(second line)")

    def bad_key():
        raise KeyError("no 'backbone' in the manifest; export it with tools/export_encoder.py")

    def bug():
        raise KeyError("backbone")  # a bare lookup error is a bug, not a user mistake

    assert run(ok, ["--x", "3"], serialize=lambda r: None) == {"x": 3}
    for command, message in ((bad_value, "in.json: not valid JSON (second line)"), (bad_key, "no 'backbone' in")):
        with pytest.raises(SystemExit) as exit_info:
            run(command, [])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"error: {message}"), err
    with pytest.raises(KeyError):
        run(bug, [])
    with pytest.raises(RuntimeError):
        run(lambda: (_ for _ in ()).throw(RuntimeError("internal")), [])
    with pytest.raises(ValueError):  # --debug: the exception itself, with its traceback
        run(bad_value, ["--debug"])


# ------------------------------------------------------------------------------------------------------------ sha256
def test_fire_reads_an_all_digit_hash_as_an_int_and_as_sha256_restores_it():
    parsed = fire.Fire(lambda sha256=None: sha256, command=["--sha256", DIGITS_SHA])
    assert isinstance(parsed, int)  # the premise: the hash reaches the code as a number
    assert as_sha256(parsed, "sha256") == DIGITS_SHA
    assert as_sha256(int(PADDED_SHA)) == PADDED_SHA  # zero-padded back to 64 digits
    assert fire.Fire(lambda sha256=None: sha256, command=["--sha256", "0" * 64]) == 0
    assert as_sha256(0) == "0" * 64
    hexa = "ab" * 32
    assert as_sha256(hexa.upper()) == hexa and as_sha256(f" {hexa} ") == hexa
    assert all(as_sha256(v) is None for v in (None, "", "none", "null", False))
    with pytest.raises(ValueError, match=r"^pretrained_sha256 'abc': not a sha256 \(64 hexadecimal digits"):
        as_sha256("abc", "pretrained_sha256")
    made_float = fire.Fire(lambda sha256=None: sha256, command=["--sha256", "12e" + "3" * 61])
    with pytest.raises(ValueError, match="quote it"):
        as_sha256(made_float, "sha256")  # a hash like 12e333...: python-fire made a float (inf) of it
    with pytest.raises(ValueError, match="not a sha256"):
        as_sha256(10**64)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(3, 2)
        self.head = nn.Linear(2, 1)


def test_hash_arguments_are_checked_whatever_the_command_line_made_of_them(tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "encoder.pt"
    torch.save(nn.Linear(3, 2).state_dict(), weights)
    right = file_sha256(weights)
    assert load_pretrained_encoder(_Net(), weights, sha256=right.upper(), verbose=False).loaded

    # an all-digit hash made an int by the command line is compared, not skipped
    for digits in (DIGITS_SHA, PADDED_SHA):
        with pytest.raises(ValueError, match=f"differs from pretrained_sha256 {digits}"):
            load_pretrained_encoder(_Net(), weights, sha256=int(digits), verbose=False)
    # all zeros: fire reads it as 0, which `sha256 or None` used to drop
    with pytest.raises(ValueError, match="differs from pretrained_sha256 0{64}"):
        prepare_network(_Net(), str(weights), sha256=0)
    with pytest.raises(ValueError, match="not a sha256"):
        prepare_network(_Net(), str(weights), sha256=right[:-1])
    assert prepare_network(_Net(), str(weights), sha256=None) is not None


FIRE_TOOLS = ("benchmark", "check_bundle", "compare_pretraining", "convert_weights", "datalist", "demo_data",
              "energy_reference", "export_encoder", "plot_embeddings", "probe", "train_tokenizer", "weights")


def test_fire_tools_all_run_through_medssl_cli():
    """One place for the one-line errors: no tool calls python-fire itself (argparse tools handle their own)."""
    for path in sorted(TOOLS.glob("*.py")):
        text = path.read_text()
        assert "import fire" not in text and "fire.Fire(" not in text, path.name
    for name in FIRE_TOOLS:
        assert "from medssl.cli import run" in (TOOLS / f"{name}.py").read_text(), name


@pytest.mark.parametrize("name", FIRE_TOOLS)
def test_help_prints_the_tools_usage(name, monkeypatch, capsys):
    """``--help`` exits 0 with the tool's usage: its docstring for a one-command tool, also when the command takes
    ``**kwargs`` (probe.py, compare_pretraining.py: python-fire called them with ``help=True`` and crashed);
    python-fire's list of commands and flags for a multi-command tool (datalist.py, benchmark.py, weights.py)."""
    path = TOOLS / f"{name}.py"
    monkeypatch.setattr(sys, "argv", [str(path), "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(path), run_name="__main__")
    assert exit_info.value.code == 0
    captured = capsys.readouterr()
    namespace = runpy.run_path(str(path))
    if name in ("datalist", "benchmark", "weights", "convert_weights"):  # dicts of commands
        assert "COMMANDS" in captured.out + captured.err, (name, captured.out[-500:], captured.err[-500:])
    else:
        assert captured.out.strip().splitlines()[0] == namespace["__doc__"].strip().splitlines()[0]
