"""Issue #15 probe: per-epoch validation history and cost per method.

One (benchmark, shift, seed) task at a time, the sweep's own run_group setup (cached
prefix shared by all runs of the task); one JSON line per (method, lr) run, appended,
so the script resumes."""
import json, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from deep.protocol import load_protocol
from deep.sweep import prepare_task, resolve_checkpoint
from deep.data import get_benchmark
from deep.blocks import blocks_for
from deep.train import fit

if len(sys.argv) < 7:
    sys.exit("usage: python scripts/fmnist_probe.py BENCHMARK SHIFT OUT.jsonl EPOCHS LR,LR,.. METHOD,METHOD,.. [SEED] [N_TARGET]")
benchmark, shift, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
epochs = int(sys.argv[4]); lrs = [float(x) for x in sys.argv[5].split(",")]
methods = sys.argv[6].split(","); seed = int(sys.argv[7]) if len(sys.argv) > 7 else 0
n_target = int(sys.argv[8]) if len(sys.argv) > 8 else 1000
done = set()
if out.is_file():
    for line in out.read_text().splitlines():
        r = json.loads(line); done.add((r["method"], r["lr"], r["seed"], r["n_target"]))
protocol = load_protocol(benchmark).replace(epochs=epochs, lrs=lrs, methods=methods, seeds=[seed],
                                            n_target=n_target)
bench = get_benchmark(benchmark)
checkpoint = resolve_checkpoint(bench, protocol.arch, None, None)
t0 = time.perf_counter()
prepared = prepare_task(protocol, benchmark, shift, n_target, seed, None, checkpoint, 2048, "cpu")
task, model, base, cache = prepared.task, prepared.model, prepared.base_state, prepared.cache
blocks = blocks_for(protocol.arch)
print(f"setup {time.perf_counter()-t0:.1f}s", flush=True)
for method in methods:
    for lr in lrs:
        if (method, lr, seed, n_target) in done:
            continue
        model.load_state_dict(base)
        config = protocol.tuning.run_config(lr, seed, cache_mb=2048, device="cpu")
        c0 = time.process_time()
        r = fit(model, task.train, task.val, task.test, method, config, blocks, cache)
        row = dict(benchmark=benchmark, shift=shift, method=method, lr=lr, seed=seed, n_target=n_target,
                   status=r.status, best_epoch=r.best_epoch, val_acc=r.val.acc if r.val else None,
                   test_acc=r.test.acc if r.test else None, seconds=r.seconds, cpu_seconds=time.process_time() - c0,
                   val_curve=[h.get("val_acc") for h in r.history],
                   loss_curve=[h["train_loss"] for h in r.history])
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(method, lr, r.best_epoch, f"{row['val_acc']:.3f}", f"{row['test_acc'] or 0:.3f}",
              f"{r.seconds:.1f}s wall {row['cpu_seconds']:.1f}s cpu", flush=True)
