# Two commands a newcomer needs:  `make run`  and  `make test`.
PY ?= python3
TORCH ?= torch==2.13.0
MODEL ?= OpenGVLab/InternVL3-1B
IMAGE ?= weights/$(subst /,--,$(MODEL))/examples/image1.jpg
ARGS ?= --verbose

.PHONY: setup setup-test run test bench bench-smoke train-bench train-bench-smoke train-gpu table readme

setup:  ## runtime dependencies only (pin torch first: an unpinned torch may pull a CUDA build)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e .

setup-test:  ## + the test-only references (transformers, sentencepiece)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test]"

run: setup  ## download $(MODEL) into weights/ (once) and describe $(IMAGE)
	$(PY) -m nanovl.generate --model $(MODEL) --image $(IMAGE) $(ARGS)

test: setup-test
	$(PY) -m pytest

bench: setup-test  ## nanovl vs transformers at the real sizes, with the machine's limits -> benchmarks/results.md (~25 min)
	$(PY) benchmarks/bench.py

bench-smoke: setup-test  ## the same script on a tiny checkpoint, seconds (CI runs it in tests/test_bench_smoke.py)
	$(PY) benchmarks/bench.py --smoke --cache /tmp/nanovl-bench-smoke --out /tmp/nanovl-bench-smoke/results.md

train-bench: setup-test  ## nanovl's training step vs transformers + peft at InternVL3-1B size -> benchmarks/train_results.md (~20 min on 2 AMX cores, ~1 h without AMX)
	$(PY) benchmarks/train_bench.py

train-bench-smoke: setup-test  ## the same script and benchmarks/train_gpu.py on a tiny checkpoint, seconds (CI: tests/test_train_bench_smoke.py)
	$(PY) benchmarks/train_bench.py --smoke --cache /tmp/nanovl-train-bench-smoke --out /tmp/nanovl-train-bench-smoke/train_results.md
	$(PY) benchmarks/train_gpu.py --smoke --cache /tmp/nanovl-train-bench-smoke --out /tmp/nanovl-train-bench-smoke/train_gpu_results.md

train-gpu: setup-test  ## the training step on a CUDA GPU -> benchmarks/train_gpu_results.md (a few minutes on one H200)
	$(PY) benchmarks/train_gpu.py

readme:  ## regenerate every README block that holds numbers (layout, parity, speed, supported checkpoints)
	$(PY) scripts/readme.py
	$(PY) scripts/support_table.py --write README.md

table:  ## regenerate the supported-checkpoints table in README.md
	$(PY) scripts/support_table.py --write README.md
