"""Usage: python scripts/prefix_cache_peak.py BUDGET_MB [BUDGET_MB ...]

How much memory filling the prefix cache takes beyond what it keeps: resnet26 on 2,000
random 3x32x32 images, the inputs of every stage up to the last asked for at once, one
thread, each budget in a fresh process. Prints what was stored and how far the peak
resident memory rose during the fill (docs/performance.md)."""
import resource
import subprocess
import sys

import torch


def measure(budget_mb: float) -> None:
    from deep.data.base import TensorSplit
    from deep.models import build_model
    from deep.prefix_cache import PrefixCache
    torch.set_num_threads(1)
    n = 2000
    model = build_model("resnet26", 10, 3).eval()
    split = TensorSplit(torch.randn(n, 3, 32, 32), torch.zeros(n, dtype=torch.long))
    cache = PrefixCache(model, {"train": split}, budget_mb=budget_mb)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    _, stage = cache.inputs("train", len(cache.stages) - 1)
    rise = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    print(f"budget {budget_mb:g} MB: kept {cache.used / 2**20:.1f} MB (stages "
          f"{cache.stored_stages('train')}), peak memory rose {rise:.0f} MB", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] in (["-h"], ["--help"]):
        print(__doc__)
    elif len(sys.argv) == 3 and sys.argv[1] == "--one":
        measure(float(sys.argv[2]))
    else:
        for budget in sys.argv[1:] or ["1", "4096"]:
            subprocess.run([sys.executable, __file__, "--one", budget], check=True)
