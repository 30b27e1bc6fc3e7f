// RMSNorm forward and backward over the last dimension of a row-major bf16 [rows, n] tensor, as
// Hugging Face's LlamaRMSNorm computes it: the mean square and the scaling in f32, the normed
// value rounded to bf16, then multiplied by the bf16 weight (the product rounded to bf16).
//
//   forward:  r = rsqrt(mean(x^2) + eps);  y = bf16(bf16(x * r) * w);  inv[row] = r
//   backward: g = dy * w;  xh = x * r;  dx = r * (g - xh * mean(g * xh))      (f32, then bf16)
//
// One warp per row, ROWS_PER_BLOCK rows per block; no headers (bf16 travels as its bits). The
// `_v8` kernels read and write eight values a lane in 16-byte vectors (n a multiple of 8).
// Compiled by NVRTC together with flash_attn.cu (kernels/src/flash_cuda.rs), so every name here
// carries an `rn_` prefix.

#define RN_ROWS_PER_BLOCK 4

typedef unsigned short rn_bf16;

__device__ __forceinline__ float rn_to_f32(rn_bf16 x) { return __uint_as_float(((unsigned int)x) << 16); }

// Round to nearest even (finite inputs; a NaN stays a NaN).
__device__ __forceinline__ rn_bf16 rn_to_bf16(float f) {
  unsigned int u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (rn_bf16)((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (rn_bf16)(u >> 16);
}

__device__ __forceinline__ float rn_warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The per-value formulas of both passes, shared by the scalar and the `_v8` kernels.
__device__ __forceinline__ rn_bf16 rn_norm_value(rn_bf16 x, float r, rn_bf16 w) {
  const float normed = rn_to_f32(rn_to_bf16(rn_to_f32(x) * r));
  return rn_to_bf16(normed * rn_to_f32(w));
}

__device__ __forceinline__ rn_bf16 rn_dx_value(rn_bf16 x, rn_bf16 dy, rn_bf16 w, float r, float mean) {
  const float xh = rn_to_f32(x) * r;
  const float g = rn_to_f32(dy) * rn_to_f32(w);
  return rn_to_bf16(r * (g - xh * mean));
}

extern "C" __global__ void newt_rms_fwd(const rn_bf16* __restrict__ x, const rn_bf16* __restrict__ w,
                                        rn_bf16* __restrict__ y, float* __restrict__ inv, int rows, int n,
                                        float eps) {
  const int lane = threadIdx.x & 31;
  const long long row = (long long)blockIdx.x * RN_ROWS_PER_BLOCK + (threadIdx.x >> 5);
  if (row >= rows) return;
  const rn_bf16* xr = x + row * n;
  float ss = 0.f;
  for (int i = lane; i < n; i += 32) {
    const float v = rn_to_f32(xr[i]);
    ss += v * v;
  }
  const float r = rsqrtf(rn_warp_sum(ss) / (float)n + eps);
  if (lane == 0) inv[row] = r;
  rn_bf16* yr = y + row * n;
  for (int i = lane; i < n; i += 32) yr[i] = rn_norm_value(xr[i], r, w[i]);
}

extern "C" __global__ void newt_rms_bwd(const rn_bf16* __restrict__ x, const rn_bf16* __restrict__ w,
                                        const rn_bf16* __restrict__ dy, const float* __restrict__ inv,
                                        rn_bf16* __restrict__ dx, int rows, int n) {
  const int lane = threadIdx.x & 31;
  const long long row = (long long)blockIdx.x * RN_ROWS_PER_BLOCK + (threadIdx.x >> 5);
  if (row >= rows) return;
  const rn_bf16* xr = x + row * n;
  const rn_bf16* dyr = dy + row * n;
  const float r = inv[row];
  float dot = 0.f;
  for (int i = lane; i < n; i += 32) dot += rn_to_f32(dyr[i]) * rn_to_f32(w[i]) * rn_to_f32(xr[i]) * r;
  const float mean = rn_warp_sum(dot) / (float)n;
  rn_bf16* dxr = dx + row * n;
  for (int i = lane; i < n; i += 32) dxr[i] = rn_dx_value(xr[i], dyr[i], w[i], r, mean);
}

// 16-byte vectors of eight bf16.
union rn_vec8 {
  uint4 v;
  rn_bf16 e[8];
};

// The same passes in 16-byte loads and stores, eight values a lane, for n a multiple of 8 and
// rows starting on 16 bytes (the launcher checks both). The per-value arithmetic is the scalar
// kernels' (the helpers above); the row sums add the same terms in another order, so r and the mean may differ from
// theirs in the last place of an f32.
extern "C" __global__ void newt_rms_fwd_v8(const rn_bf16* __restrict__ x, const rn_bf16* __restrict__ w,
                                           rn_bf16* __restrict__ y, float* __restrict__ inv, int rows, int n,
                                           float eps) {
  const int lane = threadIdx.x & 31;
  const long long row = (long long)blockIdx.x * RN_ROWS_PER_BLOCK + (threadIdx.x >> 5);
  if (row >= rows) return;
  const rn_bf16* xr = x + row * n;
  float ss = 0.f;
#pragma unroll 4
  for (int i = lane * 8; i < n; i += 256) {
    rn_vec8 a;
    a.v = *(const uint4*)(xr + i);
#pragma unroll
    for (int j = 0; j < 8; j++) {
      const float v = rn_to_f32(a.e[j]);
      ss += v * v;
    }
  }
  const float r = rsqrtf(rn_warp_sum(ss) / (float)n + eps);
  if (lane == 0) inv[row] = r;
  rn_bf16* yr = y + row * n;
#pragma unroll 4
  for (int i = lane * 8; i < n; i += 256) {
    rn_vec8 a, g, o;
    a.v = *(const uint4*)(xr + i);
    g.v = __ldg((const uint4*)(w + i));
#pragma unroll
    for (int j = 0; j < 8; j++) o.e[j] = rn_norm_value(a.e[j], r, g.e[j]);
    *(uint4*)(yr + i) = o.v;
  }
}

extern "C" __global__ void newt_rms_bwd_v8(const rn_bf16* __restrict__ x, const rn_bf16* __restrict__ w,
                                           const rn_bf16* __restrict__ dy, const float* __restrict__ inv,
                                           rn_bf16* __restrict__ dx, int rows, int n) {
  const int lane = threadIdx.x & 31;
  const long long row = (long long)blockIdx.x * RN_ROWS_PER_BLOCK + (threadIdx.x >> 5);
  if (row >= rows) return;
  const rn_bf16* xr = x + row * n;
  const rn_bf16* dyr = dy + row * n;
  const float r = inv[row];
  float dot = 0.f;
#pragma unroll 4
  for (int i = lane * 8; i < n; i += 256) {
    rn_vec8 a, g, d;
    a.v = *(const uint4*)(xr + i);
    g.v = __ldg((const uint4*)(w + i));
    d.v = *(const uint4*)(dyr + i);
#pragma unroll
    for (int j = 0; j < 8; j++) dot += rn_to_f32(d.e[j]) * rn_to_f32(g.e[j]) * rn_to_f32(a.e[j]) * r;
  }
  const float mean = rn_warp_sum(dot) / (float)n;
  rn_bf16* dxr = dx + row * n;
#pragma unroll 4
  for (int i = lane * 8; i < n; i += 256) {
    rn_vec8 a, g, d, o;
    a.v = *(const uint4*)(xr + i);
    g.v = __ldg((const uint4*)(w + i));
    d.v = *(const uint4*)(dyr + i);
#pragma unroll
    for (int j = 0; j < 8; j++) o.e[j] = rn_dx_value(a.e[j], d.e[j], g.e[j], r, mean);
    *(uint4*)(dxr + i) = o.v;
  }
}
