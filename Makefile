# Shortcuts for ./run.sh (which needs only Python 3.11+ and bash).
demo:
	./run.sh demo
test:
	./run.sh test
docs:
	./run.sh docs
wheel-check:
	./run.sh wheel-check
reproduce:
	./run.sh install && .venv/bin/python benchmarks/reproduce.py --seeds 3
.PHONY: demo test docs wheel-check reproduce
