"""What a plain ``pip install`` of the package gives: commands whose optional dependency is missing
refuse with one line naming the install command, before doing any work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from quantize.models.demo import Demo

# Runs the CLI with AutoAWQ made unimportable, as on an install without it.
WITHOUT_AWQ = "import sys; sys.modules['awq'] = None; from quantize.cli import main; sys.exit(main(sys.argv[1:]))"
MESSAGE = "quantize: awq: AutoAWQ (the awq extra) is not installed; pip install --no-deps autoawq==0.2.9\n"


def test_awq_without_autoawq_is_a_one_line_error(tmp_path: Path) -> None:
    src = tmp_path / "model"
    src.mkdir()
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-c", WITHOUT_AWQ, "awq", str(src), "-o", str(out)], capture_output=True, text=True)
    assert (res.returncode, res.stderr, res.stdout) == (2, MESSAGE, "")
    assert not out.exists() and sorted(tmp_path.iterdir()) == [src]


def test_build_with_awq_without_autoawq_stops_before_any_work(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text('name = "X"\nbase = "demo:mistral-spm"\nevaluation = "text:eval"\n[ladder]\nawq = true\n')
    art = tmp_path / "artifacts"
    res = subprocess.run([sys.executable, "-c", WITHOUT_AWQ, "build", str(recipe), "--artifacts", str(art)],
                         capture_output=True, text=True)
    assert (res.returncode, res.stderr) == (2, MESSAGE)
    assert not art.exists()


def test_evaluating_an_awq_folder_without_autoawq_is_a_one_line_error(demo: Demo, tmp_path: Path) -> None:
    """The gate reads an AWQ folder with AutoAWQ's unpacking order: one line and no report, not a traceback."""
    folder = tmp_path / "X-AWQ"
    folder.mkdir()
    (folder / "config.json").write_text('{"quantization_config": {"quant_method": "awq"}}')
    text = tmp_path / "t.txt"
    text.write_text(demo.text["eval"].read_text()[:4000])
    res = subprocess.run([sys.executable, "-c", WITHOUT_AWQ, "eval", str(folder), "--reference", str(demo.spm), "--ctx", "128",
                          "--text", str(text), "--out-dir", str(tmp_path / "eval"), "--cache", str(tmp_path / "cache")],
                         capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr == MESSAGE  # the one line, nothing else
    assert not (tmp_path / "eval").exists()


def test_the_wheel_ships_the_package_and_not_the_benches(tmp_path: Path) -> None:
    """A non-editable install compiles the gate's kernel from the C source in the package: the wheel holds it,
    every module of the package's tree, and nothing of bench/ or tests/."""
    import zipfile

    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(root)],
                   check=True, capture_output=True)
    (wheel,) = tmp_path.glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        shipped = z.read("quantize/gate_kernel.c")
        names = set(z.namelist())
    assert shipped == (root / "quantize" / "gate_kernel.c").read_bytes()
    tree = {str(p.relative_to(root)) for p in (root / "quantize").rglob("*.py")}
    assert tree <= names, f"modules missing from the wheel: {sorted(tree - names)}"
    assert not [n for n in names if n.startswith(("bench/", "tests/"))]
