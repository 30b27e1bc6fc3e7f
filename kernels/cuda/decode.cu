// One decoding step of a Llama-family model for a few rows (kernels/src/decode.rs): every row
// feeds one token at its own position against its own KV cache. A step is a short list of these
// launches queued from the device thread in one go (about a dozen a layer), instead of the
// hundreds of small Burn operations the layer-by-layer path queues on the host.
//
// Activations live in f32 scratch but are rounded to bf16 where the bf16 layer-by-layer path
// rounds them (norm outputs, linear outputs, the residual stream, the SwiGLU product, attention
// output), so the two paths agree to bf16 rounding. Weights are bf16 (LoRA A/B f32 or bf16),
// the KV cache bf16 `[rows, kv_heads, capacity, head_dim]`, written in place at each row's length.
//
// `meta` is i32 `[2 * rows]`: each row's token, then each row's length (the position the token
// takes). `rope` is f32 `[rows, head_dim]`: cos of each frequency, then its sin (rounded to bf16
// here, as the layer-by-layer path's tables are).
// Compiled with the other kernels as one module: names carry `dk_`/`DK_`.

#define DK_MAX_ROWS 8  // rows a gemv launch takes (the launcher cuts more into chunks)
#define DK_GEMV_WARPS 8
#define DK_NEG_INF __int_as_float(0xff800000)  // no headers: -INFINITY by its bits

typedef unsigned short dk_bf16;

__device__ __forceinline__ float dk_f32(dk_bf16 x) { return __uint_as_float(((unsigned int)x) << 16); }

__device__ __forceinline__ dk_bf16 dk_to_bf16(float f) {
  unsigned int u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (dk_bf16)((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (dk_bf16)(u >> 16);
}

// f32 rounded to the nearest bf16 value.
__device__ __forceinline__ float dk_rb(float f) { return dk_f32(dk_to_bf16(f)); }

__device__ __forceinline__ float dk_warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float dk_load(const dk_bf16* p) { return dk_f32(*p); }
__device__ __forceinline__ float dk_load(const float* p) { return *p; }

// Eight consecutive weights from a 16-byte (bf16) or two 16-byte (f32) aligned address.
__device__ __forceinline__ void dk_load8(const dk_bf16* p, float* w) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const unsigned int v[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    w[2 * j] = __uint_as_float(v[j] << 16);
    w[2 * j + 1] = __uint_as_float(v[j] & 0xffff0000u);
  }
}
__device__ __forceinline__ void dk_load8(const float* p, float* w) {
  const float4 a = *reinterpret_cast<const float4*>(p);
  const float4 b = *reinterpret_cast<const float4*>(p + 4);
  w[0] = a.x; w[1] = a.y; w[2] = a.z; w[3] = a.w;
  w[4] = b.x; w[5] = b.y; w[6] = b.z; w[7] = b.w;
}

// out[r, o] = rb(res + rb(prev + rb(scale * x[r]·w[o] + bias[o]))) for r < rows (at most
// DK_MAX_ROWS), each of bias/prev/res left out when null. x is f32 [rows, k], w [n, k] (Hugging
// Face layout), out/prev/res f32 [rows, n] (out may be prev or res: each element is read and
// written by one thread). One warp per output.
template <typename W>
__device__ __forceinline__ void dk_gemv(const float* __restrict__ x, const W* __restrict__ w, const dk_bf16* bias,
                                        const float* prev, const float* res, float* out, int rows, int n, int k,
                                        float scale) {
  const int lane = threadIdx.x & 31;
  const int o = blockIdx.x * DK_GEMV_WARPS + (threadIdx.x >> 5);
  if (o >= n) return;
  const W* wr = w + (long long)o * k;
  float acc[DK_MAX_ROWS];
#pragma unroll
  for (int r = 0; r < DK_MAX_ROWS; ++r) acc[r] = 0.f;
  if ((k & 7) == 0) {
    for (int i = lane * 8; i < k; i += 256) {
      float wv[8];
      dk_load8(wr + i, wv);
#pragma unroll
      for (int r = 0; r < DK_MAX_ROWS; ++r) {
        if (r < rows) {
          const float4 a = *reinterpret_cast<const float4*>(x + (long long)r * k + i);
          const float4 b = *reinterpret_cast<const float4*>(x + (long long)r * k + i + 4);
          acc[r] += wv[0] * a.x + wv[1] * a.y + wv[2] * a.z + wv[3] * a.w + wv[4] * b.x + wv[5] * b.y +
                    wv[6] * b.z + wv[7] * b.w;
        }
      }
    }
  } else {
    for (int i = lane; i < k; i += 32) {
      const float wv = dk_load(wr + i);
#pragma unroll
      for (int r = 0; r < DK_MAX_ROWS; ++r)
        if (r < rows) acc[r] += wv * x[(long long)r * k + i];
    }
  }
#pragma unroll
  for (int r = 0; r < DK_MAX_ROWS; ++r) acc[r] = dk_warp_sum(acc[r]);
  if (lane != 0) return;
  const float b = bias ? dk_f32(bias[o]) : 0.f;
#pragma unroll
  for (int r = 0; r < DK_MAX_ROWS; ++r) {
    if (r < rows) {
      const long long at = (long long)r * n + o;
      float v = dk_rb(scale * acc[r] + b);
      if (prev) v = dk_rb(prev[at] + v);
      if (res) v = dk_rb(res[at] + v);
      out[at] = v;
    }
  }
}

extern "C" __global__ void __launch_bounds__(256) newt_dec_gemv_bf16(const float* x, const dk_bf16* w,
                                                                     const dk_bf16* bias, const float* prev,
                                                                     const float* res, float* out, int rows, int n,
                                                                     int k, float scale) {
  dk_gemv<dk_bf16>(x, w, bias, prev, res, out, rows, n, k, scale);
}

extern "C" __global__ void __launch_bounds__(256) newt_dec_gemv_f32(const float* x, const float* w,
                                                                    const dk_bf16* bias, const float* prev,
                                                                    const float* res, float* out, int rows, int n,
                                                                    int k, float scale) {
  dk_gemv<float>(x, w, bias, prev, res, out, rows, n, k, scale);
}

// x[r, :] = embed[token of row r, :]. Grid: rows; 256 threads.
extern "C" __global__ void newt_dec_embed(const int* meta, const dk_bf16* embed, float* x, int hidden) {
  const int r = blockIdx.x;
  const dk_bf16* e = embed + (long long)meta[r] * hidden;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) x[(long long)r * hidden + i] = dk_f32(e[i]);
}

// y = rb(rb(x * rsqrt(mean(x^2) + eps)) * w) per row, as newt_rms_fwd. Grid: rows; 256 threads.
extern "C" __global__ void __launch_bounds__(256) newt_dec_rms(const float* x, const dk_bf16* w, float* y, int n,
                                                               float eps) {
  __shared__ float part[8];
  const float* xr = x + (long long)blockIdx.x * n;
  float ss = 0.f;
  for (int i = threadIdx.x; i < n; i += 256) ss += xr[i] * xr[i];
  ss = dk_warp_sum(ss);
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = ss;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int j = 0; j < 8; ++j) total += part[j];
  const float inv = rsqrtf(total / (float)n + eps);
  float* yr = y + (long long)blockIdx.x * n;
  for (int i = threadIdx.x; i < n; i += 256) yr[i] = dk_rb(dk_rb(xr[i] * inv) * dk_f32(w[i]));
}

// RoPE on row r's query and key heads (rotate_half: the first half pairs with the second), the
// query in place, the rotated key and the value written to the cache at the row's length.
// Grid: rows; 128 threads.
extern "C" __global__ void newt_dec_rope_cache(float* q, const float* k, const float* v, const int* meta,
                                               const float* rope, dk_bf16* kc, dk_bf16* vc, int rows, int hq, int hkv,
                                               int d, int capacity) {
  const int r = blockIdx.x;
  const int half = d / 2;
  const int pos = meta[rows + r];
  const float* cs = rope + (long long)r * d;
  for (int j = threadIdx.x; j < hq * half; j += blockDim.x) {
    const int h = j / half, i = j % half;
    float* qh = q + ((long long)r * hq + h) * d;
    const float c = dk_rb(cs[i]), s = dk_rb(cs[half + i]);  // the tables in bf16, as the model's
    const float x1 = qh[i], x2 = qh[i + half];
    qh[i] = dk_rb(x1 * c - x2 * s);
    qh[i + half] = dk_rb(x2 * c + x1 * s);
  }
  for (int j = threadIdx.x; j < hkv * half; j += blockDim.x) {
    const int h = j / half, i = j % half;
    const float* kh = k + ((long long)r * hkv + h) * d;
    const float* vh = v + ((long long)r * hkv + h) * d;
    const long long at = (((long long)r * hkv + h) * capacity + pos) * d;
    const float c = dk_rb(cs[i]), s = dk_rb(cs[half + i]);  // the tables in bf16, as the model's
    const float x1 = kh[i], x2 = kh[i + half];
    kc[at + i] = dk_to_bf16(x1 * c - x2 * s);
    kc[at + i + half] = dk_to_bf16(x2 * c + x1 * s);
    vc[at + i] = dk_to_bf16(vh[i]);
    vc[at + i + half] = dk_to_bf16(vh[i + half]);
  }
}

// softmax(q·kᵀ·scale)·v for one query head of one row over the row's cache positions
// [first, len] (first = len + 1 - window with a sliding window, else 0). Four warps split the
// positions, each with an online softmax over its share (a lane holds d/32 of the head's
// elements), merged at the end. Grid: (q_heads, rows); 128 threads.
template <int D>
__device__ __forceinline__ void dk_attn(const float* q, const int* meta, const dk_bf16* kc, const dk_bf16* vc,
                                        float* out, int rows, int hq, int hkv, int capacity, float scale,
                                        int window) {
  constexpr int E = D / 32;
  __shared__ float sm_m[4], sm_l[4], sm_acc[4][D];
  const int h = blockIdx.x, r = blockIdx.y;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int len = meta[rows + r];
  const int first = window > 0 && len + 1 > window ? len + 1 - window : 0;
  const int kvh = h / (hq / hkv);
  const float* qh = q + ((long long)r * hq + h) * D;
  float qv[E];
#pragma unroll
  for (int j = 0; j < E; ++j) qv[j] = qh[lane * E + j] * scale;
  const long long base = ((long long)r * hkv + kvh) * capacity * D;
  float m = DK_NEG_INF, l = 0.f, acc[E];
#pragma unroll
  for (int j = 0; j < E; ++j) acc[j] = 0.f;
  for (int p = first + warp; p <= len; p += 4) {
    const dk_bf16* kp = kc + base + (long long)p * D + lane * E;
    float s = 0.f;
#pragma unroll
    for (int j = 0; j < E; ++j) s += qv[j] * dk_f32(kp[j]);
    s = dk_warp_sum(s);
    const float mn = fmaxf(m, s);
    const float corr = __expf(m - mn), e = __expf(s - mn);
    l = l * corr + e;
    const dk_bf16* vp = vc + base + (long long)p * D + lane * E;
#pragma unroll
    for (int j = 0; j < E; ++j) acc[j] = acc[j] * corr + e * dk_f32(vp[j]);
    m = mn;
  }
  if (lane == 0) {
    sm_m[warp] = m;
    sm_l[warp] = l;
  }
#pragma unroll
  for (int j = 0; j < E; ++j) sm_acc[warp][lane * E + j] = acc[j];
  __syncthreads();
  const float mx = fmaxf(fmaxf(sm_m[0], sm_m[1]), fmaxf(sm_m[2], sm_m[3]));
  float total = 0.f, f[4];
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    f[w] = sm_m[w] == DK_NEG_INF ? 0.f : __expf(sm_m[w] - mx);
    total += sm_l[w] * f[w];
  }
  float* oh = out + ((long long)r * hq + h) * D;
  for (int i = threadIdx.x; i < D; i += 128) {
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < 4; ++w) v += sm_acc[w][i] * f[w];
    oh[i] = dk_rb(v / total);
  }
}

extern "C" __global__ void __launch_bounds__(128) newt_dec_attn(const float* q, const int* meta, const dk_bf16* kc,
                                                                const dk_bf16* vc, float* out, int rows, int hq,
                                                                int hkv, int capacity, float scale, int window) {
  dk_attn<64>(q, meta, kc, vc, out, rows, hq, hkv, capacity, scale, window);
}

extern "C" __global__ void __launch_bounds__(128) newt_dec_attn_hd128(const float* q, const int* meta,
                                                                      const dk_bf16* kc, const dk_bf16* vc,
                                                                      float* out, int rows, int hq, int hkv,
                                                                      int capacity, float scale, int window) {
  dk_attn<128>(q, meta, kc, vc, out, rows, hq, hkv, capacity, scale, window);
}

// gate = rb(rb(silu(gate)) * up), element-wise over n values.
extern "C" __global__ void newt_dec_swiglu(float* gate, const float* up, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float g = gate[i];
  gate[i] = dk_rb(dk_rb(g / (1.f + __expf(-g))) * up[i]);
}
