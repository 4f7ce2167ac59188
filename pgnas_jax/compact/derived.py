"""The compact network of any super-network, derived from its traced program (issue 31).

The masked network's inference (``model.apply`` with the candidate's hard masks, BatchNorms
on their running statistics) is traced to a jaxpr at a batch of ``BATCH`` images, nested
calls inlined. Three passes over it:

1. **What is known** (forward). A value that does not depend on the images is computed
   here, once (weights, BatchNorm's folded statistics, and whatever a removed conv left). A
   value that does has a *channel axis* where one can be followed (the image's last axis,
   a conv's or a dense layer's output features, carried through elementwise ops,
   broadcasts, reshapes that keep it, concatenations, pooling, reductions over other axes,
   transposes), and on it the channels whose values are known: a product with a mask's
   zero, a concatenated constant, whatever follows from known channels only.
2. **What is read** (backward). A channel is needed when some reader needs it: a conv or a
   dense layer needs every input channel it has weights for that is not known (a known one
   adds a constant), an elementwise op passes its output's needs on, an op that mixes the
   channel axis with others (a flatten) needs them all. A channel that nothing needs is not
   computed; where readers differ, the union is kept.
3. **The compact program** (forward). Each op is emitted on the channels needed and not
   known, its weights sliced to them. Per-channel affine ops (a BatchNorm at inference, a
   bias, a scale, a mean over stacked branches) stay pending and are folded into the conv
   or dense layer that produced the value when it has no other reader; otherwise they
   become a stored scale and offset. Sums and concatenations of such values stay pending
   too, so an affine op after them reaches every producer. Known channels that a reader
   adds in are folded into its bias (a vector, or a map where a padded conv made it vary
   over the image).

What it cannot follow (an op outside ``SUPPORTED``, a reduction or reshape across the batch)
is refused with ``Unsupported``, naming the op; the caller keeps the input-sliced winner.
The program runs at any batch size (``apply``), its weights are every array it stores.
"""

import contextlib
import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core

BATCH = 2  # images the program is traced with: not 1, so the batch axis is never squeezed
UNIFORM_RTOL = 1e-6  # a constant map equal to its first pixel within this is stored as a vector


class Unsupported(ValueError):
  """The derivation cannot follow an op of the traced program."""


ELEMENTWISE = frozenset(  # ops applied value by value (operands broadcast to one shape)
  'add sub mul div max min neg exp exp2 log log1p expm1 tanh logistic rsqrt sqrt cbrt erf '
  'erfc abs sign square integer_pow pow sin cos floor ceil round clamp select_n '
  'convert_element_type reduce_precision stop_gradient copy gt ge lt le eq ne and or not'.split()
)
STRUCTURAL = (
  'stack',
  'conv_general_dilated',
  'dot_general',
  'broadcast_in_dim',
  'reshape',
  'squeeze',
  'expand_dims',
  'concatenate',
  'reduce_sum',
  'reduce_max',
  'reduce_min',
  'reduce_window_sum',
  'reduce_window_max',
  'pad',
  'slice',
  'transpose',
)
SUPPORTED = tuple(ELEMENTWISE) + STRUCTURAL
LINEAR = ('reduce_window_sum', 'reduce_sum', 'pad', 'slice', 'transpose')  # channel by channel


# ---- tracing ----


def _inline(closed: core.ClosedJaxpr, args: list) -> list:
  """Evaluates ``closed`` on ``args`` binding every primitive, nested calls inlined."""
  env = {}

  def read(v):
    return v.val if isinstance(v, core.Literal) else env[v]

  for v, c in zip(closed.jaxpr.constvars, closed.consts):
    env[v] = c
  for v, a in zip(closed.jaxpr.invars, args):
    env[v] = a
  for eqn in closed.jaxpr.eqns:
    ins = [read(v) for v in eqn.invars]
    inner = eqn.params.get('jaxpr', eqn.params.get('call_jaxpr'))
    if eqn.primitive.name in ('pjit', 'jit', 'custom_jvp_call', 'custom_vjp_call', 'closed_call'):
      if not isinstance(inner, core.ClosedJaxpr):
        inner = core.ClosedJaxpr(inner, ())
      outs = _inline(inner, ins[len(ins) - len(inner.jaxpr.invars) :])
    else:
      outs = eqn.primitive.bind(*ins, **eqn.params)
      outs = outs if eqn.primitive.multiple_results else [outs]
    for v, o in zip(eqn.outvars, outs):
      env[v] = o
  return [read(v) for v in closed.jaxpr.outvars]


def trace(model, weights: dict, mask, image_shape: tuple):
  """(flat jaxpr of the masked network's logits at ``BATCH`` images as a function of its
  weight leaves, mask leaves and images, their '/'-joined names, their values). The trace is
  kept per model and shapes: every candidate of a search shares it."""
  leaves = []
  for collection, tree in (('', weights), ('masks/', mask)):
    for path, value in jax.tree_util.tree_flatten_with_path(tree)[0]:
      name = collection + '/'.join(str(getattr(k, 'key', k)) for k in path)
      leaves.append((name, np.asarray(value)))
  names, values = [n for n, _ in leaves], [v for _, v in leaves]
  structure = (
    jax.tree.structure(weights),
    jax.tree.structure(mask),
    tuple((v.shape, v.dtype.str) for v in values),
  )
  return _traced(model, tuple(image_shape), structure), names, values


@functools.lru_cache(maxsize=8)
def _traced(model, image_shape: tuple, structure) -> core.ClosedJaxpr:
  weights_def, mask_def, avals = structure
  count = weights_def.num_leaves

  def logits(*leaves):
    weights = jax.tree_util.tree_unflatten(weights_def, leaves[:count])
    mask = jax.tree_util.tree_unflatten(mask_def, leaves[count:-1])
    return model.apply({**weights, 'masks': mask}, leaves[-1], train=False)

  args = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in avals]
  args.append(jax.ShapeDtypeStruct((BATCH,) + image_shape, jnp.float32))
  closed = jax.make_jaxpr(logits)(*args)
  return jax.make_jaxpr(lambda *a: _inline(closed, list(a)))(*args)


# ---- pass 1: what is known ----


@dataclasses.dataclass
class Known:
  """What pass 1 knows of a value: ``const`` (the whole value, image-independent), or for an
  image-dependent one its channel ``axis`` (None: not followed) and which channels along it
  are known (``mask``) with their values (``values``, full shape, zero elsewhere; None: all
  zero, a mask's product, the common case, held without an array). A
  constant's ``sources``: the weights it is computed from (none: it follows from shapes
  alone, like a pooling's divisor, and is not stored as a weight)."""

  const: np.ndarray | None = None
  axis: int | None = None
  mask: np.ndarray | None = None
  values: np.ndarray | None = None
  sources: frozenset = frozenset()

  @property
  def dynamic(self) -> bool:
    return self.const is None


def _per_channel(const: np.ndarray, shape: tuple, axis: int) -> np.ndarray | None:
  """``const`` broadcast to ``shape`` as a vector along ``axis`` (its length, or 1) when it
  is constant along every other axis; else None."""
  c = np.broadcast_to(np.asarray(const, np.float64), shape)
  first = c[tuple(0 if i != axis else slice(None) for i in range(len(shape)))]
  expanded = np.expand_dims(first, [i for i in range(len(shape)) if i != axis])
  return first if np.array_equal(np.broadcast_to(expanded, shape), c) else None


def _batch_constant(const: np.ndarray, shape: tuple) -> np.ndarray | None:
  """``const`` broadcast to ``shape`` with a batch axis of 1, when it is the same for every
  image (a map over the image): else None."""
  c = np.broadcast_to(np.asarray(const, np.float64), shape)
  return c[:1] if np.array_equal(np.broadcast_to(c[:1], shape), c) else None


# ---- the compact program ----


@dataclasses.dataclass
class Term:
  """One addend of a pending value: ``ref``'s channels ``channels`` (original indices, in
  order), times ``scale`` (per channel, None: 1), ``producer`` the conv or dense step whose
  output ``ref`` is and that has no other reader (a pending affine may be folded into it)."""

  ref: int
  channels: np.ndarray
  scale: np.ndarray | None = None
  producer: int | None = None
  scale_only: bool = False  # a linear op (a pooling's sum) lies between: no shift folds
  learned: bool = False  # the scale comes from weights (else from shapes: a pooling's divisor)


@dataclasses.dataclass
class Value:
  """An image-dependent value while the program is emitted: along ``axis``, the channels
  ``present`` (computed: needed and not known), the sum of ``terms`` placed at their
  channels plus ``shift`` (per present channel, or a map with the channel axis last of
  ``present``; None: 0). ``axis`` None: the whole value, one term, no pending affine.
  ``stacked``: the axis along which ``members`` (variables) are stacked, kept pending for a
  following sum over it (``jnp.mean`` of stacked branches)."""

  axis: int | None
  present: np.ndarray | None
  terms: list
  shift: np.ndarray | None = None
  stacked: int | None = None
  members: list | None = None
  shift_learned: bool = True  # False: the shift follows from shapes alone (gelu's 1 + ...)
  label: str | None = None  # the layer whose weights a pending affine holds (its name)


class Step(NamedTuple):
  kind: str
  inputs: tuple  # refs
  params: dict  # static
  weights: tuple  # names in the weights dict


class Program(NamedTuple):
  steps: tuple
  output: int
  output_axis: int | None


class Derivation:
  def __init__(self, jaxpr: core.ClosedJaxpr, names: list, values: list):
    self.jaxpr = jaxpr.jaxpr
    self.consts = jaxpr.consts
    self.names = names
    self.values = values
    self.known = {}
    self.need = {}
    self.uses = {}
    self.steps = []
    self.weights = {}
    self.refs = 1  # ref 0: the images
    self.layer_name = None

  # pass 1
  def forward(self):
    j = self.jaxpr
    for v, c in zip(j.constvars, self.consts):
      self.known[v] = Known(const=np.asarray(c))
    for v, c, name in zip(j.invars[:-1], self.values, self.names):
      learned = frozenset() if name.startswith('masks/') else frozenset([name])
      self.known[v] = Known(const=np.asarray(c), sources=learned)
    image = j.invars[-1]
    n = image.aval.shape[-1]
    shape = image.aval.shape
    self.known[image] = Known(axis=len(shape) - 1, mask=np.zeros(n, bool))
    for eqn in j.eqns:
      name = eqn.primitive.name
      ins = [self._known_of(v) for v in eqn.invars]
      if all(not k.dynamic for k in ins):  # any op on constants: computed here
        out = eqn.primitive.bind(*[k.const for k in ins], **eqn.params)
        sources = frozenset().union(*(k.sources for k in ins))
        self.known[eqn.outvars[0]] = Known(const=np.asarray(out), sources=sources)
        continue
      if name not in SUPPORTED:
        raise Unsupported(
          f'the compact derivation cannot follow the op {name!r} on the images (docs/library.md)'
        )
      known = self._forward_rule(eqn, ins)
      if known.axis is not None and known.mask.all():  # every channel known: a constant
        const = _values(known, eqn.outvars[0].aval.shape)
        known = Known(const=const, sources=frozenset(['(a removed conv)']))
      self.known[eqn.outvars[0]] = known
    for eqn in j.eqns:
      for v in eqn.invars:
        if not isinstance(v, core.Literal):
          self.uses[v] = self.uses.get(v, 0) + 1
    for v in j.outvars:
      self.uses[v] = self.uses.get(v, 0) + 1

  def _known_of(self, v) -> Known:
    if isinstance(v, core.Literal):
      return Known(const=np.asarray(v.val))
    return self.known[v]

  def _forward_rule(self, eqn, ins: list) -> Known:
    name, p = eqn.primitive.name, eqn.params
    out_shape = eqn.outvars[0].aval.shape
    shapes = [v.aval.shape for v in eqn.invars]
    dyn = [k for k in ins if k.dynamic]
    axis = _out_axis(eqn, ins)
    if axis is None:
      return Known()
    n = out_shape[axis]
    mask, values = np.zeros(n, bool), None
    others = tuple(i for i in range(len(out_shape)) if i != axis)

    def operand(k, shape):
      return _values(k, shape) if k.dynamic else np.broadcast_to(k.const, shape)

    if name in ELEMENTWISE:
      # known where every image-dependent operand is; a product is known zero where a
      # constant factor is zero along the channel axis
      ok = np.ones(n, bool)
      for k in dyn:
        ok &= k.mask if k.axis == axis and len(k.mask) == n else np.zeros(n, bool)
      if name == 'mul':
        for k, shape in zip(ins, shapes):
          if not k.dynamic:
            ok |= np.all(np.broadcast_to(k.const, out_shape) == 0, axis=others)
          elif k.axis == axis and len(k.mask) == n:
            ok |= k.mask & np.all(np.broadcast_to(_values(k, shape), out_shape) == 0, axis=others)
      if ok.any():
        operands = [np.broadcast_to(operand(k, sh), out_shape) for k, sh in zip(ins, shapes)]
        result = np.asarray(eqn.primitive.bind(*[jnp.asarray(o) for o in operands], **p))
        mask, values = ok, np.where(_along(ok, axis, len(out_shape)), result, 0.0)
    elif name == 'concatenate' and p['dimension'] == axis:
      parts, offset = [], 0
      for k, shape in zip(ins, shapes):
        mask[offset : offset + shape[axis]] = k.mask if k.dynamic else True
        parts.append(operand(k, shape))
        offset += shape[axis]
      if mask.any():
        values = np.where(_along(mask, axis, len(out_shape)), np.concatenate(parts, axis), 0.0)
    elif name in ('concatenate', 'stack'):
      ok = np.ones(n, bool)
      for k in dyn:
        ok &= k.mask
      if ok.any():
        parts = [operand(k, shape) for k, shape in zip(ins, shapes)]
        if name == 'stack':
          result = np.stack(parts, axis=p['axis'])
        else:
          result = np.concatenate(parts, axis=p['dimension'])
        mask, values = ok, np.where(_along(ok, axis, len(out_shape)), result, 0.0)
    elif name == 'conv_general_dilated' and _depthwise(eqn):
      (k,) = dyn  # channel by channel: a known input channel gives a known output one
      if k.mask.any():
        x = jnp.asarray(_values(k, shapes[0]), jnp.float32)
        result = np.asarray(eqn.primitive.bind(x, ins[1].const, **p))
        mask, values = k.mask.copy(), np.where(_along(k.mask, axis, len(out_shape)), result, 0.0)
    elif name in ('conv_general_dilated', 'dot_general'):
      pass  # outputs mix channels: none known unless every input is (pass 1's constant)
    else:  # one image-dependent operand, the channel axis carried
      (k,) = dyn
      if k.mask.any():
        operands = [operand(i, shape) for i, shape in zip(ins, shapes)]
        result = np.asarray(eqn.primitive.bind(*[jnp.asarray(o) for o in operands], **p))
        mask, values = k.mask.copy(), np.where(_along(k.mask, axis, len(out_shape)), result, 0.0)
    if values is not None and not values.any():
      values = None  # known zeros (a mask's): nothing to hold
    return Known(axis=axis, mask=mask, values=values)

  # pass 2
  def backward(self):
    j = self.jaxpr
    for v in j.outvars:
      k = self.known[v]
      if k.dynamic:
        self._add_need(v, None)
    for eqn in reversed(j.eqns):
      out = eqn.outvars[0]
      k = self.known[out]
      if not k.dynamic or out not in self.need:
        continue
      need = self.need[out]
      if not need.any():
        continue
      for i, v in enumerate(eqn.invars):
        if isinstance(v, core.Literal) or not self.known[v].dynamic:
          continue
        self._add_need(v, self._need_of_input(eqn, i, need))

  def _add_need(self, v, need):
    k = self.known[v]
    full = np.ones(v.aval.shape[k.axis] if k.axis is not None else 1, bool)
    need = full if need is None else need
    self.need[v] = need if v not in self.need else (self.need[v] | need)

  def _need_of_input(self, eqn, i, need):
    """Channels of input ``i`` needed for channels ``need`` of the output (None: all)."""
    name, p = eqn.primitive.name, eqn.params
    v = eqn.invars[i]
    k = self.known[v]
    out = self.known[eqn.outvars[0]]
    if k.axis is None or out.axis is None:
      return None
    dynamic = ~k.mask
    if name == 'conv_general_dilated':
      if _depthwise(eqn):
        return need & dynamic
      if p['feature_group_count'] > 1 or p['batch_group_count'] > 1:
        return None
      return dynamic.copy()
    if name == 'dot_general':
      if self._known_of(eqn.invars[1]).dynamic:  # batched over heads: the heads needed
        return need & dynamic
      return dynamic.copy()
    if name == 'concatenate' and p['dimension'] == out.axis:
      offset = sum(u.aval.shape[out.axis] for u in eqn.invars[:i])
      return need[offset : offset + v.aval.shape[k.axis]] & dynamic
    size = v.aval.shape[k.axis]
    if size == len(need):
      return need & dynamic
    return np.ones(size, bool) & dynamic  # broadcast along the channel axis

  def present(self, v) -> np.ndarray | None:
    k = self.known[v]
    if k.axis is None:
      return None
    need = self.need.get(v, np.zeros(len(k.mask), bool))
    return np.flatnonzero(need & ~k.mask)


def _depthwise(eqn) -> bool:
  """A conv with one group per input channel and one output per group."""
  p = eqn.params
  lhs, rhs = (v.aval.shape for v in eqn.invars)
  dn = p['dimension_numbers']
  channels = lhs[dn.lhs_spec[1]]
  return (
    p['feature_group_count'] == channels > 1
    and rhs[dn.rhs_spec[1]] == 1
    and rhs[dn.rhs_spec[0]] == channels
  )


def _layer_of(weight: str) -> str:
  """'params/stage0/conv/kernel' -> 'stage0/conv'."""
  parts = weight.split('/')
  return '/'.join(parts[1:-1] if parts[0] in ('params', 'batch_stats') else parts[:-1])


def _label(sources) -> str | None:
  """The one layer that ``sources`` (weight names) belong to, if one."""
  found = {_layer_of(n) for n in sources}
  return found.pop() if len(found) == 1 else None


def _add(a, b):
  return b if a is None else a + b


def _values(k: Known, shape) -> np.ndarray:
  """An image-dependent value's known channels' values (zeros elsewhere), full shape."""
  return np.zeros(shape) if k.values is None else k.values


def _along(flags, axis, ndim):
  return np.expand_dims(flags, [i for i in range(ndim) if i != axis])


def _out_axis(eqn, ins: list) -> int | None:
  """The output's channel axis, from the image-dependent inputs' (None: not followed)."""
  name, p = eqn.primitive.name, eqn.params
  dyn = [(v, k) for v, k in zip(eqn.invars, ins) if k.dynamic]
  out_shape = eqn.outvars[0].aval.shape
  axes = {k.axis for _, k in dyn}
  if name == 'conv_general_dilated':
    lhs, rhs = eqn.invars
    if not ins[0].dynamic or ins[1].dynamic:
      return None
    dn = p['dimension_numbers']
    grouped = (p['feature_group_count'] > 1 and not _depthwise(eqn)) or p['batch_group_count'] > 1
    return dn.out_spec[1] if ins[0].axis == dn.lhs_spec[1] and not grouped else None
  if name == 'dot_general':
    (lc, rc), (lb, rb) = p['dimension_numbers']
    if ins[0].dynamic and not ins[1].dynamic:  # a layer: its kernel contracts the channels
      if ins[0].axis not in lc or lb or rb:
        return None
      rhs_free = [d for d in range(eqn.invars[1].aval.ndim) if d not in rc]
      lhs_free = eqn.invars[0].aval.ndim - len(lc)
      return lhs_free if rhs_free else None  # the kernel's first free axis: heads, features
    if ins[0].dynamic and ins[1].dynamic:  # two values batched over their channel axis
      left, right = ins[0].axis, ins[1].axis
      if left in lb and right in rb and lb.index(left) == rb.index(right):
        return lb.index(left)
    return None
  if name in ELEMENTWISE:
    # the full-shaped operands' common axis; an operand of size 1 there (a LayerNorm's
    # statistics) is the same for every channel
    full = {k.axis for u, k in dyn if u.aval.shape == out_shape}
    if len(full) > 1:  # a followed operand beside one that is not: every channel of that one
      full.discard(None)
    if not full:  # image-dependent operands constant along one axis that a constant spans
      spans = [
        d
        for d in range(len(out_shape))
        if out_shape[d] > 1 and all(u.aval.shape[d] == 1 for u, _ in dyn)
      ]
      full = set(spans) if len(spans) == 1 and spans[0] > 0 else {None}
    if len(full) != 1 or None in full:
      return None
    (axis,) = full
    fits = all(
      u.aval.shape[axis] == 1 or (k.axis == axis and u.aval.shape[axis] == out_shape[axis])
      for u, k in dyn
    )
    return axis if fits else None
  if None in axes or len(axes) != 1:
    return None
  (axis,) = axes
  v, k = dyn[0]
  in_shape = v.aval.shape
  if name == 'concatenate':
    return axis
  if name == 'stack':
    return axis + (1 if p['axis'] <= axis else 0)
  if name == 'broadcast_in_dim':
    d = p['broadcast_dimensions'][axis]
    return d if out_shape[d] == in_shape[axis] else None
  if name in ('reshape',):
    before = math.prod(in_shape[:axis])
    for j in range(len(out_shape)):
      if math.prod(out_shape[:j]) == before and out_shape[j] == in_shape[axis]:
        return j
    return None
  if name == 'squeeze':
    dims = p['dimensions']
    return axis - sum(d < axis for d in dims) if axis not in dims else None
  if name == 'expand_dims':
    return None
  if name in ('reduce_sum', 'reduce_max', 'reduce_min'):
    axes_ = p['axes']
    if axis in axes_ or 0 in axes_:
      return None
    return axis - sum(a < axis for a in axes_)
  if name in ('reduce_window_sum', 'reduce_window_max'):
    ok = p['window_dimensions'][axis] == 1 and p['window_strides'][axis] == 1
    ok = ok and tuple(p['padding'][axis]) == (0, 0)
    return axis if ok else None
  if name == 'pad':
    return axis if tuple(p['padding_config'][axis]) == (0, 0, 0) else None
  if name == 'slice':
    full = p['start_indices'][axis] == 0 and p['limit_indices'][axis] == in_shape[axis]
    return axis if full and (p['strides'] is None or p['strides'][axis] == 1) else None
  if name == 'transpose':
    return list(p['permutation']).index(axis)
  return None


# ---- pass 3: the compact program ----


def _shape_along(axis: int, ndim: int, size: int) -> tuple:
  return tuple(size if i == axis else 1 for i in range(ndim))


def _vector_or_map(shift: np.ndarray, axis: int) -> np.ndarray:
  """A shift (batch axis 1, channel axis ``axis``) reduced to its channel vector, shaped to
  broadcast, when it does not vary over the other axes within ``UNIFORM_RTOL``."""
  first = shift[tuple(slice(None) if i == axis else slice(0, 1) for i in range(shift.ndim))]
  scale = max(float(np.max(np.abs(shift), initial=0.0)), 1e-30)
  if np.max(np.abs(shift - first), initial=0.0) <= UNIFORM_RTOL * scale:
    return first
  return shift


class Emitter(Derivation):
  """Pass 3 over a derivation's facts: ``run()`` gives the program and its weights."""

  def run(self) -> tuple:
    self.forward()
    self.backward()
    image = self.jaxpr.invars[-1]
    self.vals = {image: self._plain(0, self.present(image), image.aval.ndim - 1)}
    for i, eqn in enumerate(self.jaxpr.eqns):
      out = eqn.outvars[0]
      if not self.known[out].dynamic or not self.need.get(out, np.zeros(1, bool)).any():
        continue
      self.eqn_index = i
      self.vals[out] = self._emit(eqn)
    (out,) = self.jaxpr.outvars
    k = self.known[out]
    if not k.dynamic:  # every searchable input dropped: the same logits for every image
      self.layer_name = 'logits'
      ref = self._step('constant', (0,), {}, {'constant': np.asarray(k.const[:1], np.float64)})
    else:
      full = None if k.axis is None else np.arange(out.aval.shape[k.axis])
      ref = self._placed(out, full)
    weights = {n: _stored(n, w) for n, w in self.weights.items()}
    return Program(tuple(self.steps), ref, k.axis), weights

  # values
  def _plain(self, ref, channels, axis) -> Value:
    return Value(axis=axis, present=channels, terms=[Term(ref, channels)])

  def _new_ref(self) -> int:
    self.refs += 1
    return self.refs - 1

  def _step(self, kind: str, inputs: tuple, params: dict, weights: dict = None) -> int:
    names = []
    for role, array in (weights or {}).items():
      name = self._weight_name(role)
      self.weights[name] = array
      names.append(name)
    ref = self._new_ref()
    self.steps.append(Step(kind, tuple(inputs), dict(params, out=ref), tuple(names)))
    return ref

  def _weight_name(self, role: str) -> str:
    base = getattr(self, 'layer_name', None) or f'op{self.eqn_index}'
    name = f'{base}/{role}'
    n = 1
    while name in self.weights:
      n += 1
      name = f'{base}_{n}/{role}'
    return name

  def _value(self, v) -> Value:
    """The emitted value of ``v``; pending only for its one reader."""
    val = self.vals[v]
    if self.uses.get(v, 0) > 1 and not self._is_plain(val):
      ref = self._materialize(val)
      val = self.vals[v] = self._plain(ref, val.present, val.axis)
    return val

  @staticmethod
  def _is_plain(val: Value) -> bool:
    if val.stacked is not None or val.shift is not None:
      return False
    if len(val.terms) != 1:
      return False
    t = val.terms[0]
    return t.scale is None and (val.present is None or np.array_equal(t.channels, val.present))

  def _materialize(self, val: Value) -> int:
    saved = self.layer_name
    try:
      return self._materialized(val)
    finally:
      self.layer_name = saved

  def _materialized(self, val: Value) -> int:
    """A ref holding ``val`` at exactly its present channels; pending affine ops folded into
    their producers where they have no other reader."""
    if val.members is not None:  # stacked: every member at the same channels
      if any(not self._known_of(m).dynamic for m in val.members):
        raise Unsupported('a stack of image-independent values read other than summed')
      refs = [self._placed(m, val.present) for m in val.members]
      return self._step('stack', refs, {'axis': val.stacked})
    if self._is_plain(val):
      return val.terms[0].ref
    present, axis = val.present, val.axis
    self.layer_name = val.label  # names the scale and offset stored here
    shift = None if val.shift is None else np.array(val.shift, np.float64)
    unassigned = np.ones(len(present), bool)
    refs = []
    for t in val.terms:
      pos = np.searchsorted(present, t.channels)
      part = None
      if shift is not None:
        mine = unassigned[pos]
        part = np.zeros(shift.shape[:axis] + (len(pos),) + shift.shape[axis + 1 :])
        idx = tuple(slice(None) if i != axis else pos[mine] for i in range(shift.ndim))
        sub = tuple(slice(None) if i != axis else np.flatnonzero(mine) for i in range(shift.ndim))
        part[sub] = shift[idx]
      if t.producer is not None and t.scale_only:
        if t.scale is not None:
          self._fold(t.producer, t.scale, None)
        refs.append((t.ref, t.channels))
        continue
      if t.producer is not None and (t.scale is not None or (part is not None and part.any())):
        self._fold(t.producer, t.scale, part)
        if part is not None:
          unassigned[pos] = False
        refs.append((t.ref, t.channels))
        continue
      ref, parts, literal = t.ref, {}, {}
      if t.scale is not None:  # from shapes alone (a mean's divisor): part of the program
        (parts if t.learned else literal)['scale'] = np.asarray(t.scale, np.float64)
      if t.scale is not None and part is not None and part.any():  # its share of the shift
        (parts if val.shift_learned else literal)['shift'] = _vector_or_map(part, axis)
        unassigned[pos] = False
      if parts or literal:
        ref = self._affine_step(ref, axis, parts, literal)
      refs.append((ref, t.channels))
    ref = self._combine(refs, present, axis)
    if shift is not None:
      rest = shift * _along(unassigned, axis, shift.ndim)
      if rest.any():
        rest = {'shift': _vector_or_map(rest, axis)}
        ref = self._affine_step(ref, axis, *((rest, {}) if val.shift_learned else ({}, rest)))
    return ref

  def _affine_step(self, ref: int, axis: int, weights: dict, literal: dict) -> int:
    """``ref * scale + shift``: stored ``weights``, or ``literal`` constants of the program."""
    literal = {k: np.asarray(v, np.float32) for k, v in literal.items()}
    return self._step('affine', (ref,), {'axis': axis, 'literal': literal}, weights)

  def _fold(self, producer_ref: int, scale, shift) -> None:
    """Folds ``* scale + shift`` into the conv or dense step that made ``producer_ref``."""
    index = self._producer(producer_ref)
    step = self.steps[index]
    kernel_name = step.weights[0]
    out_dim = step.params['kernel_out_dim']
    axis = step.params['axis']
    if scale is not None:
      k = np.asarray(self.weights[kernel_name], np.float64)
      self.weights[kernel_name] = k * np.reshape(scale, _shape_along(out_dim, k.ndim, len(scale)))
    bias = self.weights[step.weights[1]] if len(step.weights) > 1 else None
    ndim = step.params['ndim']
    n = len(scale) if scale is not None else shift.shape[axis]
    if bias is None:
      bias = np.zeros(_shape_along(axis, ndim, n))
    if scale is not None:
      bias = bias * np.reshape(scale, _shape_along(axis, ndim, n))
    if shift is not None:
      bias = bias + shift
    bias = _vector_or_map(np.asarray(bias, np.float64), axis)
    if len(step.weights) > 1:
      self.weights[step.weights[1]] = bias
    else:
      name = step.weights[0].rsplit('/', 1)[0] + '/bias'
      self.weights[name] = bias
      self.steps[index] = step._replace(weights=step.weights + (name,))

  def _combine(self, refs: list, present: np.ndarray, axis: int) -> int:
    """One ref of ``present`` channels from refs each holding some of them (summed)."""
    if len(refs) == 1 and np.array_equal(refs[0][1], present):
      return refs[0][0]
    # parts that tile ``present`` side by side are concatenated, the rest placed; then summed
    whole = [(r, c) for r, c in refs if np.array_equal(c, present)]
    parts = sorted(
      [(r, c) for r, c in refs if not np.array_equal(c, present)], key=lambda rc: rc[1][0]
    )
    while parts:
      tile, end, rest = [], -1, []
      for r, c in parts:
        if c[0] > end and (not tile or np.all(np.diff(np.concatenate([tile[-1][1], c])) > 0)):
          tile.append((r, c))
          end = c[-1]
        else:
          rest.append((r, c))
      joined = np.concatenate([c for _, c in tile])
      if len(tile) > 1 and np.array_equal(joined, present):
        whole.append((self._step('concatenate', [r for r, _ in tile], {'axis': axis}), present))
        parts = rest
      else:
        whole += [(self._place(r, c, present, axis), present) for r, c in parts]
        parts = []
    refs = [r for r, _ in whole]
    return refs[0] if len(refs) == 1 else self._step('sum', refs, {})

  def _place(self, ref: int, have: np.ndarray, want: np.ndarray, axis: int) -> int:
    """``ref`` (channels ``have``) at channels ``want``: selected, zeros where it has none."""
    if np.array_equal(have, want):
      return ref
    return self._step(
      'place', (ref,), {'axis': axis, 'have': tuple(map(int, have)), 'want': tuple(map(int, want))}
    )

  def _placed(self, v, want) -> int:
    """A ref of ``v`` at channels ``want`` (None: the whole value), known channels filled in."""
    val = self._value(v)
    ref = self._materialize(val)
    k = self.known[v]
    if k.axis is None:
      return ref
    want = np.asarray(want, int) if want is not None else np.arange(v.aval.shape[k.axis])
    ref = self._place(ref, val.present, want, k.axis)
    known = k.mask[want]
    if known.any():
      values = _values(k, v.aval.shape)[:1] * _along(k.mask, k.axis, v.aval.ndim)
      values = np.take(values, want, axis=k.axis)
      if values.any():
        ref = self._affine_step(ref, k.axis, {'shift': _vector_or_map(values, k.axis)}, {})
    return ref

  def _const_along(self, k: Known, shape, axis, present):
    """A constant operand as a per-channel vector over ``present`` (None: it is not one)."""
    vector = _per_channel(k.const, shape, axis)
    return None if vector is None else vector[present]

  # ops
  def _emit(self, eqn) -> Value:
    name = eqn.primitive.name
    out = eqn.outvars[0]
    ko = self.known[out]
    present = self.present(out)
    self.layer_name = None
    if name == 'conv_general_dilated':
      return self._conv(eqn, ko, present)
    if name == 'dot_general':
      return self._dot(eqn, ko, present)
    if name in ('add', 'sub', 'mul', 'div', 'neg') and ko.axis is not None:
      pending = self._affine(eqn, ko, present)
      if pending is not None:
        return pending
    if name == 'concatenate' and ko.axis is not None:
      return self._concatenate(eqn, ko, present)
    if name == 'stack' and ko.axis is not None:
      return Value(ko.axis, present, [], stacked=eqn.params['axis'], members=list(eqn.invars))
    if name == 'reduce_sum' and ko.axis is not None:
      summed = self._stack_sum(eqn, ko, present)
      if summed is not None:
        return summed
    if name in LINEAR and ko.axis is not None:
      passed = self._through_linear(eqn, ko, present)
      if passed is not None:
        return passed
    return self._generic(eqn, ko, present)

  def _through_linear(self, eqn, ko: Known, present) -> Value | None:
    """A channel-by-channel linear op (a sum pooling, a zero padding, a slice) on one pending
    product: the op runs on the product's input and the scale stays pending after it (it
    commutes), still foldable into the producer's kernel (not a shift: a pooling sums it)."""
    v = eqn.invars[0]
    if not self.known[v].dynamic or self.uses.get(v, 0) > 1:
      return None
    if eqn.primitive.name == 'pad' and np.any(self._known_of(eqn.invars[1]).const != 0):
      return None
    val = self._value(v)
    if val.members is not None or val.shift is not None or len(val.terms) != 1:
      return None
    t = val.terms[0]
    if t.scale is None or not np.array_equal(t.channels, present):
      return None
    operands = [('ref', None)] + [
      ('scalar', np.asarray(self._known_of(u).const, np.float32)) for u in eqn.invars[1:]
    ]
    ref = self._step(
      'op',
      (t.ref,),
      {
        'primitive': eqn.primitive,
        'operands': tuple(operands),
        'p': self._runtime_params(eqn, ko, present),
      },
    )
    return Value(ko.axis, present, [dataclasses.replace(t, ref=ref, scale_only=True)])

  def _dyn_inputs(self, eqn):
    return [
      (i, v)
      for i, v in enumerate(eqn.invars)
      if not isinstance(v, core.Literal) and self.known[v].dynamic
    ]

  def _kernel(self, v) -> tuple:
    """(kernel value, the layer's name when it is computed from one weight of the network)."""
    k = self._known_of(v)
    name = next(iter(k.sources)) if len(k.sources) == 1 else None
    return np.asarray(k.const, np.float64), (_layer_of(name) if name else None)

  def _conv(self, eqn, ko: Known, present) -> Value:
    p = eqn.params
    x, w = eqn.invars
    if ko.axis is None:
      return self._generic(eqn, ko, present)
    kernel, layer = self._kernel(w)
    self.layer_name = layer
    dn = p['dimension_numbers']
    kin, kout = dn.rhs_spec[1], dn.rhs_spec[0]
    kx = self.known[x]
    xval_present = self.present(x)
    conv_params = {
      k: p[k]
      for k in ('window_strides', 'padding', 'lhs_dilation', 'rhs_dilation', 'dimension_numbers')
    }
    if _depthwise(eqn):
      ref = self._placed_dynamic(x, present)
      k = np.take(kernel, present, axis=kout)
      groups = len(present)
    else:
      ref, scale = self._input_scale(x)
      k = np.take(np.take(kernel, xval_present, axis=kin), present, axis=kout)
      if scale is not None:
        k = k * np.reshape(scale, _shape_along(kin, k.ndim, len(scale)))
      groups = 1
    shift = None
    if not _depthwise(eqn) and kx.mask.any():
      rows = np.flatnonzero(kx.mask)
      known = np.take(_values(kx, x.aval.shape)[:1], rows, axis=kx.axis).astype(np.float32)
      kk = np.take(np.take(kernel, rows, axis=kin), present, axis=kout).astype(np.float32)
      c = np.asarray(
        jax.lax.conv_general_dilated(known, kk, precision='highest', **conv_params), np.float64
      )
      shift = c if c.any() else None
    ndim = eqn.outvars[0].aval.ndim
    ref = self._step(
      'conv',
      (ref,),
      {
        **conv_params,
        'feature_group_count': groups,
        'kernel_out_dim': kout,
        'axis': ko.axis,
        'ndim': ndim,
      },
      {'kernel': k},
    )
    return Value(ko.axis, present, [Term(ref, present, producer=ref)], shift=shift)

  def _placed_dynamic(self, v, want) -> int:
    """A ref of ``v`` at its computed channels ``want`` (no known ones)."""
    val = self._value(v)
    return self._place(
      self._materialize(val), val.present, np.asarray(want, int), self.known[v].axis
    )

  def _input_scale(self, v):
    """(ref, per-channel scale) of ``v`` when it is one computed value times a pending scale
    (a mean's division, say) that its reader, a conv or a dense layer, takes into its kernel
    rows (exact: zero padding stays zero); else (ref, None)."""
    val = self._value(v)
    if val.members is None and val.shift is None and len(val.terms) == 1:
      t = val.terms[0]
      if t.scale is not None and np.array_equal(t.channels, val.present):
        return t.ref, t.scale
    return self._materialize(val), None

  def _dot(self, eqn, ko: Known, present) -> Value:
    """A layer's product with its kernel (a dense layer, attention's projections): the
    kernel's rows of the input channels computed, its columns (along its first free axis)
    of the output channels needed."""
    x, w = eqn.invars
    if ko.axis is None or self.known[w].dynamic:
      return self._generic(eqn, ko, present)
    (lc, rc), _ = eqn.params['dimension_numbers']
    kernel, layer = self._kernel(w)
    self.layer_name = layer
    kx = self.known[x]
    have = self.present(x)
    rin = rc[list(lc).index(kx.axis)]
    rout = [d for d in range(kernel.ndim) if d not in rc][0]
    k = np.take(np.take(kernel, have, axis=rin), present, axis=rout)
    ref, scale = self._input_scale(x)
    if scale is not None:
      k = k * np.reshape(scale, _shape_along(rin, k.ndim, len(scale)))
    shift = None
    if kx.mask.any():
      rows = np.flatnonzero(kx.mask)
      known = np.take(_values(kx, x.aval.shape)[:1], rows, axis=kx.axis)
      c = np.tensordot(
        known, np.take(np.take(kernel, rows, axis=rin), present, axis=rout), axes=(lc, rc)
      )
      shift = c if c.any() else None
    ndim = eqn.outvars[0].aval.ndim
    params = {'contract': tuple(lc), 'kernel_in_dims': tuple(rc), 'kernel_out_dim': rout}
    ref = self._step('dot', (ref,), {**params, 'axis': ko.axis, 'ndim': ndim}, {'kernel': k})
    return Value(ko.axis, present, [Term(ref, present, producer=ref)], shift=shift)

  def _affine(self, eqn, ko: Known, present) -> Value | None:
    """add / sub / mul / div / neg with at most one image-dependent operand, or a sum or
    difference of two: kept pending. None: not of that form."""
    name = eqn.primitive.name
    shape = eqn.outvars[0].aval.shape
    dyn = self._dyn_inputs(eqn)
    if any(self.known[v].axis != ko.axis or v.aval.shape != shape for _, v in dyn):
      return None
    if name == 'neg':
      return self._scaled(self._value(dyn[0][1]), -np.ones(len(present)), present, ko)
    if len(dyn) == 2:
      if name not in ('add', 'sub'):
        return None
      (_, a), (_, b) = dyn
      return self._sum([(a, 1.0), (b, -1.0 if name == 'sub' else 1.0)], ko, present)
    ((i, v),) = dyn
    other = eqn.invars[1 - i]
    kc = self._known_of(other)
    val = self._value(v)
    if val.members is not None or val.stacked is not None:
      return None
    vector = self._const_along(kc, shape, ko.axis, present)
    if name in ('mul', 'div'):
      if vector is None or (name == 'div' and i == 1):
        return None
      factor = vector if name == 'mul' else 1.0 / vector
      if not np.all(np.isfinite(factor)):
        return None
      scaled = self._scaled(val, factor, present, ko, learned=bool(kc.sources))
      return dataclasses.replace(scaled, label=_label(kc.sources) or val.label)
    # add / sub: a per-channel or per-pixel constant
    c = _batch_constant(kc.const, shape)
    if c is None:
      return None
    c = np.take(c, present, axis=ko.axis)
    if name == 'sub':
      if i == 1:
        val = self._scaled(val, -np.ones(len(present)), present, ko)
      else:
        c = -c
    shifted = self._shifted(val, _vector_or_map(c, ko.axis), present, ko, learned=bool(kc.sources))
    return dataclasses.replace(shifted, label=_label(kc.sources) or val.label)

  def _restricted(self, val: Value, present, axis) -> Value:
    """``val`` with only channels ``present`` (a product with a constant zeroed the rest)."""
    if np.array_equal(val.present, present):
      return val
    terms = []
    for t in val.terms:
      keep = np.isin(t.channels, present)
      if keep.all():
        terms.append(t)
        continue
      if not keep.any():
        continue
      if t.producer is not None:
        self._drop_outputs(t.producer, np.flatnonzero(keep))
        terms.append(
          Term(t.ref, t.channels[keep], None if t.scale is None else t.scale[keep], t.producer)
        )
      else:
        ref = self._place(t.ref, t.channels, t.channels[keep], axis)
        terms.append(Term(ref, t.channels[keep], None if t.scale is None else t.scale[keep]))
    shift = val.shift
    if shift is not None:
      shift = (
        np.take(shift, np.searchsorted(val.present, present), axis=axis)
        if shift.shape[axis] > 1
        else shift
      )
    return Value(axis, present, terms, shift=shift, shift_learned=val.shift_learned)

  def _producer(self, ref: int) -> int:
    """The index of the step whose output is ``ref``."""
    return next(i for i, step in enumerate(self.steps) if step.params['out'] == ref)

  def _drop_outputs(self, producer_ref: int, keep) -> None:
    step = self.steps[self._producer(producer_ref)]
    if step.kind == 'conv' and step.params['feature_group_count'] > 1:
      raise Unsupported('a depthwise conv whose outputs a later product zeroes')
    out_dim, axis = step.params['kernel_out_dim'], step.params['axis']
    self.weights[step.weights[0]] = np.take(self.weights[step.weights[0]], keep, axis=out_dim)
    if len(step.weights) > 1:
      b = self.weights[step.weights[1]]
      self.weights[step.weights[1]] = np.take(b, keep, axis=axis) if b.shape[axis] > 1 else b

  def _scaled(self, val: Value, factor, present, ko, learned: bool = False) -> Value:
    val = self._restricted(val, present, ko.axis)
    if np.all(factor == 1.0):  # a mask's kept channels
      return val
    terms = []
    for t in val.terms:
      f = factor[np.searchsorted(present, t.channels)]
      scale = f if t.scale is None else t.scale * f
      terms.append(dataclasses.replace(t, scale=scale, learned=t.learned or learned))
    shift = None
    if val.shift is not None:
      shift = val.shift * np.reshape(factor, _shape_along(ko.axis, val.shift.ndim, len(factor)))
    label = val.label
    return Value(
      ko.axis, present, terms, shift=shift, shift_learned=val.shift_learned or learned, label=label
    )

  def _shifted(self, val: Value, c, present, ko, learned: bool = True) -> Value:
    val = self._restricted(val, present, ko.axis)
    if not np.any(c):  # a sum's start, 0
      return val
    shift = c if val.shift is None else val.shift + c
    learned = learned or (val.shift is not None and val.shift_learned)
    return Value(
      ko.axis, present, list(val.terms), shift=shift, shift_learned=learned, label=val.label
    )

  def _known_shift(self, v, present, axis, ndim):
    """The known channels of ``v`` among ``present`` as a shift (None: none)."""
    k = self.known[v]
    missing = np.isin(present, np.flatnonzero(k.mask))
    if not missing.any():
      return None
    values = np.take(_values(k, v.aval.shape)[:1], present, axis=axis)
    values = values * _along(missing, axis, ndim)
    return _vector_or_map(values, axis) if values.any() else None

  def _sum(self, addends: list, ko, present) -> Value | None:
    """The pending sum of image-dependent ``addends`` ((var, sign) pairs) at the output's
    ``present`` channels: their terms, their shifts, and the channels one of them knows
    (the others compute) as a shift."""
    terms, shift = [], None
    for v, sign in addends:
      k = self._known_of(v)
      if not k.dynamic:  # a stacked constant: image-independent, a shift
        c = _batch_constant(k.const, v.aval.shape)
        if c is None:
          raise Unsupported('a sum with a constant that differs between images')
        shift = _add(shift, sign * _vector_or_map(np.take(c, present, axis=ko.axis), ko.axis))
        continue
      val = self._value(v)
      if val.members is not None or val.stacked is not None:
        return None
      if sign < 0:
        val = self._scaled(val, -np.ones(len(val.present)), val.present, self.known[v])
      terms += [t for t in val.terms if len(t.channels)]
      if val.shift is not None:
        shift = _add(shift, self._widened(val.shift, val.present, present, ko.axis))
      known = self._known_shift(v, present, ko.axis, v.aval.ndim)
      if known is not None:
        shift = _add(shift, sign * known)
    return Value(ko.axis, present, terms, shift=shift)

  @staticmethod
  def _widened(shift, have, present, axis):
    """A shift over channels ``have`` as one over ``present`` (zero elsewhere)."""
    shape = shift.shape[:axis] + (len(present),) + shift.shape[axis + 1 :]
    out = np.zeros(shape)
    pos = np.searchsorted(present, have)
    out[tuple(slice(None) if i != axis else pos for i in range(shift.ndim))] = shift
    return out

  def _concatenate(self, eqn, ko: Known, present) -> Value:
    d = eqn.params['dimension']
    if d != ko.axis:
      return self._generic(eqn, ko, present)
    terms, shift, offset = [], None, 0
    for v in eqn.invars:
      size = v.aval.shape[d]
      if isinstance(v, core.Literal) or not self.known[v].dynamic:
        offset += size
        continue
      val = self._value(v)
      if val.members is not None or val.stacked is not None:
        return self._generic(eqn, ko, present)
      for t in val.terms:
        terms.append(dataclasses.replace(t, channels=t.channels + offset))
      if val.shift is not None:
        shift = _add(shift, self._widened(val.shift, val.present + offset, present, d))
      offset += size
    return Value(ko.axis, present, terms, shift=shift)

  def _stack_sum(self, eqn, ko: Known, present) -> Value | None:
    (v,) = eqn.invars
    val = self.vals.get(v)
    axes = tuple(eqn.params['axes'])
    if val is None or val.members is None or axes != (val.stacked,) or self.uses.get(v, 0) > 1:
      return None
    return self._sum([(member, 1.0) for member in val.members], ko, present)

  def _generic(self, eqn, ko: Known, present) -> Value:
    """Any other op, on materialised operands: at the output's channels where it keeps the
    channel axis, whole where it does not."""
    name = eqn.primitive.name
    operands = []
    for v in eqn.invars:
      k = self._known_of(v)
      if not k.dynamic:
        c = np.asarray(k.const)
        if ko.axis is not None and c.ndim == eqn.outvars[0].aval.ndim and name in ELEMENTWISE:
          c = np.broadcast_to(c, eqn.outvars[0].aval.shape)
          c = _batch_constant(c, c.shape)
          if c is None:
            raise Unsupported(f'{name} with a constant that differs between images')
          c = _vector_or_map(np.take(c, present, axis=ko.axis), ko.axis)
        if c.size == 1:
          operands.append(('scalar', float(c.reshape(()))))
        elif not k.sources:  # follows from shapes: part of the program, not a weight
          operands.append(('scalar', np.asarray(c, np.float32)))
        else:
          operands.append(('weight', self._store('constant', c)))
        continue
      if ko.axis is None:
        operands.append(('ref', self._placed(v, None)))
      elif self.known[v].axis is None and v.aval.shape[ko.axis] == len(
        self.known[eqn.outvars[0]].mask
      ):
        whole = np.arange(v.aval.shape[ko.axis])  # not followed: all its channels, then ours
        operands.append(('ref', self._place(self._placed(v, None), whole, present, ko.axis)))
      else:
        operands.append(('ref', self._placed(v, self._input_channels(eqn, v, ko, present))))
    params = self._runtime_params(eqn, ko, present)
    refs = [r for kind, r in operands if kind == 'ref']
    described = tuple((kind, None if kind == 'ref' else r) for kind, r in operands)
    ref = self._step('op', refs, {'primitive': eqn.primitive, 'operands': described, 'p': params})
    if ko.axis is None:
      return Value(None, None, [Term(ref, None)])
    return self._plain(ref, present, ko.axis)

  def _store(self, role: str, array) -> str:
    name = self._weight_name(role)
    self.weights[name] = np.asarray(array, np.float64)
    return name

  def _input_channels(self, eqn, v, ko, present):
    """The channels of input ``v`` an op that keeps the channel axis reads for ``present``."""
    k = self.known[v]
    if k.axis is None:
      return None
    if v.aval.shape[k.axis] == 1 and eqn.outvars[0].aval.shape[ko.axis] != 1:
      return np.zeros(1, int)
    return present

  def _runtime_params(self, eqn, ko: Known, present) -> dict:
    """The op's parameters with the channel axis at its compact size; shapes name the batch
    as None (the images' at run time)."""
    name, p = eqn.primitive.name, dict(eqn.params)
    out_shape = list(eqn.outvars[0].aval.shape)
    if ko.axis is not None:
      out_shape[ko.axis] = len(present)
    if name in ('reshape', 'broadcast_in_dim'):
      if out_shape[0] != BATCH:
        raise Unsupported(f'{name} across the batch axis')
      key = 'new_sizes' if name == 'reshape' else 'shape'
      p[key] = (None,) + tuple(out_shape[1:])
    if name == 'slice':
      in_shape = list(eqn.invars[0].aval.shape)
      limit = list(p['limit_indices'])
      if limit[0] != in_shape[0] or p['start_indices'][0] != 0:
        raise Unsupported('slice across the batch axis')
      limit[0] = None
      k = self.known[eqn.invars[0]]
      if k.axis is not None and ko.axis is not None:
        limit[k.axis] = len(present)
      p['limit_indices'] = tuple(limit)
    if name in ('reduce_sum', 'reduce_max', 'reduce_min') and 0 in p['axes']:
      raise Unsupported(f'{name} across the batch axis')
    if name == 'transpose' and p['permutation'][0] != 0:
      raise Unsupported('transpose of the batch axis')
    return p


def _stored(name: str, array) -> np.ndarray:
  """float32; a per-channel bias, scale or shift as a vector (reshaped along its axis when
  run)."""
  array = np.asarray(array, np.float32)
  role = name.rsplit('/', 1)[-1]
  if role in ('bias', 'scale', 'shift') and sum(d > 1 for d in array.shape) <= 1:
    return array.reshape(-1)
  if role in ('bias', 'shift') and array.ndim > 1 and array.shape[0] == 1:
    return array[0]  # a map: the batch axis added back when run
  return array


# ---- running it ----


_recorders = []  # while ``recording`` is active: lists that conv and dense layers append to


@contextlib.contextmanager
def recording():
  """Collects every convolution and dense product traced inside (``apply``), in order, as
  ``(kind, input shape, kernel shape, strides, dilation, groups, macs)``; MACs per call
  (trace one image for MACs per image)."""
  _recorders.append([])
  try:
    yield _recorders[-1]
  finally:
    _recorders.pop()


def _record(kind, x, kernel, out, strides=(1, 1), dilation=(1, 1), groups=1, contracted=1):
  if not _recorders:
    return
  if kind == 'conv':
    macs = math.prod(out.shape) * math.prod(kernel.shape) // kernel.shape[-1]
  else:
    macs = math.prod(out.shape) * contracted
  entry = (kind, tuple(x.shape), tuple(kernel.shape), tuple(strides), tuple(dilation), groups, macs)
  _recorders[-1].append(entry)


def same_conv(x, kernel, stride: int, dilation: int, groups: int):
  """A SAME-padded NHWC x HWIO convolution, recorded as the program's are (the latency
  table times one alone)."""
  y = jax.lax.conv_general_dilated(
    x,
    kernel,
    (stride, stride),
    'SAME',
    rhs_dilation=(dilation, dilation),
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    feature_group_count=groups,
  )
  _record('conv', x, kernel, y, (stride, stride), (dilation, dilation), groups)
  return y


def _run_step(step: Step, env: dict, weights: dict):
  p = step.params
  ins = [env[r] for r in step.inputs]
  kind = step.kind
  if kind == 'conv':
    x = ins[0]
    kernel = weights[step.weights[0]].astype(x.dtype)
    y = jax.lax.conv_general_dilated(
      x,
      kernel,
      p['window_strides'],
      p['padding'],
      lhs_dilation=p['lhs_dilation'],
      rhs_dilation=p['rhs_dilation'],
      dimension_numbers=p['dimension_numbers'],
      feature_group_count=p['feature_group_count'],
    )
    _record('conv', x, kernel, y, p['window_strides'], p['rhs_dilation'], p['feature_group_count'])
    return _biased(y, step, weights, p['axis'])
  if kind == 'dot':
    kernel = weights[step.weights[0]].astype(ins[0].dtype)
    y = jnp.tensordot(ins[0], kernel, axes=(p['contract'], p['kernel_in_dims']))
    contracted = math.prod(kernel.shape[d] for d in p['kernel_in_dims'])
    _record('dense', ins[0], kernel, y, contracted=contracted)
    return _biased(y, step, weights, p['axis'])
  if kind == 'affine':
    x = ins[0]
    stored = {name.rsplit('/', 1)[-1]: weights[name] for name in step.weights}
    for role in ('scale', 'shift'):
      for source in (stored, p['literal']):
        if role in source:
          w = jnp.asarray(source[role], x.dtype)
          w = w.reshape(_shape_along(p['axis'], x.ndim, w.size)) if w.ndim == 1 else w
          x = x * w if role == 'scale' else x + w
    return x
  if kind == 'place':
    return _place(ins[0], p['have'], p['want'], p['axis'])
  if kind == 'concatenate':
    return jnp.concatenate(ins, axis=p['axis'])
  if kind == 'sum':
    total = ins[0]
    for x in ins[1:]:
      total = total + x
    return total
  if kind == 'stack':
    return jnp.stack(ins, axis=p['axis'])
  if kind == 'constant':
    c = weights[step.weights[0]]
    return jnp.broadcast_to(c.astype(ins[0].dtype), ins[0].shape[:1] + c.shape[1:])
  return _run_op(p, ins, weights)


def _biased(y, step: Step, weights: dict, axis: int):
  if len(step.weights) < 2:
    return y
  b = weights[step.weights[1]].astype(y.dtype)
  return y + (b.reshape(_shape_along(axis, y.ndim, b.size)) if b.ndim == 1 else b)


def _place(x, have, want, axis):
  """Channels ``want`` of ``x`` (holding ``have``) along ``axis``, zero where absent: a slice
  for a run, else a product with a 0/1 matrix (cheap before a conv on XLA:CPU, see
  ``compact/ops.take``)."""
  have, want = np.asarray(have), np.asarray(want)
  pos = {c: i for i, c in enumerate(have)}
  idx = [pos.get(c, -1) for c in want]
  if all(i >= 0 for i in idx) and idx and idx == list(range(idx[0], idx[0] + len(idx))):
    return jax.lax.slice_in_dim(x, idx[0], idx[0] + len(idx), axis=axis)
  select = np.zeros((len(have), len(want)), np.float32)
  for j, i in enumerate(idx):
    if i >= 0:
      select[i, j] = 1.0
  moved = jnp.moveaxis(x, axis, -1) @ select.astype(x.dtype)
  return jnp.moveaxis(moved, -1, axis)


def _run_op(p: dict, ins: list, weights: dict):
  """Any other op: its operands (refs, scalars, stored constants) and parameters, with the
  batch taken from the image-dependent operand."""
  it = iter(ins)
  operands = []
  for kind, value in p['operands']:
    operands.append(next(it) if kind == 'ref' else value if kind == 'scalar' else weights[value])
  name, params = p['primitive'].name, dict(p['p'])
  if name in ELEMENTWISE:
    shape = jnp.broadcast_shapes(*(np.shape(o) for o in operands))
    operands = [
      jnp.broadcast_to(
        jnp.asarray(o, ins[0].dtype if np.ndim(o) == 0 and name != 'select_n' else None), shape
      )
      for o in operands
    ]
    return p['primitive'].bind(*operands, **params)
  batch = ins[0].shape[0]
  for key in ('new_sizes', 'shape', 'limit_indices'):
    if key in params:
      params[key] = (batch,) + tuple(params[key][1:])
  operands = [jnp.asarray(o, jnp.float32) if isinstance(o, np.ndarray) else o for o in operands]
  out = p['primitive'].bind(*operands, **params)
  if name == 'conv_general_dilated':  # one the derivation ran whole (a grouped conv)
    _record(
      'conv', operands[0], operands[1], out, params['window_strides'], params['rhs_dilation'],
      params['feature_group_count'],
    )  # fmt: skip
  if name == 'dot_general':  # a product of two image-dependent values (attention), or whole
    (contract, _), _ = params['dimension_numbers']
    _record(
      'dense',
      operands[0],
      operands[1],
      out,
      contracted=math.prod(operands[0].shape[d] for d in contract),
    )
  return out


def apply(program: Program, weights: dict, images):
  """The compact network's logits of ``images`` (any batch size)."""
  env = {0: images}
  for step in program.steps:
    env[step.params['out']] = _run_step(step, env, weights)
  return env[program.output]


def derive(model, variables: dict, mask, image_shape: tuple) -> tuple:
  """(program, weights) of candidate ``mask``'s compact network; raises ``Unsupported``."""
  weights = jax.device_get(
    {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}
  )
  mask = jax.tree.map(np.asarray, jax.device_get(mask))
  jaxpr, names, values = trace(model, weights, mask, image_shape)
  return Emitter(jaxpr, names, values).run()
