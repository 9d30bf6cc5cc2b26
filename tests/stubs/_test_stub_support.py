"""TEST STUB helper shared by the stub packages beside it (torchvision, timm): the error they raise for anything
they do not implement. Not a package of its own on purpose: it lives next to them on the path."""


def missing(package: str, name: str) -> NotImplementedError:
    return NotImplementedError(
        f"TEST STUB {package} (tests/stubs/{package}) does not implement {name!r}; install the real {package} "
        f"to use it")


def module_getattr(package: str, module: str):
    """A module ``__getattr__``: names the stub lacks raise NotImplementedError naming the stub. Private and dunder
    names stay AttributeError so that ``hasattr``-style probes (pickle, inspect, pytest) keep working."""

    def __getattr__(name: str):
        if name.startswith("_"):
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        raise missing(package, f"{module}.{name}")

    return __getattr__
