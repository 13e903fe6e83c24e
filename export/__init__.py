"""Deployment-kit templates (MCU and Android), shipped inside the package as ``mskd_tf.export_templates``.

setup.py maps this folder to that package name; ``mskd_tf.deploy`` copies ``micro/*`` and ``android/*`` into
the kits it writes. Nothing here is imported as code.
"""
