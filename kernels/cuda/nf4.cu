// Quantized frozen weights (kernels/src/nf4.rs) expanded to bf16 in one pass: codes packed in
// 32-bit words (NF4: eight 4-bit codes a word; int8: four 8-bit codes), element j of a word in
// bits [bits*j, bits*j + bits), one f32 scale per QD_BLOCK weights. The value is the code's entry
// of the code book times its block's scale in f32, rounded to bf16 (nearest even): what the tensor
// operations of nf4::dequantize compute, bit for bit.
//
// One thread a word: eight bf16 (16 bytes, one vector store) for NF4, four (8 bytes) for int8.
// Compiled with the other kernels as one module: names carry `qd_`/`QD_`.

#define QD_BLOCK 64

// The NF4 code book (kernels/src/nf4.rs NF4_CODE), entry c = 8*b3 + 4*b2 + 2*b1 + b0 chosen by a
// tree of selects on the code's bits: registers only (a table lookup with a warp's different codes
// serializes in constant memory and measured slower than the tensor operations).
__device__ __forceinline__ float qd_nf4(unsigned int c) {
  const bool b0 = c & 1u, b1 = c & 2u, b2 = c & 4u, b3 = c & 8u;
  const float v0 = b0 ? -0.6961928f : -1.0f, v1 = b0 ? -0.3949175f : -0.52507305f;
  const float v2 = b0 ? -0.18477343f : -0.28444138f, v3 = b0 ? 0.0f : -0.091050036f;
  const float v4 = b0 ? 0.1609302f : 0.0795803f, v5 = b0 ? 0.33791524f : 0.2461123f;
  const float v6 = b0 ? 0.562617f : 0.44070983f, v7 = b0 ? 1.0f : 0.72295684f;
  const float w0 = b1 ? v1 : v0, w1 = b1 ? v3 : v2, w2 = b1 ? v5 : v4, w3 = b1 ? v7 : v6;
  const float x0 = b2 ? w1 : w0, x1 = b2 ? w3 : w2;
  return b3 ? x1 : x0;
}

// Round to nearest even (a NaN stays a NaN), as bits.
__device__ __forceinline__ unsigned int qd_bf16(float f) {
  unsigned int u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (u >> 16) | 0x40u;
  u += 0x7fffu + ((u >> 16) & 1u);
  return u >> 16;
}

__device__ __forceinline__ float qd_int8_value(unsigned int c) { return fmaxf(((float)c - 128.0f) / 127.0f, -1.0f); }

// n weights; `out` is 16-byte aligned and holds n bf16.
extern "C" __global__ void newt_dequant_nf4(const unsigned int* __restrict__ packed, const float* __restrict__ absmax,
                                            unsigned short* __restrict__ out, long long n) {
  const long long words = (n + 7) / 8;
  for (long long w = (long long)blockIdx.x * blockDim.x + threadIdx.x; w < words;
       w += (long long)gridDim.x * blockDim.x) {
    const unsigned int p = packed[w];
    const float s = absmax[(w * 8) / QD_BLOCK];
    const long long e = w * 8;
    unsigned int h[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) h[j] = qd_bf16(qd_nf4((p >> (4 * j)) & 15u) * s);
    if (e + 8 <= n) {
      uint4 v;
      v.x = h[0] | (h[1] << 16);
      v.y = h[2] | (h[3] << 16);
      v.z = h[4] | (h[5] << 16);
      v.w = h[6] | (h[7] << 16);
      *reinterpret_cast<uint4*>(out + e) = v;
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j)
        if (e + j < n) out[e + j] = (unsigned short)h[j];
    }
  }
}

// As newt_dequant_nf4 for int8 codes (code c stands for (c - 128) / 127, at least -1); `out`
// 8-byte aligned.
extern "C" __global__ void newt_dequant_int8(const unsigned int* __restrict__ packed, const float* __restrict__ absmax,
                                             unsigned short* __restrict__ out, long long n) {
  const long long words = (n + 3) / 4;
  for (long long w = (long long)blockIdx.x * blockDim.x + threadIdx.x; w < words;
       w += (long long)gridDim.x * blockDim.x) {
    const unsigned int p = packed[w];
    const float s = absmax[(w * 4) / QD_BLOCK];
    const long long e = w * 4;
    unsigned int h[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) h[j] = qd_bf16(qd_int8_value((p >> (8 * j)) & 255u) * s);
    if (e + 4 <= n) {
      uint2 v;
      v.x = h[0] | (h[1] << 16);
      v.y = h[2] | (h[3] << 16);
      *reinterpret_cast<uint2*>(out + e) = v;
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j)
        if (e + j < n) out[e + j] = (unsigned short)h[j];
    }
  }
}
