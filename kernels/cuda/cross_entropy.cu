// Cross-entropy of rows of bf16 logits, the loss and its gradient with respect to the logits in
// one kernel (kernels/src/loss.rs, one chunk of the language-model head at a time):
//
//   loss[r]    = w[r] · (log Σ_j exp(x[r, j]) − x[r, t[r]])
//   grad[r, j] = w[r] · (softmax(x[r])[j] − [j = t[r]])      (bf16, rounded to nearest even)
//
// for rows r of the chunk, with targets t and weights w read at row0 + r of their whole-batch
// vectors; the gradient only when want_grad is nonzero (a loss without one: evaluation). One
// block of CE_THREADS a row: a first pass over the row keeps each thread's running maximum and
// sum of exponentials (rescaled as the maximum grows), a block reduction combines them, and a
// second pass (the row is 2·vocab bytes, read again from L2) writes the gradient.
// Arithmetic in f32, exponentials in base 2. Rows of 8-element multiples (vocab and row stride) at
// 16-byte aligned addresses go 16 bytes a load and store, others one element at a time.
// Compiled with flash_attn.cu and the others as one module: names carry a `ce_` prefix.

#define CE_THREADS 512
#define CE_LOG2E 1.4426950408889634f
#define CE_LN2 0.6931471805599453f

typedef unsigned short ce_bf16;

__device__ __forceinline__ float ce_to_f32(ce_bf16 x) { return __uint_as_float(((unsigned int)x) << 16); }

__device__ __forceinline__ ce_bf16 ce_from_f32(float f) {
  unsigned int u;
  asm("cvt.rn.bf16x2.f32 %0, %1, %1;" : "=r"(u) : "f"(f));
  return (ce_bf16)(u & 0xffffu);
}

// (m, s) ← the pair for the union of both sets: s's exponentials are relative to m (base 2).
__device__ __forceinline__ void ce_merge(float& m, float& s, float m2, float s2) {
  const float mx = fmaxf(m, m2);
  if (mx == -__int_as_float(0x7f800000)) return;  // both empty
  s = (m == mx ? s : s * exp2f(m - mx)) + (m2 == mx ? s2 : s2 * exp2f(m2 - mx));
  m = mx;
}

union ce_vec8 {
  uint4 v;
  ce_bf16 e[8];
};

extern "C" __global__ void __launch_bounds__(CE_THREADS)
    newt_ce_rows(const ce_bf16* __restrict__ logits, const int* __restrict__ targets, const float* __restrict__ weights,
                 float* __restrict__ loss, ce_bf16* __restrict__ grad, int vocab, long long ld, int row0,
                 int want_grad) {
  const int r = blockIdx.x;
  const ce_bf16* x = logits + (long long)r * ld;
  ce_bf16* g = grad + (long long)r * vocab;
  const bool vec = vocab % 8 == 0 && ld % 8 == 0 && ((unsigned long long)logits % 16) == 0 &&
                   ((unsigned long long)grad % 16) == 0;
  const float NEG_INF = -__int_as_float(0x7f800000);

  // Pass 1: this thread's running maximum and sum of 2^(x·log2 e − m).
  float m = NEG_INF, s = 0.f;
  if (vec) {
    for (int i = threadIdx.x * 8; i < vocab; i += CE_THREADS * 8) {
      ce_vec8 a;
      a.v = *(const uint4*)(x + i);
      float y[8], mx = NEG_INF;
#pragma unroll
      for (int j = 0; j < 8; j++) {
        y[j] = ce_to_f32(a.e[j]) * CE_LOG2E;
        mx = fmaxf(mx, y[j]);
      }
      float part = 0.f;
#pragma unroll
      for (int j = 0; j < 8; j++) part += exp2f(y[j] - mx);
      ce_merge(m, s, mx, part);
    }
  } else {
    for (int i = threadIdx.x; i < vocab; i += CE_THREADS) ce_merge(m, s, ce_to_f32(x[i]) * CE_LOG2E, 1.f);
  }
  // Block reduction: warps by shuffles, then the warps' pairs through shared memory.
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffff, m, off), s2 = __shfl_xor_sync(0xffffffff, s, off);
    ce_merge(m, s, m2, s2);
  }
  __shared__ float ms[CE_THREADS / 32], ss[CE_THREADS / 32];
  __shared__ float lz;  // log2 Σ exp(x), in units of log2 e
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    ms[warp] = m;
    ss[warp] = s;
  }
  __syncthreads();
  if (warp == 0) {
    m = lane < CE_THREADS / 32 ? ms[lane] : NEG_INF;
    s = lane < CE_THREADS / 32 ? ss[lane] : 0.f;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const float m2 = __shfl_xor_sync(0xffffffff, m, off), s2 = __shfl_xor_sync(0xffffffff, s, off);
      ce_merge(m, s, m2, s2);
    }
    if (lane == 0) lz = m + log2f(s);
  }
  __syncthreads();
  const float l2z = lz;
  const int t = targets[row0 + r];
  const float w = weights[row0 + r];
  if (threadIdx.x == 0) loss[r] = w * (l2z * CE_LN2 - ce_to_f32(x[t]));
  if (!want_grad) return;

  // Pass 2: the gradient.
  if (vec) {
    for (int i = threadIdx.x * 8; i < vocab; i += CE_THREADS * 8) {
      ce_vec8 a, o;
      a.v = *(const uint4*)(x + i);
#pragma unroll
      for (int j = 0; j < 8; j++) {
        const float p = exp2f(ce_to_f32(a.e[j]) * CE_LOG2E - l2z);
        o.e[j] = ce_from_f32(w * (i + j == t ? p - 1.f : p));
      }
      *(uint4*)(g + i) = o.v;
    }
  } else {
    for (int i = threadIdx.x; i < vocab; i += CE_THREADS) {
      const float p = exp2f(ce_to_f32(x[i]) * CE_LOG2E - l2z);
      g[i] = ce_from_f32(w * (i == t ? p - 1.f : p));
    }
  }
}
