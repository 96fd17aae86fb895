import json, sys, collections

from deep.results import best_row

rows = [json.loads(l) for f in sorted(sys.argv[1:]) for l in open(f)]
print("per run: shift method lr | best epoch/ran | best val | test | cpu s/epoch")
for r in rows:
    c = r["val_curve"]
    print(f"{r['shift'][:10]:10s} {r['method']:8s} {r['lr']:.0e} | {r['best_epoch']:2d}/{len(c)} | "
          f"{r['val_acc']:.3f} | {r['test_acc'] or 0:.3f} | {r['cpu_seconds']/len(c):.2f} | "
          + " ".join(f"{100*v:.0f}" for v in c))
print("\nchosen lr per (shift, method):")
by_pair = collections.defaultdict(list)
for r in rows:
    by_pair[(r["shift"], r["method"])].append(r)
best = {k: best_row(rs) for k, rs in by_pair.items()}  # the report's rule (deep.results)
for k, r in sorted(best.items()):
    print(k, f"lr {r['lr']:.0e} epoch {r['best_epoch']} val {r['val_acc']:.3f} test {r['test_acc']:.3f}")
print("\npatience p: runs whose early-stopped choice differs from the full-run best (val points lost, max)")
for p in (2, 3, 4, 5, 6, 8):
    lost, changed, epochs = [], 0, 0
    for r in rows:
        c = r["val_curve"]; bestv, beste, stop = -1, 0, len(c)
        for e, v in enumerate(c, 1):
            if v > bestv: bestv, beste = v, e
            if e - beste >= p: stop = e; break
        epochs += stop
        full = max(c)
        if bestv < full: changed += 1; lost.append(full - bestv)
    print(p, f"changed {changed}/{len(rows)}, max loss {100*max(lost, default=0):.1f} pts, "
          f"mean epochs run {epochs/len(rows):.1f} of {max(len(r['val_curve']) for r in rows)}")
print("\ncpu s/epoch by method:", {m: round(sum(r['cpu_seconds'] for r in rows if r['method']==m)/max(1,sum(len(r['val_curve']) for r in rows if r['method']==m)),2) for m in dict.fromkeys(r['method'] for r in rows)})

print("\nper (shift, method): chosen (lr, epoch, val) from full 15-epoch runs vs with patience p (stopped runs)")
def stopped(c, p):
    bestv, beste = -1, 0
    for e, v in enumerate(c, 1):
        if v > bestv: bestv, beste = v, e
        if p and e - beste >= p: return bestv, beste, e
    return bestv, beste, len(c)
groups = collections.defaultdict(list)
for r in rows: groups[(r["shift"], r["method"])].append(r)
for p in (3, 4, 5, 6, 8):
    worse, total_ep, full_ep, detail = 0, 0, 0, []
    for k, rs in sorted(groups.items()):
        full = max(rs, key=lambda r: (max(r["val_curve"]), r["lr"]))
        st = [(stopped(r["val_curve"], p), r) for r in rs]
        (sv, se, sr), sr_row = max(st, key=lambda t: (t[0][0], t[1]["lr"]))
        total_ep += sum(t[0][2] for t in st); full_ep += sum(len(r["val_curve"]) for r in rs)
        if sv < max(full["val_curve"]) - 1e-9:
            worse += 1; detail.append(f"{k}: {100*max(full['val_curve']):.0f}->{100*sv:.0f}")
    print(f"p={p}: choice val lower in {worse}/{len(groups)} pairs {detail}; epochs run {total_ep}/{full_ep}")
