"""The CLI: ``python -m mskd_tf.run --flagfile=configs/quickstart.cfg`` (or ``mskd-tf``).

Only turns flags into a :class:`mskd_tf.config.Config` and calls the stage
runner. Bad flags, data or models print one line ``mskd-tf: error: ...`` with
no traceback and exit with code 2.
"""

from __future__ import annotations

import os
import re
import sys
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# oneDNN kernels: off by default on some AVX2 CPUs, 2-4x faster training when on (BENCHMARKS.md).
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

from absl import app, flags, logging  # noqa: E402

from mskd_tf import native_logs  # noqa: E402
from mskd_tf.config import config_from_flags, define_flags  # noqa: E402
from mskd_tf.errors import MskdError  # noqa: E402

define_flags()
# Not a Config field: it changes what the terminal shows, never a result.
flags.DEFINE_bool("verbose", False, "Also show TensorFlow's and LiteRT's native log lines (the CUDA probe on a CPU "
                  "machine, the oneDNN notice, the converter's settings), which are hidden by default.")
EXIT_USAGE = 2


def _fail(message: str) -> None:
    print(f"mskd-tf: error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USAGE)


def _parse_flags(argv):
    try:
        return flags.FLAGS(argv)
    except flags.CantOpenFlagFileError as exc:
        # absl's text is "ERROR:: Unable to open flagfile: [Errno 2] No such file or directory: 'x.cfg'".
        found = re.search(r"\[Errno \d+\] (?P<why>[^:]+): '(?P<path>.*)'", str(exc))
        if found:
            _fail(f"cannot open flagfile {found['path']} ({found['why'].lower()}); check the --flagfile path.")
        _fail(f"cannot open a flagfile ({str(exc).split('flagfile:', 1)[-1].strip()}); check the --flagfile path.")
    except flags.Error as exc:
        _fail(f"{exc}. See --helpfull for every flag.")


def main(argv):
    logging.set_verbosity(logging.WARNING)  # TF's SavedModel export logs every asset at INFO
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}; every setting is a --flag (see --helpfull).")
    native_logs.set_verbose(flags.FLAGS.verbose)
    with native_logs.filtered_stderr():  # TF's import and device probe print their notices here
        import tensorflow as tf

        tf.config.list_physical_devices()
    try:
        with warnings.catch_warnings(record=True) as renamed:  # a user's old flag names: one line each
            warnings.simplefilter("always", DeprecationWarning)
            cfg = config_from_flags()
        for warning in renamed:
            print(f"mskd-tf: warning: {warning.message}", file=sys.stderr, flush=True)
        micro_warning = cfg.check_micro(explicit=False)
        if micro_warning:
            print(f"mskd-tf: warning: {micro_warning}", file=sys.stderr, flush=True)
        from mskd_tf.api import run_pipeline

        run_pipeline(cfg)
    except MskdError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        print("\nmskd-tf: interrupted; finished stages are kept, rerun the same command to resume.", file=sys.stderr)
        sys.exit(130)
    print(f"\nworkdir: {cfg.workdir}" + (" (front.md: one student per --targets item)" if cfg.targets else ""))
    return 0


def console_main():
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    console_main()
