.PHONY: run test lint format bench worker

# Install the runtime dependencies (in .venv) and serve the API (HOST, PORT, RELOAD, WORKERS).
run:
	@bash scripts/venv.sh requirements.txt
	.venv/bin/python run.py

# A reply worker as a process of its own (Redis store; REDIS_URL as for the API).
worker:
	@bash scripts/venv.sh requirements.txt
	.venv/bin/python run.py worker

# Install the dev dependencies, make sure Redis is up for the tests, run the whole suite.
test:
	@bash scripts/test.sh

lint:
	@bash scripts/venv.sh requirements-dev.txt
	.venv/bin/ruff check src tests bench testkit *.py
	.venv/bin/ruff format --check src tests bench testkit *.py
	.venv/bin/mypy

format:
	.venv/bin/ruff format src tests bench testkit
	.venv/bin/ruff check --fix src tests bench testkit

bench:
	@bash scripts/venv.sh requirements-dev.txt
	PYTHONPATH=src .venv/bin/python -m bench
