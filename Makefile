# `make test` and `make demo` create the environment on first use, then run.
VENV   ?= .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: env test demo benchmark-synthetic zoo-latency zoo-synthetic clean-runs gpu-check gpu-wheels

env: $(STAMP)

$(STAMP): requirements.txt requirements-ci.txt
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -r requirements-ci.txt
	touch $(STAMP)

test: $(STAMP)
	$(PYTHON) -m pytest -q --durations=30 tests

# The synthetic demo: generate the two domains (first use), train BiSeNet-R18 source-only and the oracle
# (the same network trained on the labelled target) side by side, one torch thread each (on 2 cores that is
# faster than one after the other with two threads each, docs/results/log.md), then score both on the
# target's val split and print the time since `make` started (the install included when it ran).
# 300 of the benchmark's 500 steps, so that a fresh clone (install included) stays within 10 minutes on the slower
# 2-core machines; `make demo DEMO_ITERS=500` trains exactly the benchmark's source-only and oracle rows.
DEMO_RUNS := runs/demo
DEMO_ITERS ?= 300
DEMO_START := $(shell date +%s)

demo: $(STAMP)
	@mkdir -p $(DEMO_RUNS)
	@echo "demo: training source-only and oracle in parallel (logs: $(DEMO_RUNS)/gta5_bisenet.log, $(DEMO_RUNS)/oracle_bisenet.log)"
	@OMP_NUM_THREADS=1 $(PYTHON) train.py --config configs/synthetic/gta5_bisenet.yaml --work-dir $(DEMO_RUNS) train.iters=$(DEMO_ITERS) \
	  > $(DEMO_RUNS)/gta5_bisenet.log 2>&1 & src=$$!; \
	OMP_NUM_THREADS=1 $(PYTHON) train.py --config configs/synthetic/oracle_bisenet.yaml --work-dir $(DEMO_RUNS) train.iters=$(DEMO_ITERS) \
	  > $(DEMO_RUNS)/oracle_bisenet.log 2>&1 & ora=$$!; \
	wait $$src || { tail -n 20 $(DEMO_RUNS)/gta5_bisenet.log; exit 1; }; \
	wait $$ora || { tail -n 20 $(DEMO_RUNS)/oracle_bisenet.log; exit 1; }
	$(PYTHON) eval.py --config configs/synthetic/oracle_bisenet.yaml --each --checkpoint \
	  $$(ls -d $(DEMO_RUNS)/gta5_bisenet/*/ | tail -n 1)best.pt $$(ls -d $(DEMO_RUNS)/oracle_bisenet/*/ | tail -n 1)best.pt
	@echo "demo: $$(( $$(date +%s) - $(DEMO_START) )) s since make started"

# Every adaptation method against source-only and the oracle on the synthetic domains, three seeds (resumable:
# finished runs are reused, an interrupted one carries on from its last.pt), at the configs' 128x64 and 500
# steps; the table lands in runs/benchmark_adaptation/table.md (docs/results/synthetic.md quotes it). Every row
# starts from one backbone pretrained on randomised scenes (BENCH_PRETRAINED: made once by
# `benchmark.py pretrain-synthetic`), what ImageNet weights are to the protocol's rows; delete the file to
# pretrain it again. BENCH_JOBS trainings side by side, the cores shared out between them.
BENCH_ROOT := data/synthetic_benchmark_adaptation
BENCH_JOBS ?= 2
# Named by its recipe, so that a file made by an older recipe is not reused.
BENCH_PRETRAINED := runs/synthetic_pretrained/resnet18_randomised_2400steps.pt

$(BENCH_PRETRAINED): | $(STAMP)
	$(PYTHON) benchmark.py pretrain-synthetic $@

benchmark-synthetic: $(STAMP) $(BENCH_PRETRAINED)
	$(PYTHON) benchmark.py adaptation-table --work-dir runs/benchmark_adaptation --seeds 0 1 2 --ssl --jobs $(BENCH_JOBS) \
	  model.pretrained=$(BENCH_PRETRAINED) \
	  data.source.root=$(BENCH_ROOT) data.target.root=$(BENCH_ROOT) data.val.root=$(BENCH_ROOT) train.workers=0

# The real-time networks: CPU latency of every network at 512x1024 in its eager, deploy and ONNX Runtime forms,
# timed in one run (docs/benchmarks.md), then source-only, DACS and the oracle of each on the synthetic domains,
# one seed, from scratch (docs/results/synthetic.md).
zoo-latency: $(STAMP)
	mkdir -p runs && $(PYTHON) benchmark.py zoo --out runs/zoo_latency.json

zoo-synthetic: $(STAMP)
	$(PYTHON) benchmark.py zoo-table --work-dir runs/zoo_synthetic --jobs $(BENCH_JOBS) \
	  $(if $(wildcard runs/zoo_latency.json),--latency runs/zoo_latency.json) \
	  data.source.root=$(BENCH_ROOT) data.target.root=$(BENCH_ROOT) data.val.root=$(BENCH_ROOT) train.workers=0

clean-runs:
	rm -rf runs

# `make gpu-check` on a CUDA machine, with that machine's own torch (no .venv, no registry needed): every protocol
# config's step time and peak memory with amp auto, train.py on random images in the real layouts, both models'
# eager vs deploy latency, a 2-process DDP run; meant to end within 5 minutes on an H200; JSON in $(GPU_CHECK_OUT)
# (docs/benchmarks.md). Where cityscapesscripts is missing it is installed from the wheels in .whl/, which
# `make gpu-wheels` downloads on a machine that reaches PyPI. On a machine without CUDA it stops with one line.
GPU_PYTHON    ?= $(if $(wildcard $(PYTHON)),$(PYTHON),python3)
GPU_CHECK_OUT ?= runs/gpu_check.json
WHEELS        := .whl
GPU_SITE      := $(WHEELS)/site

gpu-wheels:
	$(GPU_PYTHON) -m pip download --quiet --no-deps --only-binary=:all: -d $(WHEELS) "cityscapesscripts>=2.2"

gpu-check:
	@export PYTHONPATH="$(CURDIR)/$(GPU_SITE)$${PYTHONPATH:+:$$PYTHONPATH}"; \
	if ! $(GPU_PYTHON) -c "import cityscapesscripts.helpers.labels" 2>/dev/null && ls $(WHEELS)/*.whl >/dev/null 2>&1; then \
	  $(GPU_PYTHON) -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
	    --target $(GPU_SITE) $(WHEELS)/*.whl || exit 1; \
	fi; \
	$(GPU_PYTHON) benchmark.py gpu-check --out $(GPU_CHECK_OUT)
