"""doit entry point.  All logic lives in the hypersolid package."""
from hypersolid.tasks import (  # noqa: F401  (doit collects task_* names)
    doit_config, task_boot, task_bootfiles, task_bootstrap, task_configure, task_disk, task_initramfs,
    task_resolve, task_rootfs, task_sbom, task_squashfs)

DOIT_CONFIG = doit_config(default_target="qemu-amd64")
