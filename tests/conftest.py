"""Test set-up shared by every module.

XLA reads XLA_FLAGS once, when jax is first imported, so the 8 fake CPU devices that the
sharding tests need must be requested here, before any test module imports jax.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
# Keep tfds quiet and offline: it must never try to reach GCS for dataset metadata.
os.environ.setdefault("TFDS_DISABLE_GCS", "1")
os.environ.setdefault("NO_GCE_CHECK", "true")
