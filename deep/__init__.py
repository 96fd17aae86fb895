"""Surgical fine-tuning of deep networks: architectures, benchmarks, methods, the loop, sweeps.

Imports flow one way, top to bottom; a module imports only from the layers below it,
at the top of the file (tests/deep/test_layering.py checks this):

    CLI          __main__, bench, report, ray_backend, speed, vit_cost, calibrate, gallery
    runs         adapt (online MEMO/TENT) -> sweep (cells, resume, workers),
                 convergence (per-epoch curves; issue #15), two_stage (lr grid on
                 some seeds, the rest at the chosen lr; above sweep)
    config       protocol (TOML -> Tuning, TargetData, PretrainConfig, data options), flags
                 (command-line flags from those fields, for every command's parser)
    engine       pretrain -> train (the loop) -> methods, prefix_cache -> blocks,
                 checkpoints, normalization
    foundations  data (the benchmark registry) -> models (the architecture registry),
                 results (the row schema and the lr/epoch selection rule the loop uses)
    bottom       files (atomic writes, manifests), stats (mean, se, t intervals over seeds)
                 -> errors, allocator

Data loaders never import the engine; the engine never imports the protocol or the CLI.
Where to change what: a new architecture registers itself in its own `deep/models/`
module, imported by `deep/models/__init__.py` (tests/deep/test_architectures.py then
checks its blocks, stages and BN folding); a new benchmark is a module of `deep/data/`
that lists it in its `BENCHMARKS`, plus one line of `deep.data._MODULES` and a protocol
file `deep/configs/NAME.toml`; a new method is one row of `deep.methods.METHODS` (it runs
where `--methods` or a protocol's `methods` names it); a default lives once, in
`TrainConfig`, `PretrainConfig` or a protocol file, and every command-line flag is
generated from those fields.
"""
