//! ggml tensor types: their ids, block geometry, and dequantization to f32 (plus the Q8_0
//! quantizer the exporter needs). Block layouts follow ggml's `block_*` structs byte for byte
//! (`ggml-common.h`) and the arithmetic follows `dequantize_row_*` in `ggml-quants.c`.

use half::{bf16, f16};

/// A ggml tensor type as stored in a GGUF tensor info. Every id ggml has assigned is named, so an
/// error can say *which* unsupported type a file uses; only some can be dequantized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GgmlType(pub u32);

/// (id, name, elements per block, bytes per block) for every type ggml has defined.
const TYPES: &[(u32, &str, usize, usize)] = &[
    (0, "F32", 1, 4),
    (1, "F16", 1, 2),
    (2, "Q4_0", 32, 18),
    (3, "Q4_1", 32, 20),
    (6, "Q5_0", 32, 22),
    (7, "Q5_1", 32, 24),
    (8, "Q8_0", 32, 34),
    (9, "Q8_1", 32, 40),
    (10, "Q2_K", 256, 84),
    (11, "Q3_K", 256, 110),
    (12, "Q4_K", 256, 144),
    (13, "Q5_K", 256, 176),
    (14, "Q6_K", 256, 210),
    (15, "Q8_K", 256, 292),
    (16, "IQ2_XXS", 256, 66),
    (17, "IQ2_XS", 256, 74),
    (18, "IQ3_XXS", 256, 98),
    (19, "IQ1_S", 256, 50),
    (20, "IQ4_NL", 32, 18),
    (21, "IQ3_S", 256, 110),
    (22, "IQ2_S", 256, 82),
    (23, "IQ4_XS", 256, 136),
    (24, "I8", 1, 1),
    (25, "I16", 1, 2),
    (26, "I32", 1, 4),
    (27, "I64", 1, 8),
    (28, "F64", 1, 8),
    (29, "IQ1_M", 256, 56),
    (30, "BF16", 1, 2),
    (34, "TQ1_0", 256, 54),
    (35, "TQ2_0", 256, 66),
    (39, "MXFP4", 32, 17),
];

/// The types [`dequantize`] supports.
pub const SUPPORTED: &[GgmlType] = &[
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

const QK_K: usize = 256;

impl GgmlType {
    pub const F32: GgmlType = GgmlType(0);
    pub const F16: GgmlType = GgmlType(1);
    pub const Q4_0: GgmlType = GgmlType(2);
    pub const Q4_1: GgmlType = GgmlType(3);
    pub const Q8_0: GgmlType = GgmlType(8);
    pub const Q4_K: GgmlType = GgmlType(12);
    pub const Q5_K: GgmlType = GgmlType(13);
    pub const Q6_K: GgmlType = GgmlType(14);
    pub const BF16: GgmlType = GgmlType(30);

    fn entry(self) -> Option<&'static (u32, &'static str, usize, usize)> {
        TYPES.iter().find(|t| t.0 == self.0)
    }

    /// ggml's name for the type, or `None` for an id ggml never assigned.
    pub fn name(self) -> Option<&'static str> {
        self.entry().map(|t| t.1)
    }

    /// (elements per block, bytes per block), or `None` for an unknown id.
    pub fn block(self) -> Option<(usize, usize)> {
        self.entry().map(|t| (t.2, t.3))
    }

    /// Whether [`dequantize`] handles this type.
    pub fn is_supported(self) -> bool {
        SUPPORTED.contains(&self)
    }

    /// Bytes needed for `n` elements, or `None` when the id is unknown or `n` is not a whole
    /// number of blocks.
    pub fn byte_len(self, n: usize) -> Option<usize> {
        let (be, bb) = self.block()?;
        n.is_multiple_of(be).then_some(n / be * bb)
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.name() {
            Some(n) => write!(f, "{n} (type id {})", self.0),
            None => write!(f, "unknown type id {}", self.0),
        }
    }
}

/// Why a buffer could not be dequantized.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantError {
    #[error("ggml type {ty} cannot be dequantized by newt (supported: {})", supported_list())]
    Unsupported { ty: GgmlType },
    #[error("{ty}: {n} elements need {want} bytes, got {got}")]
    Length { ty: GgmlType, n: usize, want: usize, got: usize },
    #[error("{ty}: {n} elements is not a whole number of {block}-element blocks")]
    Blocks { ty: GgmlType, n: usize, block: usize },
}

fn supported_list() -> String {
    SUPPORTED.iter().map(|t| t.name().unwrap_or("?")).collect::<Vec<_>>().join(", ")
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// Dequantizes `n` elements of type `ty` from `bytes` into f32.
pub fn dequantize(ty: GgmlType, bytes: &[u8], n: usize) -> Result<Vec<f32>, QuantError> {
    if !ty.is_supported() {
        return Err(QuantError::Unsupported { ty });
    }
    let (be, bb) = ty.block().expect("supported types are known");
    if !n.is_multiple_of(be) {
        return Err(QuantError::Blocks { ty, n, block: be });
    }
    let want = n / be * bb;
    if bytes.len() != want {
        return Err(QuantError::Length { ty, n, want, got: bytes.len() });
    }
    let mut out = Vec::with_capacity(n);
    let blocks = bytes.chunks_exact(bb);
    match ty {
        GgmlType::F32 => out.extend(blocks.map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
        GgmlType::F16 => out.extend(blocks.map(|c| f16_at(c, 0))),
        GgmlType::BF16 => out.extend(blocks.map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())),
        GgmlType::Q8_0 => blocks.for_each(|b| {
            let d = f16_at(b, 0);
            out.extend(b[2..34].iter().map(|&q| q as i8 as f32 * d));
        }),
        GgmlType::Q4_0 => blocks.for_each(|b| {
            let d = f16_at(b, 0);
            let qs = &b[2..18];
            out.extend(qs.iter().map(|&q| ((q & 0xF) as i32 - 8) as f32 * d));
            out.extend(qs.iter().map(|&q| ((q >> 4) as i32 - 8) as f32 * d));
        }),
        GgmlType::Q4_1 => blocks.for_each(|b| {
            let (d, m) = (f16_at(b, 0), f16_at(b, 2));
            let qs = &b[4..20];
            out.extend(qs.iter().map(|&q| (q & 0xF) as f32 * d + m));
            out.extend(qs.iter().map(|&q| (q >> 4) as f32 * d + m));
        }),
        GgmlType::Q4_K => blocks.for_each(|b| dequant_q4_k(b, &mut out)),
        GgmlType::Q5_K => blocks.for_each(|b| dequant_q5_k(b, &mut out)),
        GgmlType::Q6_K => blocks.for_each(|b| dequant_q6_k(b, &mut out)),
        _ => unreachable!("SUPPORTED lists only the types handled above"),
    }
    Ok(out)
}

/// 6-bit scale and min of sub-block `j` from the 12 packed bytes of a Q4_K/Q5_K super-block
/// (`get_scale_min_k4`).
pub fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// `block_q4_K`: d f16, dmin f16, scales[12], qs[128].
fn dequant_q4_k(b: &[u8], out: &mut Vec<f32>) {
    let (d, min) = (f16_at(b, 0), f16_at(b, 2));
    let scales = &b[4..16];
    let qs = &b[16..144];
    for (k, q) in qs.chunks_exact(32).enumerate() {
        let (sc, m) = scale_min_k4(2 * k, scales);
        let (d1, m1) = (d * sc as f32, min * m as f32);
        let (sc, m) = scale_min_k4(2 * k + 1, scales);
        let (d2, m2) = (d * sc as f32, min * m as f32);
        out.extend(q.iter().map(|&x| d1 * (x & 0xF) as f32 - m1));
        out.extend(q.iter().map(|&x| d2 * (x >> 4) as f32 - m2));
    }
}

/// `block_q5_K`: d f16, dmin f16, scales[12], qh[32], qs[128].
fn dequant_q5_k(b: &[u8], out: &mut Vec<f32>) {
    let (d, min) = (f16_at(b, 0), f16_at(b, 2));
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for (k, ql) in qs.chunks_exact(32).enumerate() {
        let (u1, u2) = (1u8 << (2 * k), 2u8 << (2 * k));
        let (sc, m) = scale_min_k4(2 * k, scales);
        let (d1, m1) = (d * sc as f32, min * m as f32);
        let (sc, m) = scale_min_k4(2 * k + 1, scales);
        let (d2, m2) = (d * sc as f32, min * m as f32);
        let hi = |l: usize, u: u8| if qh[l] & u != 0 { 16.0 } else { 0.0 };
        out.extend((0..32).map(|l| d1 * ((ql[l] & 0xF) as f32 + hi(l, u1)) - m1));
        out.extend((0..32).map(|l| d2 * ((ql[l] >> 4) as f32 + hi(l, u2)) - m2));
    }
}

/// `block_q6_K`: ql[128], qh[64], scales[16] (i8), d f16.
fn dequant_q6_k(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 208);
    let start = out.len();
    out.resize(start + QK_K, 0.0);
    let y = &mut out[start..];
    for half in 0..2 {
        let ql = &b[64 * half..64 * half + 64];
        let qh = &b[128 + 32 * half..128 + 32 * half + 32];
        let sc = &b[192 + 8 * half..192 + 8 * half + 8];
        let y = &mut y[128 * half..128 * half + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            let s = |i: usize| d * (sc[i] as i8) as f32;
            y[l] = s(is) * q1 as f32;
            y[l + 32] = s(is + 2) * q2 as f32;
            y[l + 64] = s(is + 4) * q3 as f32;
            y[l + 96] = s(is + 6) * q4 as f32;
        }
    }
}

/// Quantizes to Q8_0 exactly as ggml's `quantize_row_q8_0_ref`: per 32-element block,
/// d = max|x| / 127 stored as f16, q = round(x / d).
/// `values.len()` must be a multiple of 32.
pub fn quantize_q8_0(values: &[f32]) -> Vec<u8> {
    assert!(values.len().is_multiple_of(32), "Q8_0 needs whole 32-element blocks");
    let mut out = Vec::with_capacity(values.len() / 32 * 34);
    for blk in values.chunks_exact(32) {
        let amax = blk.iter().fold(0.0f32, |a, &x| a.max(x.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
        // ggml rounds with roundf (half away from zero), which is Rust's f32::round.
        out.extend(blk.iter().map(|&x| (x * id).round() as i8 as u8));
    }
    out
}
