//! `newt kernels`: fast kernels against their references, with timings.

use newt_kernels::KernelBackend;
use newt_kernels::check::{self, CheckRow};
use newt_model::backend::{self, BackendChoice, ResolvedBackend, WithAutodiffBackend};

use crate::cli::Cli;

/// Linears of the benchmark shapes at 4×2048 tokens: SmolLM2-135M, Llama-3.2-1B, a square one.
const DEFAULT_SHAPES: &[[usize; 3]] = &[
    [8192, 576, 576],
    [8192, 576, 1536],
    [8192, 1536, 576],
    [8192, 2048, 2048],
    [8192, 2048, 512],
    [8192, 2048, 8192],
    [8192, 8192, 2048],
    [8192, 8192, 8192],
];

struct Check {
    shapes: Vec<[usize; 3]>,
    /// `[batch, q_heads, kv_heads, tokens]` of the flash attention rows (head_dim 64).
    attention: Vec<[usize; 4]>,
    /// `[rows, vocab]` of the loss's cross-entropy rows.
    loss: Vec<[usize; 2]>,
    reps: usize,
}

impl WithAutodiffBackend for Check {
    type Output = ();

    fn run<B: burn::tensor::backend::AutodiffBackend + KernelBackend>(self, device: B::Device)
    where
        B::InnerBackend: KernelBackend,
    {
        // The correctness checks first: the timing table below autotunes Burn's own matmul for
        // every shape, which on a cold GPU can take minutes. SwiGLU (elementwise, nothing to
        // autotune) leads, at the 8B MLP's width when the shapes are a GPU's.
        let [t, i, o] = self.shapes[0];
        println!(
            "{:<7} {:>17} {:>11} {:>10} {:>10} {:>10} {:>10}",
            "swiglu", "rows×n", "max rel err", "newt ms", "burn ms", "newt TB/s", "burn TB/s"
        );
        let mlp = if t >= 8192 { 14336 } else { o.max(i) };
        print_row(&check::swiglu::<B::InnerBackend>(&device, t, mlp, self.reps));
        let g = check::matmul_gradients::<B>(&device, t.min(1024), i, o);
        println!(
            "dense_matmul under autodiff vs Burn matmul, max rel err: y {:.2e}, dx {:.2e}, dW {:.2e}",
            g[0], g[1], g[2]
        );
        let n = check::nf4::<B::InnerBackend>(&device, t.min(1024), i, o);
        println!("nf4: dequantized weight vs host, max rel err {:.2e}; nf4_linear vs dense_matmul {:.2e}", n[0], n[1]);
        println!(
            "{:<7} {:>17} {:>11} {:>10} {:>10} {:>10} {:>10}",
            "lora", "t×in×out/r", "max rel err", "newt ms", "burn ms", "newt TF/s", "burn TF/s"
        );
        for &[t, i, o] in &self.shapes {
            print_row(&check::lora::<B::InnerBackend>(&device, t, i, o, 32, self.reps));
        }
        print_matmul_calls();
        println!(
            "{:<7} {:>17} {:>11} {:>10} {:>10} {:>10} {:>10}",
            "rmsnorm", "rows×n", "max rel err", "newt ms", "burn ms", "newt TB/s", "burn TB/s"
        );
        for &[t, i, _] in &self.shapes {
            print_row(&check::rms_norm::<B::InnerBackend>(&device, t, i, self.reps));
        }
        for &[b, hq, _, tokens] in &self.attention {
            print_row(&check::rope::<B::InnerBackend>(&device, b, tokens, hq, 64, self.reps));
        }
        for &[rows, vocab] in &self.loss {
            print_row(&check::cross_entropy::<B::InnerBackend>(&device, rows, vocab, self.reps));
        }
        // A LoRA's parameters, r = 32 on every linear of 30 layers of the first shape's width.
        let sizes: Vec<usize> = (0..30 * 7).flat_map(|_| [32 * i, o * 32]).collect();
        print_row(&check::flat::<B::InnerBackend>(&device, &sizes, self.reps));
        println!(
            "{:<7} {:>17} {:>11} {:>10} {:>10} {:>10} {:>10}",
            "flash", "b×hq/hkv×t", "max rel err", "newt ms", "burn ms", "newt TF/s", "burn TF/s"
        );
        for &[b, hq, hkv, tokens] in &self.attention {
            print_row(&check::flash::<B::InnerBackend>(&device, b, hq, hkv, tokens, self.reps));
        }
        println!(
            "{:<7} {:>17} {:>11} {:>10} {:>10} {:>10} {:>10}",
            "matmul", "m×k×n", "max rel err", "newt ms", "burn ms", "newt TF/s", "burn TF/s"
        );
        for &[t, i, o] in &self.shapes {
            for r in check::matmul::<B::InnerBackend>(&device, t, i, o, self.reps) {
                print_row(&r);
            }
        }
    }
}

fn print_row(r: &CheckRow) {
    use std::io::Write;
    println!(
        "{:<7} {:>17} {:>11.2e} {:>10.3} {:>10.3} {:>10.1} {:>10.1}",
        r.op, r.shape, r.max_rel_err, r.fast_ms, r.reference_ms, r.fast_tflops, r.reference_tflops
    );
    let _ = std::io::stdout().flush();
}

fn parse_shape(s: &str) -> anyhow::Result<[usize; 3]> {
    let v: Vec<usize> = s.split(',').map(|p| p.trim().parse()).collect::<Result<_, _>>()?;
    match v[..] {
        [t, i, o] if t > 0 && i > 0 && o > 0 => Ok([t, i, o]),
        _ => anyhow::bail!("--shape wants three positive numbers `tokens,in,out`, got `{s}`"),
    }
}

pub fn kernels(cli: &Cli, backend_name: &str, shapes: &[String], reps: usize) -> anyhow::Result<i32> {
    let choice: BackendChoice = backend_name.parse()?;
    let resolved = backend::resolve(choice)?;
    let shapes = if shapes.is_empty() {
        match resolved {
            ResolvedBackend::Cpu => vec![[256, 576, 576], [256, 576, 1536]],
            _ => DEFAULT_SHAPES.to_vec(),
        }
    } else {
        shapes.iter().map(|s| parse_shape(s)).collect::<anyhow::Result<_>>()?
    };
    if resolved != ResolvedBackend::Cpu {
        let root = cli.cache_dir.clone().unwrap_or_else(newt_cache::Cache::default_root);
        backend::configure_kernel_cache(&root)?;
    }
    println!("backend: {} ({})", resolved.name(), resolved.dtype_name());
    // The attention of the benchmark shapes (SmolLM2-135M, Llama-3.2-1B) on a GPU; a small
    // packed case on the CPU.
    let attention = match resolved {
        ResolvedBackend::Cpu => vec![[1, 4, 2, 512]],
        _ => vec![[4, 9, 3, 2048], [4, 32, 8, 2048]],
    };
    // One chunk of the loss at SmolLM2's and Llama 3's vocabularies on a GPU (at most 256 MiB of
    // f32 logits a chunk: newt_model::llama::default_chunk_tokens); 64 rows on the CPU.
    let chunk = |vocab: usize| [newt_model::llama::default_chunk_tokens(vocab), vocab];
    let loss = match resolved {
        ResolvedBackend::Cpu => vec![[64, 49152]],
        _ => vec![chunk(49152), chunk(128256)],
    };
    backend::dispatch_autodiff(resolved, Check { shapes, attention, loss, reps: reps.max(1) });
    print_matmul_calls();
    Ok(0)
}

/// How many CUDA products went to cuBLASLt so far (nothing on the CPU).
fn print_matmul_calls() {
    let (lt, fallback) = newt_kernels::matmul::cuda_dense_matmul_calls();
    if lt + fallback > 0 {
        println!("CUDA dense_matmul calls: {lt} through cuBLASLt, {fallback} fell back to CubeCL's matmul");
    }
}

/// `newt kernels --decode`: the decoding step as one operation against the layers in Burn
/// operations (`newt_model::decode_check`), 3 rows at different lengths, 24 steps; a `--model`
/// is checked as it is and with a LoRA adapter.
pub fn decode(cli: &Cli, backend_name: &str, model: Option<&std::path::Path>) -> anyhow::Result<i32> {
    let choice: BackendChoice = backend_name.parse()?;
    let resolved = backend::resolve(choice)?;
    if resolved != ResolvedBackend::Cpu {
        let root = cli.cache_dir.clone().unwrap_or_else(newt_cache::Cache::default_root);
        backend::configure_kernel_cache(&root)?;
    }
    println!("backend: {} ({})", resolved.name(), resolved.dtype_name());
    let mut dirs = Vec::new();
    let _keep;
    match model {
        Some(dir) => {
            let name = dir.file_name().map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into_owned());
            dirs.push((name.clone(), dir.to_path_buf(), false));
            dirs.push((format!("{name} + LoRA r 8"), dir.to_path_buf(), true));
        }
        None => {
            let tmp = tempfile::tempdir()?;
            let texts: Vec<String> =
                (0..64).map(|i| format!("line {i}: the quick brown fox jumps over {}", i * 7)).collect();
            for (name, hidden, heads) in [("tiny-hd64", 256, 4), ("tiny-hd128", 512, 4)] {
                let dir = tmp.path().join(name);
                let spec = newt_model::tiny::TinySpec {
                    seed: 7,
                    vocab_size: 512,
                    hidden_size: hidden,
                    intermediate_size: 2 * hidden,
                    num_hidden_layers: 3,
                    num_attention_heads: heads,
                    num_key_value_heads: 2,
                    max_position_embeddings: 2048,
                };
                newt_model::tiny::write_tiny_model(&dir, &spec, &texts)?;
                dirs.push((format!("{name} + LoRA r 8"), dir, true));
            }
            _keep = tmp;
        }
    }
    backend::dispatch(resolved, DecodeCheck { dirs })
}

struct DecodeCheck {
    /// (name, folder, attach a LoRA adapter with nonzero B).
    dirs: Vec<(String, std::path::PathBuf, bool)>,
}

impl backend::WithBackend for DecodeCheck {
    type Output = anyhow::Result<i32>;

    fn run<B: KernelBackend>(self, device: B::Device) -> anyhow::Result<i32> {
        println!(
            "{:<34} {:>4} {:>5} {:>6} {:>11} {:>9} {:>10} {:>10} {:>10} {:>10}",
            "decode step",
            "rows",
            "steps",
            "fused",
            "max rel err",
            "argmax",
            "fused ms",
            "layers ms",
            "launch us",
            "gpu us"
        );
        for (name, dir, lora) in self.dirs {
            let mut model = newt_model::llama::Llama::<B>::from_hf_dir(&dir, &device)?;
            if lora {
                let config = newt_model::lora::LoraConfig { r: 8, alpha: 16.0, ..Default::default() };
                model = model.with_lora(&config)?.map_linears(|_, mut lin| {
                    if let Some(ad) = lin.lora.as_mut() {
                        // A trained-looking B (a fresh one is zero and would hide the adapter).
                        ad.lora_b = burn::module::Param::from_tensor(
                            ad.lora_b.val().random_like(burn::tensor::Distribution::Uniform(-0.05, 0.05)),
                        );
                    }
                    Ok::<_, std::convert::Infallible>(lin)
                })?;
            }
            let c = newt_model::decode_check::compare_decode(&model, &[5, 17, 40], 24);
            println!(
                "{:<34} {:>4} {:>5} {:>6} {:>11.2e} {:>4}/{:<4} {:>10.3} {:>10.3} {:>10} {:>10}",
                name,
                c.rows,
                c.steps,
                c.fused_steps,
                c.max_rel_err,
                c.argmax_agree,
                c.rows * c.steps,
                c.fused_ms,
                c.reference_ms,
                c.launch_us.map_or("-".into(), |v| format!("{v:.0}")),
                c.gpu_us.map_or("-".into(), |v| format!("{v:.0}"))
            );
        }
        Ok(0)
    }
}
