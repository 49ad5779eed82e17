"""Deterministic phantoms with ground truth: a B-mode ultrasound sweep and a chest radiograph.

One ``(seed, t)`` always gives the same pixels, so the live ``synthetic:`` source, the training tools and the
tests all see the same data. Everything a seed varies (probe geometry, depth, gain, anatomy, how many fluid
collections or nodules there are) is drawn once in ``__init__``; ``render(t)`` only moves precomputed
pieces and blends precomputed noise, so a 640x480 frame costs a few milliseconds.

Ultrasound, how a frame is made:

1. The image is formed in the probe's own polar grid (beam x depth sample), as a scanner does, and
   scan-converted to the Cartesian frame with one ``cv2.remap``: the fan, the lateral blur that grows with
   depth and the beam-aligned artefacts come for free.
2. Speckle is the magnitude of a spatially correlated complex Gaussian field (Rayleigh envelope). Three
   precomputed fields are mixed with weights on the unit sphere that turn a little every frame (partial
   decorrelation, as when tissue moves out of the beam), and the window follows the breathing motion.
3. Echogenicity (organs, their bright capsules, the diaphragm, hypoechoic regions, smooth texture) lives in
   a static "world" map that breathing and a slow probe drift move rigidly; the anechoic fluid collections
   are evaluated analytically per frame (smooth irregular outlines that drift, breathe and swell or shrink,
   some vanish for a while), with posterior acoustic enhancement along each beam below them.
4. Depth attenuation, partial time-gain compensation, near-field layers (skin, fat, fascia, muscle), rib
   shadows and the lateral beam fall-off are a static per-seed gain map; log compression to a per-seed
   dynamic range gives the 8-bit image.

The ground truth mask is the fluid collections' outline inside the fan (1 = fluid).

X-ray: a static per-seed chest (body outline, lung fields, mediastinum, heart, spine, ribs, clavicles,
vascular markings) that shifts a few pixels with breathing; nodules (0-4, round-ish, lobulated, of
varying size and contrast, inside the lung fields) get a new layout every ``XrayPhantom.layout_frames``
frames; quantum noise changes every frame. Boxes are half-open: ``mask[y0:y1, x0:x1]`` holds the nodule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

__all__ = ["UltrasoundPhantom", "XrayPhantom"]

_LN10_20 = math.log(10.0) / 20.0  # dB -> natural-log amplitude units
_SALT_US = 0x05A1_F1D5
_SALT_XR = 0x0C4E_5703


def _rng(salt: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([salt, *(int(k) % (1 << 63) for k in key)]))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 + 0.5 * np.tanh(0.5 * x)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian noise blurred with ``sigma`` pixels (float32)."""
    field = rng.standard_normal(shape, dtype=np.float32)
    field = cv2.GaussianBlur(field, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)
    field -= field.mean()
    field /= max(float(field.std()), 1e-6)
    return field


@dataclass(frozen=True)
class _Blob:
    """A smooth irregular outline: an ellipse whose radius is modulated by harmonics 2..4.

    ``radius(theta) = 1 + sum_k amp[k] * cos(k * theta - phase[k])`` in the ellipse's own normalised frame.
    """

    cx: float
    cy: float
    a: float  # semi-axes, px
    b: float
    rot: float  # rad
    amp: tuple[float, float, float]
    phase: tuple[float, float, float]

    def signed_distance(
        self, x: np.ndarray, y: np.ndarray, cx: float, cy: float, scale: float, phase_shift: float = 0.0
    ) -> np.ndarray:
        """Approximate signed distance in px (positive inside) of points (x, y) to the outline centred at
        (cx, cy) and scaled by ``scale``."""
        a, b = self.a * scale, self.b * scale
        cr, sr = math.cos(self.rot), math.sin(self.rot)
        dx = x - np.float32(cx)
        dy = y - np.float32(cy)
        u = (dx * np.float32(cr) + dy * np.float32(sr)) * np.float32(1.0 / a)
        v = (dy * np.float32(cr) - dx * np.float32(sr)) * np.float32(1.0 / b)
        r = np.sqrt(u * u + v * v + np.float32(1e-12))
        c1 = u / r
        s1 = v / r
        c2 = c1 * c1 - s1 * s1
        s2 = np.float32(2.0) * c1 * s1
        c3 = c2 * c1 - s2 * s1
        s3 = s2 * c1 + c2 * s1
        c4 = c2 * c2 - s2 * s2
        s4 = np.float32(2.0) * c2 * s2
        harm = np.float32(1.0)
        for amp, ph, ck, sk in zip(self.amp, self.phase, (c2, c3, c4), (s2, s3, s4)):
            p = ph + phase_shift
            harm = harm + ck * np.float32(amp * math.cos(p)) + sk * np.float32(amp * math.sin(p))
        return (np.float32(1.0) - r / harm) * np.float32(math.sqrt(a * b))

    def extent(self, scale: float) -> float:
        """Radius (px) of a disc that holds the outline."""
        return max(self.a, self.b) * scale * (1.0 + sum(abs(a) for a in self.amp)) + 2.0


@dataclass(frozen=True)
class _Fluid:
    blob: _Blob
    drift: tuple[float, float, float, float]  # amplitude x, amplitude y (px), period (frames), phase
    size: tuple[float, float, float, float]  # mean, amplitude, period (frames), phase of the scale factor
    morph: float  # rad per frame: how fast the outline's lobes turn


def _random_blob(
    rng: np.random.Generator, cx: float, cy: float, a: float, b: float, lobes: float, tilt: float = math.pi
) -> _Blob:
    """A blob at (cx, cy) with semi-axes a, b, lobes of up to ``lobes`` and a rotation in +-``tilt``."""
    amp = (
        float(rng.uniform(0.0, lobes)),
        float(rng.uniform(0.0, lobes) / 1.6),
        float(rng.uniform(0.0, lobes) / 2.2),
    )
    rot = float(rng.uniform(-tilt, tilt))
    p1, p2, p3 = (float(p) for p in rng.uniform(-math.pi, math.pi, 3))
    return _Blob(cx=cx, cy=cy, a=a, b=b, rot=rot, amp=amp, phase=(p1, p2, p3))


class UltrasoundPhantom:
    """A curvilinear-probe B-mode sweep over an abdomen with 0-3 anechoic fluid collections."""

    def __init__(self, width: int = 640, height: int = 480, seed: int = 0) -> None:
        if width < 32 or height < 32:
            raise ValueError(f"phantom size {width}x{height}: need at least 32x32")
        self.width, self.height, self.seed = int(width), int(height), int(seed)
        rng = _rng(_SALT_US, seed)
        self._init_geometry(rng)
        self._init_motion(rng)
        self._init_speckle(rng)
        self._init_gain_map(rng)
        self._init_world(rng)
        self._init_fluid(rng)

    @property
    def mm_per_px(self) -> float:
        """The scale of the image: the probe's depth (cm) over the fan's radial extent (px)."""
        return self.depth_cm * 10.0 / (self._r1 - self._r0)

    @property
    def face_y(self) -> float:
        """The row of the transducer face on the centre line (depth 0)."""
        return self._ay + self._r0

    # ---------------------------------------------------------------- setup (once per seed)
    def _init_geometry(self, rng: np.random.Generator) -> None:
        W, H = self.width, self.height
        apex_off = rng.uniform(0.08, 0.30) * H
        self._ax = W * (0.5 + rng.uniform(-0.02, 0.02))
        self._ay = -apex_off
        self._r0 = apex_off + rng.uniform(0.02, 0.06) * H
        self._r1 = apex_off + rng.uniform(0.90, 0.985) * H
        alpha = rng.uniform(math.radians(28.0), math.radians(40.0))
        self._alpha = min(alpha, math.asin(min(1.0, 0.47 * W / self._r1)))
        self.depth_cm = float(rng.uniform(8.0, 18.0))

        # polar grids, cell-centred: fine (speckle, image) and coarse = every 2x2 cells (smooth fields)
        self._nb = max(32, 2 * round(96 * W / 640))
        self._ns = max(32, 2 * round(160 * H / 480))
        self._dth = 2.0 * self._alpha / self._nb
        self._dr = (self._r1 - self._r0) / self._ns
        nbc, nsc = self._nb // 2, self._ns // 2
        th_c = (-self._alpha + (np.arange(nbc) + 0.5) * 2.0 * self._dth).astype(np.float32)
        r_c = (self._r0 + (np.arange(nsc) + 0.5) * 2.0 * self._dr).astype(np.float32)
        self._xc = (self._ax + r_c[:, None] * np.sin(th_c)[None, :]).astype(np.float32)
        self._yc = (self._ay + r_c[:, None] * np.cos(th_c)[None, :]).astype(np.float32)

        # scan conversion maps: Cartesian pixel -> fine and coarse polar cell
        ys, xs = np.mgrid[0:H, 0:W].astype(np.float64)
        dx, dy = xs - self._ax, ys - self._ay
        theta = np.arctan2(dx, dy)
        rad = np.hypot(dx, dy)
        fan = (np.abs(theta) <= self._alpha) & (rad >= self._r0) & (rad <= self._r1)
        self._fan = fan.astype(np.uint8)
        mx = (theta + self._alpha) / self._dth - 0.5
        my = (rad - self._r0) / self._dr - 0.5
        mx[~fan] = -10.0
        my[~fan] = -10.0
        self._map_fine = cv2.convertMaps(mx.astype(np.float32), my.astype(np.float32), cv2.CV_16SC2)
        cmx = ((mx + 0.5) / 2.0 - 0.5).astype(np.float32)
        cmy = ((my + 0.5) / 2.0 - 0.5).astype(np.float32)
        cmx[~fan] = -10.0
        cmy[~fan] = -10.0
        self._map_coarse = cv2.convertMaps(cmx, cmy, cv2.CV_16SC2)
        self._cell_px = 2.0 * max(self._dr, self._r1 * self._dth)  # largest coarse cell, px

    def _init_motion(self, rng: np.random.Generator) -> None:
        H, W = self.height, self.width
        self._breath_amp = rng.uniform(0.012, 0.035) * H
        self._breath_period = rng.uniform(70.0, 130.0)  # frames (about 2.5-4 s at 30 fps)
        self._breath_phase = rng.uniform(0.0, 2.0 * math.pi)
        self._breath_dx = rng.uniform(-0.35, 0.35)  # lateral part of the breathing excursion
        self._drift_amp = rng.uniform(0.01, 0.04) * W  # slow probe drift
        self._drift_period = rng.uniform(400.0, 900.0)
        self._drift_phase = rng.uniform(0.0, 2.0 * math.pi)
        self._decor_rate = rng.uniform(0.35, 0.55)  # rad per frame between speckle fields
        self._decor_phase = rng.uniform(0.0, 2.0 * math.pi, 2)

    def _shift(self, t: int) -> tuple[float, float]:
        b = math.sin(2.0 * math.pi * t / self._breath_period + self._breath_phase)
        d = math.sin(2.0 * math.pi * t / self._drift_period + self._drift_phase)
        dy = self._breath_amp * b
        return self._breath_dx * dy + self._drift_amp * d, dy

    def _init_speckle(self, rng: np.random.Generator) -> None:
        self._my = int(math.ceil((self._breath_amp * 1.3) / self._dr)) + 2
        self._mx = int(math.ceil((self._drift_amp * 1.5) / (0.5 * (self._r0 + self._r1) * self._dth))) + 2
        shape = (self._ns + 2 * self._my, self._nb + 2 * self._mx)
        sig_ax, sig_lat = rng.uniform(0.7, 1.0), rng.uniform(0.45, 0.7)
        fields = []
        for _ in range(6):
            f = rng.standard_normal(shape, dtype=np.float32)
            f = cv2.GaussianBlur(f, (0, 0), sigmaX=sig_lat, sigmaY=sig_ax, borderType=cv2.BORDER_REFLECT)
            f /= max(float(f.std()), 1e-6) * math.sqrt(2.0)  # |I + jQ| has unit mean square
            fields.append(f)
        self._speckle = fields  # I1, Q1, I2, Q2, I3, Q3

    def _init_gain_map(self, rng: np.random.Generator) -> None:
        """Static per-seed log gain on the fine polar grid: attenuation, TGC, layers, shadows, beam."""
        ns, nb = self._ns, self._nb
        z = (np.arange(ns, dtype=np.float64) + 0.5) / ns  # 0 = skin, 1 = deepest sample
        att_db = 0.5 * 3.5 * 2.0 * self.depth_cm  # dB over the full depth (0.5 dB/cm/MHz, 3.5 MHz, 2-way)
        resid = rng.uniform(-0.05, 0.35)  # what TGC leaves uncompensated
        wob = rng.uniform(-2.5, 2.5, 2)
        row_db = -att_db * resid * z + wob[0] * np.sin(math.pi * z) + wob[1] * np.sin(2.0 * math.pi * z)
        row_db += rng.uniform(1.0, 4.0) * np.exp(-z / 0.04)  # near-field brightness

        # near-field layers: skin line, fat (darker), fascia lines (bright), muscle (striated)
        skin = rng.uniform(0.015, 0.03)
        fat_end = skin + rng.uniform(0.03, 0.08)
        muscle_end = fat_end + rng.uniform(0.04, 0.09)
        lat = np.linspace(-1.0, 1.0, nb)
        undul = rng.uniform(-0.01, 0.01) * np.cos(math.pi * lat * rng.uniform(0.5, 1.5) + rng.uniform(0, 6))
        zz = z[:, None] - undul[None, :]
        layers = np.zeros((ns, nb))
        layers += rng.uniform(6.0, 10.0) * np.exp(-(((zz - skin * 0.5) / (skin * 0.5)) ** 2))
        layers += rng.uniform(-7.0, -3.0) * ((zz > skin) & (zz < fat_end))
        for edge in (fat_end, muscle_end):
            layers += rng.uniform(5.0, 10.0) * np.exp(-(((zz - edge) / 0.006) ** 2))
        in_muscle = (zz > fat_end) & (zz < muscle_end)
        stri = np.sin(
            2.0 * math.pi * zz / rng.uniform(0.008, 0.015) + 3.0 * lat[None, :] * rng.uniform(-1, 1)
        )
        layers += in_muscle * (rng.uniform(-4.0, -2.0) + 2.5 * stri)

        # 0-2 rib shadows: a bright arc and a partial shadow below it along the beams
        shadows = np.zeros((ns, nb))
        for _ in range(int(rng.choice([0, 0, 1, 1, 2]))):
            c = rng.uniform(-0.8, 0.8)
            half = rng.uniform(0.05, 0.12)
            zr = muscle_end + rng.uniform(0.01, 0.05)
            edge = np.clip((half - np.abs(lat - c)) / 0.03, 0.0, 1.0)  # soft lateral edges
            below = _sigmoid((z - zr) / 0.006)
            shadows += rng.uniform(-14.0, -8.0) * below[:, None] * edge[None, :]
            shadows += rng.uniform(8.0, 14.0) * np.exp(-(((z - zr + 0.005) / 0.008) ** 2))[:, None] * edge

        col_db = -rng.uniform(1.0, 4.0) * lat**4
        total_db = row_db[:, None] + col_db[None, :] + layers + shadows
        self._gain_ln = (total_db * _LN10_20).astype(np.float32)

        # log compression: grey = offset + scale * ln(amplitude); tissue at 0 ln sits at `tissue_grey`
        dyn_range = rng.uniform(45.0, 62.0)
        self._grey_scale = float(255.0 / (dyn_range * _LN10_20))
        self._grey_offset = float(rng.uniform(100.0, 140.0))

    def _init_world(self, rng: np.random.Generator) -> None:
        """Static echogenicity (ln units, 0 = reference tissue) in world coordinates at half resolution."""
        W, H = self.width, self.height
        margin = self._breath_amp * 1.5 + self._drift_amp * 1.5 + 8.0
        self._wx0 = min(0.0, self._ax - self._r1) - margin
        self._wy0 = -margin
        self._ws = 2.0
        wx1 = max(float(W), self._ax + self._r1) + margin
        wy1 = float(H) + margin
        nx = int(math.ceil((wx1 - self._wx0) / self._ws))
        ny = int(math.ceil((wy1 - self._wy0) / self._ws))
        gx = (self._wx0 + (np.arange(nx) + 0.5) * self._ws).astype(np.float32)
        gy = (self._wy0 + (np.arange(ny) + 0.5) * self._ws).astype(np.float32)
        X = np.broadcast_to(gx[None, :], (ny, nx))
        Y = np.broadcast_to(gy[:, None], (ny, nx))

        db = 2.0 * _smooth_noise(rng, (ny, nx), sigma=rng.uniform(6.0, 14.0))  # parenchyma texture
        db += 1.0 * _smooth_noise(rng, (ny, nx), sigma=2.0)
        self._organs: list[_Blob] = []
        depth = self._r1 - self._r0

        def place(zlo: float, zhi: float, spread: float) -> tuple[float, float]:
            rr = self._r0 + depth * rng.uniform(zlo, zhi)
            th = rng.uniform(-spread, spread) * self._alpha
            return self._ax + rr * math.sin(th), self._ay + rr * math.cos(th)

        # diaphragm-like bright curve (probability 0.6), with a different texture beyond it
        if rng.random() < 0.6:
            cx, cy = place(0.55, 0.85, 0.6)
            curv = rng.uniform(-0.0012, 0.0012) * 480.0 / H
            tilt = rng.uniform(-0.4, 0.4)
            yline = cy + tilt * (X - cx) + curv * (X - cx) ** 2
            thick = rng.uniform(2.0, 4.5)
            db += rng.uniform(9.0, 14.0) * np.exp(-(((Y - yline) / thick) ** 2))
            db += rng.uniform(-5.0, 2.0) * (Y > yline + thick)

        n_org = int(rng.integers(1, 4))
        for k in range(n_org):
            cx, cy = place(0.3, 0.8, 0.8)
            a = rng.uniform(0.12, 0.35) * H
            b = a * rng.uniform(0.45, 0.9)
            blob = _random_blob(rng, cx, cy, a, b, lobes=0.12)
            self._organs.append(blob)
            sd = blob.signed_distance(X, Y, cx, cy, 1.0)
            inside = _sigmoid(sd / 2.0)
            kind = rng.choice(["iso", "hypo", "kidney"], p=[0.45, 0.3, 0.25]) if k else "iso"
            if kind == "iso":
                level = rng.uniform(-4.0, 4.0)
            elif kind == "hypo":
                level = rng.uniform(-14.0, -8.0)  # darker, but far from anechoic
            else:
                level = rng.uniform(-8.0, -4.0)
                sinus = _random_blob(rng, cx, cy, a * 0.45, b * 0.35, lobes=0.15)
                ssd = sinus.signed_distance(X, Y, cx, cy, 1.0)
                db += rng.uniform(6.0, 10.0) * inside * _sigmoid(ssd / 3.0)
            db += (level + rng.uniform(1.0, 2.5) * _smooth_noise(rng, (ny, nx), 4.0)) * inside
            db += rng.uniform(7.0, 13.0) * np.exp(-((sd / rng.uniform(1.2, 2.5)) ** 2))  # capsule

        self._world_ln = (db * _LN10_20).astype(np.float32)

    def _init_fluid(self, rng: np.random.Generator) -> None:
        H = self.height
        depth = self._r1 - self._r0
        self._fluids: list[_Fluid] = []
        n = int(rng.choice([0, 1, 2, 3], p=[0.25, 0.35, 0.25, 0.15]))
        for _ in range(n):
            if self._organs and rng.random() < 0.5:  # free fluid hugging an organ's capsule
                org = self._organs[int(rng.integers(len(self._organs)))]
                ang = rng.uniform(-math.pi, math.pi)
                cx = org.cx + org.a * math.cos(ang) * 1.05
                cy = org.cy + org.b * math.sin(ang) * 1.05
            else:
                rr = self._r0 + depth * rng.uniform(0.3, 0.85)
                th = rng.uniform(-0.75, 0.75) * self._alpha
                cx, cy = self._ax + rr * math.sin(th), self._ay + rr * math.cos(th)
            a = rng.uniform(0.045, 0.13) * H
            b = a * rng.uniform(0.3, 1.0)
            blob = _random_blob(rng, cx, cy, a, b, lobes=0.3)
            transient = rng.random() < 0.35  # shrinks away for part of its cycle
            size = (
                (rng.uniform(0.4, 0.7), rng.uniform(0.7, 1.0), rng.uniform(150, 400), rng.uniform(0, 6.3))
                if transient
                else (1.0, rng.uniform(0.08, 0.3), rng.uniform(90, 300), rng.uniform(0, 6.3))
            )
            drift = (
                rng.uniform(0.0, 0.05) * H,
                rng.uniform(0.0, 0.05) * H,
                rng.uniform(150.0, 500.0),
                rng.uniform(0.0, 2.0 * math.pi),
            )
            self._fluids.append(_Fluid(blob, drift, size, morph=rng.uniform(-0.01, 0.01)))
        self._fluid_level = rng.uniform(-38.0, -28.0) * _LN10_20  # ln amplitude relative to tissue
        self._enh_per_px = rng.uniform(0.08, 0.16) * _LN10_20 * 480.0 / H  # posterior enhancement, ln/px
        self._enh_max = rng.uniform(6.0, 10.0) * _LN10_20

    # ---------------------------------------------------------------- per frame
    def _fluid_field(self, t: int, sx: float, sy: float) -> np.ndarray | None:
        """Signed distance (px, positive inside) of the union of fluid collections on the coarse grid."""
        field = None
        nsc, nbc = self._xc.shape
        for fl in self._fluids:
            mean, amp, period, phase = fl.size
            scale = mean + amp * math.sin(2.0 * math.pi * t / period + phase)
            if scale * min(fl.blob.a, fl.blob.b) < 2.0:
                continue
            ax_, ay_, dper, dph = fl.drift
            cx = fl.blob.cx + sx + ax_ * math.sin(2.0 * math.pi * t / dper + dph)
            cy = fl.blob.cy + sy + ay_ * math.cos(2.0 * math.pi * t / dper + dph)
            # bounding box of the outline in coarse polar cells
            ext = fl.blob.extent(scale)
            d = math.hypot(cx - self._ax, cy - self._ay)
            th = math.atan2(cx - self._ax, cy - self._ay)
            dth = math.asin(min(1.0, ext / max(d, 1e-6)))
            j0 = int(math.floor((th - dth + self._alpha) / (2.0 * self._dth))) - 1
            j1 = int(math.ceil((th + dth + self._alpha) / (2.0 * self._dth))) + 2
            i0 = int(math.floor((d - ext - self._r0) / (2.0 * self._dr))) - 1
            i1 = int(math.ceil((d + ext - self._r0) / (2.0 * self._dr))) + 2
            j0, j1, i0, i1 = max(j0, 0), min(j1, nbc), max(i0, 0), min(i1, nsc)
            if j0 >= j1 or i0 >= i1:
                continue
            if field is None:
                field = np.full((nsc, nbc), -1000.0, dtype=np.float32)
            sd = fl.blob.signed_distance(
                self._xc[i0:i1, j0:j1], self._yc[i0:i1, j0:j1], cx, cy, scale, fl.morph * t
            )
            np.maximum(field[i0:i1, j0:j1], sd, out=field[i0:i1, j0:j1])
        return field

    def render(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """Frame number t (>=0) -> (image uint8 HxW grayscale, mask uint8 HxW with 1 = anechoic fluid)."""
        t = int(t)
        sx, sy = self._shift(t)

        # speckle: unit-sphere mix of three complex fields, window moving with the tissue
        a = self._decor_rate * t + self._decor_phase[0]
        psi = 0.55 + 0.4 * math.sin(0.043 * t + self._decor_phase[1])
        w = (math.cos(a) * math.cos(psi), math.sin(a) * math.cos(psi), math.sin(psi))
        oy = min(max(self._my - int(round(sy / self._dr)), 0), 2 * self._my)
        ox = min(max(self._mx - int(round(sx / (0.5 * (self._r0 + self._r1) * self._dth))), 0), 2 * self._mx)
        win = (slice(oy, oy + self._ns), slice(ox, ox + self._nb))
        f = self._speckle
        i_ = cv2.addWeighted(f[0][win], w[0], f[2][win], w[1], 0.0)
        q_ = cv2.addWeighted(f[1][win], w[0], f[3][win], w[1], 0.0)
        i_ = cv2.scaleAdd(f[4][win], w[2], i_)
        q_ = cv2.scaleAdd(f[5][win], w[2], q_)
        env = cv2.magnitude(i_, q_)
        cv2.max(env, 1e-4, dst=env)
        log_env = cv2.log(env)

        # echogenicity on the coarse grid: the world map moved by breathing + drift, then fluid
        mapx = (self._xc - np.float32(sx + self._wx0)) * np.float32(1.0 / self._ws) - np.float32(0.5)
        mapy = (self._yc - np.float32(sy + self._wy0)) * np.float32(1.0 / self._ws) - np.float32(0.5)
        echo = cv2.remap(self._world_ln, mapx, mapy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        field = self._fluid_field(t, sx, sy)
        if field is not None:
            soft = np.clip(field * np.float32(0.5) + np.float32(0.5), 0.0, 1.0)
            echo += soft * (np.float32(self._fluid_level) - echo)
            path = np.cumsum(soft, axis=0) * np.float32(2.0 * self._dr * self._enh_per_px)
            echo += np.minimum(path, np.float32(self._enh_max))

        # fine polar image: speckle x echogenicity x static gain, log-compressed to 8 bits
        log_img = cv2.resize(echo, (self._nb, self._ns), interpolation=cv2.INTER_LINEAR)
        log_img += log_env
        log_img += self._gain_ln
        polar = cv2.addWeighted(log_img, self._grey_scale, log_img, 0.0, self._grey_offset, dtype=cv2.CV_8U)
        image = cv2.remap(polar, *self._map_fine, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)

        mask = np.zeros((self.height, self.width), np.uint8)
        if field is not None:  # scan-convert the fluid field only where it can be positive
            near = field > -4.0
            if near.any():
                xs, ys = self._xc[near], self._yc[near]
                pad = self._cell_px + 2.0
                x0, x1 = max(int(xs.min() - pad), 0), min(int(xs.max() + pad) + 1, self.width)
                y0, y1 = max(int(ys.min() - pad), 0), min(int(ys.max() + pad) + 1, self.height)
                if x0 < x1 and y0 < y1:
                    m1, m2 = self._map_coarse
                    cart = cv2.remap(
                        field,
                        m1[y0:y1, x0:x1],
                        m2[y0:y1, x0:x1],
                        cv2.INTER_LINEAR,
                        borderMode=cv2.BORDER_CONSTANT,
                        borderValue=-1.0,
                    )
                    np.greater(cart, 0.0, out=mask[y0:y1, x0:x1].view(bool))
                    mask[y0:y1, x0:x1] &= self._fan[y0:y1, x0:x1]
        return image, mask

    @property
    def fan_mask(self) -> np.ndarray:
        """uint8 HxW, 1 inside the imaging sector."""
        return self._fan.copy()

    @property
    def n_fluid(self) -> int:
        """How many fluid collections this seed has (each may still be absent in some frames)."""
        return len(self._fluids)


class XrayPhantom:
    """A frontal chest radiograph with 0-4 pulmonary nodules; new nodule layout every ``layout_frames``."""

    layout_frames = 30

    def __init__(self, width: int = 640, height: int = 480, seed: int = 0) -> None:
        if width < 32 or height < 32:
            raise ValueError(f"phantom size {width}x{height}: need at least 32x32")
        self.width, self.height, self.seed = int(width), int(height), int(seed)
        rng = _rng(_SALT_XR, seed)
        W, H = self.width, self.height
        self._unit = min(W / 640.0, H / 480.0)
        self._breath_amp = rng.uniform(1.0, 3.5) * H / 480.0
        self._breath_period = rng.uniform(80.0, 140.0)
        m = self._m = int(math.ceil(self._breath_amp)) + 2
        Hp, Wp = H + 2 * m, W + 2 * m
        ys, xs = np.mgrid[0:Hp, 0:Wp].astype(np.float32)
        xs = (xs - m) / W  # normalised frame coordinates, 0..1 inside the frame
        ys = (ys - m) / H

        def blob(cx: float, cy: float, a: float, b: float, lobes: float) -> np.ndarray:
            """Soft membership (0..1) of a random smooth outline, in normalised coordinates."""
            bl = _random_blob(rng, cx * W, cy * H, a * W, b * H, lobes, tilt=0.15)
            sd = bl.signed_distance(xs * W, ys * H, bl.cx, bl.cy, 1.0)
            return _sigmoid(sd / 3.0)

        cx = 0.5 + rng.uniform(-0.03, 0.03)
        body_w = rng.uniform(0.43, 0.5)
        body = np.maximum(blob(cx, 0.75, body_w, 0.8, 0.02), blob(cx, 0.0, 0.09, 0.2, 0.02))  # trunk, neck
        img = 0.04 + rng.uniform(0.4, 0.5) * body

        # lung fields (dark), each a rounded outline with the diaphragm dome at its base
        lung_w, lung_h = rng.uniform(0.14, 0.17), rng.uniform(0.3, 0.37)
        lung_y = rng.uniform(0.45, 0.52)
        gap = rng.uniform(0.07, 0.1)
        lungs = np.maximum(
            blob(cx - gap - lung_w, lung_y, lung_w, lung_h, 0.05),
            blob(cx + gap + lung_w, lung_y + rng.uniform(-0.01, 0.03), lung_w * 0.95, lung_h, 0.05),
        )
        img -= rng.uniform(0.22, 0.3) * lungs
        vessels = _smooth_noise(rng, (Hp, Wp), 2.5 * self._unit)
        img += 0.03 * np.abs(vessels) * lungs * (1.2 - np.abs(xs - cx) / 0.5)  # vascular markings
        img += 0.02 * _smooth_noise(rng, (Hp, Wp), 15.0 * self._unit) * body

        # heart (to the image's right of the midline), mediastinum, spine with vertebrae
        heart = blob(cx + rng.uniform(0.04, 0.07), lung_y + lung_h * 0.45, 0.12, 0.14, 0.04)
        img += rng.uniform(0.15, 0.22) * heart * body
        img += rng.uniform(0.08, 0.14) * np.exp(-(((xs - cx) / 0.055) ** 2)) * body
        spine = np.exp(-(((xs - cx) / rng.uniform(0.022, 0.03)) ** 4))
        vert = 0.6 + 0.4 * (np.cos(2.0 * math.pi * ys / rng.uniform(0.055, 0.07)) > -0.6)
        img += rng.uniform(0.1, 0.16) * spine * vert * body

        # ribs: posterior arcs from the spine outward and down, fainter anterior arcs, clavicles
        bones = np.zeros((Hp, Wp), np.float32)
        n_ribs = int(rng.integers(8, 11))
        top = lung_y - lung_h * 0.95
        step = (lung_h * 1.8) / n_ribs
        thick = max(2, int(round(rng.uniform(6.0, 9.0) * self._unit)))
        u = np.linspace(0.0, 1.0, 40)
        lateral = gap + 2.0 * lung_w + 0.03
        for side in (-1.0, 1.0):
            for k in range(n_ribs):
                y0 = top + k * step + rng.uniform(-0.005, 0.005)
                px = cx + side * (0.025 + u * lateral)
                py = y0 - 0.03 * np.sin(math.pi * u * 0.7) + (0.07 + 0.04 * k / n_ribs) * u**2
                pts = np.stack([px * W + m, py * H + m], axis=1).astype(np.int32)
                cv2.polylines(bones, [pts], False, 1.0, thickness=thick, lineType=cv2.LINE_AA)
                px = cx + side * (lateral - u * (lateral - 0.06))
                py = y0 + 0.06 + 0.11 * u - 0.03 * u**2
                pts = np.stack([px * W + m, py * H + m], axis=1).astype(np.int32)
                cv2.polylines(bones, [pts], False, 0.45, thickness=thick, lineType=cv2.LINE_AA)
            px = cx + side * (0.04 + u * 0.25)
            py = top - 0.02 + 0.05 * u - 0.06 * u**2
            pts = np.stack([px * W + m, py * H + m], axis=1).astype(np.int32)
            cv2.polylines(bones, [pts], False, 1.0, thickness=thick + 3, lineType=cv2.LINE_AA)
        bones = cv2.GaussianBlur(bones, (0, 0), 1.2 * self._unit)
        img += rng.uniform(0.07, 0.11) * bones * body

        gamma = rng.uniform(0.85, 1.2)
        img = np.clip(img, 0.0, 1.0) ** gamma
        self._base = (img * 255.0).astype(np.float32)
        self._lungs = lungs[m : m + H, m : m + W] > 0.9  # where nodule centres may go (frame coords)
        dist = cv2.distanceTransform(self._lungs.astype(np.uint8), cv2.DIST_L2, 5)
        self._lung_dist = dist
        self._noise = _smooth_noise(rng, (Hp + 64, Wp + 64), 0.7) * np.float32(rng.uniform(3.0, 6.0))
        self._cache: tuple[int, list[tuple[_Blob, float]]] = (-1, [])

    def _layout(self, layout: int) -> list[tuple[_Blob, float]]:
        rng = _rng(_SALT_XR, self.seed, layout, 1)
        n = int(rng.choice([0, 1, 2, 3, 4], p=[0.2, 0.3, 0.25, 0.15, 0.1]))
        placed: list[tuple[_Blob, float]] = []
        for _ in range(n):
            r = rng.uniform(5.0, 26.0) * self._unit
            cand = np.argwhere(self._lung_dist >= r * 1.25 + 2.0)
            for _try in range(20):
                if len(cand) == 0:
                    break
                cy, cx = cand[int(rng.integers(len(cand)))]
                if all(math.hypot(cx - b.cx, cy - b.cy) > (r + max(b.a, b.b)) * 1.4 + 4.0 for b, _ in placed):
                    bl = _random_blob(rng, float(cx), float(cy), r, r * rng.uniform(0.75, 1.0), 0.12)
                    placed.append((bl, float(rng.uniform(18.0, 60.0))))  # contrast, grey levels
                    break
        return placed

    def render(self, t: int) -> tuple[np.ndarray, np.ndarray, tuple[tuple[int, int, int, int], ...]]:
        """-> (image uint8 HxW, mask uint8 HxW of nodule targets, boxes (x0, y0, x1, y1) of each nodule)."""
        t = int(t)
        W, H, m = self.width, self.height, self._m
        dy = int(round(self._breath_amp * math.sin(2.0 * math.pi * t / self._breath_period)))
        img = self._base[m - dy : m - dy + H, m : m + W].copy()
        mask = np.zeros((H, W), np.uint8)
        boxes: list[tuple[int, int, int, int]] = []
        layout = t // self.layout_frames
        if self._cache[0] != layout:
            self._cache = (layout, self._layout(layout))
        for bl, contrast in self._cache[1]:
            cx, cy = bl.cx, bl.cy + dy
            e = int(math.ceil(bl.extent(1.0)))
            x0, x1 = max(int(cx) - e, 0), min(int(cx) + e + 1, W)
            y0, y1 = max(int(cy) - e, 0), min(int(cy) + e + 1, H)
            yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
            sd = bl.signed_distance(xx, yy, cx, cy, 1.0)
            depth = np.clip(sd / max(bl.a, bl.b), 0.0, 1.0)
            edge = np.clip(sd + 0.5, 0.0, 1.0)  # one-pixel soft edge
            img[y0:y1, x0:x1] += np.float32(contrast) * edge * (0.35 + 0.65 * np.sqrt(depth))
            inside = sd > 0.0
            if not inside.any():
                continue
            mask[y0:y1, x0:x1] |= inside.view(np.uint8)
            rows, cols = np.nonzero(inside)
            boxes.append(
                (
                    x0 + int(cols.min()),
                    y0 + int(rows.min()),
                    x0 + int(cols.max()) + 1,
                    y0 + int(rows.max()) + 1,
                )
            )
        oy, ox = (t * 37 + 11) % 64, (t * 53 + 29) % 64
        img += self._noise[oy : oy + H, ox : ox + W]
        image = cv2.addWeighted(img, 1.0, img, 0.0, 0.0, dtype=cv2.CV_8U)
        return image, mask, tuple(boxes)
