import os

# Quiet TF and keep tests on the CPU, deterministic where TF allows.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds (deselect with -m 'not slow')")
    # Keras 3.15 turns its variables into arrays with np.array(x); NumPy 2 first asks __array__ for copy=False, which
    # KerasVariable.__array__ does not take, and warns before it retries without it (keras/src/backend/tensorflow/
    # core.py). Thousands per run from inside Keras, same values either way: nothing of ours to fix.
    config.addinivalue_line("filterwarnings", "ignore:__array__ implementation doesn't accept a copy keyword"
                                              ":DeprecationWarning")
