"""Extreme multi-label classification (XC) data and metrics.

File format (the Extreme Classification Repository's text format, as read by pyxclib): line 1 is
``num_points num_features num_labels``; each of the next ``num_points`` lines describes one
point as

    l1,l2,...,lm f1:v1 f2:v2 ... fn:vn

with 0-based label ids ``l``, feature ids ``f`` and feature values ``v``. The label list may be
empty: the line then starts with a space, or holds only features (a first field containing ``:``
is read as features). A point may have no features. Blank lines after the last point are ignored;
CRLF line ends are accepted. :func:`load_xc` reads such a file, :func:`load_xc_split` a folder
with ``train.txt`` and ``test.txt``, and :func:`synthetic_xc` plants label clusters at any scale.

Points are held as :class:`XCData`: a feature CSR (sparse input ``x_i``) and a label CSR (label
set ``Y_i``), each row sorted by id and free of repeats. With ``normalize=True`` the loader scales
each point to unit L2 norm, ``x_i <- x_i / ||x_i||_2`` (points without features stay empty).

Metric: precision at ``k`` of the ranked predictions ``top_k(i)`` (the first ``k`` entries of row
``i`` of the ``topk`` matrix) over ``N`` points,

    P@k = (1 / N) * sum_i |top_k(i) ∩ Y_i| / k

where a point with ``Y_i`` empty counts as 0 and stays in ``N`` (the XC repository's convention).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, NamedTuple, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from .data import _check_csr_bounds, _check_float, _check_int, _check_path
from .metrics import _check_index, _check_ks

__all__ = ["XCBatch", "XCData", "load_xc", "load_xc_split", "precision_at_k", "synthetic_xc"]

# Bytes of a file parsed at once: bounds the parser's scratch arrays (tens of bytes per input
# byte) whatever the file size, and keeps them cache-friendly (4 MiB parsed ~1.7x faster than
# 16 MiB blocks).
_BLOCK_BYTES = 1 << 22
# Digits of the longest id the parser accepts: 10**18 - 1 still fits in int64.
_MAX_ID_DIGITS = 18
# Characters of the longest feature value the parser accepts (far above any float's repr).
_MAX_VALUE_CHARS = 40
# Significant digits of a decimal read exactly as an integer (10**15 < 2**53), and the powers of
# ten it may be divided by, converted exactly from Python ints.
_PLAIN_DIGITS = 15
_POWERS_OF_TEN = np.array([float(10 ** k) for k in range(_MAX_VALUE_CHARS + 1)])

# Byte classes of the format: the three separators, line ends, blanks, and token characters.
_TOKEN, _BLANK, _NEWLINE, _COMMA, _COLON = 0, 1, 2, 3, 4
_CLASS = np.zeros(256, dtype=np.uint8)
_CLASS[[ord(" "), ord("\t"), ord("\r")]] = _BLANK
_CLASS[ord("\n")] = _NEWLINE
_CLASS[ord(",")] = _COMMA
_CLASS[ord(":")] = _COLON
# Characters a feature value may hold; numpy alone would also accept "nan", "inf" and "1_0".
_VALUE_CHAR = np.zeros(256, dtype=bool)
_VALUE_CHAR[[ord(c) for c in "0123456789.eE+-"]] = True

_LAYOUT = "'l1,l2,... f1:v1 f2:v2 ...'"


# ----------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------

def _check_bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")
    return value


# ----------------------------------------------------------------------------------------------
# CSR helpers (numpy)
# ----------------------------------------------------------------------------------------------

def _indptr(rows, num_rows):
    """CSR row pointer of the row index of every entry (entries grouped by row)."""
    indptr = np.zeros(num_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=num_rows), out=indptr[1:])
    return indptr


def _gather(indptr, rows):
    """Positions of the entries of ``rows`` (in that order) and the new row pointer."""
    lengths = indptr[rows + 1] - indptr[rows]
    new_indptr = np.zeros(rows.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=new_indptr[1:])
    pos = (np.arange(new_indptr[-1], dtype=np.int64)
           + np.repeat(indptr[rows] - new_indptr[:-1], lengths))
    return pos, new_indptr


def _unit_rows(rows, values, num_rows):
    """``values`` scaled so that every row has unit L2 norm (all-zero rows stay zero)."""
    norms = np.sqrt(np.bincount(rows, weights=np.square(values, dtype=np.float64),
                                minlength=num_rows))
    scale = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    return (values * scale[rows]).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# The dataset
# ----------------------------------------------------------------------------------------------

class XCBatch(NamedTuple):
    """Points ``idx`` of an :class:`XCData` (``B`` of them) as model input and targets.

    ``indices``, ``offsets`` [B] and ``weights`` (float32) are the features in
    ``torch.nn.EmbeddingBag`` form (``mode="sum"`` with ``per_sample_weights=weights`` computes
    ``W^T x_i``); ``label_offsets`` [B + 1] and ``label_ids`` are the label sets as CSR."""

    indices: Tensor
    offsets: Tensor
    weights: Tensor
    label_offsets: Tensor
    label_ids: Tensor


@dataclass
class XCData:
    """``N`` points with sparse features over ``num_features`` and label sets over ``num_labels``.

    Point ``i`` has features ``feat_indices[feat_indptr[i]:feat_indptr[i + 1]]`` with values
    ``feat_values[...]`` (same slice) and labels
    ``label_ids[label_indptr[i]:label_indptr[i + 1]]``.
    Index tensors are int64, values float32 and finite, all on the CPU; each row's ids are sorted
    and unique. The constructor checks all of this and raises TypeError/ValueError naming the first
    violation.
    """

    num_features: int
    num_labels: int
    feat_indptr: Tensor
    feat_indices: Tensor
    feat_values: Tensor
    label_indptr: Tensor
    label_ids: Tensor
    name: str = "xc"

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Check the invariants stated in the class docstring."""
        if not isinstance(self.name, str):
            raise TypeError(f"name must be a str, got {self.name!r}")
        _check_int("num_features", self.num_features, 1)
        _check_int("num_labels", self.num_labels, 1)
        dtypes = {"feat_indptr": torch.int64, "feat_indices": torch.int64,
                  "feat_values": torch.float32, "label_indptr": torch.int64,
                  "label_ids": torch.int64}
        for attr, dtype in dtypes.items():
            value = getattr(self, attr)
            if not isinstance(value, Tensor) or value.dtype != dtype:
                got = value.dtype if isinstance(value, Tensor) else type(value).__name__
                raise TypeError(f"{attr} must be a {dtype} torch.Tensor, got {got}")
            if value.device.type != "cpu":
                raise ValueError(f"{attr} must live on the CPU, got device {value.device}")
            if value.dim() != 1:
                raise ValueError(f"{attr} must be 1-D, got shape {tuple(value.shape)}")
        if self.feat_indptr.numel() == 0:
            raise ValueError("feat_indptr must hold N + 1 >= 1 entries, got none")
        if self.label_indptr.shape != self.feat_indptr.shape:
            raise ValueError(f"label_indptr and feat_indptr must both have N + 1 entries, got "
                             f"{self.label_indptr.numel()} and {self.feat_indptr.numel()}")
        if self.feat_values.shape != self.feat_indices.shape:
            raise ValueError(f"feat_values must match feat_indices, got "
                             f"{self.feat_values.numel()} values for "
                             f"{self.feat_indices.numel()} indices")
        bad = np.flatnonzero(~np.isfinite(self.feat_values.numpy()))
        if bad.size:
            raise ValueError(f"feat_values[{bad[0]}] = {self.feat_values[bad[0]].item()} is "
                             f"not finite")
        self._check_csr("feat", self.feat_indptr, "feat_indices", self.feat_indices,
                        self.num_features)
        self._check_csr("label", self.label_indptr, "label_ids", self.label_ids, self.num_labels)

    @staticmethod
    def _check_csr(what, indptr, ids_name, ids, bound):
        indptr, ids = indptr.numpy(), ids.numpy()
        _check_csr_bounds(what, indptr, ids_name, ids, bound, "point")
        row_start = np.zeros(ids.size, dtype=bool)
        row_start[indptr[:-1][np.diff(indptr) > 0]] = True
        unsorted = np.flatnonzero((np.diff(ids) <= 0) & ~row_start[1:])
        if unsorted.size:
            point = np.searchsorted(indptr, unsorted[0], side="right") - 1
            raise ValueError(f"{ids_name} of point {point} are not sorted and unique (at id "
                             f"{ids[unsorted[0] + 1]})")

    def __len__(self) -> int:
        return self.feat_indptr.numel() - 1

    def _points(self, idx):
        idx = _check_index("idx", idx, 1)
        if idx.device.type != "cpu":
            raise ValueError(f"idx must live on the CPU, got device {idx.device}")
        n = len(self)
        bad = torch.nonzero((idx < 0) | (idx >= n)).flatten()
        if bad.numel():
            raise IndexError(f"idx holds point {int(idx[bad[0]])}, out of range [0, {n})")
        return idx.numpy()

    def batch(self, idx: Tensor) -> XCBatch:
        """Features and labels of points ``idx`` (1-D int tensor, repeats allowed), in order."""
        rows = self._points(idx)
        pos, feat_indptr = _gather(self.feat_indptr.numpy(), rows)
        label_pos, label_indptr = _gather(self.label_indptr.numpy(), rows)
        pos, label_pos = torch.from_numpy(pos), torch.from_numpy(label_pos)
        return XCBatch(self.feat_indices[pos], torch.from_numpy(feat_indptr[:-1]),
                       self.feat_values[pos], torch.from_numpy(label_indptr),
                       self.label_ids[label_pos])

    def subset(self, idx: Tensor, name: str | None = None) -> "XCData":
        """A new dataset of points ``idx`` in that order, named ``name`` (by default as this
        one)."""
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str or None, got {name!r}")
        b = self.batch(idx)
        indptr = torch.cat([b.offsets, b.offsets.new_tensor([b.indices.numel()])])
        return XCData(self.num_features, self.num_labels, indptr, b.indices, b.weights,
                      b.label_offsets, b.label_ids, self.name if name is None else name)

    def split(self, num_parts: int, seed: int = 0) -> list:
        """A random partition into ``num_parts`` datasets whose sizes differ by at most one (e.g.
        one per device), drawn with ``numpy.random.default_rng(seed)``. Each part keeps its points
        in their original order and is named ``"<name>[part p/num_parts]"``."""
        num_parts = _check_int("num_parts", num_parts, 1, max(1, len(self)))
        seed = _check_int("seed", seed, 0)
        order = np.random.default_rng(seed).permutation(len(self))
        return [self.subset(torch.from_numpy(np.sort(part)), f"{self.name}[part {p}/{num_parts}]")
                for p, part in enumerate(np.array_split(order, num_parts))]

    def label_counts(self) -> Tensor:
        """How many points carry each label, int64 [num_labels]."""
        return torch.bincount(self.label_ids, minlength=self.num_labels)

    def summary(self) -> str:
        """One line of sizes: points, features, labels, average labels and features per point."""
        n = max(1, len(self))
        empty = int((torch.diff(self.label_indptr) == 0).sum())
        return (f"{self.name}: {len(self):,} points, {self.num_features:,} features, "
                f"{self.num_labels:,} labels; {self.label_ids.numel() / n:.2f} labels and "
                f"{self.feat_indices.numel() / n:.2f} features per point, {empty:,} points "
                f"without labels")


def _make(name, num_features, num_labels, feat_rows, feat_ids, feat_values, label_rows,
          label_ids, num_points):
    """XCData from (row, id) entries grouped by row."""
    def long(array):
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64))

    return XCData(int(num_features), int(num_labels), long(_indptr(feat_rows, num_points)),
                  long(feat_ids), torch.from_numpy(np.ascontiguousarray(feat_values,
                                                                        dtype=np.float32)),
                  long(_indptr(label_rows, num_points)), long(label_ids), name)


# ----------------------------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------------------------

class _Bad(Exception):
    """A malformed spot of a block: byte position and what is wrong there."""

    def __init__(self, pos, problem):
        super().__init__(pos, problem)
        self.pos, self.problem = pos, problem


def _parse_header(path, line):
    fields = line.split()
    try:
        num_points, num_features, num_labels = (int(f) for f in fields)
        valid = num_points >= 0 and num_features >= 1 and num_labels >= 1
    except ValueError:
        valid = False
    if not valid:
        raise ValueError(f"{path}, line 1: bad header {line.decode(errors='replace')!r}, expected "
                         f"'num_points num_features num_labels' (integers, the last two >= 1)")
    return num_points, num_features, num_labels


def _parse_ids(buf, start, end):
    """Integers of the tokens ``buf[start:end]`` and a mask of the tokens that are not
    ``-?[0-9]{1,18}``. Digits are accumulated column by column: one vectorised pass per digit
    position, over all tokens."""
    negative = buf[start] == ord("-")
    first = start + negative
    length = end - first
    bad = (length == 0) | (length > _MAX_ID_DIGITS)
    value = np.zeros(start.size, dtype=np.int64)
    last = buf.size - 1
    # Whole-array passes with masks beat gathering the live tokens of each column.
    for j in range(min(int(length.max(initial=0)), _MAX_ID_DIGITS)):
        live = length > j
        digit = buf[np.minimum(first + j, last)] - np.uint8(ord("0"))   # wraps below "0"
        bad |= live & (digit > 9)
        value = np.where(live, value * 10 + digit, value)
    return np.where(negative, -value, value), bad


def _parse_values(buf, start, end):
    """Floats of the tokens ``buf[start:end]`` and a mask of the tokens that are not numbers.

    Plain decimals of at most 15 digits (``1``, ``0.0846``: XC files hold little else) are read
    column by column as ``mantissa / 10**decimals``, an exact integer over an exact power of ten,
    which IEEE division rounds correctly, i.e. to what ``float()`` gives. The others (exponents,
    signs, long mantissas) are copied into a fixed-width bytes array that numpy converts."""
    length = end - start
    bad = length > _MAX_VALUE_CHARS
    length = np.where(bad, 0, length)
    mantissa = np.zeros(start.size, dtype=np.int64)
    digits = np.zeros(start.size, dtype=np.int64)
    decimals = np.zeros(start.size, dtype=np.int64)
    dots = np.zeros(start.size, dtype=np.int64)
    plain = np.ones(start.size, dtype=bool)
    last = buf.size - 1
    for j in range(int(length.max(initial=0))):
        live = length > j
        char = buf[np.minimum(start + j, last)]
        bad |= live & ~_VALUE_CHAR[char]
        is_digit = live & (char - np.uint8(ord("0")) <= 9)
        is_dot = live & (char == ord("."))
        plain &= ~live | is_digit | is_dot
        # Mantissas of more than 15 digits wrap around here; they are not plain and are re-read.
        mantissa = np.where(is_digit, mantissa * 10 + (char - np.uint8(ord("0"))), mantissa)
        digits += is_digit
        decimals += is_digit & (dots > 0)
        dots += is_dot
    fast = plain & ~bad & (dots <= 1) & (digits >= 1) & (digits <= _PLAIN_DIGITS)
    values = np.zeros(start.size, dtype=np.float64)
    values[fast] = mantissa[fast] / _POWERS_OF_TEN[decimals[fast]]
    slow = np.flatnonzero(~fast & ~bad)
    if slow.size:
        width = int(length[slow].max())
        cols = np.arange(width)
        chars = buf[np.minimum(start[slow, None] + cols, buf.size - 1)]
        chars[cols >= length[slow, None]] = 0
        texts = chars.view(f"S{width}").ravel()
        try:
            values[slow] = texts.astype(np.float64)
        except ValueError:
            # Some token made only of number characters is still not a number ("1.2.3", "e"):
            # find which, one token at a time.
            for t, text in zip(slow, texts):
                try:
                    values[t] = float(text)
                except ValueError:
                    bad[t] = True
    bad |= ~np.isfinite(values)
    return values, bad


def _parse_block(buf, num_features, num_labels):
    """Parse whole lines ``buf`` (uint8, ending with a newline). Returns, with line indices
    relative to the block, (label lines, label ids, feature lines, feature ids, values).

    Tokens are the maximal runs of non-separator bytes; a token is a feature value if a colon
    precedes it, a feature id if a colon follows it, and a label id otherwise, which is only legal
    in a line's first blank-separated field."""
    cls = _CLASS[buf]
    is_token = (cls == _TOKEN).view(np.int8)
    edge = np.diff(is_token, prepend=np.int8(0), append=np.int8(0))
    start = np.flatnonzero(edge == 1)
    end = np.flatnonzero(edge == -1)
    before = np.where(start > 0, cls[start - 1], _NEWLINE)
    after = cls[end]
    newlines = np.flatnonzero(cls == _NEWLINE)
    line = np.searchsorted(newlines, start)
    # A token is in its line's first field if it starts before the line's first blank.
    blanks = np.flatnonzero(cls == _BLANK)
    line_starts = np.concatenate(([0], newlines[:-1] + 1))
    first_blank = np.append(blanks, buf.size)[np.searchsorted(blanks, line_starts)]
    first_field = start < first_blank[line]

    is_value = before == _COLON
    is_feature = after == _COLON
    is_label = ~is_value & ~is_feature
    malformed = ((is_value & is_feature)
                 | (is_value & (after != _BLANK) & (after != _NEWLINE))
                 | (is_feature & (before != _BLANK) & (before != _NEWLINE))
                 | (is_label & ~first_field))
    separators = np.flatnonzero((cls == _COMMA) | (cls == _COLON))
    lonely = separators[(separators == 0)
                        | (cls[np.maximum(separators - 1, 0)] != _TOKEN)
                        | (cls[separators + 1] != _TOKEN)]
    worst = [_Bad(start[t], "malformed") for t in np.flatnonzero(malformed)[:1]]
    worst += [_Bad(p, "malformed") for p in lonely[:1]]

    ids = np.flatnonzero(~is_value)
    id_values, bad = _parse_ids(buf, start[ids], end[ids])
    worst += [_Bad(start[ids[t]], "unparsable") for t in np.flatnonzero(bad)[:1]]
    bound = np.where(is_label[ids], num_labels, num_features)
    out = np.flatnonzero(~bad & ((id_values < 0) | (id_values >= bound)))
    worst += [_Bad(start[ids[t]], f"{'label' if is_label[ids[t]] else 'feature'} id "
                   f"{id_values[t]} out of range [0, {bound[t]})") for t in out[:1]]

    vals = np.flatnonzero(is_value)
    values, bad = _parse_values(buf, start[vals], end[vals])
    worst += [_Bad(start[vals[t]], "unparsable") for t in np.flatnonzero(bad)[:1]]
    if worst:
        raise min(worst, key=lambda b: b.pos)

    labels = np.flatnonzero(is_label[ids])
    features = np.flatnonzero(is_feature[ids])
    # A feature id token is always directly followed by its value token.
    return (line[ids[labels]], id_values[labels], line[ids[features]], id_values[features],
            values)


def _describe(path, text, line_number, pos, problem):
    """The error for ``problem`` at byte ``pos`` of line ``text``: it names the file, the line and
    the blank-separated field there."""
    left = max(text.rfind(b" ", 0, pos), text.rfind(b"\t", 0, pos)) + 1
    right = min(p for p in (text.find(b" ", pos), text.find(b"\t", pos), text.find(b"\r", pos),
                            len(text)) if p >= 0)
    field = text[left:right].decode(errors="replace")
    where = f"{path}, line {line_number}"
    if problem == "malformed":
        return ValueError(f"{where}: malformed field {field!r}, every point line must read "
                          f"{_LAYOUT}")
    if problem == "unparsable":
        token = text[pos:right].split(b",")[0].split(b":")[0].decode(errors="replace")
        value = text[pos - 1:pos] == b":"
        what = "feature value (a finite number)" if value else "id (an integer)"
        return ValueError(f"{where}: unparsable token {token!r} in field {field!r}, expected a "
                          f"{what}")
    return ValueError(f"{where}: {problem} in field {field!r}")


def _sort_rows(path, what, rows, ids, values=None):
    """Entries ordered by (row, id); a repeated id within a row raises, naming its file line."""
    keys = rows * (int(ids.max(initial=0)) + 1) + ids
    if not (np.diff(keys) > 0).all():
        order = np.argsort(keys, kind="stable")
        rows, ids, keys = rows[order], ids[order], keys[order]
        values = None if values is None else values[order]
        repeat = np.flatnonzero(np.diff(keys) == 0)
        if repeat.size:
            r = repeat[0]
            raise ValueError(f"{path}, line {rows[r] + 2}: {what} {ids[r]} is listed twice")
    return rows, ids, values


def _load(path, normalize, name):
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    raw = path.read_bytes()
    if not raw.endswith(b"\n"):
        raw += b"\n"
    header_end = raw.find(b"\n")
    num_points, num_features, num_labels = _parse_header(path, raw[:header_end])
    # A view of the file after the header line: a 1 GB file is not copied.
    buf = np.frombuffer(raw, dtype=np.uint8)[header_end + 1:]
    newlines = np.flatnonzero(buf == ord("\n"))
    if newlines.size > num_points:
        tail = buf[newlines[num_points - 1] + 1 if num_points else 0:].tobytes().split(b"\n")
        extra = [number for number, text in enumerate(tail, num_points + 2) if text.strip()]
        if extra:
            raise ValueError(f"{path}: the header announces {num_points} points but line "
                             f"{extra[0]}, after them, is not blank")
        newlines = newlines[:num_points]
    elif newlines.size < num_points:
        raise ValueError(f"{path}: the header announces {num_points} points but the file has "
                         f"{newlines.size} lines after it")

    parts = []
    first = 0
    while first < num_points:
        block_start = newlines[first - 1] + 1 if first else 0
        last = min(num_points - 1,
                   max(first, int(np.searchsorted(newlines, block_start + _BLOCK_BYTES))))
        block_end = newlines[last] + 1
        try:
            lab_rows, lab_ids, feat_rows, feat_ids, values = _parse_block(
                buf[block_start:block_end], num_features, num_labels)
        except _Bad as bad:
            pos = block_start + bad.pos
            line = first + int(np.searchsorted(newlines[first:last + 1], pos))
            line_start = newlines[line - 1] + 1 if line else 0
            raise _describe(path, buf[line_start:newlines[line]].tobytes(), line + 2,
                            pos - line_start, bad.problem) from None
        parts.append((lab_rows + first, lab_ids, feat_rows + first, feat_ids, values))
        first = last + 1

    def cat(k, dtype):
        return np.concatenate([p[k] for p in parts]) if parts else np.zeros(0, dtype=dtype)

    lab_rows, lab_ids = _sort_rows(path, "label", cat(0, np.int64), cat(1, np.int64))[:2]
    feat_rows, feat_ids, values = _sort_rows(path, "feature", cat(2, np.int64),
                                             cat(3, np.int64), cat(4, np.float64))
    values = (_unit_rows(feat_rows, values, num_points) if normalize
              else values.astype(np.float32))
    return _make(name, num_features, num_labels, feat_rows, feat_ids, values, lab_rows, lab_ids,
                 num_points)


def load_xc(path, normalize: bool = True) -> XCData:
    """Read one file of the XC repository's text format (see the module docstring), named after
    the file's stem.

    Parsing is vectorised over the bytes of the file (blocks of 4 MiB), not a Python loop over
    lines or tokens: Delicious' train file (12,920 lines, 2.3 MB) loads in ~0.09 s and a file of
    10^6 points (278 MB) in ~6 s of CPU time. Labels and features of a line may come in any
    order; they are stored sorted. A missing file raises FileNotFoundError; a bad header, a
    number of lines that disagrees with it, a malformed field, an unparsable token, an id out of
    range (negative, or >= num_labels / num_features), a repeated id within a line or a
    non-finite value raise ValueError naming the file, the line and the offending token.
    ``normalize`` scales each point's features to unit L2 norm.
    """
    path = _check_path("path", path)
    normalize = _check_bool("normalize", normalize)
    return _load(path, normalize, path.stem)


def load_xc_split(folder, normalize: bool = True) -> Tuple[XCData, XCData]:
    """``(train, test)`` from ``folder/train.txt`` and ``folder/test.txt`` (named
    ``"<folder>/train"`` and ``"<folder>/test"``); the two headers must agree on ``num_features``
    and ``num_labels``."""
    folder = _check_path("folder", folder)
    normalize = _check_bool("normalize", normalize)
    if not folder.is_dir():
        raise FileNotFoundError(f"no such directory: {folder}")
    train, test = (_load(folder / f"{split}.txt", normalize, f"{folder.name}/{split}")
                   for split in ("train", "test"))
    if (train.num_features, train.num_labels) != (test.num_features, test.num_labels):
        raise ValueError(f"{folder}: train.txt has {train.num_features} features and "
                         f"{train.num_labels} labels but test.txt {test.num_features} and "
                         f"{test.num_labels}")
    return train, test


# ----------------------------------------------------------------------------------------------
# Synthetic data
# ----------------------------------------------------------------------------------------------

def synthetic_xc(num_points: int = 10_000, num_features: int = 5_000, num_labels: int = 10_000,
                 *, num_clusters: int = 100, labels_per_point: int = 5,
                 features_per_point: int = 20, zipf: float = 1.0, noise: float = 0.2,
                 seed: int = 0, test_points: int = 2_000) -> Tuple[XCData, XCData]:
    """Planted label clusters: ``(train, test)`` with ``num_points`` and ``test_points`` points
    drawn i.i.d. from one distribution, fully determined by ``seed``.

    The labels are split into ``num_clusters`` clusters of near-equal size (a random partition).
    Each cluster has a profile of ``P = min(num_features, 4 * features_per_point)`` features
    (uniform draws) and each of its labels a signature of ``S = min(P, features_per_point // 2 +
    1)`` features drawn from that profile. Cluster ``c`` has a random popularity rank ``r_c`` and
    each label a random rank ``q`` inside its cluster. A point

    - draws a cluster ``c`` with probability ``∝ r_c ** -zipf``;
    - draws ``labels_per_point`` labels of ``c`` with replacement, label of rank ``q`` with
      probability ``∝ q ** -zipf``; repeats merge, so a point has 1 .. ``labels_per_point``
      labels (4.5 on average with the defaults);
    - fills ``features_per_point`` feature slots: with probability ``noise`` a feature uniform
      over all ``num_features``, otherwise a feature uniform over the signature of one of its label
      draws (chosen uniformly); each slot's value is uniform in [0.5, 1.5), repeats add up, and
      the point is scaled to unit L2 norm (as :func:`load_xc` does by default).

    So the features reveal the cluster and, less surely, the labels within it: a linear model
    (e.g. label centroids of the training features) ranks the true labels far above chance and
    above label popularity (test P@1 0.75 vs 0.21 and chance 0.008 at 3,000 x 1,000 x 500).
    Vectorised numpy: 10^6 labels x 10^5 points (1,000 clusters, plus 2*10^4 test points) build
    in ~1.1 s of CPU time.
    """
    num_points = _check_int("num_points", num_points, 1)
    num_features = _check_int("num_features", num_features, 1)
    num_labels = _check_int("num_labels", num_labels, 1)
    num_clusters = _check_int("num_clusters", num_clusters, 1, num_labels)
    labels_per_point = _check_int("labels_per_point", labels_per_point, 1)
    features_per_point = _check_int("features_per_point", features_per_point, 1)
    zipf = _check_float("zipf", zipf, 0.0)
    noise = _check_float("noise", noise, 0.0, 1.0)
    seed = _check_int("seed", seed, 0)
    test_points = _check_int("test_points", test_points, 0)

    rng = np.random.default_rng(seed)
    # Labels are laid out cluster by cluster: position p holds label layout[p].
    layout = rng.permutation(num_labels)
    bounds = np.arange(num_clusters + 1, dtype=np.int64) * num_labels // num_clusters
    sizes = np.diff(bounds)
    cluster_of = np.repeat(np.arange(num_clusters), sizes)
    rank_in_cluster = np.arange(num_labels) - bounds[cluster_of] + 1.0
    # Drawing a label of cluster c inverts this cumulative weight between c's bounds.
    label_cdf = np.concatenate(([0.0], np.cumsum(rank_in_cluster ** -zipf)))
    cluster_cdf = np.cumsum((rng.permutation(num_clusters) + 1.0) ** -zipf)
    profile_size = min(num_features, 4 * features_per_point)
    signature_size = min(profile_size, features_per_point // 2 + 1)
    profiles = rng.integers(0, num_features, size=(num_clusters, profile_size))
    signatures = np.take_along_axis(
        profiles[cluster_of], rng.integers(0, profile_size, size=(num_labels, signature_size)),
        axis=1)

    def draw(n, name):
        rows = np.arange(n, dtype=np.int64)[:, None]
        cluster = np.searchsorted(cluster_cdf, rng.random(n) * cluster_cdf[-1], side="right")
        lo, hi = label_cdf[bounds[cluster]], label_cdf[bounds[cluster + 1]]
        u = lo[:, None] + rng.random((n, labels_per_point)) * (hi - lo)[:, None]
        pos = np.searchsorted(label_cdf, u, side="right") - 1
        # Rounding can put u on a cluster's upper edge.
        pos = np.clip(pos, bounds[cluster][:, None], bounds[cluster + 1][:, None] - 1)
        label_keys = np.unique(rows * num_labels + layout[pos])

        source = pos[rows, rng.integers(0, labels_per_point, size=(n, features_per_point))]
        feats = signatures[source, rng.integers(0, signature_size, size=source.shape)]
        noisy = rng.random(source.shape) < noise
        feats[noisy] = rng.integers(0, num_features, size=int(noisy.sum()))
        feat_keys, inverse = np.unique(rows * num_features + feats, return_inverse=True)
        values = np.bincount(inverse.ravel(), weights=rng.uniform(0.5, 1.5, feats.shape).ravel(),
                             minlength=feat_keys.size)
        feat_rows = feat_keys // num_features
        return _make(name, num_features, num_labels, feat_rows, feat_keys % num_features,
                     _unit_rows(feat_rows, values, n), label_keys // num_labels,
                     label_keys % num_labels, n)

    return draw(num_points, "synthetic-xc/train"), draw(test_points, "synthetic-xc/test")


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------

def precision_at_k(topk: Tensor, label_offsets: Tensor, label_ids: Tensor,
                   ks: Union[int, Sequence[int]] = (1, 3, 5)) -> Dict[int, float]:
    """``{k: P@k}`` for each ``k`` in ``ks``: the mean over the ``B`` rows of ``topk`` (label
    ids, best first, ``K >= max(ks)`` columns) of ``|top_k(i) ∩ Y_i| / k``, where
    ``Y_i = label_ids[label_offsets[i]:label_offsets[i + 1]]`` (an :class:`XCBatch`'s labels).

    A point with no labels scores 0 and still counts in the mean (the XC repository's
    convention), so P@k of a set with empty rows is below what a perfect ranking of the labelled
    points reaches. An entry ``-1`` in ``topk`` is a missing prediction (never a hit, still in the
    ``k`` of the denominator); other entries must be label ids >= 0 without repeats in a row.
    Repeats in ``Y_i`` count once. NaN when ``B == 0``.

    Vectorised: each prediction is looked up as the key ``row * M + label`` in the sorted keys of
    the true labels (``M`` is above every id).
    """
    ks = _check_ks(ks, letter="k")
    topk = _check_index("topk", topk, 2)
    label_offsets = _check_index("label_offsets", label_offsets, 1)
    label_ids = _check_index("label_ids", label_ids, 1)
    b, width = topk.shape
    if width < ks[-1]:
        raise ValueError(f"topk has {width} columns, fewer than the largest k = {ks[-1]}")
    if label_offsets.numel() != b + 1:
        raise ValueError(f"label_offsets must have B + 1 = {b + 1} entries (one row per row of "
                         f"topk), got {label_offsets.numel()}")
    if int(label_offsets[0]) != 0 or int(label_offsets[-1]) != label_ids.numel():
        raise ValueError(f"label_offsets must run from 0 to {label_ids.numel()} "
                         f"(len(label_ids)), got {int(label_offsets[0])} .. "
                         f"{int(label_offsets[-1])}")
    if (label_offsets[1:] < label_offsets[:-1]).any():
        raise ValueError("label_offsets must be non-decreasing")
    if label_ids.numel() and int(label_ids.min()) < 0:
        raise ValueError(f"label_ids must be >= 0, got {int(label_ids.min())}")
    if topk.numel() and int(topk.min()) < -1:
        raise ValueError(f"topk entries must be label ids >= 0 or -1 (missing), got "
                         f"{int(topk.min())}")
    ordered = topk.sort(dim=1).values
    repeats = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    if repeats.any():
        row = int(repeats.any(dim=1).nonzero()[0])
        raise ValueError(f"topk row {row} repeats a label: {topk[row].tolist()}")
    if b == 0:
        return {k: math.nan for k in ks}

    device = topk.device
    label_offsets, label_ids = label_offsets.to(device), label_ids.to(device)
    m = 1 + max(int(label_ids.max()) if label_ids.numel() else 0, int(topk.max()))
    owner = torch.repeat_interleave(torch.arange(b, device=device), torch.diff(label_offsets))
    truth = torch.sort(owner * m + label_ids).values
    queries = torch.arange(b, device=device)[:, None] * m + topk[:, :ks[-1]]
    if truth.numel():
        pos = torch.searchsorted(truth, queries).clamp(max=truth.numel() - 1)
        hit = (truth[pos] == queries) & (topk[:, :ks[-1]] >= 0)
    else:
        hit = torch.zeros_like(queries, dtype=torch.bool)
    hits = torch.cumsum(hit, dim=1, dtype=torch.float64)
    return {k: float(hits[:, k - 1].mean()) / k for k in ks}
