# Two entry points for a fresh machine (see README.md).
RELEASE ?= 0.5.11

.PHONY: demo serve-demo test envs compat

envs:
	bash scripts/envs.sh

# Install, then show what sgl-accel would do against a real installed sglang release.
demo: envs
	.venv/bin/sgl-accel list
	PYTHONPATH=.envs/sglang-$(RELEASE) .venv/bin/sgl-accel status
	PYTHONPATH=.envs/sglang-$(RELEASE) .venv/bin/sgl-accel status --hardware ascend
	.venv/bin/sgl-accel plan --sglang $(RELEASE) --hardware ascend
	.venv/bin/sgl-accel pin --hardware ascend

# A live sglang server on this CPU with SGL_ACCEL=1: tiny Llama, random weights, the
# sgl-accel lines of each sglang process, one answer; serves until Ctrl-C (ONCE=1: stops).
serve-demo: envs
	.venv/bin/python -m sgl_accel.testing.server --release $(RELEASE) $(if $(HARDWARE),--hardware $(HARDWARE)) $(if $(ONCE),--once)

# Refresh compat/matrix.json and the README table from every release wheel on PyPI.
compat: envs
	.venv/bin/python -m sgl_accel.compat.scanner

# Install, then run the whole suite against every test release.
test:
	bash scripts/run-tests.sh
