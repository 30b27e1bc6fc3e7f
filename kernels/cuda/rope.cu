// Rotary position embedding, "rotate-half" layout, on bf16 queries or keys [b, t, h, d] (any
// strides with a contiguous last dimension) with bf16 cos/sin tables [b, t, d] (contiguous):
//
//   y = x * cos + sign * rotate_half(x) * sin,   rotate_half(x) = [-x2, x1]
//
// sign = 1 is the forward pass; sign = -1 its backward pass (the tables repeat their d/2
// frequencies twice, so the transpose of the rotation is the rotation by the opposite angle).
// Each product is rounded to bf16 before the sum, as transformers' `q * cos + rotate_half(q) * sin`
// does in bf16. The output is contiguous [b, t, h, d]. `newt_rope` takes one (i, i + d/2) pair a
// thread, any head_dim; `newt_rope_v8` eight pairs a thread in 16-byte loads and stores, for d/2 a
// multiple of 8 with x's strides multiples of 8 elements (every Llama-family head_dim) — the same
// arithmetic, so the two agree bit for bit; it also keeps its index arithmetic in 32 bits (the
// launcher checks the thread count fits). Compiled with flash_attn.cu and rms_norm.cu as one
// module: names carry a `rp_` prefix.

typedef unsigned short rp_bf16;

__device__ __forceinline__ float rp_to_f32(rp_bf16 x) { return __uint_as_float(((unsigned int)x) << 16); }

__device__ __forceinline__ float rp_round(float f) {
  unsigned int u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return f;
  u += 0x7fffu + ((u >> 16) & 1u);
  return __uint_as_float(u & 0xffff0000u);
}

__device__ __forceinline__ rp_bf16 rp_bits(float rounded) { return (rp_bf16)(__float_as_uint(rounded) >> 16); }

// One output pair: (x1·c1 − x2·s1, x2·c2 + x1·s2), each product and the sum rounded to bf16.
__device__ __forceinline__ void rp_pair(float x1, float x2, float c1, float c2, float s1, float s2, rp_bf16* y1,
                                        rp_bf16* y2) {
  *y1 = rp_bits(rp_round(rp_round(x1 * c1) + rp_round(-x2 * s1)));
  *y2 = rp_bits(rp_round(rp_round(x2 * c2) + rp_round(x1 * s2)));
}

extern "C" __global__ void newt_rope(const rp_bf16* __restrict__ x, const rp_bf16* __restrict__ cos_t,
                                     const rp_bf16* __restrict__ sin_t, rp_bf16* __restrict__ y, int batch,
                                     int tokens, int heads, int d, long long sb, long long st, long long sh,
                                     float sign) {
  const int half = d / 2;
  const long long pairs = (long long)batch * tokens * heads * half;
  for (long long p = (long long)blockIdx.x * blockDim.x + threadIdx.x; p < pairs;
       p += (long long)gridDim.x * blockDim.x) {
    const int i = (int)(p % half);
    long long rest = p / half;
    const int h = (int)(rest % heads);
    rest /= heads;
    const int t = (int)(rest % tokens);
    const int b = (int)(rest / tokens);
    const rp_bf16* xr = x + b * sb + t * st + h * sh;
    const long long table = ((long long)b * tokens + t) * d;
    const float x1 = rp_to_f32(xr[i]), x2 = rp_to_f32(xr[i + half]);
    const float c1 = rp_to_f32(cos_t[table + i]), c2 = rp_to_f32(cos_t[table + i + half]);
    const float s1 = sign * rp_to_f32(sin_t[table + i]), s2 = sign * rp_to_f32(sin_t[table + i + half]);
    rp_bf16* yr = y + (((long long)b * tokens + t) * heads + h) * d;
    rp_pair(x1, x2, c1, c2, s1, s2, &yr[i], &yr[i + half]);
  }
}

// 16-byte vectors of eight bf16.
union rp_vec8 {
  uint4 v;
  rp_bf16 e[8];
};

extern "C" __global__ void newt_rope_v8(const rp_bf16* __restrict__ x, const rp_bf16* __restrict__ cos_t,
                                        const rp_bf16* __restrict__ sin_t, rp_bf16* __restrict__ y, int batch,
                                        int tokens, int heads, int d, long long sb, long long st, long long sh,
                                        float sign) {
  const int half = d / 2, chunks = half / 8;
  const int work = batch * tokens * heads * chunks;  // < 2^31: the launcher's check
  for (int g = blockIdx.x * blockDim.x + threadIdx.x; g < work; g += gridDim.x * blockDim.x) {
    const int i = (g % chunks) * 8;
    const int row = g / chunks;  // (b, t, h)
    const int h = row % heads, bt = row / heads;
    const int t = bt % tokens, b = bt / tokens;
    const rp_bf16* xr = x + b * sb + t * st + h * sh;
    const long long table = (long long)bt * d;
    rp_vec8 x1, x2, c1, c2, s1, s2, y1, y2;
    x1.v = *(const uint4*)(xr + i);
    x2.v = *(const uint4*)(xr + i + half);
    c1.v = __ldg((const uint4*)(cos_t + table + i));
    c2.v = __ldg((const uint4*)(cos_t + table + i + half));
    s1.v = __ldg((const uint4*)(sin_t + table + i));
    s2.v = __ldg((const uint4*)(sin_t + table + i + half));
#pragma unroll
    for (int j = 0; j < 8; j++) {
      rp_pair(rp_to_f32(x1.e[j]), rp_to_f32(x2.e[j]), rp_to_f32(c1.e[j]), rp_to_f32(c2.e[j]),
              sign * rp_to_f32(s1.e[j]), sign * rp_to_f32(s2.e[j]), &y1.e[j], &y2.e[j]);
    }
    rp_bf16* yr = y + (long long)row * d;
    *(uint4*)(yr + i) = y1.v;
    *(uint4*)(yr + i + half) = y2.v;
  }
}
