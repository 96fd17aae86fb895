import torch
from torch import nn
from deep.data import get_benchmark
from deep.train import TrainConfig, evaluate, fit

class MyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32),
                                  nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(self.body(self.stem(x)))

torch.manual_seed(0)
model = MyNet()
blocks = {"stem": ("stem",), "body": ("body",), "head": ("head",)}
bench = get_benchmark("synthetic")   # generated in memory: no data to download
# stands in for your pretrained weights: all layers trained on the source data
source = bench.load_source(None)
fit(model, source.train, None, None, "all", TrainConfig(lr=1e-2, epochs=5), blocks=blocks)
# the target: same classes, other subpopulations (a feature-level shift). Any labelled
# tensors work: deep.data.TensorSplit(images (n, C, H, W) float32, labels (n,) int64)
task = bench.load_task(None, "feature", n_target=200, val_per_class=25, test_per_class=100, seed=0)
print(f"before tuning: test accuracy {evaluate(model, task.test).acc:.3f}")
result = fit(model, task.train, task.val, task.test, "stem",       # or "auto-rgn", "lp-ft", ...
             TrainConfig(lr=1e-2, epochs=10), blocks=blocks)
print(f"tuned {result.tuned_params} parameters (stem.*): best epoch {result.best_epoch}, "
      f"validation {result.val.acc:.3f}, test {result.test.acc:.3f}")
# `model` now holds the weights of the best validation epoch; only stem.* changed
