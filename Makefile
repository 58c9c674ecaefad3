# Two commands a newcomer needs:  `make run`  and  `make test`.
PY ?= python3
TORCH ?= torch==2.13.0
MODEL ?= OpenGVLab/InternVL3-1B
IMAGE ?= weights/$(notdir $(MODEL))/examples/image1.jpg
ARGS ?= --verbose

.PHONY: setup setup-test run test bench bench-smoke table

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

table:  ## regenerate the supported-checkpoints table in README.md
	$(PY) scripts/support_table.py --write README.md
