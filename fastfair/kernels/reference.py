"""Pure-PyTorch reference of every op: the test oracle, the benchmark baseline and the fallback.

Every backend module (``reference``, ``numba_backend``, ``triton_backend``, ``cuda_backend``)
exposes the same functions with the same signatures. Inputs arrive validated and contiguous
(see ``fastfair.kernels.ops``):

* ``weight``: 1-D floating array of length ``memory_size``.
* ``indices``: 1-D int32/int64, every value in ``[0, num_embeddings)``.
* ``offsets``: 1-D int64 of length ``B + 1`` (``offsets[0] == 0``, non-decreasing,
  ``offsets[-1] <= len(indices)``), bag ``b`` is ``indices[offsets[b]:offsets[b+1]]``;
  or ``None``: every index is its own bag (the un-pooled embedding lookup).
* ``per_sample_weights``: 1-D, same dtype as ``weight``, same length as ``indices``, or ``None``.
* ``mode``: 0 = sum, 1 = mean. ``padding_idx``: a row excluded from every bag, or -1.

Math (``v(i)[k] = sign(i, k) * w[idx(i, k)]``, the virtual row, see ``hashing``)::

    out[b, k] = sum_{j in bag b, indices[j] != padding_idx} a_j * v(indices[j])[k]
    a_j = per_sample_weights[j] (or 1);  mean mode divides by the bag's non-padding count
    grad_w[s] = sum_{(j, k): idx(indices[j], k) = s} sign * a_j * grad_out[bag(j), k]
"""
from __future__ import annotations

import torch

from . import hashing

NAME = "reference"

# Rows hashed at once by the streaming ops, so no n x d temporary is ever built.
ROW_BLOCK = 1 << 14


def available(device: torch.device) -> tuple[bool, str]:
    return True, ""


def hash_index(rows, dim, memory_size, chunk_size, seed, signed):
    """Materialised addresses (int64) and signs (int8) of ``rows`` ``[N] -> [N, dim]``."""
    return hashing.index_and_sign(rows, dim, memory_size, chunk_size, seed, signed)


def bag_of_element(offsets: torch.Tensor) -> torch.Tensor:
    """The bag id of every element inside a bag: the first ``offsets[-1]`` elements."""
    return torch.repeat_interleave(torch.arange(offsets.numel() - 1, device=offsets.device),
                                   offsets[1:] - offsets[:-1])


def _element_scale(indices, offsets, per_sample_weights, mode, padding_idx, dtype):
    """a_j (times 1/count for mean, 0 for padding) for each element, and the bag ids."""
    n = indices.numel()
    scale = torch.ones(n, dtype=dtype, device=indices.device)
    if per_sample_weights is not None:
        scale = scale * per_sample_weights
    if padding_idx >= 0:
        scale = scale * (indices != padding_idx).to(dtype)
    if offsets is None:
        return scale, None, n
    seg = bag_of_element(offsets)
    used = seg.numel()
    scale = scale[:used]
    if mode == 1:
        keep = torch.ones(used, dtype=dtype, device=indices.device)
        if padding_idx >= 0:
            keep = (indices[:used] != padding_idx).to(dtype)
        cnt = torch.zeros(offsets.numel() - 1, dtype=dtype, device=indices.device)
        cnt.index_add_(0, seg, keep)
        scale = scale / cnt.clamp(min=1)[seg]
    return scale, seg, used


def bag_forward(weight, indices, offsets, per_sample_weights, dim, chunk_size, seed, signed,
                mode, padding_idx):
    scale, seg, used = _element_scale(indices, offsets, per_sample_weights, mode, padding_idx,
                                      weight.dtype)
    idx, sign = hash_index(indices[:used], dim, weight.numel(), chunk_size, seed, signed)
    vals = weight[idx] * sign.to(weight.dtype) * scale[:, None]
    if offsets is None:
        return vals
    out = torch.zeros(offsets.numel() - 1, dim, dtype=weight.dtype, device=weight.device)
    return out.index_add_(0, seg, vals)


def bag_backward(grad_out, indices, offsets, per_sample_weights, memory_size, dim, chunk_size,
                 seed, signed, mode, padding_idx):
    scale, seg, used = _element_scale(indices, offsets, per_sample_weights, mode, padding_idx,
                                      grad_out.dtype)
    idx, sign = hash_index(indices[:used], dim, memory_size, chunk_size, seed, signed)
    g = grad_out if seg is None else grad_out[seg]
    vals = g * sign.to(grad_out.dtype) * scale[:, None]
    grad_w = torch.zeros(memory_size, dtype=grad_out.dtype, device=grad_out.device)
    return grad_w.index_add_(0, idx.reshape(-1), vals.reshape(-1))


def slot_counts(num_embeddings, dim, memory_size, chunk_size, seed, device):
    """cnt[s] = #{(i, k) : idx(i, k) = s} over the whole virtual table (int64)."""
    cnt = torch.zeros(memory_size, dtype=torch.int64, device=device)
    for start in range(0, num_embeddings, ROW_BLOCK):
        rows = torch.arange(start, min(start + ROW_BLOCK, num_embeddings), device=device)
        idx, _ = hashing.index_and_sign(rows, dim, memory_size, chunk_size, seed, False)
        cnt += torch.bincount(idx.reshape(-1), minlength=memory_size)
    return cnt


def fold(weight, factor, counts):
    """Count-weighted collapse ``w'[j] = sum_t c[j+t m'] w[j+t m'] / sum_t c[j+t m']`` (0 if empty)."""
    m2 = weight.numel() // factor
    c = counts.to(weight.dtype).view(factor, m2)
    num = (c * weight.view(factor, m2)).sum(0)
    den = c.sum(0)
    return torch.where(den > 0, num / den.clamp(min=1), torch.zeros_like(num))


def tile(weight, factor):
    """The same virtual table in an array ``factor`` times bigger: ``out[j] = w[j mod m]``."""
    return weight.repeat(factor)


def aggregate(arrays, weights, target_size):
    """``out[j] = sum_i weights[i] * arrays[i][j mod len(arrays[i])]`` (every size divides target)."""
    dtype = arrays[0].dtype
    out = torch.zeros(target_size, dtype=dtype, device=arrays[0].device)
    for a, p in zip(arrays, weights):
        out += p * a.repeat(target_size // a.numel())
    return out


# ----------------------------------------------------------------------------------------------
# k-means and action sharing (``fastfair.kernels.kmeans``). Inputs arrive validated and
# contiguous: ``x`` [N, d] and ``centroids`` [K, d] float32/float64 of one dtype, labels and rows
# int64 in range.

# Distance entries (rows x centroids) materialised at once by ``kmeans_assign``.
ASSIGN_BLOCK = 1 << 22


def kmeans_layout(x):
    """The form of ``x`` that ``kmeans_assign`` reads fastest: ``x`` itself here (``None``)."""
    return None


def kmeans_assign(x, centroids, layout=None):
    """``labels[i] = argmin_k (||c_k||^2 - 2 <x_i, c_k>)`` (ties: smallest ``k``) and
    ``dist2[i] = ||x_i - c_{labels[i]}||^2``.

    The argmin drops ``||x_i||^2``, constant in ``k``. ``dist2`` is not read off that expansion:
    it is summed from the differences, so it is never negative and is exactly 0 where a row equals
    its centroid.
    """
    n, k = x.shape[0], centroids.shape[0]
    labels = torch.empty(n, dtype=torch.int64, device=x.device)
    cn = (centroids * centroids).sum(1)
    step = max(1, ASSIGN_BLOCK // max(k, 1))
    for i in range(0, n, step):
        g = x[i:i + step] @ centroids.T
        labels[i:i + step] = torch.argmin(cn - (g + g), dim=1)
    return labels, kmeans_dist2(x, centroids, labels)


def kmeans_dist2(x, centroids, labels):
    """``||x_i - c_{labels[i]}||^2`` from the differences (in the dtype)."""
    diff = x - centroids[labels]
    return (diff * diff).sum(1)


def kmeans_centroid_sums(x, labels, k):
    """``sums[c] = sum_{i : labels[i] = c} x_i`` (accumulated in float64, rounded to the dtype)
    and ``counts[c] = #{i : labels[i] = c}`` (int64)."""
    sums = torch.zeros(k, x.shape[1], dtype=torch.float64, device=x.device)
    sums.index_add_(0, labels, x.to(torch.float64))
    return sums.to(x.dtype), torch.bincount(labels, minlength=k)


def kmeans_pack(values, bits):
    """Little-endian bit stream: bit ``t`` of ``values[j]`` is bit ``(j bits + t) mod 8`` of byte
    ``(j bits + t) // 8``; ``ceil(m bits / 8)`` bytes, the unused high bits of the last one 0."""
    m = values.numel()
    nbytes = (m * bits + 7) // 8
    shifts = torch.arange(bits, device=values.device)
    stream = ((values[:, None] >> shifts) & 1).to(torch.uint8).reshape(-1)
    stream = torch.cat([stream, stream.new_zeros(nbytes * 8 - stream.numel())])
    weights = torch.tensor([1 << b for b in range(8)], dtype=torch.uint8, device=values.device)
    return (stream.view(nbytes, 8) * weights).sum(1, dtype=torch.uint8)


def kmeans_unpack(packed, bits, m):
    """The inverse of ``kmeans_pack``: ``m`` values of ``bits`` bits (int64)."""
    shifts = torch.arange(8, device=packed.device)
    stream = ((packed.to(torch.int64)[:, None] >> shifts) & 1).reshape(-1)[:m * bits]
    weights = torch.ones(bits, dtype=torch.int64, device=packed.device) << torch.arange(
        bits, device=packed.device)
    return (stream.view(m, bits) * weights).sum(1)


def kmeans_rebuild_add_(out, rows, centroids, labels, scales, weight):
    """``out[rows[j]] += (w s_j) c_{labels[j]}`` with ``w`` rounded to ``out``'s dtype and
    ``w s_j`` rounded to it too (``s_j = 1`` without scales, so the term is ``w c``); ``rows``
    hold no repeats, so every row gets exactly one rounded addition."""
    coef = torch.full((rows.numel(),), weight, dtype=out.dtype, device=out.device)
    if scales is not None:
        coef = coef * scales
    return out.index_add_(0, rows, centroids[labels] * coef[:, None])


def kmeans_seed(x, first, uniforms, plusplus):
    """The k-means init (``kmeans.kmeans`` documents the draw), with the random numbers given:
    ``first`` is the first center's row, ``uniforms`` (float64, ``K - 1`` values in ``[0, 1)``)
    pick the others. Returns the chosen rows (int64, at most ``K``), each row's nearest chosen
    center (the earliest on ties) and its squared distance ``D_i^2`` (float64; squares summed in
    the dtype)."""
    return seed_loop(x, first, uniforms, plusplus, _nearest_)


def _nearest_(x, center, d2, labels, j):
    """``d2[i], labels[i] = ||x_i - center||^2, j`` where that is smaller than ``d2[i]``."""
    diff = x - center
    dist = (diff * diff).sum(1).to(torch.float64)
    closer = dist < d2
    d2[closer] = dist[closer]
    labels[closer] = j


def seed_loop(x, first, uniforms, plusplus, nearest_):
    """``kmeans_seed`` over a backend's ``nearest_`` step: after center ``j``, the next is the
    first row whose running sum of weights ``w_i`` exceeds ``u_j sum_i w_i``, ``w_i = D_i^2``
    (k-means++) or ``[D_i > 0]`` (random); the last row with ``w_i > 0`` if rounding leaves none.
    It stops early when every ``w_i`` is 0 (every row coincides with a center)."""
    n = x.shape[0]
    d2 = torch.full((n,), float("inf"), dtype=torch.float64, device=x.device)
    labels = torch.zeros(n, dtype=torch.int64, device=x.device)
    chosen = [first]
    u = uniforms.tolist()
    for step in range(len(u) + 1):
        nearest_(x, x[chosen[-1]], d2, labels, step)
        if step == len(u):
            break
        w = d2 if plusplus else (d2 > 0).to(torch.float64)
        cum = torch.cumsum(w, 0)
        total = float(cum[-1])
        if total == 0:
            break
        target = torch.tensor([u[step] * total], dtype=torch.float64, device=x.device)
        i = int(torch.searchsorted(cum, target, right=True))
        chosen.append(i if i < n else int(torch.nonzero(w)[-1, 0]))
    return torch.tensor(chosen, dtype=torch.int64, device=x.device), labels, d2


# ---------------------------------------------------------------- deferred Adam (fastfair.optim)
def deferred_adam(param, exp_avg, exp_avg_sq, last, rows, grad, upto, step_size, inv_bc2_sqrt,
                  beta1, beta2, eps):
    """Bring rows ``rows`` of ``[R, w]`` Adam state from their step ``last[r]`` to ``upto`` with
    zero gradients, then (when ``grad`` [len(rows), w] is given) take step ``upto + 1`` with
    ``grad``; ``last[rows]`` becomes the step reached. Per element and step ``k`` (torch's Adam)::

        m <- b1 m + (1 - b1) g,  v <- b2 v + (1 - b2) g^2,
        p <- p - step_size[k] m / (sqrt(v) inv_bc2_sqrt[k] + eps)

    with ``step_size[k] = lr / (1 - b1^k)``, ``inv_bc2_sqrt[k] = 1 / sqrt(1 - b2^k)``. A row at
    step 0 has never been used: its moments are zero and it is not replayed."""
    if rows.numel() == 0:
        return
    p, m, v = param[rows], exp_avg[rows], exp_avg_sq[rows]
    start = last[rows]
    # A row never used (step 0) has zero moments: its missed steps move nothing.
    start = torch.where(start > 0, start, upto)
    for k in range(int(start.min()) + 1, upto + 1):
        live = (start < k)[:, None]
        m = torch.where(live, m * beta1, m)
        v = torch.where(live, v * beta2, v)
        denom = v.sqrt() * inv_bc2_sqrt[k] + eps
        p = torch.where(live, p - step_size[k] * m / denom, p)
    reached = upto
    if grad is not None:
        k = upto + 1
        m = m * beta1 + (1 - beta1) * grad
        v = v * beta2 + (1 - beta2) * grad * grad
        p = p - step_size[k] * m / (v.sqrt() * inv_bc2_sqrt[k] + eps)
        reached = k
    param[rows], exp_avg[rows], exp_avg_sq[rows] = p, m, v
    last[rows] = reached


# ---------------------------------------------------------------- LSH output layers (PGHash)
# ``fastfair.kernels.lsh`` validates the inputs and documents every op; these are the oracles.
# Rows are neurons (or samples): ``x`` is ``[n, d]``, as the weight of ``torch.nn.Linear``.

def lsh_fold(x, c, signs):
    """``y[j, i] = sum_{t : i + t c < d} s_{i + t c} x[j, i + t c]`` (``s = 1`` without signs)."""
    n, d = x.shape
    if signs is not None:
        x = x * signs
    pad = (-d) % c
    if pad:
        x = torch.cat([x, x.new_zeros(n, pad)], 1)
    return x.reshape(n, (d + pad) // c, c).sum(1)


def lsh_pg_codes(x, proj, signs):
    """``codes[l, j] = sum_b [<proj[l, b], y_j> > 0] 2^b`` with ``y = fold(x, c, signs)``
    (``y = x`` when ``c = d`` and there are no signs); int32 ``[L, n]``. Dot products in
    float64, so near-zero ones follow the exact sign of the rounded inputs."""
    L, k, c = proj.shape
    y = x if (c == x.shape[1] and signs is None) else lsh_fold(x, c, signs)
    dots = torch.einsum("lbc,nc->lnb", proj.to(torch.float64), y.to(torch.float64))
    weights = torch.tensor([1 << b for b in range(k)], dtype=torch.int64, device=x.device)
    return ((dots > 0).to(torch.int64) * weights).sum(2).to(torch.int32)


def _dwta_probe(key, g, attempt, nbins):
    """The bin that empty bin ``g`` borrows from at ``attempt`` (int64 tensors in, same out)."""
    h = hashing.fmix32((hashing.fmix32(g ^ key) + hashing._mul32(attempt, hashing.GOLDEN))
                       & hashing.MASK32)
    return h % nbins


def lsh_dwta_codes(x, rows, bins, bits, key, probes):
    """Winner-take-all codes with densification; int32 ``[L, n]``.

    ``v[j, l, b, p] = x[j, rows[bins[l, b, p]]]``; bin ``(l, b)`` of row ``j`` is empty when all
    its ``w`` values are 0, else it holds ``a = argmax_p v`` (first on ties). An empty bin takes
    the value of bin ``(l, b')`` of the same row and table, ``b'`` the first non-empty among
    ``probe(key, b, 0..probes-1)`` (mod ``nb``), else the first non-empty after ``b``
    cyclically, else 0. Densifying within a table, by a probe sequence that does not depend on
    the table's index, keeps each table's codes independent of the others: tables can be built
    one at a time or in any grouping. ``codes[l, j] = (sum_b a_{l b} 2^{b log2 w})
    mod 2^bits``."""
    L, nb, w = bins.shape
    n = x.shape[0]
    v = x[:, rows][:, bins.reshape(-1)].view(n, L, nb, w)
    empty = (v == 0).all(3)
    val = torch.argmax(v, 3)  # first maximal index on ties
    g = torch.arange(nb, device=x.device).expand(L, nb)
    lsel = torch.arange(L, device=x.device)[:, None]
    filled = val.clone()
    todo = empty.clone()
    for a in range(probes):
        if not bool(todo.any()):
            break
        src = _dwta_probe(key, g, torch.full_like(g, a), nb)
        take = todo & ~empty[:, lsel, src]
        filled = torch.where(take, val[:, lsel, src], filled)
        todo = todo & ~take
    for s in range(1, nb):
        if not bool(todo.any()):
            break
        src = (torch.arange(nb, device=x.device) + s) % nb
        take = todo & ~empty[:, :, src]
        filled = torch.where(take, val[:, :, src], filled)
        todo = todo & ~take
    filled = torch.where(todo, torch.zeros_like(filled), filled)
    shift = (w.bit_length() - 1) * torch.arange(nb, device=x.device)
    codes = (filled << shift).sum(2) & ((1 << bits) - 1)
    return codes.T.contiguous().to(torch.int32)


def lsh_buckets(codes, bits):
    """Counting sort of every table's codes: ``members[l, offsets[l, h]:offsets[l, h + 1]]`` are
    the neurons ``j`` with ``codes[l, j] = h``, ascending; offsets int64 ``[L, 2^bits + 1]``,
    members int32 ``[L, n]``."""
    L, n = codes.shape
    counts = torch.zeros(L, 1 << bits, dtype=torch.int64, device=codes.device)
    counts.scatter_add_(1, codes.long(), torch.ones_like(codes, dtype=torch.int64))
    offsets = torch.zeros(L, (1 << bits) + 1, dtype=torch.int64, device=codes.device)
    offsets[:, 1:] = torch.cumsum(counts, 1)
    members = torch.sort(codes.long(), dim=1, stable=True).indices.to(torch.int32)
    return offsets, members


def lsh_rank(ids, key):
    """The random order of trimming and padding: ``(fmix32(j ^ key), j)`` as one int64
    (``fmix32 2^31 + j``; neuron ids are below ``2^31``)."""
    return (hashing.fmix32(ids ^ key) << 31) | ids


def lsh_union_(mark, out, count, qcodes, offsets, members, m, key):
    """Add to the active set the neurons of the buckets the batch hits, table by table.

    ``mark`` (bool ``[n]``) and ``out[:count]`` (int64) hold the set; for table ``t`` the new
    neurons ``N_t`` are the members of buckets ``qcodes[:, t]`` not yet in the set. If ``count +
    |N_t| <= m`` all join; else the ``m - count`` of ``N_t`` with the smallest ``lsh_rank`` join
    and the union stops. It does not start when ``count >= m``. Returns the new count."""
    for t in range(qcodes.shape[1]):
        if count >= m:
            break
        hit = torch.unique(qcodes[:, t].long())
        parts = [members[t, offsets[t, h]:offsets[t, h + 1]] for h in hit.tolist()]
        cand = torch.unique(torch.cat(parts).long()) if parts else out[:0]
        new = cand[~mark[cand]]
        if count + new.numel() > m:
            order = torch.argsort(lsh_rank(new, key))
            new = new[order[:m - count]]
        mark[new] = True
        out[count:count + new.numel()] = new
        count += new.numel()
    return count


def lsh_pad_(mark, out, count, m, key):
    """Fill the set up to ``m`` with the unmarked neurons of smallest ``lsh_rank``."""
    if count >= m:
        return count
    free = torch.nonzero(~mark).view(-1)
    pick = free[torch.argsort(lsh_rank(free, key))[:m - count]]
    mark[pick] = True
    out[count:count + pick.numel()] = pick
    return count + pick.numel()


def lsh_force_(mark, out, count, ids):
    """Add the distinct ``ids`` not yet in the set (labels forced in, beyond ``m`` if need be)."""
    new = torch.unique(ids)
    new = new[~mark[new]]
    mark[new] = True
    out[count:count + new.numel()] = new
    return count + new.numel()


def lsh_targets(active, label_offsets, label_ids):
    """Per sample, the positions in sorted ``active`` of its labels that are active, as CSR
    (``offsets`` ``[B + 1]``, ``pos`` int64), in the order of ``label_ids``."""
    B = label_offsets.numel() - 1
    pos = torch.searchsorted(active, label_ids)
    hit = pos < active.numel()
    hit[hit.clone()] = active[pos[hit]] == label_ids[hit]
    owner = torch.repeat_interleave(torch.arange(B, device=active.device),
                                    label_offsets[1:] - label_offsets[:-1])
    counts = torch.bincount(owner[hit], minlength=B)
    offsets = torch.zeros(B + 1, dtype=torch.int64, device=active.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return offsets, pos[hit]


def lsh_softmax_loss(logits, tgt_offsets, tgt_pos):
    """Label-normalised softmax cross-entropy over the active set and its gradient.

    Sample ``b`` with active label positions ``P_b`` (``|P_b| > 0``) contributes
    ``logsumexp(z_b) - (1/|P_b|) sum_{p in P_b} z_bp``; samples with ``P_b`` empty contribute 0;
    the loss is the sum over samples divided by ``B``. ``grad[b] = (softmax(z_b) - t_b) / B`` for
    samples with labels (``t_bp = 1/|P_b|`` on ``P_b``), 0 for the others. Float64 inside."""
    B = logits.shape[0]
    z = logits.to(torch.float64)
    cnt = (tgt_offsets[1:] - tgt_offsets[:-1])
    has = cnt > 0
    owner = torch.repeat_interleave(torch.arange(B, device=logits.device), cnt)
    t = torch.zeros_like(z)
    t.index_put_((owner, tgt_pos), 1.0 / cnt[owner].to(torch.float64), accumulate=True)
    lse = torch.logsumexp(z, 1) if z.shape[1] else torch.zeros(B, dtype=torch.float64,
                                                                 device=z.device)
    per = torch.where(has, lse - (t * z).sum(1), torch.zeros_like(lse))
    loss = per.sum() / max(B, 1)
    grad = torch.where(has[:, None], torch.softmax(z, 1) - t, torch.zeros_like(z)) / max(B, 1)
    return loss.to(logits.dtype), grad.to(logits.dtype)


# ---------------------------------------------------------------- scatter Adam (fastfair.optim)
def scatter_adam(param, exp_avg, exp_avg_sq, rows, grad, step_size, inv_bc2_sqrt, beta1, beta2,
                 eps):
    """One ``torch.optim.Adam`` step of ``[R, w]`` state whose gradient ``G`` is zero except on
    rows ``rows`` (distinct), where it is ``grad [len(rows), w]``. Every element moves::

        m <- b1 m + (1 - b1) G,  v <- b2 v + (1 - b2) G^2,
        p <- p - step_size m / (sqrt(v) inv_bc2_sqrt + eps)

    with ``step_size = lr / (1 - b1^t)`` and ``inv_bc2_sqrt = 1 / sqrt(1 - b2^t)``."""
    exp_avg.mul_(beta1)
    exp_avg_sq.mul_(beta2)
    exp_avg.index_add_(0, rows, grad, alpha=1 - beta1)
    exp_avg_sq.index_add_(0, rows, grad * grad, alpha=1 - beta2)
    param.addcdiv_(exp_avg, exp_avg_sq.sqrt().mul_(inv_bc2_sqrt).add_(eps), value=-step_size)


# ---------------------------------------------------------------- lazy Adam (fastfair.optim)
def lazy_adam(param, exp_avg, exp_avg_sq, rows, grad, step_size, beta1, beta2, eps):
    """``torch.optim.SparseAdam``'s update of rows ``rows`` (distinct) of ``[R, w]`` state with
    ``grad [len(rows), w]``; other rows do not move. Per element::

        m <- m + (1 - b1)(g - m),  v <- v + (1 - b2)(g^2 - v),  p <- p - step_size m / (sqrt(v) + eps)

    with ``step_size = lr sqrt(1 - b2^t) / (1 - b1^t)`` for the parameter's step ``t``."""
    if rows.numel() == 0:
        return
    m = exp_avg[rows]
    v = exp_avg_sq[rows]
    m = m + (grad - m) * (1 - beta1)
    v = v + (grad * grad - v) * (1 - beta2)
    exp_avg[rows] = m
    exp_avg_sq[rows] = v
    param[rows] = param[rows] - step_size * (m / (v.sqrt() + eps))
