"""Usage: python scripts/fmnist_v2_snapshot.py fmnist-flip,fmnist-breeds,... && git commit

Stage the completed benchmarks of figures/fmnist-v2 without touching the files the
running `make deep` writes: filtered CSVs go into the index via git hash-object; the
summaries are built from them in a temp dir and copied into the working tree."""
import shutil, subprocess, sys, tempfile
from pathlib import Path
from deep.results import read_results, results_text
from deep.convergence import read_curves, curves_text
from deep.files import atomic_write_text

done = sys.argv[1].split(",")          # completed benchmarks
out = Path("figures/fmnist-v2")
tmp = Path(tempfile.mkdtemp())
rows = [r for r in read_results(out / "results.csv") if r["benchmark"] in done]
curves = [c for c in read_curves(out / "curves.csv") if c["benchmark"] in done]
atomic_write_text(tmp / "results.csv", results_text(rows))
atomic_write_text(tmp / "curves.csv", curves_text(curves))
for name in ("n_target.csv", "n_target_curves.csv"):
    if (out / name).exists() and "n_target" in done:
        shutil.copy(out / name, tmp / name)
subprocess.run([sys.executable, "-m", "deep", "bench", "fmnist", "--summarize-only", "--out", str(tmp)],
               check=True, stdout=subprocess.DEVNULL)
def stage(src, dest):
    blob = subprocess.run(["git", "hash-object", "-w", str(src)], check=True, capture_output=True,
                          text=True).stdout.strip()
    subprocess.run(["git", "update-index", "--add", "--cacheinfo", f"100644,{blob},{dest}"], check=True)
for name in ("results.csv", "curves.csv", "n_target.csv", "n_target_curves.csv"):
    if (tmp / name).exists():
        stage(tmp / name, out / name)
shutil.copy(out / "results.csv.config.json", tmp / "cfg.json")
stage(tmp / "cfg.json", out / "results.csv.config.json")
for p in tmp.glob("*"):
    if p.suffix in (".md", ".png", ".pdf"):
        shutil.copy(p, out / p.name)
        subprocess.run(["git", "add", str(out / p.name)], check=True)
print(len(rows), "rows,", len(curves), "curve rows of", done)
