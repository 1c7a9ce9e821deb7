"""Giving modules another class for a while: how macft changes a layer's call without renaming its weights."""

import contextlib


@contextlib.contextmanager
def swapped_classes(modules, new_class):
    """Give each module `new_class(type(module))` for the duration, then its own class back.

    Python finds __call__ on the class, so a subclass changes what a layer does while its
    parameters keep their names (wrapping it in another module would rename them).
    """
    originals = [(m, type(m)) for m in modules]
    for m, cls in originals:
        m.__class__ = new_class(cls)
    try:
        yield
    finally:
        for m, cls in originals:
            m.__class__ = cls
