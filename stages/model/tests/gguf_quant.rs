//! GGUF dequantization: each format against the `gguf` Python package on random blocks
//! (goldens from scripts/gguf_dequant_goldens.py), and against blocks quantized here from a
//! ramp following ggml's block layouts, within each format's error bound.

use half::f16;
use newt_model::gguf::quant::{GgmlType, QuantError, dequantize, quantize_q8_0, scale_min_k4};

fn goldens() -> serde_json::Value {
    let text = include_str!("goldens/gguf_dequant.json");
    serde_json::from_str(text).unwrap()
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

#[test]
fn every_supported_format_matches_gguf_python_dequantize_exactly() {
    let g = goldens();
    let formats = g["formats"].as_object().unwrap();
    assert_eq!(formats.len(), 9, "goldens cover F32 F16 BF16 Q8_0 Q4_0 Q4_1 Q4_K Q5_K Q6_K");
    for (name, f) in formats {
        let ty = GgmlType(f["type_id"].as_u64().unwrap() as u32);
        assert_eq!(ty.name(), Some(name.as_str()));
        let n = f["n"].as_u64().unwrap() as usize;
        let got = dequantize(ty, &hex(f["bytes_hex"].as_str().unwrap()), n).unwrap();
        let want: Vec<f32> = f["values"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        assert_eq!(got.len(), want.len(), "{name}");
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!(a == b || (a.is_nan() && b.is_nan()), "{name}[{i}]: newt {a} vs gguf.quants {b}");
        }
    }
}

fn ramp(n: usize) -> Vec<f32> {
    // Not symmetric, with a kink, so mins and scales differ per block.
    (0..n).map(|i| (i as f32 * 0.37).sin() * 2.0 + (i as f32) * 0.01 - 1.3).collect()
}

fn f16b(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_bits().to_le_bytes()
}
fn f16r(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

#[test]
fn q8_0_ramp_round_trips_within_half_a_step() {
    let x = ramp(128);
    let q = quantize_q8_0(&x);
    assert_eq!(q.len(), 4 * 34);
    let y = dequantize(GgmlType::Q8_0, &q, 128).unwrap();
    for (b, (xs, ys)) in x.chunks(32).zip(y.chunks(32)).enumerate() {
        let d = f16r(xs.iter().fold(0f32, |a, v| a.max(v.abs())) / 127.0);
        for (a, b2) in xs.iter().zip(ys) {
            // Half a step, plus the f16 rounding of d times up to 127 steps.
            let bound = d * 0.5 + 127.0 * d * f32::powi(2.0, -11);
            assert!((a - b2).abs() <= bound, "block {b}: {a} vs {b2} (bound {bound})");
        }
    }
}

/// ggml's `quantize_row_q4_0_ref`.
fn quantize_q4_0(x: &[f32]) -> Vec<u8> {
    let mut out = vec![];
    for blk in x.chunks(32) {
        let max = blk.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend(f16b(d));
        for j in 0..16 {
            let q0 = ((blk[j] * id + 8.5) as i8).min(15) as u8;
            let q1 = ((blk[j + 16] * id + 8.5) as i8).min(15) as u8;
            out.push(q0 | (q1 << 4));
        }
    }
    out
}

/// ggml's `quantize_row_q4_1_ref`.
fn quantize_q4_1(x: &[f32]) -> Vec<u8> {
    let mut out = vec![];
    for blk in x.chunks(32) {
        let min = blk.iter().cloned().fold(f32::MAX, f32::min);
        let max = blk.iter().cloned().fold(f32::MIN, f32::max);
        let d = (max - min) / 15.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend(f16b(d));
        out.extend(f16b(min));
        for j in 0..16 {
            let q0 = (((blk[j] - min) * id + 0.5) as i8).min(15) as u8;
            let q1 = (((blk[j + 16] - min) * id + 0.5) as i8).min(15) as u8;
            out.push(q0 | (q1 << 4));
        }
    }
    out
}

#[test]
fn q4_0_and_q4_1_ramps_round_trip_within_one_step() {
    let x = ramp(96);
    let y = dequantize(GgmlType::Q4_0, &quantize_q4_0(&x), 96).unwrap();
    for (xs, ys) in x.chunks(32).zip(y.chunks(32)) {
        let d = xs.iter().fold(0f32, |a, v| a.max(v.abs())) / 8.0;
        for (a, b) in xs.iter().zip(ys) {
            assert!((a - b).abs() <= d * 1.01, "Q4_0 {a} vs {b} (step {d})");
        }
    }
    let y = dequantize(GgmlType::Q4_1, &quantize_q4_1(&x), 96).unwrap();
    for (xs, ys) in x.chunks(32).zip(y.chunks(32)) {
        let (lo, hi) = xs.iter().fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
        let d = (hi - lo) / 15.0;
        for (a, b) in xs.iter().zip(ys) {
            assert!((a - b).abs() <= d * 0.51 + lo.abs() * 1e-3, "Q4_1 {a} vs {b} (step {d})");
        }
    }
}

/// Packs 8 six-bit (scale, min) pairs the way `quantize_row_q4_K_ref` does.
fn pack_scales_k4(sc: &[u8; 8], m: &[u8; 8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for j in 0..8 {
        if j < 4 {
            s[j] = sc[j];
            s[j + 4] = m[j];
        } else {
            s[j + 4] = (sc[j] & 0xF) | ((m[j] & 0xF) << 4);
            s[j - 4] |= (sc[j] >> 4) << 6;
            s[j] |= (m[j] >> 4) << 6;
        }
    }
    s
}

#[test]
fn k4_scale_packing_round_trips_all_six_bit_values() {
    let sc: [u8; 8] = [0, 1, 17, 63, 32, 47, 5, 60];
    let m: [u8; 8] = [63, 2, 33, 0, 61, 16, 48, 9];
    let packed = pack_scales_k4(&sc, &m);
    for j in 0..8 {
        assert_eq!(scale_min_k4(j, &packed), (sc[j], m[j]), "sub-block {j}");
    }
}

/// Per 32-element sub-block: (6-bit scale, 6-bit min, d, dmin) for 4- or 5-bit levels.
fn k_scales(x: &[f32], levels: f32) -> ([u8; 8], [u8; 8], f32, f32) {
    let subs: Vec<(f32, f32)> = x
        .chunks(32)
        .map(|s| {
            let lo = s.iter().cloned().fold(0f32, f32::min); // ggml clamps the min at 0
            let hi = s.iter().cloned().fold(f32::MIN, f32::max);
            ((hi - lo) / levels, -lo)
        })
        .collect();
    let d = f16r(subs.iter().map(|s| s.0).fold(0f32, f32::max) / 63.0);
    let dmin = f16r(subs.iter().map(|s| s.1).fold(0f32, f32::max) / 63.0);
    let (mut sc, mut m) = ([0u8; 8], [0u8; 8]);
    for (j, (scale, min)) in subs.iter().enumerate() {
        // Rounding the scale up keeps every value inside the representable range.
        sc[j] = ((scale / d).ceil() as u8).min(63);
        m[j] = ((min / dmin).round() as u8).min(63);
    }
    (sc, m, d, dmin)
}

/// Quantizes one 256-element super-block to Q4_K (or Q5_K when `five`), returning the block
/// and the values its levels stand for, computed as ggml's dequantizer does.
fn quantize_k(x: &[f32], five: bool) -> (Vec<u8>, Vec<f32>, Vec<f32>) {
    let maxq = if five { 31.0 } else { 15.0 };
    let (sc, m, d, dmin) = k_scales(x, maxq);
    let mut levels = vec![0u8; 256];
    let mut expect = vec![0f32; 256];
    let mut steps = vec![0f32; 256];
    for (i, &v) in x.iter().enumerate() {
        let j = i / 32;
        let (step, off) = (d * sc[j] as f32, dmin * m[j] as f32);
        let q = ((v + off) / step).round().clamp(0.0, maxq);
        levels[i] = q as u8;
        expect[i] = step * q - off;
        steps[i] = step;
    }
    let mut b = vec![];
    b.extend(f16b(d));
    b.extend(f16b(dmin));
    b.extend(pack_scales_k4(&sc, &m));
    if five {
        let mut qh = [0u8; 32];
        let mut ql = [0u8; 128];
        for n in 0..4 {
            for l in 0..32 {
                let (mut l1, mut l2) = (levels[64 * n + l], levels[64 * n + l + 32]);
                if l1 > 15 {
                    l1 -= 16;
                    qh[l] |= 1 << (2 * n);
                }
                if l2 > 15 {
                    l2 -= 16;
                    qh[l] |= 2 << (2 * n);
                }
                ql[32 * n + l] = l1 | (l2 << 4);
            }
        }
        b.extend(qh);
        b.extend(ql);
    } else {
        for n in 0..4 {
            for l in 0..32 {
                b.push(levels[64 * n + l] | (levels[64 * n + l + 32] << 4));
            }
        }
    }
    (b, expect, steps)
}

#[test]
fn q4_k_and_q5_k_ramps_decode_to_their_levels_within_half_a_step() {
    let x = ramp(512);
    for (five, ty, bytes) in [(false, GgmlType::Q4_K, 144), (true, GgmlType::Q5_K, 176)] {
        let mut blocks = vec![];
        let mut expect = vec![];
        let mut steps = vec![];
        for sb in x.chunks(256) {
            let (b, e, s) = quantize_k(sb, five);
            assert_eq!(b.len(), bytes);
            blocks.extend(b);
            expect.extend(e);
            steps.extend(s);
        }
        let y = dequantize(ty, &blocks, 512).unwrap();
        for i in 0..512 {
            assert_eq!(y[i], expect[i], "{ty} element {i}: layout mismatch");
            assert!((y[i] - x[i]).abs() <= steps[i] * 0.5 + 1e-6, "{ty} element {i}: {} vs {}", y[i], x[i]);
        }
    }
}

/// One Q6_K super-block per `quantize_row_q6_K_ref`'s packing, with simple per-16 scales.
fn quantize_q6_k(x: &[f32]) -> (Vec<u8>, Vec<f32>, Vec<f32>) {
    let scales: Vec<f32> = x.chunks(16).map(|s| s.iter().fold(0f32, |a, v| a.max(v.abs())) / 31.0).collect();
    let d = f16r(scales.iter().cloned().fold(0f32, f32::max) / 127.0);
    let sc: Vec<i8> = scales.iter().map(|s| ((s / d).ceil() as i32).min(127) as i8).collect();
    let mut l = vec![0u8; 256];
    let mut expect = vec![0f32; 256];
    let mut steps = vec![0f32; 256];
    for (i, &v) in x.iter().enumerate() {
        let step = d * sc[i / 16] as f32;
        let q = (v / step).round().clamp(-32.0, 31.0);
        l[i] = (q as i32 + 32) as u8;
        expect[i] = step * q;
        steps[i] = step;
    }
    let (mut ql, mut qh) = ([0u8; 128], [0u8; 64]);
    for h in 0..2 {
        let (j, ql, qh) = (128 * h, &mut ql[64 * h..], &mut qh[32 * h..]);
        for k in 0..32 {
            ql[k] = (l[j + k] & 0xF) | ((l[j + k + 64] & 0xF) << 4);
            ql[k + 32] = (l[j + k + 32] & 0xF) | ((l[j + k + 96] & 0xF) << 4);
            qh[k] = (l[j + k] >> 4)
                | ((l[j + k + 32] >> 4) << 2)
                | ((l[j + k + 64] >> 4) << 4)
                | ((l[j + k + 96] >> 4) << 6);
        }
    }
    let mut b = vec![];
    b.extend(ql);
    b.extend(qh);
    b.extend(sc.iter().map(|&s| s as u8));
    b.extend(f16b(d));
    (b, expect, steps)
}

#[test]
fn q6_k_ramp_decodes_to_its_levels_within_half_a_step() {
    let x = ramp(512);
    let (mut blocks, mut expect, mut steps) = (vec![], vec![], vec![]);
    for sb in x.chunks(256) {
        let (b, e, s) = quantize_q6_k(sb);
        assert_eq!(b.len(), 210);
        blocks.extend(b);
        expect.extend(e);
        steps.extend(s);
    }
    let y = dequantize(GgmlType::Q6_K, &blocks, 512).unwrap();
    for i in 0..512 {
        assert_eq!(y[i], expect[i], "Q6_K element {i}: layout mismatch");
        assert!((y[i] - x[i]).abs() <= steps[i] * 0.5 + 1e-6, "Q6_K element {i}");
    }
}

#[test]
fn unsupported_and_unknown_types_are_errors_that_name_them() {
    let err = dequantize(GgmlType(11), &[0u8; 110], 256).unwrap_err();
    assert!(matches!(err, QuantError::Unsupported { .. }));
    let msg = err.to_string();
    assert!(msg.contains("Q3_K") && msg.contains("id 11") && msg.contains("Q4_K"), "{msg}");
    let msg = dequantize(GgmlType(99), &[], 0).unwrap_err().to_string();
    assert!(msg.contains("unknown type id 99"), "{msg}");
}

#[test]
fn wrong_lengths_are_errors() {
    assert!(matches!(dequantize(GgmlType::Q8_0, &[0u8; 33], 32), Err(QuantError::Length { .. })));
    assert!(matches!(dequantize(GgmlType::Q4_K, &[0u8; 144], 200), Err(QuantError::Blocks { .. })));
}
