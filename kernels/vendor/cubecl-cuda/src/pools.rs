//! newt patch: the memory pools' layout.
//!
//! CubeCL's default layout (`SubSlices`) carves allocations out of pages whose size grows by
//! four from pool to pool, up to a quarter of the device (20 GB on an 80 GB card), and never
//! gives a page back during a run: a training step's transient tensors of 312 MB to 2.5 GB open
//! pages of 5 GB. newt's layout ([`NEWT_LAYOUT`]) keeps every tensor from 16 MB to 512 MB in
//! pages of 512 MB and gives each larger one a page of its own; measured on the H100 with the
//! same steps and losses, pages of 2 GB for everything up to 2 GB lowered the process's peak by
//! 3.7 GiB on Llama-3.1-8B LoRA (2×4096, checkpointing) and by 5.4 GiB on Llama-3.2-1B (4×2048),
//! and pages of 512 MB by another 1.07 GiB on that 8B run, at the same speed
//! (bench/results/gpu_8b.md).
//!
//! `NEWT_CUDA_POOLS` sets another layout without a rebuild, so layouts can be measured on one
//! binary:
//!
//! - `subslices` (CubeCL's default), `exclusive` (CubeCL's one-allocation-per-page preset);
//! - a list of pools, smallest first, separated by commas: `sliced:PAGE:MAX` (slices of at most
//!   MAX bytes carved out of pages of PAGE bytes) or `exclusive:MAX` (one allocation per page, up
//!   to MAX bytes). Sizes take a `k`, `m` or `g` suffix (powers of 1024) and are rounded up to
//!   the device's alignment. An allocation goes to the first pool that takes it.

pub use cubecl_core::MemoryConfiguration;
use cubecl_runtime::memory_management::{MemoryPoolOptions, PoolType};

/// newt's layout: small tensors in pages of 20 MB, up to 16 MB in pages of 128 MB, up to 512 MB
/// in pages of 512 MB, anything larger in a page of its own (CubeCL's exclusive pools size a new
/// page by the running mean of their requests, starting from half their limit: hence a pool per
/// doubling rather than one for everything above 512 MB). Which tensors made the 1.07 GiB
/// this saved on the 8B run is not traced; an 8B model's embedding and head (1.05 GB each in
/// bf16) were slices of 2 GB pages before and now have pages of their own.
pub const NEWT_LAYOUT: &str = "sliced:20m:1m,sliced:128m:16m,sliced:512m:512m,exclusive:1g,exclusive:2g,\
                               exclusive:4g,exclusive:8g,exclusive:16g,exclusive:64g";

/// The layout `NEWT_CUDA_POOLS` names, or newt's when it is unset or empty.
///
/// # Panics
/// When the variable is set to something that is not a layout: a typo must not silently measure
/// another layout.
pub(crate) fn configured(alignment: u64) -> MemoryConfiguration {
    let spec = std::env::var("NEWT_CUDA_POOLS").unwrap_or_default();
    let spec = match spec.trim() {
        "" => NEWT_LAYOUT,
        other => other,
    };
    parse(spec, alignment).unwrap_or_else(|e| panic!("NEWT_CUDA_POOLS={spec:?}: {e}"))
}

/// The layout a `NEWT_CUDA_POOLS` value names (see the module's doc), sizes rounded up to
/// `alignment`.
pub fn parse(spec: &str, alignment: u64) -> Result<MemoryConfiguration, String> {
    match spec {
        "subslices" => return Ok(MemoryConfiguration::SubSlices),
        "exclusive" => return Ok(MemoryConfiguration::ExclusivePages),
        _ => {}
    }
    let mut pool_options = vec![
        // Allocations smaller than the alignment cannot take offsets: CubeCL's presets give
        // them a pool of their own too.
        MemoryPoolOptions {
            pool_type: PoolType::ExclusivePages { max_alloc_size: 0 },
            dealloc_period: None,
        },
    ];
    for pool in spec.split(',') {
        let parts: Vec<&str> = pool.trim().split(':').collect();
        let pool_type = match parts.as_slice() {
            ["sliced", page, max] => {
                let (page, max) = (size(page, alignment)?, size(max, alignment)?);
                if max > page {
                    return Err(format!("a slice of {max} bytes does not fit a page of {page}"));
                }
                PoolType::SlicedPages { page_size: page, max_slice_size: max }
            }
            ["exclusive", max] => PoolType::ExclusivePages { max_alloc_size: size(max, alignment)? },
            _ => return Err(format!("{pool:?} is not sliced:PAGE:MAX or exclusive:MAX")),
        };
        pool_options.push(MemoryPoolOptions { pool_type, dealloc_period: None });
    }
    Ok(MemoryConfiguration::Custom { pool_options })
}

fn size(text: &str, alignment: u64) -> Result<u64, String> {
    let text = text.trim().to_ascii_lowercase();
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => text.split_at(i),
        None => (text.as_str(), ""),
    };
    let unit: u64 = match unit {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        _ => return Err(format!("{text:?} is not a size (a number, then k, m or g)")),
    };
    let n: u64 = digits.parse().map_err(|_| format!("{text:?} is not a size"))?;
    if n == 0 {
        return Err(format!("{text:?}: a pool needs a size above zero"));
    }
    Ok((n * unit).next_multiple_of(alignment))
}
