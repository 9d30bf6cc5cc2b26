"""A small structural replica of a Hugging Face Sa2VA checkpoint, built by the tests (real weights cannot be
downloaded here). See :func:`sa2va_replica.build.build_replica`."""

from .build import REMOTE_CODE, build_replica

__all__ = ["REMOTE_CODE", "build_replica"]
