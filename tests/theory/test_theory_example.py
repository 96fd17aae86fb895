"""The README's T1 example runs as printed and shows what README says it shows."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "theory" / "examples" / "t1.py"


def test_readme_shows_the_example_file_verbatim():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("<!-- section: theory -->")[1].split("<!-- section:")[0]
    assert "```python\n" + EXAMPLE.read_text() + "```" in section


def test_example_reproduces_t1():
    result = subprocess.run([sys.executable, "-m", "theory.examples.t1"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120, check=True)
    losses = dict(re.findall(r"^\s*(\S+): target loss / \|w\*\|\^2 = (\S+)$",
                             result.stdout, flags=re.M))
    losses = {tune: float(value) for tune, value in losses.items()}
    assert set(losses) == {"first", "all", "lp-ft", "last"}
    assert losses["first"] < 1e-10
    assert losses["all"] > 1e-6
    assert losses["lp-ft"] == losses["all"]
    assert losses["last"] > 0.1
    assert "P(T1 event) = 0.8906" in result.stdout
