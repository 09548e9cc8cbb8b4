.PHONY: demo test bench

# Set up, load the demo organization and serve on http://127.0.0.1:8000.
demo:
	./scripts/demo

# Run the test suite; pass pytest options with ARGS="-k answers".
test:
	./scripts/test $(ARGS)

# Print the benchmark figures described in BENCHMARKS.md.
bench:
	./scripts/venv requirements-dev.txt
	.venv/bin/python bench/kms_calls.py
	.venv/bin/python bench/retrieval.py
