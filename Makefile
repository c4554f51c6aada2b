# The two commands of the README. Each makes the virtual environment it needs (.venv) on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint clean bench-throughput bench-feature-cache bench-memory

$(BIN)/autoft: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[demo,dev]"
	touch $@

# A real search: ImageNet EfficientNet-Lite0 fine-tuned on scikit-learn's digits, offline, ~8 min on 2 cores.
demo: $(BIN)/autoft
	$(BIN)/python examples/demo.py

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

bench-feature-cache: $(BIN)/autoft
	$(BIN)/python benchmarks/feature_cache.py

bench-memory: $(BIN)/autoft
	$(BIN)/python benchmarks/memory.py

clean:
	rm -rf $(VENV) runs demo_data
