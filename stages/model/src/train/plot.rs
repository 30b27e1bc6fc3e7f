//! The loss-curve image: training loss (blue line) and eval loss (orange line with dots)
//! against the step, on light grid lines at fifths of each axis. No text: the numbers are in the
//! metrics JSONL next to it.

use std::path::Path;

use image::{ImageBuffer, Rgb, RgbImage};

use super::TrainError;
use super::metrics::MetricsRecord;

const W: u32 = 800;
const H: u32 = 480;
const MARGIN: i64 = 40;
const TRAIN: Rgb<u8> = Rgb([31, 119, 180]);
const EVAL: Rgb<u8> = Rgb([255, 127, 14]);
const AXIS: Rgb<u8> = Rgb([60, 60, 60]);
const GRID: Rgb<u8> = Rgb([225, 225, 225]);

/// Draws the curves of `records` into a PNG at `path`.
pub fn write_loss_curve(records: &[MetricsRecord], path: &Path) -> Result<(), TrainError> {
    render(records).save(path).map_err(|e| TrainError::Io(format!("{}: {e}", path.display())))
}

/// Renders the curves of `records` into an image.
pub fn render(records: &[MetricsRecord]) -> RgbImage {
    let mut img: RgbImage = ImageBuffer::from_pixel(W, H, Rgb([255, 255, 255]));
    let train: Vec<(f64, f64)> = records
        .iter()
        .filter_map(|r| match r {
            MetricsRecord::Train(s) if s.loss.is_finite() => Some((s.step as f64, s.loss)),
            _ => None,
        })
        .collect();
    let eval: Vec<(f64, f64)> = records
        .iter()
        .filter_map(|r| match r {
            MetricsRecord::Eval(e) if e.eval_loss.is_finite() => Some((e.step as f64, e.eval_loss)),
            _ => None,
        })
        .collect();
    let all = train.iter().chain(eval.iter());
    let x_max = all.clone().map(|p| p.0).fold(1.0, f64::max);
    let (mut y_min, mut y_max) = all.fold((f64::MAX, f64::MIN), |(lo, hi), p| (lo.min(p.1), hi.max(p.1)));
    if y_min > y_max {
        (y_min, y_max) = (0.0, 1.0);
    }
    let pad = ((y_max - y_min) * 0.05).max(1e-6);
    let (y_min, y_max) = (y_min - pad, y_max + pad);
    let (x0, y0, x1, y1) = (MARGIN, H as i64 - MARGIN, W as i64 - MARGIN, MARGIN);
    let to_px = |(x, y): (f64, f64)| -> (i64, i64) {
        let px = x0 as f64 + (x / x_max) * (x1 - x0) as f64;
        let py = y0 as f64 - (y - y_min) / (y_max - y_min) * (y0 - y1) as f64;
        (px.round() as i64, py.round() as i64)
    };

    for i in 1..=5 {
        let gx = x0 + (x1 - x0) * i / 5;
        let gy = y0 - (y0 - y1) * i / 5;
        line(&mut img, (gx, y0), (gx, y1), GRID, 1);
        line(&mut img, (x0, gy), (x1, gy), GRID, 1);
    }
    line(&mut img, (x0, y0), (x1, y0), AXIS, 2);
    line(&mut img, (x0, y0), (x0, y1), AXIS, 2);

    for pair in train.windows(2) {
        line(&mut img, to_px(pair[0]), to_px(pair[1]), TRAIN, 2);
    }
    if let [only] = train.as_slice() {
        dot(&mut img, to_px(*only), TRAIN);
    }
    for pair in eval.windows(2) {
        line(&mut img, to_px(pair[0]), to_px(pair[1]), EVAL, 2);
    }
    for p in &eval {
        dot(&mut img, to_px(*p), EVAL);
    }
    img
}

fn put(img: &mut RgbImage, x: i64, y: i64, c: Rgb<u8>) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, c);
    }
}

/// Bresenham line, `width` pixels thick.
fn line(img: &mut RgbImage, a: (i64, i64), b: (i64, i64), c: Rgb<u8>, width: i64) {
    let (mut x, mut y) = a;
    let (dx, dy) = ((b.0 - a.0).abs(), -(b.1 - a.1).abs());
    let (sx, sy) = ((b.0 - a.0).signum(), (b.1 - a.1).signum());
    let mut err = dx + dy;
    loop {
        for o in 0..width {
            put(img, x + o, y, c);
            put(img, x, y + o, c);
        }
        if (x, y) == b {
            break;
        }
        let e2 = 2 * err;
        if e2 >= dy {
            err += dy;
            x += sx;
        }
        if e2 <= dx {
            err += dx;
            y += sy;
        }
    }
}

fn dot(img: &mut RgbImage, (cx, cy): (i64, i64), c: Rgb<u8>) {
    for dy in -3..=3 {
        for dx in -3..=3 {
            if dx * dx + dy * dy <= 9 {
                put(img, cx + dx, cy + dy, c);
            }
        }
    }
}
