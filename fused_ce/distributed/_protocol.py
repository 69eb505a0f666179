"""The agreement every vocab-parallel call reaches before any message whose size depends on its
arguments.

Each rank sends one fixed-size int64 header (``HEADER_WORDS`` words) in one ``all_gather``:

========  ===============================================================================
word      content
========  ===============================================================================
0         which function this rank called (``KINDS``)
1         its argument error, as an index into ``ERROR_TYPES`` (0: none)
2, 3      the start and size of its slice of the classes
4 .. 35   the error's message, UTF-8 (truncated to ``MESSAGE_WORDS * 8`` bytes)
36 ..     the values the ranks must agree on (:class:`Field`): what each rank will send
          (dtypes, rows), the options, digests of the target and of the class weight
========  ===============================================================================

Every rank reads all the headers (one device-to-host copy) and takes the same decision from the
same table: go on, or raise the same error, so no rank is left waiting in a collective and no
collective receives a size it did not expect. An argument error on one rank (caught while
validating, before any collective) travels in its header, and every rank raises it.
"""

from __future__ import annotations

import operator
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from ._group import _all_gather

HEADER_WORDS = 64
MESSAGE_WORDS = 32
_KIND, _ERROR, _START, _SIZE = 0, 1, 2, 3
_MESSAGE = 4
_FIELDS = _MESSAGE + MESSAGE_WORDS
MAX_FIELDS = HEADER_WORDS - _FIELDS

# Word 0: a constant beside the function's number, so a header meets only headers.
_MAGIC = 0x46434530 << 8
KINDS = ("vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy")
# Argument errors agreed on; others (KeyboardInterrupt, ...) leave as they came.
ERROR_TYPES = (TypeError, ValueError, RuntimeError, IndexError, NotImplementedError)


def _show_int(value: int) -> str:
    return str(value)


def _show_bool(value: int) -> str:
    return str(bool(value))


def _show_float(bits: int) -> str:
    return repr(struct.unpack("<d", struct.pack("<q", bits))[0])


def _show_softcap(bits: int) -> str:
    return "None" if bits == 0 else _show_float(bits)  # check_options gives 0.0 for None


def _show_digest(value: int) -> str:
    return f"digest {value & 0xFFFFFFFFFFFFFFFF:016x}"


@dataclass(frozen=True)
class Field:
    """One value every rank of the group must pass alike, and how an error names it."""

    argument: str  # the argument the error names
    what: str  # e.g. "the dtype", "the number of rows"
    value: int | Tensor  # an int64 word (on the host), or a 0-d int64 tensor on the device
    show: Callable[[int], str] = _show_int


def int_field(argument: str, what: str, value: int) -> Field:
    return Field(argument, what, value)


def bool_field(argument: str, what: str, value: bool) -> Field:
    return Field(argument, what, int(value), _show_bool)


def _float_bits(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


def float_field(argument: str, what: str, value: float) -> Field:
    """A float, compared bit for bit (its float64 bits)."""
    return Field(argument, what, _float_bits(value), _show_float)


_DTYPE_NAMES = {
    zlib.crc32(str(dtype).encode()): str(dtype)
    for dtype in vars(torch).values()
    if isinstance(dtype, torch.dtype)
}


def _show_dtype(code: int) -> str:
    return _DTYPE_NAMES.get(code, "no tensor" if code == 0 else f"dtype #{code}")


def dtype_field(argument: str, what: str, dtype: torch.dtype | None) -> Field:
    """A dtype (or None), by a code that does not depend on the process (CRC of its name)."""
    code = 0 if dtype is None else zlib.crc32(str(dtype).encode())
    return Field(argument, what, code, _show_dtype)


def digest_field(argument: str, what: str, values: Tensor | None) -> Field:
    """A digest of a tensor's values (0 for None), computed on its device: differs when any
    value or their order does. Class indices are read as int64, floats by their bits."""
    if values is None:
        return Field(argument, what, 0, _show_digest)
    if values.is_floating_point() and values.element_size() == 1:
        values = values.view(torch.uint8)  # fp8: its bits
    if not values.is_floating_point():
        values = values.long()
    # Signed 16-bit pieces of the bits, weighted by their position (each term below 2**31 in
    # magnitude, so the sum cannot overflow below 2**32 pieces).
    pieces = values.contiguous().view(-1).view(torch.int16).long()
    position = torch.arange(pieces.numel(), device=pieces.device)
    weights = position.mul_(40503).remainder_(65521).add_(1)
    return Field(argument, what, (pieces * weights).sum(), _show_digest)


def shape_field(argument: str, what: str, shape: tuple[int, ...]) -> Field:
    """A shape, as a digest of its dims (the number of dims included)."""
    text = ",".join(str(int(size)) for size in shape).encode()
    return Field(argument, what, zlib.crc32(text) | len(shape) << 32, _show_digest)


_REDUCTIONS = ("none", "mean", "sum")


def _show_reduction(index: int) -> str:
    return repr(_REDUCTIONS[index]) if 0 <= index < len(_REDUCTIONS) else "?"


def _int64(name: str, value) -> int:
    if not isinstance(value, bool):
        try:
            value = operator.index(value)
        except TypeError:
            pass
        else:
            if -(2**63) <= value < 2**63:
                return value
            raise ValueError(f"{name}: expected an int64, got {value}")
    raise TypeError(f"{name}: expected an int, got {value!r}")


def option_fields(
    *,
    target: Tensor,
    replicated_indices: bool,
    weight: Tensor | None,
    ignore_index: int,
    reduction: str,
    eps: float,
    scale: float,
    cap: float,
    z_loss: float,
    return_stats: bool,
) -> list[Field]:
    """The fields both entry points share: the target's dtype and, for class indices that
    every rank holds alike (``replicated_indices``), their digest; the class weight's dtype,
    length and digest; every option as it acts."""
    return [
        dtype_field("target", "the dtype", target.dtype),
        digest_field(
            "target", "the digest of the class indices", target if replicated_indices else None
        ),
        dtype_field("weight", "the dtype", None if weight is None else weight.dtype),
        int_field("weight", "the length", 0 if weight is None else weight.shape[0]),
        digest_field("weight", "the digest of the values", weight),
        int_field("ignore_index", "the value", _int64("ignore_index", ignore_index)),
        Field("reduction", "the value", _REDUCTIONS.index(reduction), _show_reduction),
        float_field("label_smoothing", "the value", eps),
        float_field("logit_scale", "the value", scale),
        Field("softcap", "the value", _float_bits(cap), _show_softcap),
        float_field("z_loss", "the value", z_loss),
        bool_field("return_stats", "the value", return_stats),
    ]


@dataclass
class Claim:
    """What this rank will do: its slice of the classes and the values the group must share."""

    start: int
    n_local: int
    fields: list[Field] = field(default_factory=list)
    weight_length: int | None = None  # the class weight's length, when one is passed


@dataclass
class Agreement:
    """What every rank knows after the exchange."""

    n_classes: int  # C, the classes of all the ranks' slices
    layout: Tensor  # (world, 2) int64 on the device: every rank's (start, size)


def header_device(value, group) -> torch.device:
    """Where the header travels: the input's device, else the group's default one (the CUDA
    device for an NCCL-only group)."""
    if isinstance(value, Tensor):
        return value.device
    backend = str(dist.get_backend(group))
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _int_word(value: int) -> int:
    """An int as a signed int64 word (wrapped: a header must not fail to build)."""
    return (int(value) + 2**63) % 2**64 - 2**63


def _message_words(error: BaseException) -> list[int]:
    raw = str(error).encode()[: MESSAGE_WORDS * 8]
    raw = raw.ljust(MESSAGE_WORDS * 8, b"\0")
    return list(struct.unpack(f"<{MESSAGE_WORDS}q", raw))


def _message(words: list[int]) -> str:
    raw = struct.pack(f"<{MESSAGE_WORDS}q", *words).rstrip(b"\0")
    return raw.decode(errors="ignore")


def _host_words(kind: int, claim: Claim | BaseException) -> tuple[list[int], list]:
    """The header's words known on the host, and ``(index, 0-d tensor)`` for the rest."""
    words = [0] * HEADER_WORDS
    words[_KIND] = _MAGIC | kind
    device_values = []
    if isinstance(claim, BaseException):
        words[_ERROR] = 1 + next(i for i, t in enumerate(ERROR_TYPES) if isinstance(claim, t))
        words[_MESSAGE:_FIELDS] = _message_words(claim)
        return words, device_values
    if len(claim.fields) > MAX_FIELDS:
        raise AssertionError(f"{len(claim.fields)} fields; the header holds {MAX_FIELDS}")
    words[_START], words[_SIZE] = _int_word(claim.start), _int_word(claim.n_local)
    for index, item in enumerate(claim.fields):
        if isinstance(item.value, Tensor):
            device_values.append((_FIELDS + index, item.value))
        else:
            words[_FIELDS + index] = _int_word(item.value)
    return words, device_values


def agree(
    kind: str, claim: Claim | BaseException, *, group, rank: int, world: int, device
) -> Agreement:
    """Exchange this rank's header and decide, identically on every rank: return the layout,
    or raise the error of the lowest rank that had one, a disagreement on a :class:`Field`
    (naming the argument and each rank's value), or slices that do not tile ``[0, C)``.

    A group of one rank exchanges nothing and reads nothing back from the device."""
    if world == 1 and isinstance(claim, BaseException):
        raise claim
    kind_code = KINDS.index(kind)
    words, device_values = _host_words(kind_code, claim)
    if world == 1:
        n_classes = _check_fields_and_layout([words], claim)
        # Filled on the device (no host-to-device copy, which waits on the stream).
        layout = torch.empty(1, 2, dtype=torch.int64, device=device)
        layout[0, 0], layout[0, 1] = claim.start, claim.n_local
        return Agreement(n_classes=n_classes, layout=layout)
    header = torch.tensor(words, dtype=torch.int64).to(device)
    for index, value in device_values:
        header[index] = value
    gathered = header.new_empty(world * HEADER_WORDS)
    _all_gather(gathered, header, group=group)
    gathered = gathered.view(world, HEADER_WORDS)
    table = gathered.tolist()
    _check_kinds(table, kind_code)
    _raise_on_error(table, claim, rank)
    n_classes = _check_fields_and_layout(table, claim)
    return Agreement(n_classes=n_classes, layout=gathered[:, _START : _SIZE + 1])


def _check_kinds(table: list[list[int]], kind: int) -> None:
    kinds = [row[_KIND] for row in table]
    if all(k == _MAGIC | kind for k in kinds):
        return
    called = ", ".join(
        f"rank {r}: "
        + (KINDS[k & 0xFF] if k >> 8 == _MAGIC >> 8 and k & 0xFF < len(KINDS) else "?")
        for r, k in enumerate(kinds)
    )
    raise RuntimeError(
        f"group: the ranks of the group called different functions ({called}); every rank "
        "must make the same vocab-parallel call"
    )


def _raise_on_error(table: list[list[int]], claim: Claim | BaseException, rank: int) -> None:
    failed = [r for r, row in enumerate(table) if row[_ERROR]]
    if not failed:
        return
    first = failed[0]
    row = table[first]
    error_type = ERROR_TYPES[row[_ERROR] - 1]
    where = f"rank {first}" if len(failed) == 1 else f"ranks {_ranks(failed)}, first rank {first}"
    error = error_type(
        f"{_message(row[_MESSAGE:_FIELDS])} [raised on {where} of the group of {len(table)}; "
        "every rank raises this error]"
    )
    if rank == first:
        raise error from claim
    raise error


def _ranks(ranks: list[int]) -> str:
    return ", ".join(str(r) for r in ranks)


def _check_fields_and_layout(table: list[list[int]], claim: Claim) -> int:
    """The fields, then the slices; the global C."""
    for index, item in enumerate(claim.fields):
        values = [row[_FIELDS + index] for row in table]
        if any(v != values[0] for v in values):
            shown = ", ".join(f"rank {r}: {item.show(v)}" for r, v in enumerate(values))
            raise ValueError(
                f"{item.argument}: {item.what} differs across the ranks of the group ({shown}); "
                "every rank must pass the same"
            )
    # The slices holding classes must follow each other from 0; an empty one (a rank holding
    # no classes) may start anywhere in [0, C].
    end = 0
    for start, size in sorted((row[_START], row[_SIZE]) for row in table if row[_SIZE]):
        if start != end:
            end = -1
            break
        end = start + size
    if end < 0 or any(not row[_SIZE] and row[_START] > end for row in table):
        held = ", ".join(
            f"rank {r} [{row[_START]}, {row[_START] + row[_SIZE]})" for r, row in enumerate(table)
        )
        raise ValueError(
            f"vocab_start_index: the ranks' class slices do not tile [0, C) without gaps or "
            f"overlaps ({held}); shards of different sizes need vocab_start_index"
        )
    if claim.weight_length is not None and claim.weight_length != end:
        raise RuntimeError(
            f"weight: should be defined for all {end} classes of the group's slices but got "
            f"weight tensor of shape: [{claim.weight_length}]"
        )
    return end
