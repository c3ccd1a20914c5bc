"""Tolerances for numbers that pass through float32 kernels, derived once for the whole suite.

A kernel set (or thread count) evaluates the same float32 operations in another order, blocked
or fused (FMA): the results differ in their last bits, not in their meaning. Every float of a report
document falls in one of three classes (`test_golden_report.rule`):

- **exact**: strings, keys, list lengths, booleans, integers, and floats that are counts or
  ratios of counts (n, counts, top-1, accuracy, NC4's disagreement share). A count moves only
  when an image sits on a decision boundary (a tie of the two largest logits, a confidence on a
  bin edge) within the float32 noise; `test_no_fixture_image_sits_on_a_boundary` checks that
  every fixture image is farther than the forward budget, so these are exact on any CPU.
  Everything outside `results` and `findings` (the model's and the data's description) is
  exact too; a finding's numbers are copies of results' and are compared as those are.
- **weights** (`WEIGHTS_RTOL` = 1e-12): the classifier's geometry (the `classifier` probe and
  collapse's `nc2_*_weights`) is float64 arithmetic on the identical float32 head weights, with
  no forward pass. Kernels change only the float64 summation order: about n·ε64 ≈ 1.4e-13 for
  the n ≤ 640 terms of a row product, so 1e-12 holds with a margin, and the planted change of
  one head weight by 1e-4 (`test_planted_head_change_fails`) moves these numbers by ~1e-7.
- **forward** (`FORWARD_RTOL` = 64·ε32 ≈ 7.6e-6): everything computed from activations. The
  tiny fixture ViT's logits pass through about 10 float32 matmuls in sequence (patch embed,
  4 blocks × qkv/proj/fc1/fc2, head), each a length-n ≤ 256 dot product whose rounding error
  is about √n·ε32 = 16·ε32 relative in the probabilistic model (Higham & Mary, SIAM J. Sci.
  Comput. 2019); independent stages add in quadrature: √10·16 ≈ 50·ε32. Every probe then
  reduces in float64 (sums over images, a softmax, a solve on C = 10 class means), which adds
  nothing at float32 resolution, and each headline is a smooth function of the features whose
  relative condition is O(1) (means, cosines, variances, trace ratios) or the logit scale for
  NLL and margins (|z| ≲ 10, which the quadrature estimate already over-covers). 64·ε32 is the
  budget; measured spread over 3 kernel sets × 2 thread counts × 3 models is ≤ 4e-7
  (tests/golden/kernel_spread.py), 19× inside it.
  A difference of unit-scale terms (confidence − accuracy, a paired gain, a margin, a mean
  cosine) carries the absolute error of its terms, not a relative one: its condition is
  |terms| / |difference| (≈ 60 for the no-mix model's confidence − accuracy of −0.017), so
  those leaves get the absolute floor `FORWARD_RTOL × 1`.
  Leaves of a list of coordinates (mixup geometry's 2-D projections, per-λ or per-layer series)
  get an absolute floor `FORWARD_RTOL × max|sibling|`: a coordinate near zero (a classifier
  vector's second axis is ~1e-17 of rounding noise) carries the error of the whole vector.

Comparisons that stay tighter than these in other tests compare float64 arithmetic on
identical inputs (closed forms, sums of the same tensors in another order) or the same float32
kernels on the same batches in one process; each says so where it is not evident.
"""

EPS32 = 2.0**-23  # float32 machine epsilon, 1.19e-7
FORWARD_RTOL = 64 * EPS32  # 7.6e-6: anything computed from a float32 forward
WEIGHTS_RTOL = 1e-12  # float64 arithmetic on identical float32 weights
