// SwiGLU of a Llama MLP, `silu(gate) * up`, forward and backward over n bf16 values (contiguous,
// starting on 16 bytes), rounded where PyTorch rounds `act_fn(gate_proj(x)) * up_proj(x)` in bf16:
// silu in f32 then bf16, the product bf16; backward, the product's two gradients in bf16, then
// silu's backward in f32 on the rounded one.
//
//   forward:  a = bf16(g / (1 + exp(-g)));  h = bf16(a * u)
//   backward: du = bf16(dh * a);  da = bf16(dh * u);  s = 1 / (1 + exp(-g));
//             dg = bf16(da * s * (1 + g * (1 - s)))
//
// Only gate and up are kept for the backward pass (Burn's autodiff of `silu(g) * up` keeps the
// sigmoid and the silu as well). Eight values a thread in 16-byte vectors, the last n % 8 one at a
// time. Compiled by NVRTC with flash_attn.cu (kernels/src/flash_cuda.rs): names carry `sg_`.

typedef unsigned short sg_bf16;

__device__ __forceinline__ float sg_to_f32(sg_bf16 x) { return __uint_as_float(((unsigned int)x) << 16); }

// Round to nearest even (finite inputs; a NaN stays a NaN).
__device__ __forceinline__ sg_bf16 sg_to_bf16(float f) {
  unsigned int u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (sg_bf16)((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (sg_bf16)(u >> 16);
}

__device__ __forceinline__ float sg_silu(float g) { return g / (1.f + expf(-g)); }

__device__ __forceinline__ sg_bf16 sg_forward(sg_bf16 g, sg_bf16 u) {
  const float a = sg_to_f32(sg_to_bf16(sg_silu(sg_to_f32(g))));
  return sg_to_bf16(a * sg_to_f32(u));
}

__device__ __forceinline__ void sg_backward(sg_bf16 g, sg_bf16 u, sg_bf16 dh, sg_bf16* dg, sg_bf16* du) {
  const float gf = sg_to_f32(g), d = sg_to_f32(dh);
  const float a = sg_to_f32(sg_to_bf16(sg_silu(gf)));
  *du = sg_to_bf16(d * a);
  const float da = sg_to_f32(sg_to_bf16(d * sg_to_f32(u)));
  const float s = 1.f / (1.f + expf(-gf));
  *dg = sg_to_bf16(da * s * (1.f + gf * (1.f - s)));
}

union sg_vec8 {
  uint4 v;
  sg_bf16 e[8];
};

extern "C" __global__ void newt_swiglu_fwd(const sg_bf16* __restrict__ g, const sg_bf16* __restrict__ u,
                                           sg_bf16* __restrict__ h, long long n) {
  const long long chunks = n / 8;
  const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  for (long long c = first; c < chunks; c += (long long)gridDim.x * blockDim.x) {
    sg_vec8 gv, uv, hv;
    gv.v = *(const uint4*)(g + 8 * c);
    uv.v = *(const uint4*)(u + 8 * c);
#pragma unroll
    for (int j = 0; j < 8; j++) hv.e[j] = sg_forward(gv.e[j], uv.e[j]);
    *(uint4*)(h + 8 * c) = hv.v;
  }
  const long long tail = 8 * chunks + first;
  if (tail < n) h[tail] = sg_forward(g[tail], u[tail]);
}

extern "C" __global__ void newt_swiglu_bwd(const sg_bf16* __restrict__ g, const sg_bf16* __restrict__ u,
                                           const sg_bf16* __restrict__ dh, sg_bf16* __restrict__ dg,
                                           sg_bf16* __restrict__ du, long long n) {
  const long long chunks = n / 8;
  const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  for (long long c = first; c < chunks; c += (long long)gridDim.x * blockDim.x) {
    sg_vec8 gv, uv, dv, dgv, duv;
    gv.v = *(const uint4*)(g + 8 * c);
    uv.v = *(const uint4*)(u + 8 * c);
    dv.v = *(const uint4*)(dh + 8 * c);
#pragma unroll
    for (int j = 0; j < 8; j++) sg_backward(gv.e[j], uv.e[j], dv.e[j], &dgv.e[j], &duv.e[j]);
    *(uint4*)(dg + 8 * c) = dgv.v;
    *(uint4*)(du + 8 * c) = duv.v;
  }
  const long long tail = 8 * chunks + first;
  if (tail < n) sg_backward(g[tail], u[tail], dh[tail], &dg[tail], &du[tail]);
}
