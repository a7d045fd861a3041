//! The loss curve PNG (plotters, bitmap backend).

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::TrainError;

/// DejaVu Sans, for the axis labels. License: Bitstream Vera / DejaVu (public-domain changes),
/// which permits redistribution with its notice: see `assets/DejaVuSans-LICENSE.txt`.
static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// Debiased exponential moving average of a series, as TensorBoard's smoothing slider.
pub fn smooth(values: &[f64], weight: f64) -> Vec<f64> {
    let mut out = Vec::with_capacity(values.len());
    let mut acc = 0.0;
    let mut w_k = 1.0;
    for &v in values {
        acc = weight * acc + (1.0 - weight) * v;
        w_k *= weight;
        out.push(if w_k < 1.0 { acc / (1.0 - w_k) } else { v });
    }
    out
}

/// A smoothing weight that suits `n` points: none for a handful, 0.9 for hundreds.
fn smoothing_weight(n: usize) -> f64 {
    (1.0 - 10.0 / n.max(1) as f64).clamp(0.0, 0.9)
}

/// Where the log-scale loss axis gets labels: 1, 2, 5 x 10^k inside [lo, hi], or every digit x
/// 10^k when 1-2-5 gives fewer than three, or five even steps for a range narrower than that;
/// over more than four decades, powers of ten only. (plotters labels only powers of ten on a
/// log axis: a loss between 0.13 and 0.9 had none.) `0 < lo < hi`, both finite.
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    debug_assert!(lo > 0.0 && hi > lo && hi.is_finite(), "log_ticks({lo}, {hi})");
    let within = |mantissas: &[f64]| -> Vec<f64> {
        let mut out = Vec::new();
        for k in (lo.log10().floor() as i32)..=(hi.log10().ceil() as i32) {
            for m in mantissas {
                let v = m * 10f64.powi(k);
                if v >= lo && v <= hi {
                    out.push(v);
                }
            }
        }
        out
    };
    if hi / lo > 1e4 {
        return within(&[1.0]);
    }
    for mantissas in [&[1.0, 2.0, 5.0][..], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]] {
        let t = within(mantissas);
        if t.len() >= 3 {
            return t;
        }
    }
    (0..5).map(|i| lo + (hi - lo) * (i as f64 + 0.5) / 5.0).collect()
}

/// A tick value to three significant digits (all digits from 100 up), without trailing zeros
/// (0.02, 0.15, 2).
fn tick_label(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let decimals = (2 - v.abs().log10().floor() as i32).max(0) as usize;
    let s = format!("{v:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// Draws the training loss (raw and smoothed) and the validation loss against the step, on a
/// log scale, into a `width x height` PNG at `path` (written atomically).
pub fn loss_curve(path: &Path, title: &str, train: &[(u64, f64)], val: &[(u64, f64)], size: (u32, u32)) -> Result<(), TrainError> {
    register_font();
    let (w, h) = size;
    let mut buf = vec![0u8; (w * h * 3) as usize];
    let err = |e: String| TrainError::Invalid(format!("loss plot: {e}"));
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
        let pts: Vec<f64> = train.iter().chain(val).map(|p| p.1).filter(|v| v.is_finite() && *v > 0.0).collect();
        let (lo, hi) = if pts.is_empty() {
            (0.01, 1.0)
        } else {
            let lo = pts.iter().cloned().fold(f64::INFINITY, f64::min);
            let hi = pts.iter().cloned().fold(0.0, f64::max);
            (lo * 0.9, (hi * 1.1).max(lo * 1.2))
        };
        let max_step = train.iter().chain(val).map(|p| p.0).max().unwrap_or(1).max(1);
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0u64..max_step, (lo..hi).log_scale().with_key_points(log_ticks(lo, hi)))
            .map_err(|e| err(e.to_string()))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("MSE loss (log)")
            .label_style(("sans-serif", 13))
            .y_label_formatter(&|v| tick_label(*v))
            .draw()
            .map_err(|e| err(e.to_string()))?;
        let ok = |p: &&(u64, f64)| p.1.is_finite() && p.1 > 0.0;
        let raw: Vec<(u64, f64)> = train.iter().filter(ok).cloned().collect();
        chart
            .draw_series(LineSeries::new(raw.iter().cloned(), RGBColor(160, 190, 230).stroke_width(1)))
            .map_err(|e| err(e.to_string()))?
            .label("train loss")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RGBColor(160, 190, 230)));
        let sm = smooth(&raw.iter().map(|p| p.1).collect::<Vec<_>>(), smoothing_weight(raw.len()));
        chart
            .draw_series(LineSeries::new(raw.iter().zip(sm).map(|(p, s)| (p.0, s)), BLUE.stroke_width(2)))
            .map_err(|e| err(e.to_string()))?
            .label("train loss (smoothed)")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
        let vals: Vec<(u64, f64)> = val.iter().filter(ok).cloned().collect();
        if !vals.is_empty() {
            chart
                .draw_series(LineSeries::new(vals.iter().cloned(), RED.stroke_width(2)))
                .map_err(|e| err(e.to_string()))?
                .label("val loss")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
            chart
                .draw_series(vals.iter().map(|p| Circle::new(*p, 3, RED.filled())))
                .map_err(|e| err(e.to_string()))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 13))
            .draw()
            .map_err(|e| err(e.to_string()))?;
        root.present().map_err(|e| err(e.to_string()))?;
    }
    let img = image::RgbImage::from_raw(w, h, buf).expect("buffer size");
    crate::checkpoint::save_png_atomic(path, &img)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_a_png() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("loss.png");
        let train: Vec<(u64, f64)> = (1..200).map(|s| (s, 1.0 / (1.0 + s as f64 * 0.05))).collect();
        loss_curve(&p, "test", &train, &[(100, 0.2), (199, 0.1)], (640, 400)).unwrap();
        let img = image::open(&p).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (640, 400));
        // Something other than white was drawn.
        assert!(img.pixels().any(|px| px.0 != [255, 255, 255]));
        loss_curve(&p, "empty", &[], &[], (320, 200)).unwrap();
        let s = smooth(&[1.0, 0.0], 0.5);
        assert!((s[0] - 1.0).abs() < 1e-12 && (s[1] - 1.0 / 3.0).abs() < 1e-12, "{s:?}");
        assert_eq!(smooth(&[1.0, 0.0], 0.0), vec![1.0, 0.0]);
    }

    #[test]
    fn the_loss_axis_has_labels_inside_any_range() {
        // 1-2-5 gives two here (0.2, 0.5): every digit instead.
        assert_eq!(log_ticks(0.117, 0.99).len(), 8);
        assert_eq!(log_ticks(0.015, 0.9), vec![0.02, 0.05, 0.1, 0.2, 0.5]);
        for (lo, hi) in [(0.117, 0.99), (0.018, 0.11), (0.02, 0.045), (0.5, 0.55), (1e-4, 3.0), (0.031, 0.032)] {
            let t = log_ticks(lo, hi);
            assert!(t.len() >= 3 && t.iter().all(|v| (lo..=hi).contains(v)), "{lo}..{hi}: {t:?}");
        }
        // A diverging run's twelve decades: one label each, not 36.
        assert_eq!(log_ticks(2e-12, 1.5).len(), 12);
        let labels: Vec<String> = [0.02, 0.15, 2.0, 0.0035, 0.12345].iter().map(|v| tick_label(*v)).collect();
        assert_eq!(labels, ["0.02", "0.15", "2", "0.0035", "0.123"]);
    }
}
