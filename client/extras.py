"""What an adapter says when its framework is not installed: the pip extra that brings it.

`pip install lrpilot` is the core (pyzmq, msgpack); each adapter's framework comes with an
extra, so `import lrpilot.client.keras` on a core install names the fix instead of a bare
`No module named 'keras'`.

Example:

    try:
        import keras
    except ModuleNotFoundError as exc:
        raise missing_extra(exc, "keras", "lrpilot.client.keras") from exc
"""

from __future__ import annotations

import importlib.util

__all__ = ["missing_extra"]


def missing_extra(exc: ModuleNotFoundError, extra: str, adapter: str) -> ModuleNotFoundError:
    """The error to raise when `adapter` cannot import its framework (`exc`).

    Keras installed with JAX but without TensorFlow (`lrpilot[keras-jax]`) fails on its
    default backend: that error says to set KERAS_BACKEND=jax.

    Args:
        exc: the import's error; its module name is kept (`.name`), so code that tests
            for a missing module still can.
        extra: the distribution extra that installs the framework (`keras`, `torch`, ...).
        adapter: the module the user imported.
    """
    missing = exc.name or str(exc)
    if extra == "keras" and missing == "tensorflow" and importlib.util.find_spec("jax"):
        # Keras is there (lrpilot[keras-jax]) but runs on TensorFlow unless told otherwise.
        return ModuleNotFoundError(
            f"No module named 'tensorflow': Keras' default backend; {adapter} runs on JAX with "
            "KERAS_BACKEND=jax set before Keras is imported, or on TensorFlow with: "
            "pip install 'lrpilot[keras]'",
            name=exc.name,
        )
    return ModuleNotFoundError(
        f"No module named {missing!r}: {adapter} needs the {extra!r} extra; "
        f"install it with: pip install 'lrpilot[{extra}]'",
        name=exc.name,
    )
