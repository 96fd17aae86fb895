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


def printed_losses(text):
    """tune -> target loss / |w*|^2 from the example's output lines."""
    return {tune: float(value) for tune, value in
            re.findall(r"^\s*(\S+): target loss / \|w\*\|\^2 = (\S+)$", text, flags=re.M)}


def test_example_reproduces_t1_and_the_numbers_readme_prints():
    result = subprocess.run([sys.executable, "-m", "theory.examples.t1"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120, check=True)
    losses = printed_losses(result.stdout)
    assert set(losses) == {"first", "all", "lp-ft", "last"}
    assert losses["first"] < 1e-25                 # rounding level: the exact fit of T1
    assert losses["all"] > 1e-6
    assert losses["lp-ft"] == losses["all"]
    assert losses["last"] > 0.1
    assert "P(T1 event) = 0.8906" in result.stdout
    # The README's output block: the same numbers to the 3 digits printed, except the
    # rounding-level one, which depends on the BLAS's order of operations.
    readme = (ROOT / "README.md").read_text()
    section = readme.split("<!-- section: theory -->")[1].split("<!-- section:")[0]
    after_code = section.split("```python\n", 1)[1].split("```\n", 1)[1]
    shown = printed_losses(re.search(r"```\n(.*?)```", after_code, flags=re.S).group(1))
    assert set(shown) == set(losses) and shown["first"] < 1e-25
    assert {t: shown[t] for t in ("all", "lp-ft", "last")} == \
        {t: losses[t] for t in ("all", "lp-ft", "last")}
