"""Every exception and warning torch_crit raises, in one hierarchy.

``except torch_crit.errors.TorchCritError`` catches everything the package raises on purpose;
each class also derives from the built-in exception a caller would expect (``ValueError`` for bad
arguments, ``MemoryError`` for results that cannot fit, ...), so existing ``except ValueError``
code keeps working.

::

    TorchCritError
    ├── InvalidArgumentError (ValueError)          a bad argument, named in the message
    ├── ModelAnalysisError (ValueError)            the model's structure could not be read
    │   ├── ActivationNotFoundError
    │   └── AmbiguousActivationError
    ├── NoCriticalPointError (ValueError)          §5.3.2: the activation has no critical point
    ├── NonDifferentiableError (ValueError)        outputs do not depend differentiably on parameters
    ├── SecondDerivativeError (RuntimeError)       an op without the second derivatives the dNTK needs
    ├── SingularKernelError (ValueError)           a singular training kernel and no jitter allowed
    ├── RecursionDivergenceError (ArithmeticError) a layer recursion overflowed
    └── ResourceError (MemoryError)                a result (or tile) does not fit in memory
        └── NTKMemoryError
            └── DNTKMemoryError

    TorchCritWarning (UserWarning)
    ├── TracingFallbackWarning                     the model analysis fell back from torch.fx
    ├── GuessedActivationWarning                   an activation was guessed, not seen
    ├── UntouchedParameterWarning                  ``init_`` left parameters unchanged
    ├── NoCriticalPointWarning                     ``strict=False`` used a non-critical setting
    ├── ZeroJacobianWarning                        a parameter has an identically zero Jacobian
    ├── FallbackPathWarning                        an exact but slower path replaced a fast one
    ├── RecursionDivergenceWarning (RuntimeWarning)
    └── SingularKernelWarning (RuntimeWarning)
"""
from __future__ import annotations

from typing import Any

__all__ = [
    "TorchCritError",
    "InvalidArgumentError",
    "ModelAnalysisError",
    "ActivationNotFoundError",
    "AmbiguousActivationError",
    "NoCriticalPointError",
    "NonDifferentiableError",
    "SecondDerivativeError",
    "SingularKernelError",
    "RecursionDivergenceError",
    "ResourceError",
    "NTKMemoryError",
    "DNTKMemoryError",
    "TorchCritWarning",
    "TracingFallbackWarning",
    "GuessedActivationWarning",
    "UntouchedParameterWarning",
    "NoCriticalPointWarning",
    "ZeroJacobianWarning",
    "FallbackPathWarning",
    "RecursionDivergenceWarning",
    "SingularKernelWarning",
]


# ----------------------------------------------------------------------------------- errors
class TorchCritError(Exception):
    """Base class of every exception torch_crit raises on purpose."""


class InvalidArgumentError(TorchCritError, ValueError):
    """An argument of a public call is invalid; the message names it and says what to pass."""


class ModelAnalysisError(TorchCritError, ValueError):
    """The model's layers, activations or inputs could not be determined; the message says how to help."""


class ActivationNotFoundError(ModelAnalysisError):
    """An operation between two layers could not be identified as an activation."""


class AmbiguousActivationError(ModelAnalysisError):
    """Two different activations feed one layer; ``mapping`` must say which one applies."""


class NoCriticalPointError(TorchCritError, ValueError):
    r"""The activation has no critical initialization (§5.3.2 of arXiv:2106.10165).

    Attributes:
        activation: the activation.
        reason: why, following the book.
        nearest: a ``CriticalPoint`` with ``universality_class = NONE``: the closest usable
            setting (:math:`C_b = 0` and :math:`\chi_\perp(K^\star) = 1` at its fixed point when
            that exists, so gradients neither explode nor vanish; the kernel still drifts since
            :math:`\chi_\parallel \ne 1`).
        suggestion: a nearby activation that has a critical point.
    """

    def __init__(self, activation: Any, reason: str, nearest: Any, suggestion: str) -> None:
        self.activation = activation
        self.reason = reason
        self.nearest = nearest
        self.suggestion = suggestion
        super().__init__(
            f"activation {activation.key!r} has no critical point: {reason} Suggestion: {suggestion} "
            f"(nearest usable setting: C_b={nearest.C_b:.6g}, C_W={nearest.C_W:.6g}; use "
            "strict=False to accept it)."
        )

    def __reduce__(self):  # picklable across processes (distributed, multiprocessing)
        return (type(self), (self.activation, self.reason, self.nearest, self.suggestion))


class NonDifferentiableError(TorchCritError, ValueError):
    """The model's outputs do not depend differentiably on (some of) its trainable parameters."""


class SecondDerivativeError(TorchCritError, RuntimeError):
    """The model has an operation without the second derivatives the dNTK needs."""


class SingularKernelError(TorchCritError, ValueError):
    """The training block of a kernel is (numerically) singular and no jitter was allowed."""


class RecursionDivergenceError(TorchCritError, ArithmeticError):
    """A layer recursion produced inf/NaN or overflowed; the message names the layer and tensor."""


class ResourceError(TorchCritError, MemoryError):
    """A result, or one tile of its computation, does not fit in the memory available."""


class NTKMemoryError(ResourceError):
    """The NTK (or one tile of it) cannot fit in the available memory."""


class DNTKMemoryError(NTKMemoryError):
    """The dNTK result (or one tile of its computation) does not fit in the memory available."""


# --------------------------------------------------------------------------------- warnings
class TorchCritWarning(UserWarning):
    """Base class of every warning torch_crit emits."""


class TracingFallbackWarning(TorchCritWarning):
    """torch.fx could not trace the model; the plan comes from another analysis (named in the message)."""


class GuessedActivationWarning(TorchCritWarning):
    """An activation was not seen by the model analysis and had to be guessed (named in the message)."""


class UntouchedParameterWarning(TorchCritWarning):
    """``init_`` left some parameters unchanged (listed in the report)."""


class NoCriticalPointWarning(TorchCritWarning):
    """``strict=False`` accepted a non-critical setting; the message gives its measured consequence."""


class ZeroJacobianWarning(TorchCritWarning):
    """A trainable parameter has an identically zero Jacobian on the probe examples."""


class FallbackPathWarning(TorchCritWarning):
    """An exact but slower computation path replaced the requested or fast one (reason in the message)."""


class RecursionDivergenceWarning(TorchCritWarning, RuntimeWarning):
    """Emitted instead of :class:`RecursionDivergenceError` when ``on_divergence="warn"``."""


class SingularKernelWarning(TorchCritWarning, RuntimeWarning):
    """A jitter was added to a numerically singular training block of a kernel."""
