"""Input checks shared by the ops. Every check runs before any kernel launch and raises an error that names the
argument, what was expected and what was given. Shape/dtype checks are free (no host synchronisation); the few value
checks that must read device memory say so in their docstring."""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int32, torch.int64) + FLOAT_DTYPES


def check_tensor(name: str, x: object, *, ndim: int | None = None, dtypes=FLOAT_DTYPES) -> torch.Tensor:
    """Check that ``x`` is a tensor with ``ndim`` dimensions and one of ``dtypes``; return it."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(x.dtype).replace('torch.', '')}")
    return x


def check_same_shape(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``x.shape == ref.shape``."""
    if x.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(x.shape)}")


def check_same_device(tensors: dict[str, torch.Tensor | None]) -> None:
    """Raise ``ValueError`` when the given tensors do not all live on one device."""
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"all inputs must be on one device, got {listing}")


def check_mask(name: str, mask: object, shape_name: str, like: torch.Tensor) -> torch.Tensor:
    """Check a ``[B, T]`` mask (bool or {0, 1} numbers) that must match ``like``'s shape; return it.

    TypeError: not a tensor, or not bool/integer/float. ValueError: another shape, or a number mask holding a value
    other than 0 and 1 (0.5, 2, NaN): the kernels weight tokens by the mask, so such a mask would silently reweight
    them. The value check is one reduction over a non-bool mask and reads one flag back to the host (one device
    synchronisation); a bool mask needs none."""
    check_tensor(name, mask, dtypes=_MASK_DTYPES)
    check_same_shape(name, mask, shape_name, like)
    if mask.dtype != torch.bool and mask.numel():
        bad = (mask != 0) & (mask != 1)  # NaN compares unequal to both: rejected too
        if bool(bad.any()):
            first = int(bad.flatten().nonzero()[0, 0])
            where = tuple(int(i) for i in torch.unravel_index(torch.tensor(first), mask.shape))
            raise ValueError(f"{name} must be bool or hold only 0 and 1, got {mask.flatten()[first].item()} at "
                             f"index {where}")
    return mask


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value  # type: ignore[return-value]


def check_finite(name: str, value: object) -> float:
    """Return ``value`` as a float. TypeError unless it is a real number (bool is not); ValueError when it is NaN or
    infinite (a NaN hyper-parameter passes every ``<``/``>`` range check and then poisons the loss)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def check_positive(name: str, value: float, *, allow_zero: bool = False) -> float:
    """Raise ``ValueError`` unless ``value`` is finite and > 0 (or >= 0 with ``allow_zero``); ``TypeError`` unless it
    is a number. Returns it as a float."""
    check_finite(name, value)
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return float(value)


def check_broadcast_rows(name: str, x: object, like: torch.Tensor) -> torch.Tensor:
    """Check a per-token ``[B, T]`` or per-sequence ``[B]`` / ``[B, 1]`` tensor against ``like`` ``[B, T]``.

    Returns it as ``[B, T]`` or ``[B, 1]`` (a view, no copy) so kernels can read it with a column stride of 0."""
    check_tensor(name, x)
    B, T = like.shape
    if x.shape == (B, T) or x.shape == (B, 1):
        return x
    if x.shape == (B,):
        return x.unsqueeze(1)
    raise ValueError(f"{name} must have shape {(B, T)}, {(B,)} or {(B, 1)}, got {tuple(x.shape)}")


INDEX_DTYPES = (torch.int64, torch.int32)


def check_class_labels(name: str, labels: object, shape: torch.Size, num_classes: int,
                       ignore_index: int) -> torch.Tensor:
    """Check class labels: an int64/int32 tensor of ``shape`` whose entries are in ``[0, num_classes)`` or equal
    ``ignore_index``; return it.

    TypeError: not a tensor, not an integer dtype, ``ignore_index`` not an int. ValueError: wrong shape, or a label out
    of range. The range check reads the labels, so on a GPU it synchronises the host with the device (one ``.item()``).
    """
    check_tensor(name, labels, dtypes=INDEX_DTYPES)
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if labels.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)} (the logits' shape without the last dim), "
                         f"got {tuple(labels.shape)}")
    bad = ((labels < 0) | (labels >= num_classes)) & (labels != ignore_index)
    if labels.numel() and bool(bad.any()):
        first = bad.flatten().nonzero()[0, 0]
        value = int(labels.flatten()[first])
        where = tuple(int(i) for i in torch.unravel_index(first, labels.shape)) if labels.dim() else ()
        raise ValueError(f"{name} must be in [0, {num_classes}) or equal ignore_index={ignore_index}, "
                         f"got {value} at index {where}")
    return labels
