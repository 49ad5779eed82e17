"""A deterministic lung-ultrasound phantom: pleural line, A-lines, and B-lines when present.

``LungPhantom(width, height, seed).render(t) -> (image uint8 HxW, label)`` with label 1 when at least one
B-line is in the frame, 0 otherwise. One ``(seed, t)`` always gives the same pixels (the same contract as
``firmware_app.sources.phantom``): the live ``synthetic:lung`` source, ``tools/train_us_bline_cls.py`` and
the tests all see the same data.

What a seed fixes (drawn once in ``__init__``): the probe (linear array: rectangular image, or curvilinear:
a fan), depth, gain and dynamic range, the chest wall (skin, fat, intercostal muscle layers), 0-2 ribs
with their bright surface and acoustic shadow (the "bat sign"), the depth of the pleural line, how "wet"
the lung is (how often B-lines are present), and the breathing that makes the lung slide under the wall.

What a frame adds: speckle that decorrelates frame to frame; the lung sliding (the pleural line's texture,
the A-lines' ripple and the B-lines move laterally with breathing, the chest wall stays); every
``layout_frames`` frames a new artefact layout: 0-8 B-lines (vertical, hyperechoic, laser-like comet tails
from the pleural line to the bottom of the image that erase the A-lines they cross; several may merge
into a "white lung" band) and 0-3 Z-lines (short, fainter comet tails that fade within 1-2 cm and leave
the A-lines intact: the classic false positive). A-lines are horizontal reverberations of the pleural
line at whole multiples of its depth.

Everything lives on a beam x depth grid and is scan-converted with one ``cv2.remap``, so B-lines follow
the beams (radial in a fan) and A-lines follow the arcs of equal depth, as on a scanner.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

__all__ = ["LungPhantom"]

_LN10_20 = math.log(10.0) / 20.0  # dB -> natural-log amplitude units
_SALT = 0x1B_11E5


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([_SALT, *(int(k) % (1 << 63) for k in key)]))


@dataclass(frozen=True)
class _Line:
    """One comet tail on the beam grid (beam index, lung coordinates)."""

    beam: float  # centre, in beams (before the lung slides)
    width: float  # e-folding half width, beams
    gain_db: float  # brightness over the lung haze, dB
    length: float  # fraction of the depth below the pleura it reaches (B-line: 1 = the bottom)
    wobble: float  # rad: phase of its slight lateral wavering


class LungPhantom:
    """B-mode lung ultrasound through one intercostal space; label 1 when B-lines are present."""

    layout_frames = 60  # a new B-/Z-line layout every 2 s at 30 fps

    def __init__(self, width: int = 640, height: int = 480, seed: int = 0) -> None:
        if width < 32 or height < 32:
            raise ValueError(f"phantom size {width}x{height}: need at least 32x32")
        self.width, self.height, self.seed = int(width), int(height), int(seed)
        rng = _rng(seed)
        self._init_geometry(rng)
        self._init_wall(rng)
        self._init_lung(rng)
        self._init_speckle(rng)
        self._cache: tuple[int, tuple[list[_Line], list[_Line]]] = (-1, ([], []))

    # ---------------------------------------------------------------- setup (once per seed)
    def _init_geometry(self, rng: np.random.Generator) -> None:
        W, H = self.width, self.height
        self.linear = bool(rng.random() < 0.5)
        self.depth_cm = float(rng.uniform(4.0, 8.0) if self.linear else rng.uniform(8.0, 16.0))
        self._nb = max(32, 2 * round(96 * W / 640))  # beams
        self._ns = max(32, 2 * round(150 * H / 480))  # depth samples
        ys, xs = np.mgrid[0:H, 0:W].astype(np.float64)
        if self.linear:
            x0 = W * rng.uniform(0.12, 0.2)
            x1 = W - W * rng.uniform(0.12, 0.2)
            y0 = H * rng.uniform(0.02, 0.05)
            y1 = H * rng.uniform(0.94, 0.99)
            inside = (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)
            mx = (xs - x0) / (x1 - x0) * self._nb - 0.5
            my = (ys - y0) / (y1 - y0) * self._ns - 0.5
        else:
            apex_off = rng.uniform(0.1, 0.3) * H
            ax, ay = W * 0.5, -apex_off
            r0 = apex_off + rng.uniform(0.02, 0.05) * H
            r1 = apex_off + rng.uniform(0.9, 0.98) * H
            alpha = min(
                rng.uniform(math.radians(25.0), math.radians(35.0)), math.asin(min(1.0, 0.47 * W / r1))
            )
            dx, dy = xs - ax, ys - ay
            theta = np.arctan2(dx, dy)
            rad = np.hypot(dx, dy)
            inside = (np.abs(theta) <= alpha) & (rad >= r0) & (rad <= r1)
            mx = (theta + alpha) / (2.0 * alpha) * self._nb - 0.5
            my = (rad - r0) / (r1 - r0) * self._ns - 0.5
        mx[~inside] = -10.0
        my[~inside] = -10.0
        self._map = cv2.convertMaps(mx.astype(np.float32), my.astype(np.float32), cv2.CV_16SC2)
        self._inside = inside.astype(np.uint8)

    def _init_wall(self, rng: np.random.Generator) -> None:
        """Static log gain of the chest wall, ribs and their shadows, depth attenuation and TGC."""
        ns, nb = self._ns, self._nb
        z = (np.arange(ns, dtype=np.float64) + 0.5) / ns  # 0 = skin, 1 = deepest sample
        lat = np.linspace(-1.0, 1.0, nb)
        # pleural line depth (fraction of the image depth); ribs sit a little above it
        self._zp = float(rng.uniform(0.16, 0.3) if self.linear else rng.uniform(0.1, 0.2))
        zp = self._zp
        undul = rng.uniform(-0.008, 0.008) * np.cos(math.pi * lat * rng.uniform(0.5, 1.5) + rng.uniform(0, 6))
        zz = z[:, None] - undul[None, :]
        db = np.zeros((ns, nb))
        skin = rng.uniform(0.01, 0.025)
        fat_end = skin + rng.uniform(0.2, 0.4) * (zp - skin)
        db += rng.uniform(6.0, 10.0) * np.exp(-(((zz - skin * 0.5) / (skin * 0.5)) ** 2))
        db += rng.uniform(-8.0, -3.0) * ((zz > skin) & (zz < fat_end))
        in_muscle = (zz > fat_end) & (zz < zp - 0.01)
        stri = np.sin(2.0 * math.pi * zz / rng.uniform(0.01, 0.02) + 2.0 * lat[None, :] * rng.uniform(-1, 1))
        db += in_muscle * (rng.uniform(-4.0, -1.0) + 2.5 * stri)
        for edge in (fat_end, zp - rng.uniform(0.015, 0.03)):
            db += rng.uniform(4.0, 9.0) * np.exp(-(((zz - edge) / 0.006) ** 2))  # fascia

        # ribs: 0-2, at the sides of the intercostal space; bright curved surface, dark shadow below
        n_ribs = int(rng.choice([0, 1, 2, 2, 2]))
        sides = [-1.0, 1.0] if n_ribs == 2 else [float(rng.choice([-1.0, 1.0]))] * n_ribs
        self._shadow = np.zeros((ns, nb), np.float32)  # 1 where a rib blocks the beam
        gap_lo, gap_hi = -1.0, 1.0  # the intercostal space (where the pleura is seen), in lat units
        for side in sides:
            inner = side * rng.uniform(0.35, 0.7)  # inner edge of the rib
            half = rng.uniform(0.25, 0.5)
            centre = inner + side * half
            zr = zp - rng.uniform(0.02, 0.05)
            d = np.abs(lat - centre) / (half + 1e-6)  # 0 at the rib centre, 1 at its edges
            edge = np.clip((1.0 - d) / 0.12, 0.0, 1.0)
            surface = zr + 0.03 * d**2  # convex top
            below = 0.5 + 0.5 * np.tanh((z[:, None] - surface[None, :] - 0.015) / 0.006)
            self._shadow = np.maximum(self._shadow, (below * edge[None, :]).astype(np.float32))
            db += rng.uniform(10.0, 16.0) * np.exp(-(((z[:, None] - surface[None, :]) / 0.008) ** 2)) * edge
            if side < 0:
                gap_lo = max(gap_lo, inner)
            else:
                gap_hi = min(gap_hi, inner)
        self._gap = (gap_lo, gap_hi)
        db += self._shadow * rng.uniform(-26.0, -18.0)

        att_db = 0.5 * (7.5 if self.linear else 3.5) * 2.0 * self.depth_cm
        resid = rng.uniform(0.0, 0.3)
        db += (-att_db * resid * z + rng.uniform(-2.0, 2.0) * np.sin(math.pi * z))[:, None]
        db += (-rng.uniform(0.5, 3.0) * lat**4)[None, :]
        self._wall_ln = (db * _LN10_20).astype(np.float32)
        dyn_range = rng.uniform(45.0, 60.0)
        self._grey_scale = float(255.0 / (dyn_range * _LN10_20))
        self._grey_offset = float(rng.uniform(95.0, 135.0))

    def _init_lung(self, rng: np.random.Generator) -> None:
        ns = self._ns
        zp = self._zp
        z = (np.arange(ns, dtype=np.float64) + 0.5) / ns
        self._z = z.astype(np.float32)
        self._ip = int(zp * ns)  # first sample of the pleural line
        # pleural line: bright and thin (texture that slides with the lung is added per frame)
        self._pleura_db = float(rng.uniform(12.0, 20.0))
        self._pleura_w = float(rng.uniform(0.006, 0.012))
        self._pleura_row = np.exp(-(((z - zp) / self._pleura_w) ** 2)).astype(np.float32)
        # below the pleura: air, a dim reverberation haze, and A-lines at 2, 3, 4 ... x the pleural depth
        below = 0.5 + 0.5 * np.tanh((z - zp - 0.01) / 0.006)
        haze = rng.uniform(-16.0, -8.0) * below
        a_db = rng.uniform(6.0, 14.0)
        a_decay = rng.uniform(0.55, 0.85)
        a_rows = np.zeros(ns)
        k = 2
        while k * zp < 1.05:
            a_rows += a_db * a_decay ** (k - 2) * np.exp(-(((z - k * zp) / (self._pleura_w * 1.3)) ** 2))
            k += 1
        self._haze_ln = (haze * _LN10_20).astype(np.float32)
        self._aline_ln = (a_rows * _LN10_20).astype(np.float32)
        self._below = below.astype(np.float32)
        # lung sliding with breathing, in beams
        self._slide_amp = rng.uniform(1.0, 4.0) * self._nb / 192.0
        self._breath_period = rng.uniform(90.0, 150.0)
        self._breath_phase = rng.uniform(0.0, 2.0 * math.pi)
        self._wetness = float(rng.choice([0.0, 1.0]))  # a dry or a wet lung (how often B-lines show)
        self._confluent = bool(rng.random() < 0.25)  # a wet lung whose B-lines may merge
        self._texture = rng.standard_normal(self._nb * 3).astype(np.float32)  # sliding pleural texture
        self._texture = cv2.GaussianBlur(self._texture[None, :], (0, 0), 1.5)[0]
        self._texture /= max(float(self._texture.std()), 1e-6)

    def _init_speckle(self, rng: np.random.Generator) -> None:
        sig_ax, sig_lat = rng.uniform(0.7, 1.0), rng.uniform(0.5, 0.8)
        fields = []
        for _ in range(6):
            f = rng.standard_normal((self._ns, self._nb), dtype=np.float32)
            f = cv2.GaussianBlur(f, (0, 0), sigmaX=sig_lat, sigmaY=sig_ax, borderType=cv2.BORDER_REFLECT)
            f /= max(float(f.std()), 1e-6) * math.sqrt(2.0)
            fields.append(f)
        self._speckle = fields
        self._decor_rate = rng.uniform(0.3, 0.5)
        self._decor_phase = rng.uniform(0.0, 2.0 * math.pi, 2)

    # ---------------------------------------------------------------- per layout and frame
    def _layout(self, layout: int) -> tuple[list[_Line], list[_Line]]:
        """(B-lines, Z-lines) of one layout, in beam units of the unslid lung."""
        rng = _rng(self.seed, layout, 1)
        nb = self._nb
        lo, hi = ((g + 1.0) * 0.5 * nb for g in self._gap)
        lo, hi = lo + 2.0, hi - 2.0
        if self._wetness > 0.5:
            n_b = int(rng.choice([0, 1, 2, 3, 4, 6, 8], p=[0.15, 0.2, 0.2, 0.15, 0.12, 0.1, 0.08]))
        else:
            n_b = int(rng.choice([0, 1, 2], p=[0.8, 0.15, 0.05]))
        n_z = int(rng.choice([0, 1, 2, 3], p=[0.35, 0.3, 0.2, 0.15]))
        if hi - lo < 4.0:
            n_b = n_z = 0
        b_lines = []
        for _ in range(n_b):
            wide = self._confluent and n_b >= 3 and rng.random() < 0.5
            b_lines.append(
                _Line(
                    beam=float(rng.uniform(lo, hi)),
                    width=float(rng.uniform(3.0, 7.0) if wide else rng.uniform(1.0, 2.8)) * nb / 192.0,
                    gain_db=float(rng.uniform(3.0, 18.0)),
                    length=float(rng.uniform(0.9, 1.0)),
                    wobble=float(rng.uniform(0.0, 2.0 * math.pi)),
                )
            )
        z_lines = [
            _Line(
                beam=float(rng.uniform(lo, hi)),
                width=float(rng.uniform(0.7, 1.6)) * nb / 192.0,
                gain_db=float(rng.uniform(4.0, 14.0)),
                length=float(rng.uniform(0.04, 0.2)),
                wobble=0.0,
            )
            for _ in range(n_z)
        ]
        return b_lines, z_lines

    def layout(self, t: int) -> tuple[int, int]:
        """(B-lines, Z-lines) in frame ``t``."""
        b, z = self._lines(int(t))
        return len(b), len(z)

    def _lines(self, t: int) -> tuple[list[_Line], list[_Line]]:
        layout = t // self.layout_frames
        if self._cache[0] != layout:
            self._cache = (layout, self._layout(layout))
        return self._cache[1]

    def render(self, t: int) -> tuple[np.ndarray, int]:
        """Frame number t (>=0) -> (image uint8 HxW grayscale, 1 if B-lines are present else 0)."""
        t = int(t)
        nb = self._nb
        slide = self._slide_amp * math.sin(2.0 * math.pi * t / self._breath_period + self._breath_phase)
        b_lines, z_lines = self._lines(t)

        # speckle: unit-sphere mix of three complex fields
        a = self._decor_rate * t + self._decor_phase[0]
        psi = 0.55 + 0.4 * math.sin(0.05 * t + self._decor_phase[1])
        w = (math.cos(a) * math.cos(psi), math.sin(a) * math.cos(psi), math.sin(psi))
        f = self._speckle
        i_ = cv2.addWeighted(f[0], w[0], f[2], w[1], 0.0)
        q_ = cv2.addWeighted(f[1], w[0], f[3], w[1], 0.0)
        i_ = cv2.scaleAdd(f[4], w[2], i_)
        q_ = cv2.scaleAdd(f[5], w[2], q_)
        env = cv2.magnitude(i_, q_)
        cv2.max(env, 1e-4, dst=env)
        log_img = cv2.log(env)
        log_img += self._wall_ln

        # the lung: pleural line with its sliding texture, haze and A-lines, then the comet tails
        beams = np.arange(nb, dtype=np.float32)
        off = int(round(slide * 4.0)) % nb  # the texture slides faster than the artefacts: shimmer
        tex = self._texture[nb + off : 2 * nb + off]
        pleura_col = (self._pleura_db + 3.0 * tex) * _LN10_20
        lung = np.outer(self._pleura_row, pleura_col).astype(np.float32)
        lung += self._haze_ln[:, None]
        aline = np.repeat(self._aline_ln[:, None], nb, axis=1)
        erase = np.zeros(nb, np.float32)  # how much each beam's A-lines are wiped out by B-lines
        for ln in b_lines:
            c = ln.beam + slide + 0.6 * math.sin(0.07 * t + ln.wobble)
            prof = np.exp(-(((beams - c) / ln.width) ** 2))
            np.maximum(erase, prof, out=erase)
            zz = (self._z - self._zp) / max(ln.length * (1.0 - self._zp), 1e-3)
            depth_prof = np.where(zz > 0, np.clip(1.15 - 0.25 * zz, 0.0, 1.0), 0.0).astype(np.float32)
            depth_prof[: self._ip] = 0.0
            lung += np.outer(depth_prof, prof * (ln.gain_db * _LN10_20))
        for ln in z_lines:
            c = ln.beam + slide
            prof = np.exp(-(((beams - c) / ln.width) ** 2))
            zz = (self._z - self._zp) / ln.length
            depth_prof = np.where(zz > 0, np.exp(-zz * 2.5), 0.0).astype(np.float32)
            lung += np.outer(depth_prof, prof * (ln.gain_db * _LN10_20))
        lung += aline * (1.0 - erase)[None, :]
        lung *= 1.0 - self._shadow  # the ribs' shadows hide the lung below them
        log_img += lung

        polar = cv2.addWeighted(log_img, self._grey_scale, log_img, 0.0, self._grey_offset, dtype=cv2.CV_8U)
        image = cv2.remap(polar, *self._map, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
        return image, int(len(b_lines) > 0)

    @property
    def inside_mask(self) -> np.ndarray:
        """uint8 HxW, 1 inside the imaging region."""
        return self._inside.copy()
