import numpy as np
import theory

problem = theory.t1_instance()    # linear, d = 10: ds = 8 old directions, m = 2 new, k = 4, p = 0.5
X, y = problem.sample_target(6, np.random.default_rng(0))    # n = 6 samples, 3 of them new
w_star = problem.target_teacher.effective_weights()
for tune in ["first", "all", "lp-ft", "last"]:
    net = theory.finetune(problem.pretrained, X, y, tune, steps=20_000, lr=0.1)
    print(f"{tune:>5}: target loss / |w*|^2 = {problem.target_loss(net) / (w_star @ w_star):.3g}")
print(f"P(T1 event) = {theory.t1_event_probability(ds=8, m=2, p=0.5, n=6):.4f}")
