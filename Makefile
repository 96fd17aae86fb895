# Every target but gpu-check bootstraps .venv on first use, so `make figures` and `make test`
# are the only set-up a fresh machine needs.
#
#   PYTHON=python3.11   the interpreter that creates the venv
#   TORCH=...           the torch requirement installed before the project; the
#                       default pin is a CPU wheel on the dev machines, on yours
#                       it may be e.g. TORCH="torch --index-url https://download.pytorch.org/whl/cu124"
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup figures test test-avx2 speed gpu-check pretrain deep deep-quick clean

setup: $(STAMP)

# torch goes in first: `pip install -e .` would otherwise resolve torch>=2.2 to
# a multi-GB CUDA build on machines that have no GPU.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(TORCH)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $@

figures: $(STAMP)
	$(PY) -m sims figures

# One pytest worker per core, at most 8 (pytest-xdist). tests/conftest.py gives each worker
# its share of the cores and keeps every file that starts Ray on one worker.
# JOBS=0 runs the tests in this process, one after another. A worker that crashes (e.g. a
# native abort) fails its test and is not replaced: with a replacement, pytest-xdist 3.8
# under --dist loadgroup hung once the rest had finished, until killed (2026-12-02, twice).
JOBS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 8 ] && n=8; echo $$n)
PYTEST := $(PY) -m pytest -q -n $(JOBS) --dist loadgroup --max-worker-restart 0

test: $(STAMP)
	$(PYTEST)

# The deep engine's tests (with adaptation, reference models, ViT, the speed scripts) again on oneDNN's AVX2 kernels, which CPUs without AVX-512 (AMD EPYC
# before Zen 4, Intel with AVX2 or AVX-VNNI only) run and ONEDNN_MAX_CPU_ISA=AVX2 selects anywhere
# (docs/troubleshooting.md). MALLOC_CHECK_=3: glibc before 2.34 aborts at the first heap inconsistency;
# from 2.34 it takes effect only with libc_malloc_debug.so preloaded (docs/troubleshooting.md, "MALLOC_CHECK_").
ENGINE_TESTS := tests/deep/test_engine.py tests/deep/test_engine_schedules.py tests/deep/test_engine_checkpoints.py \
	tests/deep/test_sweep.py tests/deep/test_cli.py tests/deep/test_onednn_guard.py \
	tests/deep/test_pretrain_options.py tests/deep/test_adapt.py tests/deep/test_reference_models.py \
	tests/deep/test_vit.py tests/deep/test_speed.py
test-avx2: $(STAMP)
	ONEDNN_MAX_CPU_ISA=AVX2 MALLOC_CHECK_=3 $(PYTEST) -m 'not pins_isa' $(ENGINE_TESTS)

# The three Fashion-MNIST source models (committed in deep/weights/ with their
# manifests; docs/fmnist.md has the measured time). Each protocol's [pretrain]
# table holds its settings. The benchmarks check each file's sha256 against its
# manifest before use. A model whose manifest records the settings it would train with
# is kept, one of other settings is refused (delete the .pt to train it again); a stopped run
# continues (<out>.state).
WEIGHTS := deep/weights
pretrain: $(STAMP)
	$(PY) -m deep pretrain --benchmark fmnist-c --out $(WEIGHTS)/fmnist-resnet26.pt
	$(PY) -m deep pretrain --benchmark fmnist-breeds --out $(WEIGHTS)/fmnist-breeds-resnet26.pt
	$(PY) -m deep pretrain --benchmark fmnist-spurious --out $(WEIGHTS)/fmnist-spurious-resnet26.pt

# The Fashion-MNIST suite under its converged protocol (figures/fmnist-v2/; about 85
# minutes on 2 cores; docs/fmnist.md "Protocol and why"; the older 4-epoch table stays in figures/fmnist/)
# and its smoke version (runs/fmnist-quick/; numbers meaningless). Both resume. The
# committed rows ran on the CPU: --device cpu keeps a GPU machine from mixing in its own.
deep: $(STAMP)
	$(PY) -m deep bench fmnist --device cpu

deep-quick: $(STAMP)
	$(PY) -m deep bench fmnist --quick

# Speed benchmarks: the batched simulator vs a per-run loop, and the surgical
# sweep engine vs a reference-style loop. Each prints its ratio on its last line.
speed: $(STAMP)
	$(PY) -m sims.speed
	$(PY) -m deep.speed --count-work

# The GPU path measured on this machine's GPU, one table (docs/distributed.md): a sweep
# of every method (also under --amp), deep.speed and sims.speed on cuda, and Ray sweeps
# at 1 and 0.25 GPU per task group where Ray is installed. Each step is a row, whatever
# fails; the whole run keeps within --budget-s (540 s). It builds no venv and needs no
# network: GPU_PYTHON is the venv's python if .venv exists, else python3. On a machine
# whose python has CUDA torch already: `make gpu-check GPU_PYTHON=python3
# GPU_CHECK_ARGS="--out gpu-check.md"`, or just `python3 scripts/gpu_check.py --out gpu-check.md`.
GPU_PYTHON ?= $(if $(wildcard $(PY)),$(PY),python3)
GPU_CHECK_ARGS ?=
gpu-check:
	$(GPU_PYTHON) scripts/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
