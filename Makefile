# Shortcuts for ./run.sh (which needs only Python 3.11+ and bash).
demo:
	./run.sh demo
install:
	./run.sh install
test:
	./run.sh test
test-fast:
	./run.sh test-fast
docs:
	./run.sh docs
wheel-check:
	./run.sh wheel-check
reproduce:
	./run.sh install && .venv/bin/python benchmarks/reproduce.py --seeds 3
.PHONY: demo install test test-fast docs wheel-check reproduce
