"""Input validation shared by jret's public functions.

Shape, rank and dtype checks read only static information, so they run at trace time and hold
under ``jit``. Value checks (NaN/inf, out-of-range ids) need concrete arrays: they run in the
non-jitted entry points, are skipped silently on tracers, and every entry point that calls them
takes ``validate=True`` so they can be switched off for speed.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(x) -> bool:
    """True when ``x`` holds values (numpy, a committed jax array), False for a tracer."""
    return not isinstance(x, jax.core.Tracer)


def check_ndim(x, name: str, ndims: Sequence[int], layout: str = "") -> None:
    """Raise ``ValueError`` unless ``x.ndim`` is one of ``ndims``; ``layout`` describes them."""
    ndim = np.ndim(x)
    if ndim not in tuple(ndims):
        want = layout or " or ".join(f"{d}-D" for d in ndims)
        raise ValueError(f"{name}: expected {want}, got an array of shape {np.shape(x)}")


def check_floating(x, name: str) -> None:
    """Raise ``ValueError`` unless ``x`` has a floating dtype."""
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise ValueError(f"{name}: expected a floating dtype, got {jnp.result_type(x)}")


def check_integer(x, name: str) -> None:
    """Raise ``ValueError`` unless ``x`` has an integer dtype."""
    if not jnp.issubdtype(jnp.result_type(x), jnp.integer):
        raise ValueError(f"{name}: expected an integer dtype, got {jnp.result_type(x)}")


def check_same_dim(a, b, name_a: str, name_b: str, axis: int = -1) -> None:
    """Raise ``ValueError`` unless ``a`` and ``b`` agree along ``axis``."""
    if np.shape(a)[axis] != np.shape(b)[axis]:
        raise ValueError(
            f"{name_a} and {name_b}: dimension mismatch along axis {axis}, "
            f"{np.shape(a)} vs {np.shape(b)}"
        )


def check_nonempty(x, name: str, axis: int = 0) -> None:
    """Raise ``ValueError`` when ``x`` has no entries along ``axis``."""
    if np.shape(x)[axis] == 0:
        raise ValueError(
            f"{name}: expected at least one entry along axis {axis}, got shape {np.shape(x)}"
        )


def check_finite(x, name: str) -> None:
    """Raise ``ValueError`` if a concrete ``x`` holds NaN or inf (no-op on tracers)."""
    if not is_concrete(x):
        return
    arr = np.asarray(x)
    if jnp.issubdtype(arr.dtype, jnp.floating) and not np.isfinite(arr).all():
        n_bad = int((~np.isfinite(arr)).sum())
        raise ValueError(f"{name}: contains {n_bad} NaN/inf value(s)")


def check_positive_int(value, name: str) -> int:
    """Return ``value`` as an int, raising ``ValueError`` unless it is a positive integer."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return int(value)
