# Two commands on a fresh machine: `make demo` and `make test`. Each sets up .venv first when it is missing.
# `make lab` opens the notebooks in JupyterLab.

PYTHON_SYSTEM ?= python3
VENV          := .venv
PYTHON        := $(VENV)/bin/python
# Reinstall when the project's dependencies change.
INSTALLED     := $(VENV)/.installed
# An IPython profile that turns off coloured tracebacks, so a failing notebook reads cleanly in CI logs.
IPYTHONDIR_NB := $(VENV)/ipython

.PHONY: demo test lab setup clean-venv

setup: $(INSTALLED)

$(INSTALLED): pyproject.toml
	@# A venv without pip is one whose creation failed half way (Debian/Ubuntu without python3-venv): made afresh.
	test -x $(VENV)/bin/pip || { rm -rf $(VENV) && $(PYTHON_SYSTEM) -m venv $(VENV); }
	$(PYTHON) -m pip install --quiet -e ".[dev]"
	mkdir -p $(IPYTHONDIR_NB)/profile_default
	echo 'c.InteractiveShell.colors = "nocolor"' > $(IPYTHONDIR_NB)/profile_default/ipython_kernel_config.py
	touch $(INSTALLED)

# Train a small ViT on the shipped Fashion-MNIST sample (on the GPU when there is one).
demo: $(INSTALLED)
	$(PYTHON) -m vit_helpers train --data sample --recipe demo --out runs/demo

# Unit tests, then every notebook top to bottom with nbmake (plain tracebacks).
test: $(INSTALLED)
	$(PYTHON) -m pytest tests
	IPYTHONDIR=$(IPYTHONDIR_NB) $(PYTHON) -m pytest --nbmake --nbmake-timeout=600 --durations=0 notebooks

lab: $(INSTALLED)
	$(VENV)/bin/jupyter lab notebooks

clean-venv:
	rm -rf $(VENV)
