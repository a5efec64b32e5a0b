"""The notebooks of notebooks/ run top to bottom in quick mode (CPU, synthetic data) in a Jupyter kernel (nbclient),
without an error, and write the files they promise under the working directory; one of them also runs outside the
repository, with the checkout installed as a package into a temporary virtual environment. About three minutes on
two CPU cores; nothing is skipped without a GPU. The committed notebooks are stored executed: memory_visualization and
compression in FULL mode (run on an H100), cold_start in quick mode."""
import json
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
CELL_TIMEOUT = 600  # seconds per cell; a quick-mode notebook takes 30 to 70 s in all on two cores

# notebook -> the files it writes under $HOLOMAMBA_OUTPUTS/<notebook>/ in quick mode
EXPECTED = {
    "cold_start": {"ranks.csv", "slices_per_seed.csv", "slices_summary.csv", "binding_gain.csv",
                   "cold_start_synthetic.png", "binding_gain_synthetic.png"},
    "memory_visualization": {"bind_unbind.png", "capacity.csv", "capacity.png", "attribute_recovery.csv",
                             "attribute_unbinding.png", "memory_slots.csv", "memory_slots.png", "mamba_delta.csv",
                             "mamba_delta.png"},
    "compression": {"compression.csv", "compression.png", "compression_memory.png", "choice_of_k.csv"},
}


def stream_text(nb):
    return "".join("".join(o.get("text", "")) for cell in nb.cells if cell.cell_type == "code"
                   for o in cell.get("outputs", []) if o.get("output_type") == "stream")


def execute(path, cwd, kernel_name="python3"):
    """Run every cell of the notebook at path in a fresh kernel whose working directory is cwd; the notebook on disk
    is left as it is. A cell that raises fails the test (nbclient's CellExecutionError)."""
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name=kernel_name,
                   resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


@pytest.fixture
def quick(monkeypatch, tmp_path):
    """Quick mode whatever the machine, outputs under tmp_path; the kernel inherits this environment."""
    monkeypatch.setenv("HOLOMAMBA_FULL", "0")
    monkeypatch.setenv("HOLOMAMBA_OUTPUTS", str(tmp_path / "outputs"))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.delenv("HOLOMAMBA_EPOCHS", raising=False)
    return tmp_path / "outputs"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_runs_in_the_repository(name, quick):
    nb = execute(NOTEBOOKS / f"{name}.ipynb", NOTEBOOKS)
    text = stream_text(nb)
    assert "from this checkout" in text and "mode: quick" in text
    assert {p.name for p in (quick / name).iterdir()} == EXPECTED[name]
    assert all((quick / name / f).stat().st_size > 0 for f in EXPECTED[name])
    assert not (NOTEBOOKS / "HoloMambaRec").exists()  # nothing was cloned


def test_results_notebook_runs_in_a_kernel(quick):
    execute(NOTEBOOKS / "results.ipynb", NOTEBOOKS)


def test_notebook_runs_outside_the_repository_from_an_installed_package(quick, tmp_path, monkeypatch):
    """A copy of the notebook in an empty folder, with the checkout installed (not editable, without dependencies)
    into a virtual environment that sees this interpreter's packages: the notebook imports the installed package
    and clones nothing."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("HoloMambaRec.py", "pyproject.toml", "README.md", "requirements.txt"):
        shutil.copy(ROOT / name, source / name)
    env = tmp_path / "venv"
    venv.create(env, system_site_packages=True, with_pip=False)
    python = env / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--no-index", "--disable-pip-version-check", str(source)], check=True)
    work = tmp_path / "elsewhere"
    work.mkdir()
    shutil.copy(NOTEBOOKS / "compression.ipynb", work)
    where = subprocess.run([str(python), "-c", "import HoloMambaRec; print(HoloMambaRec.__file__)"], cwd=work,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).resolve().is_relative_to(env.resolve())
    kernels = tmp_path / "jupyter" / "kernels" / "holomamba-venv"
    kernels.mkdir(parents=True)
    (kernels / "kernel.json").write_text(json.dumps({
        "argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "HoloMambaRec venv", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("HOLOMAMBA_OUTPUTS", "outputs")  # relative: under the notebook's working directory
    nb = execute(work / "compression.ipynb", work, kernel_name="holomamba-venv")
    assert "from the installed package" in stream_text(nb)
    assert {p.name for p in (work / "outputs" / "compression").iterdir()} == EXPECTED["compression"]
    assert sorted(p.name for p in work.iterdir()) == ["compression.ipynb", "outputs"]  # no clone, nothing else


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_committed_notebook_is_executed_and_small(name):
    """Committed executed: in FULL mode (the paper-size run) where it ran on a GPU, else in quick mode."""
    path = NOTEBOOKS / f"{name}.ipynb"
    assert path.stat().st_size < 1.5 * 2 ** 20
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and all(cell.execution_count is not None for cell in code)
    assert not any(o.get("output_type") == "error" for cell in code for o in cell.outputs)
    text = stream_text(nb)
    assert "mode: quick" in text or ("mode: FULL" in text and "device: cuda" in text)
    assert any("image/png" in o.get("data", {}) for cell in code for o in cell.outputs)
    first = code[0].source
    assert "REPO_URL" in first and "--no-deps" in first and "mamba-ssm" in first
    assert not any("FINDINGS_PLACEHOLDER" in cell.source for cell in nb.cells)
