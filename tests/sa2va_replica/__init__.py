"""Sa2VA checkpoint folders built from a replica of the public remote code (random weights; real checkpoints
cannot be downloaded here). See :func:`sa2va_replica.build.build_replica`."""

from .build import REMOTE_CODE, SHAPES, build_replica

__all__ = ["REMOTE_CODE", "SHAPES", "build_replica"]
