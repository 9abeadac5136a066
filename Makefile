# edgetl: `make demo` and `make test` do all set-up (virtual environment, install) on a fresh machine, offline
# except for the package registry.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
SHARED ?= ../shared
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-16)
DEMO_WEIGHTS := $(SHARED)/weights/weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5
PYTEST_ARGS ?=
# two pytest-xdist workers, a test file each at a time (module fixtures are built once); TEST_WORKERS=0: one process
TEST_WORKERS ?= 2
XDIST := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

.PHONY: install demo test test-slow test-all lint bench bench-fidelity bench-fidelity-scratch clean device-test-arm64

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@rm -f $(VENV)/.installed-*
	@touch $@

install: $(STAMP)

demo: install
	@if [ -f "$(DEMO_WEIGHTS)" ]; then \
	  echo "demo: using local ImageNet weights for MobileNetV3-Small from $(SHARED)/weights"; \
	  EDGETL_WEIGHTS_DIR="$(SHARED)/weights" $(BIN)/edgetl run recipes/quickstart.yaml --force; \
	else \
	  echo "demo: no local ImageNet weights ($(DEMO_WEIGHTS) is absent): training from scratch (weights: none, random initialisation)"; \
	  $(BIN)/edgetl run recipes/quickstart.yaml --force --set finetune.weights=none; \
	fi

# make test: lint + every test not marked slow (the CI suite, ~20 min on 2 cores). make test-slow: the slow ones
# (more backbones, real-photo end-to-end runs); make test-all: both.
test: install lint
	EDGETL_SHARED="$(abspath $(SHARED))" $(BIN)/python -m pytest -m "not slow" $(XDIST) $(PYTEST_ARGS)

test-slow: install
	EDGETL_SHARED="$(abspath $(SHARED))" $(BIN)/python -m pytest -m slow $(XDIST) $(PYTEST_ARGS)

test-all: install lint
	EDGETL_SHARED="$(abspath $(SHARED))" $(BIN)/python -m pytest $(XDIST) $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check edgetl tests benchmarks devices
	$(BIN)/ruff format --check edgetl tests benchmarks devices

# make bench: the product backbones (export_latency took 4 min here, qat_accuracy ~10 min of CPU); the big comparison
# rows (ResNet50, VGG16, EfficientNet-B7: hours) are
# `benchmarks/export_latency.py --backbones resnet50 vgg16 efficientnet_b7 --threads 1`.
bench: install
	EDGETL_WEIGHTS_DIR="$(SHARED)/weights" $(BIN)/python benchmarks/export_latency.py \
	  --backbones mobilenet_v3_small mobilenet_v3_large efficientnet_b0
	EDGETL_WEIGHTS_DIR="$(SHARED)/weights" $(BIN)/python benchmarks/finetune_speed.py
	EDGETL_WEIGHTS_DIR="$(SHARED)/weights" $(BIN)/python benchmarks/qat_accuracy.py

# int8 fidelity (issue 12), the matrix measured for docs/qat.md: MobileNetV3-Small, trashnet and flowers, 224 px,
# 3 seeds, default QAT (6 runs, ~35 min here); the issue's full matrix adds 128 px and Large / B0 from scratch (hours).
bench-fidelity: install
	EDGETL_WEIGHTS_DIR="$(SHARED)/weights" EDGETL_SHARED_DATA="$(SHARED)/data" $(BIN)/python \
	  benchmarks/int8_fidelity.py --backbones mobilenet_v3_small --sizes 224

# MobileNetV3-Large and EfficientNet-B0 trained from scratch (no ImageNet weights here), trashnet 128 px, 3 seeds: ~2 h.
bench-fidelity-scratch: install
	EDGETL_SHARED_DATA="$(SHARED)/data" $(BIN)/python benchmarks/int8_fidelity.py \
	  --backbones mobilenet_v3_large efficientnet_b0 --datasets trashnet --sizes 128

# edgetl verify on emulated arm64 cores (Pi 4 / Pi 5 / Neoverse-N1) vs this host; root, caches under .device/ (ignored).
device-test-arm64: install
	$(BIN)/python devices/arm64/harness.py $(if $(wildcard $(DEMO_WEIGHTS)),--weights-dir $(SHARED)/weights)

clean:
	rm -rf $(VENV) .pytest_cache models/quickstart models/.cache
