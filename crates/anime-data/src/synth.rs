//! Procedural face-like images for demos and tests, and a helper that writes images to a folder.

use std::path::Path;

use image::{ImageFormat, Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::DataError;

type Color = [f32; 3];

fn hsv(h: f32, s: f32, v: f32) -> Color {
    let h = h.rem_euclid(1.0) * 6.0;
    let c = v * s;
    let x = c * (1.0 - ((h % 2.0) - 1.0).abs());
    let (r, g, b) = match h as u32 {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    let m = v - c;
    [r + m, g + m, b + m]
}

fn mix(a: Color, b: Color, t: f32) -> Color {
    let t = t.clamp(0.0, 1.0);
    [a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t, a[2] + (b[2] - a[2]) * t]
}

fn scale(a: Color, k: f32) -> Color {
    [a[0] * k, a[1] * k, a[2] * k]
}

/// Approximate signed distance to an axis-aligned ellipse (negative inside), in image units.
fn ellipse_sd(u: f32, v: f32, cx: f32, cy: f32, rx: f32, ry: f32) -> f32 {
    let dx = (u - cx) / rx;
    let dy = (v - cy) / ry;
    ((dx * dx + dy * dy).sqrt() - 1.0) * rx.min(ry)
}

/// Coverage of a shape with signed distance `sd` for a pixel of width `px` (antialiasing).
fn cover(sd: f32, px: f32) -> f32 {
    (0.5 - sd / px).clamp(0.0, 1.0)
}

struct Face {
    bg_top: Color,
    bg_bottom: Color,
    hair: Color,
    skin: Color,
    iris: Color,
    cx: f32,
    cy: f32,
    rx: f32,
    ry: f32,
    eye_dx: f32,
    eye_y: f32,
    eye_rx: f32,
    eye_ry: f32,
    fringe: f32,
    fringe_freq: f32,
    fringe_phase: f32,
    long_hair: f32,
    mouth_w: f32,
    mouth_open: f32,
    blush: f32,
}

impl Face {
    fn random(rng: &mut ChaCha8Rng) -> Self {
        let bg_h: f32 = rng.random();
        let cx = 0.5 + rng.random_range(-0.06..0.06);
        let cy = 0.54 + rng.random_range(-0.05..0.05);
        let rx = rng.random_range(0.24..0.31);
        let ry = rx * rng.random_range(1.05..1.25);
        Face {
            bg_top: hsv(bg_h, rng.random_range(0.1..0.6), rng.random_range(0.6..1.0)),
            bg_bottom: hsv(bg_h + rng.random_range(-0.15..0.15), rng.random_range(0.1..0.7), rng.random_range(0.3..0.9)),
            hair: hsv(rng.random(), rng.random_range(0.2..0.9), rng.random_range(0.15..0.95)),
            skin: hsv(rng.random_range(0.03..0.09), rng.random_range(0.08..0.3), rng.random_range(0.85..1.0)),
            iris: hsv(rng.random(), rng.random_range(0.5..1.0), rng.random_range(0.4..0.9)),
            cx,
            cy,
            rx,
            ry,
            eye_dx: rx * rng.random_range(0.38..0.5),
            eye_y: cy + ry * rng.random_range(0.0..0.18),
            eye_rx: rx * rng.random_range(0.2..0.28),
            eye_ry: rx * rng.random_range(0.26..0.36),
            fringe: cy - ry * rng.random_range(0.05..0.35),
            fringe_freq: rng.random_range(3.0..7.0),
            fringe_phase: rng.random_range(0.0..std::f32::consts::TAU),
            long_hair: rng.random_range(0.0..0.35),
            mouth_w: rx * rng.random_range(0.08..0.2),
            mouth_open: rng.random_range(0.2..1.0),
            blush: rng.random_range(0.0..0.5),
        }
    }

    fn shade(&self, u: f32, v: f32, px: f32) -> Color {
        // Background gradient with a soft vignette.
        let mut c = mix(self.bg_top, self.bg_bottom, v);
        let vig = ((u - 0.5).powi(2) + (v - 0.5).powi(2)).sqrt();
        c = scale(c, 1.0 - 0.25 * vig);

        // Hair behind the head (plus long hair falling to the sides).
        let back = ellipse_sd(u, v, self.cx, self.cy - self.ry * 0.12, self.rx * 1.22, self.ry * 1.12);
        let long = if v > self.cy {
            let half_w = self.rx * 1.22 - (v - self.cy) * 0.2;
            let bottom = self.cy + self.ry * (0.6 + self.long_hair * 3.0);
            ((u - self.cx).abs() - half_w).max(v - bottom)
        } else {
            f32::INFINITY
        };
        let hair_shade = scale(self.hair, 0.8 + 0.2 * (1.0 - v));
        c = mix(c, hair_shade, cover(back.min(long), px));

        // Face.
        let face = ellipse_sd(u, v, self.cx, self.cy, self.rx, self.ry);
        let face_cov = cover(face, px);
        c = mix(c, self.skin, face_cov);

        // Fringe: hair over the top of the face, with a wavy lower edge.
        let wave = 0.035 * (self.fringe_freq * std::f32::consts::TAU * (u - self.cx) + self.fringe_phase).sin().abs();
        let fringe_sd = v - (self.fringe + wave);
        // Over the face and the back hair alike, so no seam shows along the face's edge.
        c = mix(c, self.hair, cover(fringe_sd.max(face.min(back)), px));

        // Blush.
        for side in [-1.0f32, 1.0] {
            let d = ellipse_sd(u, v, self.cx + side * self.eye_dx * 1.1, self.eye_y + self.eye_ry * 1.5, self.eye_rx, self.eye_ry * 0.4);
            c = mix(c, [1.0, 0.55, 0.6], self.blush * (-d / (self.eye_ry * 0.4)).clamp(0.0, 1.0) * face_cov);
        }

        // Eyes: white, iris with a darker lower part, pupil, two highlights, a lash line on top.
        for side in [-1.0f32, 1.0] {
            let ex = self.cx + side * self.eye_dx;
            let (erx, ery) = (self.eye_rx, self.eye_ry);
            let white = ellipse_sd(u, v, ex, self.eye_y, erx * 1.15, ery);
            c = mix(c, [0.98, 0.98, 1.0], cover(white, px));
            let iris = ellipse_sd(u, v, ex, self.eye_y + ery * 0.08, erx * 0.85, ery * 0.88);
            let iris_c = mix(scale(self.iris, 0.55), self.iris, (v - (self.eye_y - ery)) / (2.0 * ery));
            c = mix(c, iris_c, cover(iris.max(white), px));
            let pupil = ellipse_sd(u, v, ex, self.eye_y + ery * 0.1, erx * 0.38, ery * 0.45);
            c = mix(c, scale(self.iris, 0.2), cover(pupil, px));
            let hl = ellipse_sd(u, v, ex - erx * 0.35, self.eye_y - ery * 0.35, erx * 0.28, erx * 0.28);
            c = mix(c, [1.0, 1.0, 1.0], cover(hl, px));
            let hl2 = ellipse_sd(u, v, ex + erx * 0.3, self.eye_y + ery * 0.4, erx * 0.12, erx * 0.12);
            c = mix(c, [1.0, 1.0, 1.0], 0.8 * cover(hl2, px));
            let lash = ellipse_sd(u, v, ex, self.eye_y + ery * 0.1, erx * 1.3, ery * 1.1).abs() - px * 0.9;
            let upper = v < self.eye_y - ery * 0.2;
            if upper {
                c = mix(c, [0.12, 0.08, 0.1], cover(lash, px));
            }
        }

        // Mouth: a small dark-red ellipse.
        let mouth = ellipse_sd(u, v, self.cx, self.cy + self.ry * 0.62, self.mouth_w, self.mouth_w * 0.45 * self.mouth_open);
        c = mix(c, [0.55, 0.15, 0.2], cover(mouth.max(-px * 0.2), px));
        c
    }
}

/// Procedural, face-like 64x64 RGB images (a head blob with hair colour, two big eyes with highlights, mouth, background gradient; randomised colours/positions) for the README demo and tests: deterministic per seed.
///
/// Works for any `size` above 0 (0 panics); image `i` depends only on `(seed, i)` (ChaCha8
/// stream `i`), so the first `k` images of a larger set equal a smaller set. Rendered with
/// antialiased edges.
pub fn synthetic_faces(n: usize, size: usize, seed: u64) -> Vec<RgbImage> {
    assert!(size > 0, "size must be positive");
    (0..n).map(|i| synthetic_face(seed, i as u64, size)).collect()
}

/// Face `i` of [`synthetic_faces`]`(_, size, seed)`.
pub(crate) fn synthetic_face(seed: u64, i: u64, size: usize) -> RgbImage {
    let px = 1.0 / size as f32;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(i);
    let face = Face::random(&mut rng);
    RgbImage::from_fn(size as u32, size as u32, |x, y| {
        let c = face.shade((x as f32 + 0.5) * px, (y as f32 + 0.5) * px, px);
        Rgb(c.map(|v| (v.clamp(0.0, 1.0) * 255.0 + 0.5) as u8))
    })
}

/// Writes images as files into a folder (so tests and the demo can run prepare-data on them).
///
/// Files are named `face_00000.<ext>`, `face_00001.<ext>`, ...; `ext` picks the format (`jpg`
/// / `jpeg` are written at quality 95, `png`, `bmp`, `webp` (lossless), `gif`, `tif`). The
/// folder is created if needed.
pub fn write_images(dir: &Path, images: &[RgbImage], ext: &str) -> Result<(), DataError> {
    let ext = ext.trim_start_matches('.');
    let format = ImageFormat::from_extension(ext)
        .filter(|f| f.can_write())
        .ok_or_else(|| DataError::Invalid(format!("cannot write images with extension '{ext}'")))?;
    std::fs::create_dir_all(dir).map_err(|e| DataError::io("cannot create", dir, e))?;
    for (i, img) in images.iter().enumerate() {
        let name = format!("face_{i:05}.{ext}");
        let path = dir.join(&name);
        let mut bytes = Vec::new();
        let res = if format == ImageFormat::Jpeg {
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 95).encode_image(img)
        } else {
            img.write_to(&mut std::io::Cursor::new(&mut bytes), format)
        };
        res.map_err(|source| DataError::Image { name, source })?;
        std::fs::write(&path, &bytes).map_err(|e| DataError::io("cannot write", &path, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_faces_are_deterministic_and_varied() {
        let a = synthetic_faces(6, 64, 42);
        assert_eq!(a.len(), 6);
        assert!(a.iter().all(|im| im.dimensions() == (64, 64)));
        assert_eq!(a, synthetic_faces(6, 64, 42));
        assert_eq!(a[..3], synthetic_faces(3, 64, 42)[..]);
        assert_ne!(a, synthetic_faces(6, 64, 43));
        assert_ne!(a[0], a[1]);
        // Not flat: many distinct colours per image.
        for im in &a {
            let mut colours: Vec<[u8; 3]> = im.pixels().map(|p| p.0).collect();
            colours.sort_unstable();
            colours.dedup();
            assert!(colours.len() > 100, "only {} colours", colours.len());
        }
        assert_eq!(synthetic_faces(2, 17, 1)[1].dimensions(), (17, 17));
    }

    #[test]
    fn write_images_writes_readable_files() {
        let dir = tempfile::tempdir().unwrap();
        let imgs = synthetic_faces(2, 32, 1);
        for ext in ["png", "jpg", "bmp"] {
            write_images(dir.path(), &imgs, ext).unwrap();
            let back = image::open(dir.path().join(format!("face_00001.{ext}"))).unwrap().to_rgb8();
            assert_eq!(back.dimensions(), (32, 32));
        }
        assert_eq!(image::open(dir.path().join("face_00000.png")).unwrap().to_rgb8(), imgs[0]);
        assert!(write_images(dir.path(), &imgs, "xyz").is_err());
    }
}
