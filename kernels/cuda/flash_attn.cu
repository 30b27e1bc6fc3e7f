// FlashAttention-2 forward and backward for newt's training attention, on tensor cores
// (mma.sync m16n8k16, bf16 in, f32 accumulate), for head_dim = HD (64).
//
// Semantics are those of newt_kernels::flash (its Burn reference): causal attention over packed
// rows, where a query sees a key only when the key is not in its future, carries the same
// segment id, and (with a window w > 0) is fewer than w positions back. Query heads that share
// a key/value head (GQA) read the same K and V; in the backward pass one block computes the
// K and V gradients of all its query heads, so they are summed without atomics. Q, K, V and dO
// are read through (batch, head, token) strides; the last dimension must be contiguous.
//
// No headers: bf16 values are handled as 16-bit integers and converted by PTX, so NVRTC needs
// no CUDA include directory.
//
// Layouts of fragments (PTX ISA, mma.m16n8k16, per thread: g = lane / 4, c = lane % 4):
//   A (16x16, row): reg0 (row g, cols 2c, 2c+1), reg1 (row g+8, same cols), reg2 (row g,
//                   cols 2c+8, 2c+9), reg3 (row g+8, cols 2c+8, 2c+9)
//   B (16x8, col):  reg0 (rows 2c, 2c+1, col g), reg1 (rows 2c+8, 2c+9, col g)
//   C (16x8, f32):  c0, c1 (row g, cols 2c, 2c+1), c2, c3 (row g+8, cols 2c, 2c+1)
// so the C fragments of two adjacent 8-column tiles are, converted to bf16, the A fragment of a
// 16-wide k step: the scores never leave registers between the two products.

#ifndef HD
#define HD 64
#endif
#define BM 64        // queries per block (forward) / per step (backward)
#define BN 64        // keys per step (forward) / per block (backward)
#define THREADS 128  // four warps, 16 rows each
#define PAD 8        // bf16 elements of padding per shared-memory row (no bank conflicts)
#define LDS (HD + PAD)
#define LDP (BM + PAD)

typedef unsigned short bf16_t;
typedef unsigned int u32;

__device__ __forceinline__ float bf16_to_f32(bf16_t x) { return __uint_as_float(((u32)x) << 16); }

__device__ __forceinline__ u32 pack_bf16(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ void mma16816(float* d, const u32* a, const u32* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ u32 smem_addr(const void* p) { return (u32)__cvta_generic_to_shared(p); }

// Four 8x8 b16 matrices, transposed on load: thread t gives the address of row t % 8 of matrix
// t / 8 and receives, of each matrix, elements (2c, g) and (2c+1, g).
__device__ __forceinline__ void ldmatrix_x4_trans(u32* r, const bf16_t* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

// 16 bytes global -> shared, zero-filled when !valid.
__device__ __forceinline__ void cp_async16(bf16_t* dst, const bf16_t* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_addr(dst)), "l"(src),
                 "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }

// Rows [row0, row0 + 64) of a [tokens, HD] matrix with row stride `ld` (elements) into shared
// memory with row stride LDS; rows >= rows_valid are zeros.
__device__ __forceinline__ void load_tile(bf16_t* dst, const bf16_t* src, long long ld, int row0, int rows_valid) {
    const int chunks = HD / 8;  // 16-byte pieces per row
    for (int i = threadIdx.x; i < 64 * chunks; i += THREADS) {
        int r = i / chunks, ch = i % chunks;
        int row = row0 + r;
        bool valid = row < rows_valid;
        const bf16_t* s = src + (long long)(valid ? row : 0) * ld + ch * 8;
        cp_async16(dst + r * LDS + ch * 8, s, valid);
    }
}

__device__ __forceinline__ u32 ld32(const bf16_t* p) { return *(const u32*)p; }

// Whether key `kj` is hidden from query `qi` (segments as given; window 0 = none).
__device__ __forceinline__ bool masked(int qi, int kj, int qseg, int kseg, int window, int tokens) {
    return kj > qi || kj >= tokens || qseg != kseg || (window > 0 && qi - kj >= window);
}

#define LOG2E 1.4426950408889634f
#define NEWT_INF __int_as_float(0x7f800000)

// grid: (query blocks, q_heads, batch); block: 128 threads.
// out: [batch, q_heads, tokens, HD] contiguous; lse: [batch, q_heads, tokens] f32, in log2 units
// of the scaled scores (the backward pass's only use of it).
extern "C" __global__ void __launch_bounds__(THREADS) newt_flash_fwd(
    const bf16_t* __restrict__ q, const bf16_t* __restrict__ k, const bf16_t* __restrict__ v,
    const int* __restrict__ seg, bf16_t* __restrict__ out, float* __restrict__ lse, int tokens, int q_heads,
    int kv_heads, long long qsb, long long qsh, long long qst, long long ksb, long long ksh, long long kst,
    long long vsb, long long vsh, long long vst, long long ssb, long long sst, float scale, int window) {
    __shared__ __align__(16) bf16_t qs[BM * LDS];
    __shared__ __align__(16) bf16_t ks[BN * LDS];
    __shared__ __align__(16) bf16_t vs[BN * LDS];
    __shared__ int qseg_s[BM];
    __shared__ int kseg_s[BN];

    const int qb = gridDim.x - 1 - blockIdx.x;  // longest (latest) blocks first
    const int h = blockIdx.y, b = blockIdx.z;
    const int hk = h / (q_heads / kv_heads);
    const int q0 = qb * BM;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, c = lane % 4;
    const float sl2 = scale * LOG2E;

    const bf16_t* qp = q + b * qsb + h * qsh;
    const bf16_t* kp = k + b * ksb + hk * ksh;
    const bf16_t* vp = v + b * vsb + hk * vsh;
    const int* sp = seg + b * ssb;

    load_tile(qs, qp, qst, q0, tokens);
    cp_async_commit();
    if (threadIdx.x < BM) {
        int i = q0 + threadIdx.x;
        qseg_s[threadIdx.x] = i < tokens ? sp[i * sst] : -1;
    }
    cp_async_wait<0>();
    __syncthreads();

    // Segment range of the block's queries (a key outside it is visible to none of them).
    int qmin = 0x7fffffff, qmax = -0x7fffffff;
    for (int i = 0; i < BM; i++) {
        int s = qseg_s[i];
        if (q0 + i < tokens) {
            qmin = min(qmin, s);
            qmax = max(qmax, s);
        }
    }

    // This warp's 16 query rows as A fragments, for the HD / 16 k steps of q·kᵀ.
    u32 qf[HD / 16][4];
    const int r0 = warp * 16 + g;
#pragma unroll
    for (int kk = 0; kk < HD / 16; kk++) {
        qf[kk][0] = ld32(&qs[r0 * LDS + kk * 16 + 2 * c]);
        qf[kk][1] = ld32(&qs[(r0 + 8) * LDS + kk * 16 + 2 * c]);
        qf[kk][2] = ld32(&qs[r0 * LDS + kk * 16 + 8 + 2 * c]);
        qf[kk][3] = ld32(&qs[(r0 + 8) * LDS + kk * 16 + 8 + 2 * c]);
    }
    const int qi0 = q0 + r0, qi1 = qi0 + 8;
    const int qs0 = qseg_s[r0], qs1 = qseg_s[r0 + 8];

    float o[HD / 8][4];
#pragma unroll
    for (int n = 0; n < HD / 8; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    float m0 = -NEWT_INF, m1 = -NEWT_INF, l0 = 0.f, l1 = 0.f;

    const int q_last = min(q0 + BM, tokens) - 1;
    const int k_end = q_last + 1;  // causal: keys [0, k_end)
    int k_begin = 0;
    if (window > 0) k_begin = max(0, q0 - window + 1);
    for (int k0 = (k_begin / BN) * BN; k0 < k_end; k0 += BN) {
        __syncthreads();  // the previous step is done with ks, vs, kseg_s
        int kseg_t = -1;
        if (threadIdx.x < BN) {
            int j = k0 + threadIdx.x;
            kseg_t = j < tokens ? sp[j * sst] : -2;
            kseg_s[threadIdx.x] = kseg_t;
        }
        bool in_range = threadIdx.x < BN && kseg_t >= qmin && kseg_t <= qmax;
        if (!__syncthreads_or(in_range)) continue;  // no query of the block sees these keys
        bool uniform = threadIdx.x >= BN || (kseg_t == qmin && qmin == qmax);
        const bool full = __syncthreads_and(uniform) && k0 + BN - 1 <= q0 && window == 0 && k0 + BN <= tokens;

        load_tile(ks, kp, kst, k0, tokens);
        cp_async_commit();
        load_tile(vs, vp, vst, k0, tokens);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();

        // s = q·kᵀ for this warp's 16 rows and the 64 keys (8 tiles of 8).
        float s[BN / 8][4];
#pragma unroll
        for (int n = 0; n < BN / 8; n++) {
            s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < HD / 16; kk++) {
                u32 bfr[2];
                bfr[0] = ld32(&ks[(n * 8 + g) * LDS + kk * 16 + 2 * c]);
                bfr[1] = ld32(&ks[(n * 8 + g) * LDS + kk * 16 + 8 + 2 * c]);
                mma16816(s[n], qf[kk], bfr);
            }
        }
        // Scale into log2 units, mask, and the running row maxima.
        float mx0 = m0, mx1 = m1;
#pragma unroll
        for (int n = 0; n < BN / 8; n++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                float x = s[n][e] * sl2;
                if (!full) {
                    int col = n * 8 + 2 * c + (e & 1);
                    int kj = k0 + col;
                    bool hi = e >= 2;
                    if (masked(hi ? qi1 : qi0, kj, hi ? qs1 : qs0, kseg_s[col], window, tokens)) x = -NEWT_INF;
                }
                s[n][e] = x;
            }
            mx0 = fmaxf(mx0, fmaxf(s[n][0], s[n][1]));
            mx1 = fmaxf(mx1, fmaxf(s[n][2], s[n][3]));
        }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffff, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffff, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffff, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffff, mx1, 2));
        const float use0 = mx0 == -NEWT_INF ? 0.f : mx0, use1 = mx1 == -NEWT_INF ? 0.f : mx1;
        const float a0 = exp2f(m0 - use0), a1 = exp2f(m1 - use1);
        m0 = mx0;
        m1 = mx1;
        float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
        for (int n = 0; n < BN / 8; n++) {
            s[n][0] = exp2f(s[n][0] - use0);
            s[n][1] = exp2f(s[n][1] - use0);
            s[n][2] = exp2f(s[n][2] - use1);
            s[n][3] = exp2f(s[n][3] - use1);
            sum0 += s[n][0] + s[n][1];
            sum1 += s[n][2] + s[n][3];
        }
        l0 = l0 * a0 + sum0;
        l1 = l1 * a1 + sum1;
#pragma unroll
        for (int n = 0; n < HD / 8; n++) {
            o[n][0] *= a0;
            o[n][1] *= a0;
            o[n][2] *= a1;
            o[n][3] *= a1;
        }

        cp_async_wait<0>();
        __syncthreads();
        // o += p·v: p's C fragments are the A fragments of the k steps.
#pragma unroll
        for (int kk = 0; kk < BN / 16; kk++) {
            u32 pf[4];
            pf[0] = pack_bf16(s[2 * kk][0], s[2 * kk][1]);
            pf[1] = pack_bf16(s[2 * kk][2], s[2 * kk][3]);
            pf[2] = pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            pf[3] = pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
            for (int n = 0; n < HD / 8; n += 2) {
                u32 vf[4];
                int mat = lane / 8, r = lane % 8;
                ldmatrix_x4_trans(vf, &vs[(kk * 16 + (mat & 1) * 8 + r) * LDS + n * 8 + (mat >> 1) * 8]);
                mma16816(o[n], pf, vf);
                mma16816(o[n + 1], pf, vf + 2);
            }
        }
    }

    l0 += __shfl_xor_sync(0xffffffff, l0, 1);
    l0 += __shfl_xor_sync(0xffffffff, l0, 2);
    l1 += __shfl_xor_sync(0xffffffff, l1, 1);
    l1 += __shfl_xor_sync(0xffffffff, l1, 2);
    const float inv0 = l0 > 0.f ? 1.f / l0 : 0.f, inv1 = l1 > 0.f ? 1.f / l1 : 0.f;
    bf16_t* op = out + ((long long)(b * q_heads + h) * tokens) * HD;
#pragma unroll
    for (int n = 0; n < HD / 8; n++) {
        int col = n * 8 + 2 * c;
        if (qi0 < tokens) *(u32*)&op[(long long)qi0 * HD + col] = pack_bf16(o[n][0] * inv0, o[n][1] * inv0);
        if (qi1 < tokens) *(u32*)&op[(long long)qi1 * HD + col] = pack_bf16(o[n][2] * inv1, o[n][3] * inv1);
    }
    if (c == 0) {
        float* lp = lse + (long long)(b * q_heads + h) * tokens;
        if (qi0 < tokens) lp[qi0] = m0 + log2f(l0);
        if (qi1 < tokens) lp[qi1] = m1 + log2f(l1);
    }
}

// delta[row] = Σ_d dO[row, d]·O[row, d] (f32), one warp per row of [batch, q_heads, tokens].
// O is [batch, q_heads, tokens, HD] contiguous; dO through strides.
extern "C" __global__ void newt_flash_bwd_delta(const bf16_t* __restrict__ o, const bf16_t* __restrict__ dout,
                                                float* __restrict__ delta, int batch, int q_heads, int tokens,
                                                long long dsb, long long dsh, long long dst) {
    long long row = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= (long long)batch * q_heads * tokens) return;
    int t = row % tokens;
    int bh = row / tokens;
    int h = bh % q_heads, b = bh / q_heads;
    const bf16_t* op = o + row * HD;
    const bf16_t* dp = dout + b * dsb + h * dsh + t * dst;
    float acc = 0.f;
    for (int d = lane; d < HD; d += 32) acc += bf16_to_f32(op[d]) * bf16_to_f32(dp[d]);
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffff, acc, off);
    if (lane == 0) delta[row] = acc;
}

// grid: (key blocks, kv_heads, batch); block: 128 threads (each warp 16 keys).
// dq_acc: [batch, q_heads, tokens, HD] f32, zeroed by the caller, accumulated with atomics.
// dk, dv: [batch, kv_heads, tokens, HD] bf16 contiguous, written once.
extern "C" __global__ void __launch_bounds__(THREADS) newt_flash_bwd(
    const bf16_t* __restrict__ q, const bf16_t* __restrict__ k, const bf16_t* __restrict__ v,
    const int* __restrict__ seg, const bf16_t* __restrict__ dout, const float* __restrict__ lse,
    const float* __restrict__ delta, float* __restrict__ dq_acc, bf16_t* __restrict__ dk, bf16_t* __restrict__ dv,
    int tokens, int q_heads, int kv_heads, long long qsb, long long qsh, long long qst, long long ksb, long long ksh,
    long long kst, long long vsb, long long vsh, long long vst, long long dsb, long long dsh, long long dst,
    long long ssb, long long sst, float scale, int window) {
    __shared__ __align__(16) bf16_t ks[BN * LDS];
    __shared__ __align__(16) bf16_t qs[BM * LDS];
    __shared__ __align__(16) bf16_t dos[BM * LDS];
    __shared__ __align__(16) bf16_t dss[BN * LDP];  // dSᵀ: [key][query]
    __shared__ float lse_s[BM];
    __shared__ float delta_s[BM];
    __shared__ int qseg_s[BM];

    const int kb = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
    const int rep = q_heads / kv_heads;
    const int k0 = kb * BN;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, c = lane % 4;
    const float sl2 = scale * LOG2E;
    const int* sp = seg + b * ssb;

    const bf16_t* kp = k + b * ksb + hk * ksh;
    const bf16_t* vp = v + b * vsb + hk * vsh;
    load_tile(ks, kp, kst, k0, tokens);
    cp_async_commit();
    // v through the q tile's buffer, once, for the A fragments.
    load_tile(qs, vp, vst, k0, tokens);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();

    const int r0 = warp * 16 + g;  // this thread's key rows (within the block): r0, r0 + 8
    const int kj0 = k0 + r0, kj1 = kj0 + 8;
    const int ks0 = kj0 < tokens ? sp[kj0 * sst] : -2, ks1 = kj1 < tokens ? sp[kj1 * sst] : -2;
    u32 kf[HD / 16][4], vf[HD / 16][4];
#pragma unroll
    for (int kk = 0; kk < HD / 16; kk++) {
        kf[kk][0] = ld32(&ks[r0 * LDS + kk * 16 + 2 * c]);
        kf[kk][1] = ld32(&ks[(r0 + 8) * LDS + kk * 16 + 2 * c]);
        kf[kk][2] = ld32(&ks[r0 * LDS + kk * 16 + 8 + 2 * c]);
        kf[kk][3] = ld32(&ks[(r0 + 8) * LDS + kk * 16 + 8 + 2 * c]);
        vf[kk][0] = ld32(&qs[r0 * LDS + kk * 16 + 2 * c]);
        vf[kk][1] = ld32(&qs[(r0 + 8) * LDS + kk * 16 + 2 * c]);
        vf[kk][2] = ld32(&qs[r0 * LDS + kk * 16 + 8 + 2 * c]);
        vf[kk][3] = ld32(&qs[(r0 + 8) * LDS + kk * 16 + 8 + 2 * c]);
    }
    // Segment range of the block's keys.
    int kmin = 0x7fffffff, kmax = -0x7fffffff;
    for (int j = k0; j < min(k0 + BN, tokens); j++) {
        int s = sp[j * sst];
        kmin = min(kmin, s);
        kmax = max(kmax, s);
    }

    float dkacc[HD / 8][4], dvacc[HD / 8][4];
#pragma unroll
    for (int n = 0; n < HD / 8; n++)
        for (int e = 0; e < 4; e++) dkacc[n][e] = dvacc[n][e] = 0.f;

    int q_end = tokens;  // queries that can see a key of the block: [k0, q_end)
    if (window > 0) q_end = min(tokens, k0 + BN - 1 + window);
    const int n_qblocks = (q_end - k0 + BM - 1) / BM;

    for (int it = 0; it < rep * n_qblocks; it++) {
        const int h = hk * rep + it / n_qblocks;
        const int q0 = k0 + (it % n_qblocks) * BM;
        __syncthreads();  // the previous step is done with qs, dos, dss and the row values
        int qseg_t = -1;
        if (threadIdx.x < BM) {
            int i = q0 + threadIdx.x;
            qseg_t = i < tokens ? sp[i * sst] : -3;
            qseg_s[threadIdx.x] = qseg_t;
        }
        bool in_range = threadIdx.x < BM && qseg_t >= kmin && qseg_t <= kmax;
        if (!__syncthreads_or(in_range)) continue;
        bool uniform = threadIdx.x >= BM || (qseg_t == kmin && kmin == kmax);
        const bool full = __syncthreads_and(uniform) && k0 + BN - 1 <= q0 && window == 0 && q0 + BM <= tokens &&
                          k0 + BN <= tokens;

        const bf16_t* qp = q + b * qsb + h * qsh;
        const bf16_t* dp = dout + b * dsb + h * dsh;
        load_tile(qs, qp, qst, q0, tokens);
        load_tile(dos, dp, dst, q0, tokens);
        cp_async_commit();
        if (threadIdx.x < BM) {
            int i = q0 + threadIdx.x;
            long long row = (long long)(b * q_heads + h) * tokens + i;
            lse_s[threadIdx.x] = i < tokens ? lse[row] : NEWT_INF;
            delta_s[threadIdx.x] = i < tokens ? delta[row] : 0.f;
        }
        cp_async_wait<0>();
        __syncthreads();

        // sᵀ = k·qᵀ and dpᵀ = v·dOᵀ: this warp's 16 keys × the 64 queries.
        float s[BM / 8][4], dpt[BM / 8][4];
#pragma unroll
        for (int n = 0; n < BM / 8; n++) {
            s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
            dpt[n][0] = dpt[n][1] = dpt[n][2] = dpt[n][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < HD / 16; kk++) {
                u32 bq[2], bd[2];
                bq[0] = ld32(&qs[(n * 8 + g) * LDS + kk * 16 + 2 * c]);
                bq[1] = ld32(&qs[(n * 8 + g) * LDS + kk * 16 + 8 + 2 * c]);
                bd[0] = ld32(&dos[(n * 8 + g) * LDS + kk * 16 + 2 * c]);
                bd[1] = ld32(&dos[(n * 8 + g) * LDS + kk * 16 + 8 + 2 * c]);
                mma16816(s[n], kf[kk], bq);
                mma16816(dpt[n], vf[kk], bd);
            }
        }
        // pᵀ = exp2(sᵀ·scale·log2e − lse2[query]); dsᵀ = pᵀ ∘ (dpᵀ − delta[query]) · scale.
#pragma unroll
        for (int n = 0; n < BM / 8; n++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int col = n * 8 + 2 * c + (e & 1);
                bool hi = e >= 2;
                float p = exp2f(s[n][e] * sl2 - lse_s[col]);
                if (!full && masked(q0 + col, hi ? kj1 : kj0, qseg_s[col], hi ? ks1 : ks0, window, tokens)) p = 0.f;
                s[n][e] = p;
                dpt[n][e] = p * (dpt[n][e] - delta_s[col]) * scale;
            }
        }
        // dv += pᵀ·dO and dk += dsᵀ·q (B operands transposed out of shared memory).
#pragma unroll
        for (int kk = 0; kk < BM / 16; kk++) {
            u32 pf[4], df[4];
            pf[0] = pack_bf16(s[2 * kk][0], s[2 * kk][1]);
            pf[1] = pack_bf16(s[2 * kk][2], s[2 * kk][3]);
            pf[2] = pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            pf[3] = pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3]);
            df[0] = pack_bf16(dpt[2 * kk][0], dpt[2 * kk][1]);
            df[1] = pack_bf16(dpt[2 * kk][2], dpt[2 * kk][3]);
            df[2] = pack_bf16(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]);
            df[3] = pack_bf16(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3]);
            // dsᵀ to shared memory for dq: rows = keys, cols = queries.
            *(u32*)&dss[r0 * LDP + kk * 16 + 2 * c] = df[0];
            *(u32*)&dss[(r0 + 8) * LDP + kk * 16 + 2 * c] = df[1];
            *(u32*)&dss[r0 * LDP + kk * 16 + 8 + 2 * c] = df[2];
            *(u32*)&dss[(r0 + 8) * LDP + kk * 16 + 8 + 2 * c] = df[3];
            const int mat = lane / 8, r = lane % 8;
#pragma unroll
            for (int n = 0; n < HD / 8; n += 2) {
                u32 bo[4], bq[4];
                ldmatrix_x4_trans(bo, &dos[(kk * 16 + (mat & 1) * 8 + r) * LDS + n * 8 + (mat >> 1) * 8]);
                ldmatrix_x4_trans(bq, &qs[(kk * 16 + (mat & 1) * 8 + r) * LDS + n * 8 + (mat >> 1) * 8]);
                mma16816(dvacc[n], pf, bo);
                mma16816(dvacc[n + 1], pf, bo + 2);
                mma16816(dkacc[n], df, bq);
                mma16816(dkacc[n + 1], df, bq + 2);
            }
        }
        __syncthreads();  // dss complete
        // dq (this warp's 16 queries) = ds·k, over the block's 64 keys; added to dq_acc.
        float dqa[HD / 8][4];
#pragma unroll
        for (int n = 0; n < HD / 8; n++) dqa[n][0] = dqa[n][1] = dqa[n][2] = dqa[n][3] = 0.f;
        const int mat = lane / 8, r = lane % 8;
#pragma unroll
        for (int kk = 0; kk < BN / 16; kk++) {
            // A = ds[query][key] = dss[key][query], transposed on load: matrix i covers keys
            // kk*16 + (i >> 1)*8 and queries warp*16 + (i & 1)*8.
            u32 af[4];
            ldmatrix_x4_trans(af, &dss[(kk * 16 + (mat >> 1) * 8 + r) * LDP + warp * 16 + (mat & 1) * 8]);
#pragma unroll
            for (int n = 0; n < HD / 8; n += 2) {
                u32 bk[4];
                ldmatrix_x4_trans(bk, &ks[(kk * 16 + (mat & 1) * 8 + r) * LDS + n * 8 + (mat >> 1) * 8]);
                mma16816(dqa[n], af, bk);
                mma16816(dqa[n + 1], af, bk + 2);
            }
        }
        float* dqp = dq_acc + ((long long)(b * q_heads + h) * tokens) * HD;
        const int qi0 = q0 + warp * 16 + g, qi1 = qi0 + 8;
#pragma unroll
        for (int n = 0; n < HD / 8; n++) {
            int col = n * 8 + 2 * c;
            if (qi0 < tokens) {
                atomicAdd(&dqp[(long long)qi0 * HD + col], dqa[n][0]);
                atomicAdd(&dqp[(long long)qi0 * HD + col + 1], dqa[n][1]);
            }
            if (qi1 < tokens) {
                atomicAdd(&dqp[(long long)qi1 * HD + col], dqa[n][2]);
                atomicAdd(&dqp[(long long)qi1 * HD + col + 1], dqa[n][3]);
            }
        }
    }

    bf16_t* dkp = dk + ((long long)(b * kv_heads + hk) * tokens) * HD;
    bf16_t* dvp = dv + ((long long)(b * kv_heads + hk) * tokens) * HD;
#pragma unroll
    for (int n = 0; n < HD / 8; n++) {
        int col = n * 8 + 2 * c;
        if (kj0 < tokens) {
            *(u32*)&dkp[(long long)kj0 * HD + col] = pack_bf16(dkacc[n][0], dkacc[n][1]);
            *(u32*)&dvp[(long long)kj0 * HD + col] = pack_bf16(dvacc[n][0], dvacc[n][1]);
        }
        if (kj1 < tokens) {
            *(u32*)&dkp[(long long)kj1 * HD + col] = pack_bf16(dkacc[n][2], dkacc[n][3]);
            *(u32*)&dvp[(long long)kj1 * HD + col] = pack_bf16(dvacc[n][2], dvacc[n][3]);
        }
    }
}
