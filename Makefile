# Two entry points for a fresh machine (see README.md).
RELEASE ?= 0.5.11

.PHONY: demo test envs compat

envs:
	bash scripts/envs.sh

# Install, then show what sgl-accel would do against a real installed sglang release.
demo: envs
	.venv/bin/sgl-accel list
	PYTHONPATH=.envs/sglang-$(RELEASE) .venv/bin/sgl-accel status
	PYTHONPATH=.envs/sglang-$(RELEASE) .venv/bin/sgl-accel status --hardware ascend

# Install, then run the whole suite against every test release.
test:
	bash scripts/run-tests.sh
