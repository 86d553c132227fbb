"""The package as a user installs it: a non-editable install used from outside the checkout has the
``purefine`` command, its presets and its bundled demo."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """(a directory outside the checkout, the environment whose PYTHONPATH holds a fresh non-editable
    install of the package, scripts included)."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(ROOT)], check=True, capture_output=True, text=True)
    env = {**os.environ, "PYTHONPATH": str(target), "PATH": f"{target / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    return tmp_path_factory.mktemp("elsewhere"), env


def purefine(installed: tuple[Path, dict[str, str]], *args: str) -> subprocess.CompletedProcess:
    cwd, env = installed
    return subprocess.run(["purefine", *args], cwd=cwd, env=env, capture_output=True, text=True)


def test_the_command_comes_from_the_installed_copy(installed) -> None:
    cwd, env = installed
    where = subprocess.run([sys.executable, "-c", "import purefine; print(purefine.__file__)"], cwd=cwd, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(env["PYTHONPATH"]) and not where.startswith(str(ROOT))


def test_help_ls_and_a_preset_help_work_outside_the_checkout(installed) -> None:
    top = purefine(installed, "--help")
    assert top.returncode == 0 and "train" in top.stdout and "validate" in top.stdout
    listed = purefine(installed, "ls")
    assert listed.returncode == 0 and "llama2-7b-qlora" in listed.stdout and "tiny-demo" in listed.stdout
    preset = purefine(installed, "train", "--config", "llama2-7b-qlora", "--help")
    assert preset.returncode == 0 and "--max-steps" in preset.stdout


def test_a_five_step_demo_writes_its_loss_curve(installed) -> None:
    cwd, _ = installed
    run = purefine(installed, "train", "--max-steps", "5", "--eval-batches", "1", "--output-dir", "run", "--no-progress")
    assert run.returncode == 0, run.stderr[-2000:]
    assert (cwd / "run" / "loss.png").stat().st_size > 0 and (cwd / "run" / "adapter" / "adapter_model.safetensors").exists()
    assert "step 5/5" in run.stdout


def test_errors_are_one_line_and_exit_2(installed) -> None:
    bad = purefine(installed, "train", "--max-step", "5")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == "error: unrecognized argument '--max-step' (did you mean --max-steps?); see --help"
    unknown = purefine(installed, "trian")
    assert unknown.returncode == 2 and "did you mean train" in unknown.stderr
