# The two commands of the README: `make run` and `make test`. Both set up everything
# they need on a fresh machine (virtual environment, package, offline data) first.
VENV ?= .venv
PY := $(VENV)/bin/python
FLAGFILE ?= configs/quickstart.cfg
PYTEST_ARGS ?= -m "not slow"

.PHONY: setup data run test test-all wheel-check bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# Fashion-MNIST, the offline default data, comes from Debian. Without apt (or root)
# the code falls back to keras.datasets, which downloads.
data:
	@if [ -d /usr/share/datasets/fashion-mnist ]; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; \
	else echo "note: no Debian Fashion-MNIST; keras.datasets will download it"; fi

run: setup data
	$(PY) -m mskd_tf.run --flagfile=$(FLAGFILE)

test: setup data
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

test-all: PYTEST_ARGS =
test-all: test

# A wheel, installed into a clean venv outside the checkout, must write whole deployment kits. The
# dependencies (TensorFlow & co., ~1 GB) are borrowed from $(VENV) by a plain path line in a .pth file,
# so nothing is downloaded twice and $(VENV)'s editable mskd_tf stays out of sight.
WHEEL_DIR ?= /tmp/mskd_tf_wheel_check
wheel-check: setup
	rm -rf $(WHEEL_DIR) && mkdir -p $(WHEEL_DIR)
	$(PY) -m pip wheel -q --no-deps --no-build-isolation -w $(WHEEL_DIR)/dist .
	python3 -m venv $(WHEEL_DIR)/venv
	$(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > \
		"$$($(WHEEL_DIR)/venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/mskd_deps.pth"
	$(WHEEL_DIR)/venv/bin/python -m pip install -q --no-deps $(WHEEL_DIR)/dist/*.whl
	cd $(WHEEL_DIR) && venv/bin/python $(CURDIR)/tools/wheel_check.py

clean:
	rm -rf $(VENV) runs *.egg-info
