"""Loads nanobragg_ops and prints tricubic structure-factor values and their
gradients for a few Miller indices."""

import torch

import nanobragg_ops

torch.manual_seed(0)
# A smooth structure-factor grid over h, k, l in [-8, 8].
idx = torch.arange(-8, 9, dtype=torch.float64)
h, k, l = torch.meshgrid(idx, idx, idx, indexing="ij")
grid = (100 * torch.exp(-(h**2 + k**2 + l**2) / 50) + 1).requires_grad_(True)

hkl = torch.tensor(
    [[0.0, 0.0, 0.0], [1.5, -2.25, 3.1], [4.7, 0.3, -5.9], [7.6, 0.0, 0.0]],
    dtype=torch.float64,
    requires_grad=True,
)
F = nanobragg_ops.tricubic_interp(grid, hkl, (-8, -8, -8), default_value=0.0, out_of_range="nearest")
F.sum().backward()

print(f"library: {nanobragg_ops.library_path}")
print(f"{'h':>6} {'k':>6} {'l':>6} {'F':>10} {'dF/dh':>10} {'dF/dk':>10} {'dF/dl':>10}")
for x, f, g in zip(hkl.detach(), F.detach(), hkl.grad):
    print(" ".join(f"{v:6.2f}" for v in x.tolist()), f"{f.item():10.4f}",
          " ".join(f"{v:10.4f}" for v in g.tolist()))
print(f"dF/dgrid: {int((grid.grad != 0).sum())} nodes touched, sum {grid.grad.sum().item():.6f}"
      " (3 interpolated points whose 64 weights sum to 1 each, plus 1 nearest-node point)")
print("(7.6, 0, 0) needs nodes 6..9, and 9 > h_max = 8, so it takes the nearest node's (8) value: 'nearest' mode.")
