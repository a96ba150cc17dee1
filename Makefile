# Every target does its own setup: `make parity` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# On these machines torch==2.13.0 resolves to the CPU build on local disk; installing it first
# keeps pip from pulling a multi-GB CUDA build for the `torch>=2.4` requirement.
TORCH_SPEC ?= torch==2.13.0
# The second reference version the parity tests run against (transformers 4.57 layout).
VENV457 ?= .venv-457
PY457 := $(VENV457)/bin/python
# The peers venv for `make compat`: timm and open_clip need torchvision, which installs beside
# torch 2.14.1 (a CUDA build of several GB that runs on the CPU here), not beside 2.13.0.
VENVC ?= .venv-compat
PYC := $(VENVC)/bin/python
COMPAT_TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# The other runtimes' venv for `make runtimes`: keras-hub (JAX and torch backends) and mlx-vlm (MLX's CPU build),
# pinned to the versions measured in docs/PARITY.md; the adapters in examples/ run in it as separate processes.
VENVR ?= .venv-runtimes
PYR := $(VENVR)/bin/python
RUNTIMES_SPEC ?= "jax[cpu]==0.10.2" keras-hub==0.32.0 keras==3.15.1 "mlx[cpu]==0.32.4" mlx-vlm==0.7.10 safetensors
PIP_FLAGS ?= -q --disable-pip-version-check
# `make test` and `make test-457` run their files on this many pytest-xdist workers, one compute thread each
# (tests/conftest.py): on 2 cores 6 min against 9.5 for one process. PYTEST_WORKERS=0 runs them in one process.
PYTEST_WORKERS ?= 2
XDIST := -n $(PYTEST_WORKERS) --dist loadfile

.PHONY: install install-457 install-compat install-runtimes runtimes test test-repeat test-457 test-slow lint format parity parity-quick bench bench-quick compat fuzz clean

install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_FLAGS) "$(TORCH_SPEC)"
	$(PY) -m pip install $(PIP_FLAGS) -e ".[dev]"
	touch $@

install-457: $(VENV457)/.installed
$(VENV457)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV457)
	$(PY457) -m pip install $(PIP_FLAGS) "$(TORCH_SPEC)"
	$(PY457) -m pip install $(PIP_FLAGS) -e . "transformers==4.57.6" "pytest>=8" "pytest-xdist>=3.5" "hypothesis>=6.100" "matplotlib>=3.7" "onnxruntime>=1.17" "onnx>=1.15" "onnxscript>=0.5" "optimum-onnx==0.1.0"
	touch $@

## test: the fast suite (tiny and base configs) against the installed transformers 5.x
test: install
	SIGLIP_REQUIRE_TRANSFORMERS=1 $(PY) -m pytest -q $(XDIST)

## test-repeat: `make test` N times in a row (default 20), a line per run, stopping at the first failure (flakiness)
N ?= 20
test-repeat: install
	@for i in $$(seq 1 $(N)); do \
		start=$$(date +%s); \
		if ! $(MAKE) --no-print-directory test > .test-repeat.log 2>&1; then \
			cat .test-repeat.log; echo "run $$i of $(N): FAILED (log above)"; exit 1; fi; \
		echo "run $$i of $(N): green in $$(( $$(date +%s) - start )) s, $$(tail -1 .test-repeat.log)"; \
	done

# What differs under transformers 4.57.6 / huggingface_hub 0.x: the reference's layout and arithmetic, what its
# save_pretrained writes (plain, VLM, SigLIP 2), its processors and ONNX exports, the hub client, and the
# version-stamped exports. The judging logic (trust, diagnosis, inference, ports, batches, regime) does not
# depend on the version and runs once, in `make test`.
VERSIONED_TESTS := tests/test_model_vs_transformers.py tests/test_convert.py tests/test_vlm.py tests/test_naflex.py \
	tests/test_weights.py tests/test_verify.py tests/test_hub_faults.py tests/test_processor.py \
	tests/test_preprocess.py tests/test_onnx.py tests/test_parity.py tests/test_activations.py tests/test_errors.py \
	tests/test_image_features.py

## test-457: the tests of what differs between transformers versions, again under 4.57.6 / huggingface_hub 0.x
test-457: install-457
	SIGLIP_REQUIRE_TRANSFORMERS=1 SIGLIP_REQUIRE_OPTIMUM=1 $(PY457) -m pytest -q $(XDIST) -m "(transformers or hub) and not slow" $(VERSIONED_TESTS)

## test-slow: full-size presets (so400m) and other minutes-long tests
test-slow: install
	SIGLIP_REQUIRE_TRANSFORMERS=1 $(PY) -m pytest -q -m slow

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: install
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

## parity: the parity suite (base-224 and so400m-384; real weights if in the HF cache, else synthetic)
parity: install
	HF_HUB_OFFLINE=1 $(PY) -m siglip_scratch.parity.suite

## parity-quick: a first look in seconds (base-224, one float32 comparison, its golden fingerprint)
parity-quick: install
	HF_HUB_OFFLINE=1 $(PY) -m siglip_scratch.parity.suite --quick --out parity-report-quick

## bench: the full benchmark (~20 min on 2 cores): tables on stdout, bench-results/bench.{json,md}
bench: install
	$(PY) -m siglip_scratch.bench --out bench-results

## bench-quick: the same on a tiny config in seconds (what CI runs as a smoke test)
bench-quick: install
	$(PY) -m siglip_scratch.bench --quick --out bench-results/quick

## compat: the converter against timm's and open_clip's own forward, the fast processor against
## transformers' torchvision one; in its own venv (torchvision has no build beside torch 2.13.0 CPU)
compat: install-compat
	SIGLIP_REQUIRE_COMPAT=1 SIGLIP_REQUIRE_TRANSFORMERS=1 $(PYC) -m pytest -q -m compat

install-compat: $(VENVC)/.installed
$(VENVC)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENVC)
	$(PYC) -m pip install $(PIP_FLAGS) $(COMPAT_TORCH_SPEC)
	$(PYC) -m pip install $(PIP_FLAGS) timm open_clip_torch -e ".[dev]"
	touch $@

## runtimes: keras-hub (JAX, torch) and mlx-vlm towers judged through examples/ adapters, in their own venv
runtimes: install install-runtimes
	SIGLIP_RUNTIMES_PYTHON=$(PYR) SIGLIP_REQUIRE_RUNTIMES=1 SIGLIP_REQUIRE_TRANSFORMERS=1 $(PY) -m pytest -q -m runtimes tests/test_runtimes.py

install-runtimes: $(VENVR)/.installed
$(VENVR)/.installed: Makefile
	$(PYTHON) -m venv $(VENVR)
	$(PYR) -m pip install $(PIP_FLAGS) $(TORCH_SPEC)
	$(PYR) -m pip install $(PIP_FLAGS) $(RUNTIMES_SPEC)
	touch $@

## fuzz: a longer property-based fuzzing campaign over every reader (hypothesis "fuzz" profile)
fuzz: install
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -q tests/test_fuzz.py --hypothesis-show-statistics

clean:
	rm -rf $(VENV) $(VENV457) $(VENVC) $(VENVR) .pytest_cache .ruff_cache build src/*.egg-info
