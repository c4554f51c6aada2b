# The two commands of the README. Each makes the virtual environment it needs (.venv) on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint clean

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
	$(BIN)/ruff check src tests examples
	$(BIN)/ruff format --check src tests examples
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs demo_data
