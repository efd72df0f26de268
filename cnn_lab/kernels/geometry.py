"""A convolution's geometry: explicit padding and the output map size, in
the terms every path of this package takes (NHWC input, HWIO kernel)."""

from jax import lax


def explicit_padding(padding, in_hw, kernel_hw, strides):
  """'SAME', 'VALID', an int on every side, or per-axis pairs, as a list of
  (low, high) pairs."""
  if isinstance(padding, str):
    return lax.padtype_to_pads(in_hw, kernel_hw, strides, padding)
  if isinstance(padding, int):
    return [(padding, padding)] * 2
  return [tuple(p) if not isinstance(p, int) else (p, p) for p in padding]


def conv_geometry(in_hw, kernel_hw, strides, padding):
  """Explicit ((low, high), (low, high)) padding, as a hashable tuple, and
  the output map size (out_h, out_w)."""
  pads = tuple(tuple(int(v) for v in p)
               for p in explicit_padding(padding, in_hw, kernel_hw, strides))
  out_hw = tuple((size + lo + hi - k) // s + 1 for size, (lo, hi), k, s in
                 zip(in_hw, pads, kernel_hw, strides))
  return pads, out_hw
