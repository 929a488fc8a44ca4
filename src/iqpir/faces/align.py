"""Five-point alignment to a 512x512 template, resampling, and paste-back.

Coordinates: a pixel's centre is at integer (x, y); (0, 0) is the centre of the top-left
pixel (the convention of dlib's landmarks and of the published 512 templates). A transform
is a (2, 3) float64 matrix acting on column vectors [x, y, 1].

Paste-back puts back the *change* the restorer made, mapped to output pixels exactly:

    out = bg + M * (U - bg) + sum_i m_i * D_i / max(sum_i m_i, 1)

with bg the background at the output size (the photo, Lanczos-resized by `upscale`, or a
general model's restoration), U the photo Lanczos-resized (U = the photo at upscale 1), m_i
face i's soft mask in output pixels, M = min(sum_i m_i, 1), and D_i the change in output
pixels whose bilinear view through the alignment A_i equals the crop change d_i = restored_i
- aligned_i: D_i = argmin |A_i D - d_i|^2 + eps |D - W_i d_i|^2 (least squares by conjugate
gradients; W_i the antialiased inverse warp). So:
- an identity restorer (d = 0) returns the photo (or U) exactly;
- a face upsampled into the crop (the usual case) gets exactly the change the restorer made:
  if it removes the noise of the crop, the noise leaves the photo; the plain inverse warp
  W_i d_i low-passes the change and leaves ~75% of pixel noise in place (measured on the
  astronaut with sigma = 0.05 noise and a perfect denoiser; with this, 0.4%); at upscale > 1
  what Lanczos adds over bilinear upsampling of the noise stays (26% in the same test);
- a face larger than the crop gets W_i d_i: the detail finer than the crop is the photo's.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

FACE_SIZE = 512


def similarity_from_points(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) taking `src` to `dst`.

    Umeyama, "Least-squares estimation of transformation parameters between two point
    patterns", IEEE TPAMI 13(4), 1991, eqs. 40-42 (no reflection).

    Args:
        src, dst: (K, 2) points, K >= 2.
    Returns:
        (2, 3) float64 matrix A with dst ~ A @ [src; 1].
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or src.shape[0] < 2:
        raise ValueError(f"expected two (K, 2) point sets with K >= 2, got {src.shape} and {dst.shape}")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    xs, xd = src - mu_s, dst - mu_d
    var_s = (xs**2).sum() / len(src)
    if var_s <= 0:
        raise ValueError("the source points coincide; no similarity transform fits them")
    cov = xd.T @ xs / len(src)
    u, d, vt = np.linalg.svd(cov)
    sign = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[1, 1] = -1.0
    rot = u @ sign @ vt
    scale = np.trace(np.diag(d) @ sign) / var_s
    out = np.empty((2, 3))
    out[:, :2] = scale * rot
    out[:, 2] = mu_d - scale * rot @ mu_s
    return out


def invert_affine(a: np.ndarray) -> np.ndarray:
    """The exact inverse of a (2, 3) affine transform."""
    lin = np.linalg.inv(a[:, :2])
    out = np.empty((2, 3))
    out[:, :2] = lin
    out[:, 2] = -lin @ a[:, 2]
    return out


def compose(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The transform x -> a(b(x))."""
    out = np.empty((2, 3))
    out[:, :2] = a[:, :2] @ b[:, :2]
    out[:, 2] = a[:, :2] @ b[:, 2] + a[:, 2]
    return out


def apply_affine(a: np.ndarray, points: np.ndarray) -> np.ndarray:
    """(K, 2) points -> (K, 2) transformed points."""
    p = np.asarray(points, dtype=np.float64)
    return p @ a[:, :2].T + a[:, 2]


def upscale_map(upscale: float) -> np.ndarray:
    """Output pixel -> input pixel for an image resized by `upscale` (pixel areas scale, centres shift)."""
    s = 1.0 / upscale
    return np.array([[s, 0.0, 0.5 * s - 0.5], [0.0, s, 0.5 * s - 0.5]])


def _translate(dx: float, dy: float) -> np.ndarray:
    return np.array([[1.0, 0.0, dx], [0.0, 1.0, dy]])


def warp_affine(src: torch.Tensor, dst_to_src: np.ndarray, size: tuple[int, int], padding: str = "reflection",
                antialias: bool = True) -> torch.Tensor:
    """Resample `src` (C, H, W) onto a (C, h, w) grid: out[:, y, x] = src at dst_to_src([x, y]).

    Bilinear. When the transform shrinks (more than one source pixel per output pixel) and
    `antialias`, the needed part of `src` is first low-passed by an antialiased resize, so a
    large face is not aliased into the crop (nor a 512 crop into a small face).
    padding: "reflection" (mirror at the image border), "border" or "zeros".
    """
    _, H, W = src.shape
    h, w = size
    m = np.asarray(dst_to_src, dtype=np.float64)
    scale = math.sqrt(abs(np.linalg.det(m[:, :2])))  # source pixels per output pixel
    if antialias and scale > 1.0 + 1e-6:
        corners = apply_affine(m, np.array([[-0.5, -0.5], [w - 0.5, -0.5], [-0.5, h - 0.5], [w - 0.5, h - 0.5]]))
        margin = 2.0 * scale + 2.0
        x0 = max(0, math.floor(corners[:, 0].min() - margin))
        y0 = max(0, math.floor(corners[:, 1].min() - margin))
        x1 = min(W, math.ceil(corners[:, 0].max() + margin) + 1)
        y1 = min(H, math.ceil(corners[:, 1].max() + margin) + 1)
        if x1 > x0 and y1 > y0:
            region = src[:, y0:y1, x0:x1]
            rh, rw = region.shape[1:]
            nh, nw = max(1, round(rh / scale)), max(1, round(rw / scale))
            src = F.interpolate(region[None], size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)[0]
            fx, fy = nw / rw, nh / rh
            # region pixel x -> resized pixel (x + 0.5) * fx - 0.5 (pixel areas, as interpolate resizes)
            shrink = np.array([[fx, 0.0, 0.5 * fx - 0.5], [0.0, fy, 0.5 * fy - 0.5]])
            m = compose(shrink, compose(_translate(-x0, -y0), m))
            H, W = nh, nw
    # affine_grid works in normalised coordinates (align_corners=True: -1 and +1 are the centres
    # of the first and last pixels): theta = to_normalised_src o m o from_normalised_out.
    from_out = np.array([[(w - 1) / 2, 0.0, (w - 1) / 2], [0.0, (h - 1) / 2, (h - 1) / 2]])
    to_src = np.array([[2 / (W - 1) if W > 1 else 0.0, 0.0, -1.0 if W > 1 else 0.0],
                       [0.0, 2 / (H - 1) if H > 1 else 0.0, -1.0 if H > 1 else 0.0]])
    theta = torch.tensor(compose(to_src, compose(m, from_out)), dtype=src.dtype, device=src.device)[None]
    grid = F.affine_grid(theta, [1, src.shape[0], h, w], align_corners=True)
    return F.grid_sample(src[None], grid, mode="bilinear", padding_mode=padding, align_corners=True)[0]


def align_face(image: torch.Tensor, landmarks: np.ndarray, template: np.ndarray,
               size: int = FACE_SIZE) -> tuple[torch.Tensor, np.ndarray]:
    """Warp the face with these five landmarks onto the template.

    Args:
        image: (3, H, W) in [0, 1].
        landmarks: (5, 2) in image pixels, in the template's order.
        template: (5, 2) where those points go in the `size` x `size` crop.
    Returns:
        crop (3, size, size) and the (2, 3) image -> crop transform.
    """
    to_crop = similarity_from_points(landmarks, template)
    crop = warp_affine(image, invert_affine(to_crop), (size, size), padding="reflection")
    return crop.clamp(0, 1), to_crop


def face_mask(size: int = FACE_SIZE, erode: float = 0.03, feather: float = 0.12,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """(1, size, size) soft mask in crop space: 0 within `erode`*size of the crop's edges, rising
    to 1 over the next `feather`*size pixels with a raised cosine (a feathered, eroded square)."""
    t = torch.arange(size, dtype=torch.float32, device=device) + 0.5
    dist = torch.minimum(t, size - t)
    ramp = ((dist - erode * size) / max(feather * size, 1e-6)).clamp(0, 1)
    ramp = 0.5 - 0.5 * torch.cos(torch.pi * ramp)
    return (ramp[:, None] * ramp[None, :])[None]


def _face_region(crop_to_out: np.ndarray, size: int, out_hw: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """The output pixels [y0, y1) x [x0, x1) that the crop square covers, clipped to the output."""
    corners = apply_affine(crop_to_out, np.array([[-0.5, -0.5], [size - 0.5, -0.5], [-0.5, size - 0.5],
                                                   [size - 0.5, size - 0.5]]))
    x0 = max(0, math.floor(corners[:, 0].min()))
    y0 = max(0, math.floor(corners[:, 1].min()))
    x1 = min(out_hw[1], math.ceil(corners[:, 0].max()) + 1)
    y1 = min(out_hw[0], math.ceil(corners[:, 1].max()) + 1)
    if x1 <= x0 or y1 <= y0:
        return None
    return y0, y1, x0, x1


class BilinearSampler:
    """Bilinear sampling of an image patch at a crop's pixels, as a sparse linear map A.

    crop[c] = sum of four weights x the patch pixels around crop_to_patch(c) (pixel centres at
    integers). Crop pixels whose four neighbours are not all in the patch are left out.
    """

    OFFSETS = ((0, 0), (1, 0), (0, 1), (1, 1))  # (dx, dy) of the four neighbours

    def __init__(self, crop_to_patch: np.ndarray, crop_size: int, patch_hw: tuple[int, int],
                 device: torch.device | str = "cpu"):
        h, w = patch_hw
        ys, xs = torch.meshgrid(torch.arange(crop_size, dtype=torch.float64, device=device),
                                torch.arange(crop_size, dtype=torch.float64, device=device), indexing="ij")
        a = crop_to_patch
        sx = (a[0, 0] * xs + a[0, 1] * ys + a[0, 2]).flatten()
        sy = (a[1, 0] * xs + a[1, 1] * ys + a[1, 2]).flatten()
        x0, y0 = sx.floor(), sy.floor()
        keep = ((x0 >= 0) & (x0 <= w - 2) & (y0 >= 0) & (y0 <= h - 2)).nonzero()[:, 0]
        fx, fy = (sx - x0)[keep].float(), (sy - y0)[keep].float()
        base = (y0[keep] * w + x0[keep]).long()
        self.kept = keep
        self.index = tuple(base + dx + dy * w for dx, dy in self.OFFSETS)
        self.weight = ((1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy)
        self.patch_hw = (h, w)

    def adjoint(self, values: torch.Tensor) -> torch.Tensor:
        """A^T: (C, K) values at the kept crop pixels -> (C, h, w)."""
        h, w = self.patch_hw
        out = values.new_zeros(h * w, values.shape[0])
        vt = values.t()
        out.index_add_(0, torch.cat(self.index), torch.cat([vt * wt[:, None] for wt in self.weight]))
        return out.t().reshape(-1, h, w)

    def normal_stencil(self) -> torch.Tensor:
        """A^T A as a 3x3 stencil per patch pixel: (9, h, w), entry (dy+1)*3+(dx+1) multiplies x[y+dy, x+dx]."""
        h, w = self.patch_hw
        flat_index, values = [], []
        for (dxj, dyj), ij, wj in zip(self.OFFSETS, self.index, self.weight):
            for (dxl, dyl), wl in zip(self.OFFSETS, self.weight):
                code = (dyl - dyj + 1) * 3 + (dxl - dxj + 1)
                flat_index.append(ij * 9 + code)
                values.append(wj * wl)
        out = torch.zeros(h * w * 9, dtype=self.weight[0].dtype, device=self.weight[0].device)
        out.index_add_(0, torch.cat(flat_index), torch.cat(values))
        return out.view(h, w, 9).permute(2, 0, 1)

    def crop_values(self, crop: torch.Tensor) -> torch.Tensor:
        """(C, s, s) -> (C, K): the crop at the kept pixels."""
        return crop.flatten(1)[:, self.kept]


def _apply_stencil(stencil: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sum over the 3x3 neighbourhood of stencil[code] * x[shifted] (zero outside)."""
    h, w = x.shape[1:]
    xp = F.pad(x, (1, 1, 1, 1))
    out = torch.zeros_like(x)
    for code in range(9):
        dy, dx = divmod(code, 3)
        out += stencil[code] * xp[:, dy : dy + h, dx : dx + w]
    return out


def least_squares_change(sampler: BilinearSampler, change: torch.Tensor, start: torch.Tensor, damping: float,
                         iters: int = 100, tol: float = 1e-8) -> torch.Tensor:
    """The output-pixel change x whose view through the alignment best matches the crop change:

        argmin_x |A x - change|^2 + damping * |x - start|^2

    by conjugate gradients (Jacobi-preconditioned) on the normal equations (A^T A is a 3x3
    stencil, so each step is cheap), each channel on its own, from `start`. With A injective (the face is upsampled into
    the crop) this is A's pseudo-inverse: a change A(y) comes back as y, so what a restorer
    removes (noise, JPEG blocks) is removed from the photo too; a plain inverse warp would
    low-pass the change and leave the top of the spectrum (most of the noise) in place.
    """
    stencil = sampler.normal_stencil()

    def op(x):
        return _apply_stencil(stencil, x) + damping * x

    b = sampler.adjoint(change) + damping * start
    inv_diag = 1.0 / (stencil[4] + damping)  # Jacobi preconditioner: pixels differ in how many samples see them
    x = start.clone()
    r = b - op(x)
    z = inv_diag * r
    p = z.clone()
    rz = (r * z).sum(dim=(1, 2), keepdim=True)
    stop = tol * (b * inv_diag * b).sum(dim=(1, 2), keepdim=True).clamp(min=1e-20)
    for _ in range(iters):
        if bool((rz <= stop).all()):
            break
        q = op(p)
        step = rz / (p * q).sum(dim=(1, 2), keepdim=True).clamp(min=1e-30)
        x += step * p
        r -= step * q
        z = inv_diag * r
        rz_new = (r * z).sum(dim=(1, 2), keepdim=True)
        p = z + (rz_new / rz.clamp(min=1e-30)) * p
        rz = rz_new
    return x


def paste_faces(background: torch.Tensor, resized: torch.Tensor, aligned: torch.Tensor, restored: torch.Tensor,
                to_crop: list[np.ndarray], upscale: float = 1.0, mask: torch.Tensor | None = None,
                refine: bool = True, damping: float = 1e-3, iters: int = 30) -> torch.Tensor:
    """Paste restored faces into the background (see the module docstring for the formula).

    Args:
        background: (3, h, w) the rest of the photo at the output size.
        resized: (3, h, w) the input photo resized to the output size (U(image)).
        aligned, restored: (N, 3, s, s) the crops given to and returned by the restorer.
        to_crop: N (2, 3) input-pixel -> crop transforms (from align_face).
        upscale: output size / input size.
        mask: (1, s, s) soft mask in crop space (default face_mask(s)).
        refine, damping, iters: the least-squares change (off: the plain inverse warp of it),
            its damping per crop sample, and its conjugate-gradient steps.
    Returns:
        (3, h, w) in [0, 1].
    """
    out = background.clone()
    n = len(to_crop)
    if n == 0:
        return out
    s = aligned.shape[-1]
    if mask is None:
        mask = face_mask(s, device=aligned.device)
    out_hw = tuple(background.shape[1:])
    out_to_in = upscale_map(upscale)
    pieces = []
    for i in range(n):
        out_to_crop = compose(to_crop[i], out_to_in)
        region = _face_region(invert_affine(out_to_crop), s, out_hw)
        if region is None:
            continue
        y0, y1, x0, x1 = region
        change = restored[i] - aligned[i]
        patch_to_crop = compose(out_to_crop, _translate(x0, y0))
        warped = warp_affine(torch.cat([change, mask], dim=0), patch_to_crop, (y1 - y0, x1 - x0), padding="zeros")
        delta = warped[:3]
        density = abs(np.linalg.det(out_to_crop[:, :2]))  # crop pixels per output pixel
        if refine and density > 1.0:
            sampler = BilinearSampler(invert_affine(patch_to_crop), s, (y1 - y0, x1 - x0), device=change.device)
            delta = least_squares_change(sampler, sampler.crop_values(change), delta, damping * density, iters=iters)
        pieces.append((region, delta, warped[3:].clamp(0, 1)))
    if not pieces:
        return out
    # Accumulate over the union of the face regions only (photos can be large).
    uy0 = min(r[0] for r, _, _ in pieces)
    uy1 = max(r[1] for r, _, _ in pieces)
    ux0 = min(r[2] for r, _, _ in pieces)
    ux1 = max(r[3] for r, _, _ in pieces)
    change = torch.zeros(3, uy1 - uy0, ux1 - ux0, dtype=out.dtype, device=out.device)
    total = torch.zeros(1, uy1 - uy0, ux1 - ux0, dtype=out.dtype, device=out.device)
    for (y0, y1, x0, x1), d, m in pieces:
        change[:, y0 - uy0 : y1 - uy0, x0 - ux0 : x1 - ux0] += m * d
        total[:, y0 - uy0 : y1 - uy0, x0 - ux0 : x1 - ux0] += m
    bg = out[:, uy0:uy1, ux0:ux1]
    up = resized[:, uy0:uy1, ux0:ux1]
    blended = bg + total.clamp(max=1) * (up - bg) + change / total.clamp(min=1)
    out[:, uy0:uy1, ux0:ux1] = blended.clamp(0, 1)
    return out
