// FlashAttention-2 forward and backward for newt's training attention, on tensor cores
// (mma.sync m16n8k16, bf16 in, f32 accumulate), for head_dim HD = 64 and 128: each pass is a
// template over HD (and the backward over its query step and where K/V fragments live),
// instantiated once per head dim as its own `extern "C"` kernel (the `_hd128` names are HD 128).
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
//
// Block shapes (the launchers in kernels/src/flash_cuda.rs and bench/flash_check.py mirror them):
//   forward, HD 64 (flash_fwd<64, 1, 64>): 64 queries a block, 64 keys a step, 4 warps of 16
//             query rows; Q goes through the V buffer into registers once, so shared memory is two
//             64-row tiles (static). The next K tile loads while softmax and P·V run; V loads while
//             the scores are computed.
//   forward, HD 128 (flash_fwd<128, 2, 64>): 128 queries a block, 4 warps of two 16-row groups
//             (each K/V fragment read feeds both), Q kept in dynamic shared memory (68 KB with the
//             K and V tiles) and read at each k step; the same pipeline.
//   backward, HD 64 (flash_bwd<64, 64, true, 4>): 64 keys a block, 4 warps of 16 keys that hold
//             their K and V fragments and all 64 dims of their dK/dV in registers; 64 queries a
//             step; dynamic shared memory of flash_bwd_smem<...>() bytes (37.6 KB).
//   backward, HD 128 (flash_bwd_tiles<128, 8>): 128 keys a block, 64 queries a step, 8 warps of
//             2-D tiles (32 keys × 32 queries of the scores, 32 keys × 64 dims of dK/dV, 32 queries
//             × 32 dims of dQ), P and dS passed through shared memory; 142 KB of dynamic shared
//             memory, above the 48 KB default, so the launcher raises the function's limit. On
//             GPUs that allow a block less, newt_flash_bwd_hd128_small: 4 warps, 64 keys, 88.8 KB.
//             (flash_bwd<128, 32, false, 4>, 16 keys a warp, K/V fragments read from shared memory
//             at every step, is the slower alternative: -DFA_BWD128_TILES=0.)
//   Both backward kernels trap when launched with less dynamic shared memory than they use. The
//   next step's q and dO tiles load while dQ is computed; dQ is accumulated in f32 with vector
//   reductions (red.global.add.v4.f32 on sm_90). Segment ids (and lse, delta) are loaded two
//   steps ahead and voted on (does a step have work, does it need segment masking) a step ahead.
//   FA_FWD128_MT, FA_FWD128_BN, FA_BWD64_TILES, FA_BWD128_TILES, FA_BWD128_TILE_WARPS, FA_BWD128_BM, FA_BWD128_NW,
//   FA_DQ_GROUPS and FA_PRECISE_EXP2 exist for
//   bench/flash_check.py's --variant runs; newt compiles the defaults (a test in flash_cuda.rs
//   checks them against its launch table).

#define FA_THREADS 128  // four warps
#define FA_PAD 8        // bf16 elements of padding per shared-memory row (no bank conflicts)

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

// Four 8x8 b16 matrices: thread t gives the address of row t % 8 of matrix t / 8 and receives,
// of each matrix, elements (g, 2c) and (g, 2c+1).
__device__ __forceinline__ void ldmatrix_x4(u32* r, const bf16_t* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

// Block `bid` of a (blocks, heads, batch) grid in order of decreasing work when the work of a
// block falls with blockIdx.x: the grid's linear index, with the block index varying slowest, so
// the first wave of blocks takes the longest ones of every (head, batch).
__device__ __forceinline__ void heavy_first(int& blk, int& head, int& batch) {
    const int per = gridDim.y * gridDim.z;
    const int lin = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    blk = lin / per;
    head = (lin % per) % gridDim.y;
    batch = (lin % per) / gridDim.y;
}

// 16 bytes global -> shared, zero-filled when !valid.
__device__ __forceinline__ void cp_async16(bf16_t* dst, const bf16_t* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_addr(dst)), "l"(src),
                 "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }

__device__ __forceinline__ u32 dynamic_smem_size() {
    u32 r;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(r));
    return r;
}

// Rows [row0, row0 + ROWS) of a [tokens, HD] matrix with row stride `ld` (elements) into shared
// memory with row stride HD + FA_PAD; rows >= rows_valid are zeros.
template <int HD, int ROWS, int NT = FA_THREADS>
__device__ __forceinline__ void load_tile(bf16_t* dst, const bf16_t* src, long long ld, int row0, int rows_valid) {
    constexpr int chunks = HD / 8;  // 16-byte pieces per row; NT threads copy
    static_assert(ROWS * chunks % NT == 0, "whole rounds of 16-byte copies");
#pragma unroll
    for (int it = 0; it < ROWS * chunks / NT; it++) {
        int i = it * NT + threadIdx.x;
        int r = i / chunks, ch = i % chunks;
        int row = row0 + r;
        bool valid = row < rows_valid;
        const bf16_t* s = src + (long long)(valid ? row : 0) * ld + ch * 8;
        cp_async16(dst + r * (HD + FA_PAD) + ch * 8, s, valid);
    }
}

__device__ __forceinline__ u32 ld32(const bf16_t* p) { return *(const u32*)p; }

// p[0..4) += (a, b, c, d) in global memory (p 16-byte aligned): one vector reduction on sm_90.
__device__ __forceinline__ void red_add4(float* p, float a, float b, float c, float d) {
#if __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(p), "f"(a), "f"(b), "f"(c), "f"(d)
                 : "memory");
#else
    atomicAdd(p, a);
    atomicAdd(p + 1, b);
    atomicAdd(p + 2, c);
    atomicAdd(p + 3, d);
#endif
}

// Whether key `kj` is hidden from query `qi` (segments as given; window 0 = none).
__device__ __forceinline__ bool masked(int qi, int kj, int qseg, int kseg, int window, int tokens) {
    return kj > qi || kj >= tokens || qseg != kseg || (window > 0 && qi - kj >= window);
}

#define LOG2E 1.4426950408889634f

// A step's votes, a step ahead of it: warps [0, NWV) hold one segment id a thread (of the step's
// 32·NWV keys or queries) and compare it with the other side's segment range [lo, hi]. Bit 0: some
// id is in range (the step has work); bit 1: every id is the one segment of the other side (no
// segment masking). Read with read_votes after a barrier.
template <int NWV>
__device__ __forceinline__ void vote_step(int* votes, int id, int lo, int hi) {
    const int warp = threadIdx.x / 32;
    if (warp < NWV) {
        const bool any = __any_sync(0xffffffff, id >= lo && id <= hi);
        const bool all = __all_sync(0xffffffff, id == lo && lo == hi);
        if (threadIdx.x % 32 == 0) votes[warp] = (any ? 1 : 0) | (all ? 2 : 0);
    }
}
template <int NWV>
__device__ __forceinline__ int read_votes(const int* votes) {
    int any = 0, all = 2;
#pragma unroll
    for (int w = 0; w < NWV; w++) {
        any |= votes[w] & 1;
        all &= votes[w] & 2;
    }
    return any | all;
}

// 2^x: one MUFU.EX2, denormal results flushed to zero (exp2f adds range handling around it;
// -DFA_PRECISE_EXP2 takes exp2f).
__device__ __forceinline__ float fa_exp2(float x) {
#ifndef FA_PRECISE_EXP2
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
#else
    return exp2f(x);
#endif
}
#define NEWT_INF __int_as_float(0x7f800000)

// grid: (query blocks of 64·MT, q_heads, batch); block: 128 threads.
// out: [batch, tokens, q_heads, HD] contiguous (the layout the output projection reads, so the
// attention output needs no transposing copy); lse: [batch, q_heads, tokens] f32, in log2 units
// of the scaled scores (the backward pass's only use of it).
// MT = 1: a warp owns 16 query rows, whose q fragments stay in registers; shared memory is static
// (q's tile passes through the V buffer). MT = 2: a warp owns two groups of 16 rows (warp·16 and
// 64 + warp·16 of the block's 128), so every K and V fragment read from shared memory feeds two
// products (half the shared-memory reads per product); q's tile stays in dynamic shared memory
// (flash_fwd_smem<HD, MT, BN>() bytes) and its fragments are read at each k step, as registers
// hold the two groups' outputs and scores instead. BN keys a step.
template <int HD, int MT, int BN>
__host__ __device__ constexpr int flash_fwd_smem() {
    return MT == 1 ? 0 : 2 * (64 * MT + 2 * BN) * (HD + FA_PAD);
}

template <int HD, int MT, int BN>
__device__ __forceinline__ void flash_fwd(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k,
                                          const bf16_t* __restrict__ v, const int* __restrict__ seg,
                                          bf16_t* __restrict__ out, float* __restrict__ lse, int tokens, int q_heads,
                                          int kv_heads, long long qsb, long long qsh, long long qst, long long ksb,
                                          long long ksh, long long kst, long long vsb, long long vsh, long long vst,
                                          long long ssb, long long sst, float scale, int window) {
    static_assert(MT == 1 || MT == 2, "one or two row groups a warp");
    static_assert(BN % 32 == 0 && (MT == 2 || BN == 64), "the single-group kernel takes 64 keys a step");
    constexpr int BM = 64 * MT, LDS = HD + FA_PAD;
    __shared__ int qseg_s[BM];
    __shared__ int kseg_s[BN];
    bf16_t *ks, *vs, *qs;
    if constexpr (MT == 1) {
        __shared__ __align__(16) bf16_t ks1[BN * LDS];
        __shared__ __align__(16) bf16_t vs1[BN * LDS];
        ks = ks1;
        vs = vs1;
        qs = vs1;  // q's tile passes through the V buffer into registers, once
    } else {
        extern __shared__ __align__(16) unsigned char fa_smem[];
        if (dynamic_smem_size() < (u32)flash_fwd_smem<HD, MT, BN>()) asm volatile("trap;");
        qs = (bf16_t*)fa_smem;
        ks = qs + BM * LDS;
        vs = ks + BN * LDS;
    }

    int blk, h, b;
    heavy_first(blk, h, b);
    const int qb = gridDim.x - 1 - blk;  // longest (latest) blocks first
    const int hk = h / (q_heads / kv_heads);
    const int q0 = qb * BM;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, c = lane % 4;
    const int mat = lane / 8, r = lane % 8;
    const float sl2 = scale * LOG2E;

    const bf16_t* qp = q + b * qsb + h * qsh;
    const bf16_t* kp = k + b * ksb + hk * ksh;
    const bf16_t* vp = v + b * vsb + hk * vsh;
    const int* sp = seg + b * ssb;

    load_tile<HD, BM>(qs, qp, qst, q0, tokens);
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

    // Row group t of this warp: block rows t·64 + warp·16 + [0, 16); this thread's rows g and g + 8
    // of it (block row t·64 + rw + 8·hi; recomputed where used, to spare registers).
    const int rw = warp * 16 + g;
    // MT = 1: the warp's 16 query rows as A fragments, for the HD / 16 k steps of q·kᵀ.
    u32 qf[MT == 1 ? HD / 16 : 1][4];
    if constexpr (MT == 1) {
        const int r0 = warp * 16 + g;
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++) {
            qf[kk][0] = ld32(&qs[r0 * LDS + kk * 16 + 2 * c]);
            qf[kk][1] = ld32(&qs[(r0 + 8) * LDS + kk * 16 + 2 * c]);
            qf[kk][2] = ld32(&qs[r0 * LDS + kk * 16 + 8 + 2 * c]);
            qf[kk][3] = ld32(&qs[(r0 + 8) * LDS + kk * 16 + 8 + 2 * c]);
        }
    }

    float o[MT][HD / 8][4];
    float m[MT][2], l[MT][2];
#pragma unroll
    for (int t = 0; t < MT; t++) {
#pragma unroll
        for (int n = 0; n < HD / 8; n++) o[t][n][0] = o[t][n][1] = o[t][n][2] = o[t][n][3] = 0.f;
        m[t][0] = m[t][1] = -NEWT_INF;
        l[t][0] = l[t][1] = 0.f;
    }

    const int q_last = min(q0 + BM, tokens) - 1;
    const int k_end = q_last + 1;  // causal: keys [0, k_end)
    int k_begin = 0;
    if (window > 0) k_begin = max(0, q0 - window + 1);
    k_begin = (k_begin / BN) * BN;
    // Software pipeline, three barriers a step: the K tile of a step is loaded while the step
    // before it computes softmax and P·V, its V tile while its own scores are computed; the key
    // segment ids of a step are loaded into registers two steps ahead, voted on (work? masking?)
    // during the step before, and put in kseg_s once that step is done with its own.
    // k_pending: the step whose K tile is in flight (or in ks).
    __shared__ int votes_s[2][BN / 32];
    int kseg_next = -2;
    if (threadIdx.x < BN && k_begin + (int)threadIdx.x < tokens) kseg_next = sp[(k_begin + threadIdx.x) * sst];
    if (threadIdx.x < BN) kseg_s[threadIdx.x] = kseg_next;
    vote_step<BN / 32>(votes_s[0], kseg_next, qmin, qmax);
    int k_pending = -1;
    if (k_begin < k_end) {
        load_tile<HD, BN>(ks, kp, kst, k_begin, tokens);
        cp_async_commit();
        k_pending = k_begin;
    }
    if (threadIdx.x < BN) {
        const int j = k_begin + BN + threadIdx.x;
        kseg_next = k_begin + BN < k_end && j < tokens ? sp[j * sst] : -2;
    }
    __syncthreads();  // the first step's votes and key segment ids; every warp has its q fragments
    int step_votes = read_votes<BN / 32>(votes_s[0]);
    for (int k0 = k_begin, si = 0; k0 < k_end; k0 += BN, si++) {
        // The next step's segment ids into kseg_s and registers (two steps ahead): this step's
        // readers of kseg_s are past a barrier.
        auto advance_segments = [&]() {
            if (threadIdx.x < BN) {
                kseg_s[threadIdx.x] = kseg_next;
                const int j = k0 + 2 * BN + threadIdx.x;
                kseg_next = k0 + 2 * BN < k_end && j < tokens ? sp[j * sst] : -2;
            }
        };
        if (!(step_votes & 1)) {  // no query of the block sees these keys (packed rows)
            if (k_pending == k0) cp_async_wait<0>();  // a tile nobody reads
            k_pending = -1;
            vote_step<BN / 32>(votes_s[(si + 1) & 1], kseg_next, qmin, qmax);
            advance_segments();
            __syncthreads();
            step_votes = read_votes<BN / 32>(votes_s[(si + 1) & 1]);
            continue;
        }
        const bool full = (step_votes & 2) && k0 + BN - 1 <= q0 && window == 0 && k0 + BN <= tokens;
        // A row group whose rows all precede the step's first key sees none of its keys (causal):
        // it skips the step (the same for the whole block; always live with MT = 1).
        bool live[MT];
#pragma unroll
        for (int t = 0; t < MT; t++) live[t] = k0 <= q0 + t * 64 + 63;

        if (k_pending != k0) {
            load_tile<HD, BN>(ks, kp, kst, k0, tokens);
            cp_async_commit();
        }
        cp_async_wait<0>();
        __syncthreads();  // K is in; the previous step is done with vs
        load_tile<HD, BN>(vs, vp, vst, k0, tokens);
        cp_async_commit();

        // s = q·kᵀ for this warp's rows and the BN keys (tiles of 8).
        float s[MT][BN / 8][4];
#pragma unroll
        for (int t = 0; t < MT; t++)
#pragma unroll
            for (int n = 0; n < BN / 8; n++) s[t][n][0] = s[t][n][1] = s[t][n][2] = s[t][n][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++) {
            u32 af[MT][4];
            if constexpr (MT == 1) {
#pragma unroll
                for (int e = 0; e < 4; e++) af[0][e] = qf[kk][e];
            } else {
#pragma unroll
                for (int t = 0; t < MT; t++)
                    if (live[t]) ldmatrix_x4(af[t], &qs[(t * 64 + warp * 16 + (mat & 1) * 8 + r) * LDS + kk * 16 + (mat >> 1) * 8]);
            }
#pragma unroll
            for (int n = 0; n < BN / 8; n += 2) {
                u32 bfr[4];  // B fragments of key tiles n and n + 1
                ldmatrix_x4(bfr, &ks[((n + (mat >> 1)) * 8 + r) * LDS + kk * 16 + (mat & 1) * 8]);
#pragma unroll
                for (int t = 0; t < MT; t++) {
                    if (!live[t]) continue;
                    mma16816(s[t][n], af[t], bfr);
                    mma16816(s[t][n + 1], af[t], bfr + 2);
                }
            }
        }
        vote_step<BN / 32>(votes_s[(si + 1) & 1], kseg_next, qmin, qmax);
        __syncthreads();  // every warp is done with ks; the next step's votes are in
        step_votes = read_votes<BN / 32>(votes_s[(si + 1) & 1]);
        const bool prefetch = k0 + BN < k_end && (step_votes & 1);
        if (prefetch) {
            load_tile<HD, BN>(ks, kp, kst, k0 + BN, tokens);
            cp_async_commit();
            k_pending = k0 + BN;
        }
        // Scale into log2 units, mask, the running row maxima, and the probabilities.
#pragma unroll
        for (int t = 0; t < MT; t++) {
            if (!live[t]) continue;
            float mx0 = m[t][0], mx1 = m[t][1];
#pragma unroll
            for (int n = 0; n < BN / 8; n++) {
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    float x = s[t][n][e] * sl2;
                    if (!full) {
                        int col = n * 8 + 2 * c + (e & 1);
                        int kj = k0 + col;
                        const int row = t * 64 + rw + 8 * (e >> 1);
                        if (masked(q0 + row, kj, qseg_s[row], kseg_s[col], window, tokens)) x = -NEWT_INF;
                    }
                    s[t][n][e] = x;
                }
                mx0 = fmaxf(mx0, fmaxf(s[t][n][0], s[t][n][1]));
                mx1 = fmaxf(mx1, fmaxf(s[t][n][2], s[t][n][3]));
            }
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffff, mx0, 1));
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffff, mx0, 2));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffff, mx1, 1));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffff, mx1, 2));
            const float use0 = mx0 == -NEWT_INF ? 0.f : mx0, use1 = mx1 == -NEWT_INF ? 0.f : mx1;
            const float a0 = fa_exp2(m[t][0] - use0), a1 = fa_exp2(m[t][1] - use1);
            m[t][0] = mx0;
            m[t][1] = mx1;
            float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
            for (int n = 0; n < BN / 8; n++) {
                s[t][n][0] = fa_exp2(s[t][n][0] - use0);
                s[t][n][1] = fa_exp2(s[t][n][1] - use0);
                s[t][n][2] = fa_exp2(s[t][n][2] - use1);
                s[t][n][3] = fa_exp2(s[t][n][3] - use1);
                sum0 += s[t][n][0] + s[t][n][1];
                sum1 += s[t][n][2] + s[t][n][3];
            }
            l[t][0] = l[t][0] * a0 + sum0;
            l[t][1] = l[t][1] * a1 + sum1;
#pragma unroll
            for (int n = 0; n < HD / 8; n++) {
                o[t][n][0] *= a0;
                o[t][n][1] *= a0;
                o[t][n][2] *= a1;
                o[t][n][3] *= a1;
            }
        }

        if (prefetch)
            cp_async_wait<1>();
        else
            cp_async_wait<0>();
        __syncthreads();  // V is in; every warp is done with kseg_s
        advance_segments();
        // o += p·v: p's C fragments are the A fragments of the k steps.
#pragma unroll
        for (int kk = 0; kk < BN / 16; kk++) {
            u32 pf[MT][4];
#pragma unroll
            for (int t = 0; t < MT; t++) {
                pf[t][0] = pack_bf16(s[t][2 * kk][0], s[t][2 * kk][1]);
                pf[t][1] = pack_bf16(s[t][2 * kk][2], s[t][2 * kk][3]);
                pf[t][2] = pack_bf16(s[t][2 * kk + 1][0], s[t][2 * kk + 1][1]);
                pf[t][3] = pack_bf16(s[t][2 * kk + 1][2], s[t][2 * kk + 1][3]);
            }
#pragma unroll
            for (int n = 0; n < HD / 8; n += 2) {
                u32 vf[4];
                ldmatrix_x4_trans(vf, &vs[(kk * 16 + (mat & 1) * 8 + r) * LDS + n * 8 + (mat >> 1) * 8]);
#pragma unroll
                for (int t = 0; t < MT; t++) {
                    if (!live[t]) continue;
                    mma16816(o[t][n], pf[t], vf);
                    mma16816(o[t][n + 1], pf[t], vf + 2);
                }
            }
        }
    }

    bf16_t* op = out + ((long long)b * tokens * q_heads + h) * HD;
    const long long ot = (long long)q_heads * HD;
    float* lp = lse + (long long)(b * q_heads + h) * tokens;
#pragma unroll
    for (int t = 0; t < MT; t++) {
#pragma unroll
        for (int i = 0; i < 2; i++) {
            l[t][i] += __shfl_xor_sync(0xffffffff, l[t][i], 1);
            l[t][i] += __shfl_xor_sync(0xffffffff, l[t][i], 2);
        }
        const float inv0 = l[t][0] > 0.f ? 1.f / l[t][0] : 0.f, inv1 = l[t][1] > 0.f ? 1.f / l[t][1] : 0.f;
        const int qi0 = q0 + t * 64 + rw, qi1 = qi0 + 8;
#pragma unroll
        for (int n = 0; n < HD / 8; n++) {
            int col = n * 8 + 2 * c;
            if (qi0 < tokens) *(u32*)&op[qi0 * ot + col] = pack_bf16(o[t][n][0] * inv0, o[t][n][1] * inv0);
            if (qi1 < tokens) *(u32*)&op[qi1 * ot + col] = pack_bf16(o[t][n][2] * inv1, o[t][n][3] * inv1);
        }
        if (c == 0) {
            if (qi0 < tokens) lp[qi0] = m[t][0] + log2f(l[t][0]);
            if (qi1 < tokens) lp[qi1] = m[t][1] + log2f(l[t][1]);
        }
    }
}

// The head_dim-128 forward: two row groups a warp (FA_FWD128_MT 2, 128 queries a block) and
// FA_FWD128_BN keys a step; FA_FWD128_MT 1 is the single-group kernel (64 queries, static smem).
#ifndef FA_FWD128_MT
#define FA_FWD128_MT 2
#endif
#ifndef FA_FWD128_BN
#define FA_FWD128_BN 64
#endif

extern "C" __global__ void __launch_bounds__(FA_THREADS) newt_flash_fwd(
    const bf16_t* __restrict__ q, const bf16_t* __restrict__ k, const bf16_t* __restrict__ v,
    const int* __restrict__ seg, bf16_t* __restrict__ out, float* __restrict__ lse, int tokens, int q_heads,
    int kv_heads, long long qsb, long long qsh, long long qst, long long ksb, long long ksh, long long kst,
    long long vsb, long long vsh, long long vst, long long ssb, long long sst, float scale, int window) {
    flash_fwd<64, 1, 64>(q, k, v, seg, out, lse, tokens, q_heads, kv_heads, qsb, qsh, qst, ksb, ksh, kst, vsb, vsh,
                         vst, ssb, sst, scale, window);
}

extern "C" __global__ void __launch_bounds__(FA_THREADS) newt_flash_fwd_hd128(
    const bf16_t* __restrict__ q, const bf16_t* __restrict__ k, const bf16_t* __restrict__ v,
    const int* __restrict__ seg, bf16_t* __restrict__ out, float* __restrict__ lse, int tokens, int q_heads,
    int kv_heads, long long qsb, long long qsh, long long qst, long long ksb, long long ksh, long long kst,
    long long vsb, long long vsh, long long vst, long long ssb, long long sst, float scale, int window) {
    flash_fwd<128, FA_FWD128_MT, FA_FWD128_BN>(q, k, v, seg, out, lse, tokens, q_heads, kv_heads, qsb, qsh, qst,
                                               ksb, ksh, kst, vsb, vsh, vst, ssb, sst, scale, window);
}

// delta[row] = Σ_d dO[row, d]·O[row, d] (f32), one warp per row of [batch, q_heads, tokens].
// O and dO through strides (the forward pass writes O as [batch, tokens, q_heads, HD]).
template <int HD>
__device__ __forceinline__ void flash_bwd_delta(const bf16_t* __restrict__ o, const bf16_t* __restrict__ dout,
                                                float* __restrict__ delta, int batch, int q_heads, int tokens,
                                                long long osb, long long osh, long long ost, long long dsb,
                                                long long dsh, long long dst) {
    long long row = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= (long long)batch * q_heads * tokens) return;
    int t = row % tokens;
    int bh = row / tokens;
    int h = bh % q_heads, b = bh / q_heads;
    const bf16_t* op = o + b * osb + h * osh + t * ost;
    const bf16_t* dp = dout + b * dsb + h * dsh + t * dst;
    float acc = 0.f;
#pragma unroll
    for (int d = 2 * lane; d < HD; d += 64) {
        u32 a = ld32(op + d), e = ld32(dp + d);
        acc += bf16_to_f32(a & 0xffff) * bf16_to_f32(e & 0xffff) + bf16_to_f32(a >> 16) * bf16_to_f32(e >> 16);
    }
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffff, acc, off);
    if (lane == 0) delta[row] = acc;
}

extern "C" __global__ void newt_flash_bwd_delta(const bf16_t* __restrict__ o, const bf16_t* __restrict__ dout,
                                                float* __restrict__ delta, int batch, int q_heads, int tokens,
                                                long long osb, long long osh, long long ost, long long dsb,
                                                long long dsh, long long dst) {
    flash_bwd_delta<64>(o, dout, delta, batch, q_heads, tokens, osb, osh, ost, dsb, dsh, dst);
}

extern "C" __global__ void newt_flash_bwd_delta_hd128(const bf16_t* __restrict__ o, const bf16_t* __restrict__ dout,
                                                      float* __restrict__ delta, int batch, int q_heads, int tokens,
                                                      long long osb, long long osh, long long ost, long long dsb,
                                                      long long dsh, long long dst) {
    flash_bwd_delta<128>(o, dout, delta, batch, q_heads, tokens, osb, osh, ost, dsb, dsh, dst);
}

#ifndef FA_DQ_GROUPS
#define FA_DQ_GROUPS 2  // 16-query groups a warp takes in the backward pass's dq product
#endif

// Dynamic shared memory of the backward kernel, in bytes: the K tile (and the V tile unless its
// fragments live in registers), the q and dO tiles, dSᵀ, and lse / delta / segment ids of the
// step's queries. (kernels/src/flash_cuda.rs `backward_smem` computes the same.)
template <int HD, int BM, bool KV_REGS, int NW>
__host__ __device__ constexpr int flash_bwd_smem() {
    return 2 * ((KV_REGS ? 1 : 2) * 16 * NW * (HD + FA_PAD) + 2 * BM * (HD + FA_PAD) + 16 * NW * (BM + FA_PAD)) +
           12 * BM;
}

// grid: (key blocks of 64, kv_heads, batch); block: 128 threads (each warp 16 keys).
// dq_acc: [batch, q_heads, tokens, HD] f32, zeroed by the caller, accumulated with atomics.
// dk, dv: [batch, kv_heads, tokens, HD] bf16 contiguous, written once.
// BM: queries per step (16 per warp in the products over keys; the dq product splits HD among
// the 4 / (BM / 16) warps of each 16 queries). KV_REGS: the warp's K and V A-fragments held in
// registers (else read from shared memory at each k step).
template <int HD, int BM, bool KV_REGS, int NW>
__device__ __forceinline__ void flash_bwd(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k,
                                          const bf16_t* __restrict__ v, const int* __restrict__ seg,
                                          const bf16_t* __restrict__ dout, const float* __restrict__ lse,
                                          const float* __restrict__ delta, float* __restrict__ dq_acc,
                                          bf16_t* __restrict__ dk, bf16_t* __restrict__ dv, int tokens, int q_heads,
                                          int kv_heads, long long qsb, long long qsh, long long qst, long long ksb,
                                          long long ksh, long long kst, long long vsb, long long vsh, long long vst,
                                          long long dsb, long long dsh, long long dst, long long ssb, long long sst,
                                          float scale, int window) {
    constexpr int BN = 16 * NW, NT = 32 * NW, LDS = HD + FA_PAD, LDP = BM + FA_PAD;
    // The dq product: each warp takes GPW of the step's QG groups of 16 queries and HC columns.
    constexpr int QG = BM / 16;
    constexpr int GPW = QG < FA_DQ_GROUPS ? QG : FA_DQ_GROUPS;
    constexpr int WPG = NW / (QG / GPW);  // warps per set of groups
    constexpr int HC = HD / WPG;
    static_assert(BM % 16 == 0 && QG % GPW == 0 && NW % (QG / GPW) == 0 && HC % 16 == 0 && BM <= NT, "block shape");
    static_assert(!KV_REGS || BM == BN, "V is staged through the q tile");
    extern __shared__ __align__(16) unsigned char fa_smem[];
    bf16_t* const ks = (bf16_t*)fa_smem;                          // [BN][LDS]
    bf16_t* const vs = ks + BN * LDS;                             // [BN][LDS] (KV_REGS: = qs)
    bf16_t* const qs = KV_REGS ? ks + BN * LDS : vs + BN * LDS;   // [BM][LDS]
    bf16_t* const dos = qs + BM * LDS;                            // [BM][LDS]
    bf16_t* const dss = dos + BM * LDS;                           // dSᵀ: [BN keys][LDP]
    float* const lse_s = (float*)(dss + BN * LDP);
    float* const delta_s = lse_s + BM;
    int* const qseg_s = (int*)(delta_s + BM);
    if (dynamic_smem_size() < (u32)flash_bwd_smem<HD, BM, KV_REGS, NW>()) asm volatile("trap;");

    int kb, hk, b;
    heavy_first(kb, hk, b);  // the first key blocks see the most queries
    const int rep = q_heads / kv_heads;
    const int k0 = kb * BN;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, c = lane % 4;
    const int mat = lane / 8, r = lane % 8;
    const float sl2 = scale * LOG2E;
    const int* sp = seg + b * ssb;

    const bf16_t* kp = k + b * ksb + hk * ksh;
    const bf16_t* vp = v + b * vsb + hk * vsh;
    load_tile<HD, BN, NT>(ks, kp, kst, k0, tokens);
    load_tile<HD, BN, NT>(vs, vp, vst, k0, tokens);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();

    const int r0 = warp * 16 + g;  // this thread's key rows (within the block): r0, r0 + 8
    const int kj0 = k0 + r0, kj1 = kj0 + 8;
    const int ks0 = kj0 < tokens ? sp[kj0 * sst] : -2, ks1 = kj1 < tokens ? sp[kj1 * sst] : -2;
    // The warp's 16 rows of K (or V) as the A fragment of k step kk.
    auto a_frag = [&](u32* f, const bf16_t* t, int kk) {
        ldmatrix_x4(f, &t[(warp * 16 + (mat & 1) * 8 + r) * LDS + kk * 16 + (mat >> 1) * 8]);
    };
    u32 kf[KV_REGS ? HD / 16 : 1][4], vf[KV_REGS ? HD / 16 : 1][4];
    if constexpr (KV_REGS) {
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++) {
            a_frag(kf[kk], ks, kk);
            a_frag(vf[kk], vs, kk);
        }
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
#pragma unroll
        for (int e = 0; e < 4; e++) dkacc[n][e] = dvacc[n][e] = 0.f;

    int q_end = tokens;  // queries that can see a key of the block: [k0, q_end)
    if (window > 0) q_end = min(tokens, k0 + BN - 1 + window);
    const int n_qblocks = (q_end - k0 + BM - 1) / BM;

    // Software pipeline, two barriers a step: a step's q and dO tiles are loaded while the step
    // before it computes dq; its row values (segment ids, lse, delta) are loaded into registers
    // two steps ahead, voted on (work? masking?) during the step before, and put in shared
    // memory once that step is done with its own. pending: the step whose tiles are in flight (or
    // in qs / dos).
    static_assert(BM % 32 == 0, "whole warps vote on the queries of a step");
    __shared__ int votes_s[2][BM / 32];
    const int steps = rep * n_qblocks;
    int seg_next = -3;
    float lse_next = NEWT_INF, delta_next = 0.f;
    auto fetch_rows = [&](int it) {
        if (threadIdx.x < BM) {
            seg_next = -3;
            if (it < steps) {
                const int h = hk * rep + it / n_qblocks, i = k0 + (it % n_qblocks) * BM + threadIdx.x;
                const long long row = (long long)(b * q_heads + h) * tokens + i;
                seg_next = i < tokens ? sp[i * sst] : -3;
                lse_next = i < tokens ? lse[row] : NEWT_INF;
                delta_next = i < tokens ? delta[row] : 0.f;
            }
        }
    };
    auto put_rows = [&]() {
        if (threadIdx.x < BM) {
            qseg_s[threadIdx.x] = seg_next;
            lse_s[threadIdx.x] = lse_next;
            delta_s[threadIdx.x] = delta_next;
        }
    };
    auto load_step = [&](int it) {
        const int h = hk * rep + it / n_qblocks, q0 = k0 + (it % n_qblocks) * BM;
        load_tile<HD, BM, NT>(qs, q + b * qsb + h * qsh, qst, q0, tokens);
        load_tile<HD, BM, NT>(dos, dout + b * dsb + h * dsh, dst, q0, tokens);
        cp_async_commit();
    };
    fetch_rows(0);
    put_rows();
    vote_step<BM / 32>(votes_s[0], seg_next, kmin, kmax);
    fetch_rows(1);
    __syncthreads();  // the first step's votes and row values; every warp has its K/V fragments
    int step_votes = read_votes<BM / 32>(votes_s[0]);
    int pending = -1;

    for (int it = 0; it < steps; it++) {
        const int h = hk * rep + it / n_qblocks;
        const int q0 = k0 + (it % n_qblocks) * BM;
        if (!(step_votes & 1)) {  // no key of the block is visible to these queries (packed rows)
            if (pending == it) cp_async_wait<0>();  // prefetched tiles nobody reads
            pending = -1;
            // The next step's row values and votes: nobody reads this step's.
            vote_step<BM / 32>(votes_s[(it + 1) & 1], seg_next, kmin, kmax);
            put_rows();
            fetch_rows(it + 2);
            __syncthreads();
            step_votes = read_votes<BM / 32>(votes_s[(it + 1) & 1]);
            continue;
        }
        const bool full = (step_votes & 2) && k0 + BN - 1 <= q0 && window == 0 && q0 + BM <= tokens &&
                          k0 + BN <= tokens;

        if (pending != it) load_step(it);
        cp_async_wait<0>();
        __syncthreads();  // q and dO are in; the previous step is done with dss

        // sᵀ = k·qᵀ and dpᵀ = v·dOᵀ: this warp's 16 keys × the BM queries.
        float s[BM / 8][4], dpt[BM / 8][4];
#pragma unroll
        for (int n = 0; n < BM / 8; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) s[n][e] = dpt[n][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++) {
            u32 ka[4], va[4];
            const u32* kfr = ka;
            const u32* vfr = va;
            if constexpr (KV_REGS) {
                kfr = kf[kk];
                vfr = vf[kk];
            } else {
                a_frag(ka, ks, kk);
                a_frag(va, vs, kk);
            }
#pragma unroll
            for (int n = 0; n < BM / 8; n += 2) {
                u32 bq[4], bd[4];  // B fragments of query tiles n and n + 1
                ldmatrix_x4(bq, &qs[((n + (mat >> 1)) * 8 + r) * LDS + kk * 16 + (mat & 1) * 8]);
                ldmatrix_x4(bd, &dos[((n + (mat >> 1)) * 8 + r) * LDS + kk * 16 + (mat & 1) * 8]);
                mma16816(s[n], kfr, bq);
                mma16816(s[n + 1], kfr, bq + 2);
                mma16816(dpt[n], vfr, bd);
                mma16816(dpt[n + 1], vfr, bd + 2);
            }
        }
        // pᵀ = exp2(sᵀ·scale·log2e − lse2[query]); dsᵀ = pᵀ ∘ (dpᵀ − delta[query]) · scale.
#pragma unroll
        for (int n = 0; n < BM / 8; n++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int col = n * 8 + 2 * c + (e & 1);
                bool hi = e >= 2;
                float p = fa_exp2(s[n][e] * sl2 - lse_s[col]);
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
        vote_step<BM / 32>(votes_s[(it + 1) & 1], seg_next, kmin, kmax);
        __syncthreads();  // dss complete; qs, dos and the row values are free; the next votes are in
        step_votes = read_votes<BM / 32>(votes_s[(it + 1) & 1]);
        if (it + 1 < steps && (step_votes & 1)) {
            load_step(it + 1);
            pending = it + 1;
        }
        put_rows();
        fetch_rows(it + 2);
        // dq (16 queries of group qg, columns [cw, cw + HC)) = ds·k over the block's 64 keys;
        // added to dq_acc.
        const int qg0 = (warp % (QG / GPW)) * GPW, cw = (warp / (QG / GPW)) * HC;
        float dqa[GPW][HC / 8][4];
#pragma unroll
        for (int t = 0; t < GPW; t++)
#pragma unroll
            for (int n = 0; n < HC / 8; n++) dqa[t][n][0] = dqa[t][n][1] = dqa[t][n][2] = dqa[t][n][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < BN / 16; kk++) {
            // A = ds[query][key] = dss[key][query], transposed on load: matrix i covers keys
            // kk*16 + (i >> 1)*8 and queries (qg0 + t)*16 + (i & 1)*8.
            u32 af[GPW][4];
#pragma unroll
            for (int t = 0; t < GPW; t++)
                ldmatrix_x4_trans(af[t], &dss[(kk * 16 + (mat >> 1) * 8 + r) * LDP + (qg0 + t) * 16 + (mat & 1) * 8]);
#pragma unroll
            for (int n = 0; n < HC / 8; n += 2) {
                u32 bk[4];
                ldmatrix_x4_trans(bk, &ks[(kk * 16 + (mat & 1) * 8 + r) * LDS + cw + n * 8 + (mat >> 1) * 8]);
#pragma unroll
                for (int t = 0; t < GPW; t++) {
                    mma16816(dqa[t][n], af[t], bk);
                    mma16816(dqa[t][n + 1], af[t], bk + 2);
                }
            }
        }
        // Lanes c and c ^ 1 trade halves so that each adds four consecutive columns of one row:
        // even c row g, columns 2c .. 2c + 3; odd c row g + 8, columns 2c - 2 .. 2c + 1.
        float* dqp = dq_acc + ((long long)(b * q_heads + h) * tokens) * HD;
        const bool odd = c & 1;
#pragma unroll
        for (int t = 0; t < GPW; t++) {
            const int qi = q0 + (qg0 + t) * 16 + g + (odd ? 8 : 0);
#pragma unroll
            for (int n = 0; n < HC / 8; n++) {
                const float y0 = __shfl_xor_sync(0xffffffff, odd ? dqa[t][n][0] : dqa[t][n][2], 1);
                const float y1 = __shfl_xor_sync(0xffffffff, odd ? dqa[t][n][1] : dqa[t][n][3], 1);
                const int col = cw + n * 8 + 2 * (c & ~1);
                if (qi < tokens) {
                    float* p = &dqp[(long long)qi * HD + col];
                    if (odd)
                        red_add4(p, y0, y1, dqa[t][n][2], dqa[t][n][3]);
                    else
                        red_add4(p, dqa[t][n][0], dqa[t][n][1], y0, y1);
                }
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

// Dynamic shared memory of flash_bwd_tiles, in bytes: K, V, q and dO tiles of 64 rows, Pᵀ and dSᵀ
// of 64 × (64 + pad), lse / delta / segment ids of 64 queries. (kernels/src/flash_cuda.rs
// `backward_smem` computes the same.)
template <int HD, int NW = 4>
__host__ __device__ constexpr int flash_bwd_tiles_smem() {
    return 2 * ((2 * 16 * NW + 2 * 64) * (HD + FA_PAD) + 2 * 16 * NW * (64 + FA_PAD)) + 12 * 64;
}

// The backward pass with 2-D warp tiles (for HD 128, where a warp cannot hold the K/V fragments
// and all dims of its keys' dK/dV): grid (key blocks of BN = 16·NW, kv_heads, batch), 32·NW
// threads, 64 queries a step. With KG = NW / 2 groups of 32 keys, warp w computes sᵀ and dpᵀ for
// keys 32·(w % KG) .. + 32 and queries 32·(w / KG) .. + 32 and puts Pᵀ and dSᵀ in shared memory;
// then it accumulates dV and dK for the same 32 keys and the dims HD/2·(w / KG) .. + HD/2, and dQ
// over the block's keys for queries 32·(w & 1) .. + 32 and HD / KG dims. Each fragment read from
// shared memory feeds two to four products (one or two in flash_bwd at HD 128). More warps (a
// longer key block) read each q and dO tile once for more keys and add each query's dQ fewer
// times. Same semantics, arguments and pipeline as flash_bwd.
template <int HD, int NW = 4>
__device__ __forceinline__ void flash_bwd_tiles(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k,
                                                const bf16_t* __restrict__ v, const int* __restrict__ seg,
                                                const bf16_t* __restrict__ dout, const float* __restrict__ lse,
                                                const float* __restrict__ delta, float* __restrict__ dq_acc,
                                                bf16_t* __restrict__ dk, bf16_t* __restrict__ dv, int tokens,
                                                int q_heads, int kv_heads, long long qsb, long long qsh, long long qst,
                                                long long ksb, long long ksh, long long kst, long long vsb,
                                                long long vsh, long long vst, long long dsb, long long dsh,
                                                long long dst, long long ssb, long long sst, float scale, int window) {
    constexpr int BM = 64, BN = 16 * NW, LDS = HD + FA_PAD, LDP = BM + FA_PAD, DW = HD / 2;
    constexpr int KG = NW / 2, NT = 32 * NW;
    constexpr int DQW = HD / KG, QPW = DQW < 32 ? DQW : 32;  // dQ dims a warp, a pass
    static_assert(NW % 2 == 0 && QPW % 16 == 0, "two query groups; whole pairs of 8-dim tiles");
    extern __shared__ __align__(16) unsigned char fa_smem[];
    bf16_t* const ks = (bf16_t*)fa_smem;  // [BN][LDS]
    bf16_t* const vs = ks + BN * LDS;     // [BN][LDS]
    bf16_t* const qs = vs + BN * LDS;     // [BM][LDS]
    bf16_t* const dos = qs + BM * LDS;    // [BM][LDS]
    bf16_t* const pts = dos + BM * LDS;   // Pᵀ: [BN keys][LDP]
    bf16_t* const dss = pts + BN * LDP;   // dSᵀ: [BN keys][LDP]
    float* const lse_s = (float*)(dss + BN * LDP);
    float* const delta_s = lse_s + BM;
    int* const qseg_s = (int*)(delta_s + BM);
    if (dynamic_smem_size() < (u32)flash_bwd_tiles_smem<HD, NW>()) asm volatile("trap;");

    int kb, hk, b;
    heavy_first(kb, hk, b);  // the first key blocks see the most queries
    const int rep = q_heads / kv_heads;
    const int k0 = kb * BN;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, c = lane % 4;
    const int mat = lane / 8, r = lane % 8;
    const float sl2 = scale * LOG2E;
    const int* sp = seg + b * ssb;
    const int kw = (warp % KG) * 32;   // this warp's keys (sᵀ/dpᵀ rows, dK/dV rows)
    const int qw = (warp / KG) * 32;   // this warp's queries in sᵀ/dpᵀ
    const int dw = (warp / KG) * DW;   // this warp's dims of dK/dV
    const int qd = (warp & 1) * 32;    // this warp's queries in dQ
    const int dqw = (warp >> 1) * DQW;  // and its dims of dQ

    load_tile<HD, BN, NT>(ks, k + b * ksb + hk * ksh, kst, k0, tokens);
    load_tile<HD, BN, NT>(vs, v + b * vsb + hk * vsh, vst, k0, tokens);
    cp_async_commit();

    int kj[2][2], kseg[2][2];  // this thread's keys: kw + 16t + g + 8hh
#pragma unroll
    for (int t = 0; t < 2; t++)
#pragma unroll
        for (int hh = 0; hh < 2; hh++) {
            kj[t][hh] = k0 + kw + 16 * t + g + 8 * hh;
            kseg[t][hh] = kj[t][hh] < tokens ? sp[kj[t][hh] * sst] : -2;
        }
    // Segment range of the block's keys.
    int kmin = 0x7fffffff, kmax = -0x7fffffff;
    for (int j = k0; j < min(k0 + BN, tokens); j++) {
        int s = sp[j * sst];
        kmin = min(kmin, s);
        kmax = max(kmax, s);
    }

    float dkacc[2][DW / 8][4], dvacc[2][DW / 8][4];
#pragma unroll
    for (int t = 0; t < 2; t++)
#pragma unroll
        for (int n = 0; n < DW / 8; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) dkacc[t][n][e] = dvacc[t][n][e] = 0.f;

    int q_end = tokens;  // queries that can see a key of the block: [k0, q_end)
    if (window > 0) q_end = min(tokens, k0 + BN - 1 + window);
    const int n_qblocks = (q_end - k0 + BM - 1) / BM;

    // The pipeline of flash_bwd, with three barriers a step (the dV/dK product reads q and dO
    // after P and dS are in shared memory).
    __shared__ int votes_s[2][BM / 32];
    const int steps = rep * n_qblocks;
    int seg_next = -3;
    float lse_next = NEWT_INF, delta_next = 0.f;
    auto fetch_rows = [&](int it) {
        if (threadIdx.x < BM) {
            seg_next = -3;
            if (it < steps) {
                const int h = hk * rep + it / n_qblocks, i = k0 + (it % n_qblocks) * BM + threadIdx.x;
                const long long row = (long long)(b * q_heads + h) * tokens + i;
                seg_next = i < tokens ? sp[i * sst] : -3;
                lse_next = i < tokens ? lse[row] : NEWT_INF;
                delta_next = i < tokens ? delta[row] : 0.f;
            }
        }
    };
    auto put_rows = [&]() {
        if (threadIdx.x < BM) {
            qseg_s[threadIdx.x] = seg_next;
            lse_s[threadIdx.x] = lse_next;
            delta_s[threadIdx.x] = delta_next;
        }
    };
    auto load_step = [&](int it) {
        const int h = hk * rep + it / n_qblocks, q0 = k0 + (it % n_qblocks) * BM;
        load_tile<HD, BM, NT>(qs, q + b * qsb + h * qsh, qst, q0, tokens);
        load_tile<HD, BM, NT>(dos, dout + b * dsb + h * dsh, dst, q0, tokens);
        cp_async_commit();
    };
    fetch_rows(0);
    put_rows();
    vote_step<BM / 32>(votes_s[0], seg_next, kmin, kmax);
    fetch_rows(1);
    cp_async_wait<0>();
    __syncthreads();  // K and V; the first step's votes and row values
    int step_votes = read_votes<BM / 32>(votes_s[0]);
    int pending = -1;

    for (int it = 0; it < steps; it++) {
        const int h = hk * rep + it / n_qblocks;
        const int q0 = k0 + (it % n_qblocks) * BM;
        if (!(step_votes & 1)) {  // no key of the block is visible to these queries (packed rows)
            if (pending == it) cp_async_wait<0>();  // prefetched tiles nobody reads
            pending = -1;
            vote_step<BM / 32>(votes_s[(it + 1) & 1], seg_next, kmin, kmax);
            put_rows();
            fetch_rows(it + 2);
            __syncthreads();
            step_votes = read_votes<BM / 32>(votes_s[(it + 1) & 1]);
            continue;
        }
        const bool full = (step_votes & 2) && k0 + BN - 1 <= q0 && window == 0 && q0 + BM <= tokens &&
                          k0 + BN <= tokens;

        if (pending != it) load_step(it);
        cp_async_wait<0>();
        __syncthreads();  // q and dO are in; the previous step is done with pts and dss

        // sᵀ = k·qᵀ and dpᵀ = v·dOᵀ: this warp's 32 keys × 32 queries.
        float s[2][4][4], dpt[2][4][4];
#pragma unroll
        for (int t = 0; t < 2; t++)
#pragma unroll
            for (int n = 0; n < 4; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) s[t][n][e] = dpt[t][n][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++) {
            u32 ka[2][4], va[2][4];
#pragma unroll
            for (int t = 0; t < 2; t++) {
                ldmatrix_x4(ka[t], &ks[(kw + 16 * t + (mat & 1) * 8 + r) * LDS + kk * 16 + (mat >> 1) * 8]);
                ldmatrix_x4(va[t], &vs[(kw + 16 * t + (mat & 1) * 8 + r) * LDS + kk * 16 + (mat >> 1) * 8]);
            }
#pragma unroll
            for (int n = 0; n < 4; n += 2) {
                u32 bq[4], bd[4];  // B fragments of query tiles n and n + 1
                ldmatrix_x4(bq, &qs[(qw + (n + (mat >> 1)) * 8 + r) * LDS + kk * 16 + (mat & 1) * 8]);
                ldmatrix_x4(bd, &dos[(qw + (n + (mat >> 1)) * 8 + r) * LDS + kk * 16 + (mat & 1) * 8]);
#pragma unroll
                for (int t = 0; t < 2; t++) {
                    mma16816(s[t][n], ka[t], bq);
                    mma16816(s[t][n + 1], ka[t], bq + 2);
                    mma16816(dpt[t][n], va[t], bd);
                    mma16816(dpt[t][n + 1], va[t], bd + 2);
                }
            }
        }
        // pᵀ = exp2(sᵀ·scale·log2e − lse2[query]); dsᵀ = pᵀ ∘ (dpᵀ − delta[query]) · scale; both to
        // shared memory as bf16, rows = keys, cols = queries.
#pragma unroll
        for (int t = 0; t < 2; t++) {
#pragma unroll
            for (int n = 0; n < 4; n++) {
                float pv[4], dv4[4];
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int col = qw + n * 8 + 2 * c + (e & 1);
                    const int hh = e >= 2;
                    float p = fa_exp2(s[t][n][e] * sl2 - lse_s[col]);
                    if (!full && masked(q0 + col, kj[t][hh], qseg_s[col], kseg[t][hh], window, tokens)) p = 0.f;
                    pv[e] = p;
                    dv4[e] = p * (dpt[t][n][e] - delta_s[col]) * scale;
                }
                const int row = kw + 16 * t + g, col = qw + n * 8 + 2 * c;
                *(u32*)&pts[row * LDP + col] = pack_bf16(pv[0], pv[1]);
                *(u32*)&pts[(row + 8) * LDP + col] = pack_bf16(pv[2], pv[3]);
                *(u32*)&dss[row * LDP + col] = pack_bf16(dv4[0], dv4[1]);
                *(u32*)&dss[(row + 8) * LDP + col] = pack_bf16(dv4[2], dv4[3]);
            }
        }
        __syncthreads();  // Pᵀ and dSᵀ complete

        // dv += pᵀ·dO and dk += dsᵀ·q over the step's queries: this warp's 32 keys × DW dims.
#pragma unroll
        for (int kk = 0; kk < BM / 16; kk++) {
            u32 pa[2][4], da[2][4];
#pragma unroll
            for (int t = 0; t < 2; t++) {
                ldmatrix_x4(pa[t], &pts[(kw + 16 * t + (mat & 1) * 8 + r) * LDP + kk * 16 + (mat >> 1) * 8]);
                ldmatrix_x4(da[t], &dss[(kw + 16 * t + (mat & 1) * 8 + r) * LDP + kk * 16 + (mat >> 1) * 8]);
            }
#pragma unroll
            for (int n = 0; n < DW / 8; n += 2) {
                u32 bo[4], bq[4];
                ldmatrix_x4_trans(bo, &dos[(kk * 16 + (mat & 1) * 8 + r) * LDS + dw + n * 8 + (mat >> 1) * 8]);
                ldmatrix_x4_trans(bq, &qs[(kk * 16 + (mat & 1) * 8 + r) * LDS + dw + n * 8 + (mat >> 1) * 8]);
#pragma unroll
                for (int t = 0; t < 2; t++) {
                    mma16816(dvacc[t][n], pa[t], bo);
                    mma16816(dvacc[t][n + 1], pa[t], bo + 2);
                    mma16816(dkacc[t][n], da[t], bq);
                    mma16816(dkacc[t][n + 1], da[t], bq + 2);
                }
            }
        }
        vote_step<BM / 32>(votes_s[(it + 1) & 1], seg_next, kmin, kmax);
        __syncthreads();  // qs, dos and the row values are free; the next votes are in
        step_votes = read_votes<BM / 32>(votes_s[(it + 1) & 1]);
        if (it + 1 < steps && (step_votes & 1)) {
            load_step(it + 1);
            pending = it + 1;
        }
        put_rows();
        fetch_rows(it + 2);

        // dq (this warp's 32 queries × DQW dims, QPW at a time) = ds·k over the block's BN keys;
        // added to dq_acc with vector reductions (lanes c, c ^ 1 trade halves: even c adds row g,
        // columns 2c .. 2c + 3; odd c row g + 8, columns 2c - 2 .. 2c + 1).
        float* dqp = dq_acc + ((long long)(b * q_heads + h) * tokens) * HD;
        const bool odd = c & 1;
#pragma unroll
        for (int pass = 0; pass < DQW / QPW; pass++) {
            const int cw = dqw + pass * QPW;
            float dqa[2][QPW / 8][4];
#pragma unroll
            for (int t = 0; t < 2; t++)
#pragma unroll
                for (int n = 0; n < QPW / 8; n++) dqa[t][n][0] = dqa[t][n][1] = dqa[t][n][2] = dqa[t][n][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < BN / 16; kk++) {
                u32 af[2][4];
#pragma unroll
                for (int t = 0; t < 2; t++)
                    ldmatrix_x4_trans(af[t], &dss[(kk * 16 + (mat >> 1) * 8 + r) * LDP + qd + 16 * t + (mat & 1) * 8]);
#pragma unroll
                for (int n = 0; n < QPW / 8; n += 2) {
                    u32 bk[4];
                    ldmatrix_x4_trans(bk, &ks[(kk * 16 + (mat & 1) * 8 + r) * LDS + cw + n * 8 + (mat >> 1) * 8]);
#pragma unroll
                    for (int t = 0; t < 2; t++) {
                        mma16816(dqa[t][n], af[t], bk);
                        mma16816(dqa[t][n + 1], af[t], bk + 2);
                    }
                }
            }
#pragma unroll
            for (int t = 0; t < 2; t++) {
                const int qi = q0 + qd + 16 * t + g + (odd ? 8 : 0);
#pragma unroll
                for (int n = 0; n < QPW / 8; n++) {
                    const float y0 = __shfl_xor_sync(0xffffffff, odd ? dqa[t][n][0] : dqa[t][n][2], 1);
                    const float y1 = __shfl_xor_sync(0xffffffff, odd ? dqa[t][n][1] : dqa[t][n][3], 1);
                    const int col = cw + n * 8 + 2 * (c & ~1);
                    if (qi < tokens) {
                        float* p = &dqp[(long long)qi * HD + col];
                        if (odd)
                            red_add4(p, y0, y1, dqa[t][n][2], dqa[t][n][3]);
                        else
                            red_add4(p, dqa[t][n][0], dqa[t][n][1], y0, y1);
                    }
                }
            }
        }
    }

    bf16_t* dkp = dk + ((long long)(b * kv_heads + hk) * tokens) * HD;
    bf16_t* dvp = dv + ((long long)(b * kv_heads + hk) * tokens) * HD;
#pragma unroll
    for (int t = 0; t < 2; t++)
#pragma unroll
        for (int n = 0; n < DW / 8; n++) {
            const int col = dw + n * 8 + 2 * c;
#pragma unroll
            for (int hh = 0; hh < 2; hh++) {
                const int j = kj[t][hh];
                if (j < tokens) {
                    *(u32*)&dkp[(long long)j * HD + col] = pack_bf16(dkacc[t][n][2 * hh], dkacc[t][n][2 * hh + 1]);
                    *(u32*)&dvp[(long long)j * HD + col] = pack_bf16(dvacc[t][n][2 * hh], dvacc[t][n][2 * hh + 1]);
                }
            }
        }
}

#ifndef FA_BWD128_BM
#define FA_BWD128_BM 32
#endif
#ifndef FA_BWD128_NW
#define FA_BWD128_NW 4
#endif
#ifndef FA_BWD64_TILES
#define FA_BWD64_TILES 0  // HD 64 takes flash_bwd<64, 64, true, 4> (1: flash_bwd_tiles<64>)
#endif
#ifndef FA_BWD128_TILES
#define FA_BWD128_TILES 1  // HD 128 takes flash_bwd_tiles (0: flash_bwd<128, FA_BWD128_BM, false, FA_BWD128_NW>)
#endif
#ifndef FA_BWD128_TILE_WARPS
#define FA_BWD128_TILE_WARPS 8  // warps of flash_bwd_tiles<128> (16 keys each); _small takes 4
#endif

extern "C" __global__ void __launch_bounds__(FA_THREADS) newt_flash_bwd(
    const bf16_t* __restrict__ q, const bf16_t* __restrict__ k, const bf16_t* __restrict__ v,
    const int* __restrict__ seg, const bf16_t* __restrict__ dout, const float* __restrict__ lse,
    const float* __restrict__ delta, float* __restrict__ dq_acc, bf16_t* __restrict__ dk, bf16_t* __restrict__ dv,
    int tokens, int q_heads, int kv_heads, long long qsb, long long qsh, long long qst, long long ksb, long long ksh,
    long long kst, long long vsb, long long vsh, long long vst, long long dsb, long long dsh, long long dst,
    long long ssb, long long sst, float scale, int window) {
#if FA_BWD64_TILES
    flash_bwd_tiles<64>(q, k, v, seg, dout, lse, delta, dq_acc, dk, dv, tokens, q_heads, kv_heads, qsb, qsh, qst, ksb,
                        ksh, kst, vsb, vsh, vst, dsb, dsh, dst, ssb, sst, scale, window);
#else
    flash_bwd<64, 64, true, 4>(q, k, v, seg, dout, lse, delta, dq_acc, dk, dv, tokens, q_heads, kv_heads, qsb, qsh,
                               qst, ksb, ksh, kst, vsb, vsh, vst, dsb, dsh, dst, ssb, sst, scale, window);
#endif
}

extern "C" __global__ void __launch_bounds__(FA_BWD128_TILES ? 32 * FA_BWD128_TILE_WARPS : 32 * FA_BWD128_NW) newt_flash_bwd_hd128(
    const bf16_t* __restrict__ q, const bf16_t* __restrict__ k, const bf16_t* __restrict__ v,
    const int* __restrict__ seg, const bf16_t* __restrict__ dout, const float* __restrict__ lse,
    const float* __restrict__ delta, float* __restrict__ dq_acc, bf16_t* __restrict__ dk, bf16_t* __restrict__ dv,
    int tokens, int q_heads, int kv_heads, long long qsb, long long qsh, long long qst, long long ksb, long long ksh,
    long long kst, long long vsb, long long vsh, long long vst, long long dsb, long long dsh, long long dst,
    long long ssb, long long sst, float scale, int window) {
#if FA_BWD128_TILES
    flash_bwd_tiles<128, FA_BWD128_TILE_WARPS>(q, k, v, seg, dout, lse, delta, dq_acc, dk, dv, tokens, q_heads,
                                               kv_heads, qsb, qsh, qst, ksb, ksh, kst, vsb, vsh, vst, dsb, dsh, dst,
                                               ssb, sst, scale, window);
#else
    flash_bwd<128, FA_BWD128_BM, false, FA_BWD128_NW>(q, k, v, seg, dout, lse, delta, dq_acc, dk, dv, tokens, q_heads,
                                                      kv_heads, qsb, qsh, qst, ksb, ksh, kst, vsb, vsh, vst, dsb, dsh,
                                                      dst, ssb, sst, scale, window);
#endif
}

// flash_bwd_tiles<128, 4> (64 keys a block, 88.8 KB of shared memory) for GPUs whose blocks may
// not take the 142 KB of the 8-warp default (sm_86/sm_89: 99 KB); the launcher picks it by the
// device's opt-in limit.
extern "C" __global__ void __launch_bounds__(FA_THREADS) newt_flash_bwd_hd128_small(
    const bf16_t* __restrict__ q, const bf16_t* __restrict__ k, const bf16_t* __restrict__ v,
    const int* __restrict__ seg, const bf16_t* __restrict__ dout, const float* __restrict__ lse,
    const float* __restrict__ delta, float* __restrict__ dq_acc, bf16_t* __restrict__ dk, bf16_t* __restrict__ dv,
    int tokens, int q_heads, int kv_heads, long long qsb, long long qsh, long long qst, long long ksb, long long ksh,
    long long kst, long long vsb, long long vsh, long long vst, long long dsb, long long dsh, long long dst,
    long long ssb, long long sst, float scale, int window) {
    flash_bwd_tiles<128, 4>(q, k, v, seg, dout, lse, delta, dq_acc, dk, dv, tokens, q_heads, kv_heads, qsb, qsh, qst,
                            ksb, ksh, kst, vsb, vsh, vst, dsb, dsh, dst, ssb, sst, scale, window);
}
