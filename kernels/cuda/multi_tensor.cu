// Many f32 tensors to one flat vector and back, in one launch per MT_MAX tensors: the gradients
// and parameters the optimizer updates as one vector (stages/model's AdamW), where Burn's `cat`
// is one slice-assign launch per tensor and the way back one slice per tensor.
//
// A table of up to MT_MAX tensors travels by value as the kernel's parameter: their addresses,
// their element offsets within this table's part of the flat vector (`start[count]` is that
// part's length) and where the part begins (`base`). Each thread finds its tensor by binary
// search over `start`. Compiled with the other kernels as one module: names carry `mt_`/`MT_`.

#define MT_MAX 48

struct MtTable {
  unsigned long long ptr[MT_MAX];
  long long start[MT_MAX + 1];
  long long base;
  int count;
};

__device__ __forceinline__ int mt_find(const MtTable& t, long long e) {
  int lo = 0, hi = t.count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (t.start[mid] <= e) lo = mid; else hi = mid - 1;
  }
  return lo;
}

extern "C" __global__ void newt_flat_gather(const MtTable t, float* __restrict__ flat) {
  const long long total = t.start[t.count];
  for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total;
       e += (long long)gridDim.x * blockDim.x) {
    const int i = mt_find(t, e);
    flat[t.base + e] = ((const float*)t.ptr[i])[e - t.start[i]];
  }
}

extern "C" __global__ void newt_flat_scatter(const MtTable t, const float* __restrict__ flat) {
  const long long total = t.start[t.count];
  for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total;
       e += (long long)gridDim.x * blockDim.x) {
    const int i = mt_find(t, e);
    ((float*)t.ptr[i])[e - t.start[i]] = flat[t.base + e];
  }
}
