.PHONY: demo test

# Set up, load the demo organization and serve on http://127.0.0.1:8000.
demo:
	./scripts/demo

# Run the test suite; pass pytest options with ARGS="-k answers".
test:
	./scripts/test $(ARGS)
