"""mskd_tf: MS-KD model compression (multi-criteria pruning, model selection,
knowledge distillation, TFLite export) for Keras 3."""

import re
from pathlib import Path

from setuptools import find_packages, setup

VERSION = re.search(r'__version__ = "([^"]+)"', Path("mskd_tf/__init__.py").read_text()).group(1)

# The working set pinned and tested together on the project's machine:
# tf-keras needs the full tensorflow wheel; tfmot 0.8.1 needs absl-py 1.x;
# tensorflow-datasets 4.9.10 on Python 3.11 needs importlib_resources.
INSTALL_REQUIRES = [
    "tensorflow==2.21.0",
    "keras>=3.15,<3.16",
    "tf-keras==2.21.0",
    "tensorflow-model-optimization==0.8.1",
    "tensorflow-datasets==4.9.10",
    "importlib_resources",
    "ai-edge-litert==2.3.0",
    "tflite-micro==0.dev20261023182759",
    "absl-py>=1.0,<2",
    "matplotlib",
    "tensorboard",  # TF 2.21 no longer pulls it in; the TensorBoard callback needs it
    "numpy",
]

setup(
    name="mskd_tf",
    version=VERSION,
    description=__doc__,
    # The deployment-kit templates (MCU main.cc, Android Classifier.kt, their READMEs) live in the top-level
    # export/ folder and ship inside the package as mskd_tf.export_templates, so a wheel writes whole kits.
    packages=find_packages(include=["mskd_tf", "mskd_tf.*"]) + ["mskd_tf.export_templates"],
    package_dir={"mskd_tf.export_templates": "export"},
    package_data={"mskd_tf.export_templates": ["micro/*", "android/*"]},
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": ["pytest>=8"], "bench": ["torch==2.13.0"]},
    entry_points={"console_scripts": ["mskd-tf=mskd_tf.run:console_main"]},
)
