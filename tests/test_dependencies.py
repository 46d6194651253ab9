"""The core needs none of the evaluation extras: matplotlib and lmms-eval's runtime stay out of `import vtprune`."""

from __future__ import annotations

import configparser
import subprocess
import sys
from pathlib import Path

import pytest

from vtprune.evals.sweep import plots

SETUP_CFG = Path(__file__).resolve().parents[1] / "setup.cfg"
# (accelerate is in the eval extra too, but transformers itself imports it wherever it is installed)
EVAL_ONLY = ("matplotlib", "lmms_eval", "datasets", "loguru")


def test_importing_vtprune_and_patching_imports_no_eval_dependency():
    code = (
        "import sys, vtprune, vtprune.api; "
        "from vtprune.evals.models.transformers_vlms import tiny_llava; "
        "model = tiny_llava(); vtprune.patch(model, 'fastervlm', keep_ratio=0.5).remove(); "
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(EVAL_ONLY)!r}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_matplotlib_is_an_extra_not_a_core_requirement():
    setup = configparser.ConfigParser()
    setup.read(SETUP_CFG)
    core = setup["options"]["install_requires"].split()
    extras = {name: value.split() for name, value in setup["options.extras_require"].items()}
    assert not any(requirement.startswith("matplotlib") for requirement in core)
    assert "matplotlib" in extras["eval"] and "matplotlib" in extras["plot"]


def test_a_plot_without_matplotlib_names_the_extra_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    rows = [{"method": "none", "visual_tokens_kept": 16.0, "accuracy": 1.0}]
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'vtprune\[eval\]'"):
        plots.plot_vs_tokens(rows, tmp_path / "plot.png", y="accuracy", ylabel="accuracy")
    assert not (tmp_path / "plot.png").exists()
