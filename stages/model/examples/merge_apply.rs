//! Merge a PEFT LoRA adapter into a Hugging Face model folder with newt's streaming merge.
//!
//!     cargo run -p newt-model --example merge_apply -- BASE_DIR ADAPTER_DIR OUT_DIR [bf16|f16|f32]
//!
//! Used by scripts/merge_peft_check.py, which compares the result with PEFT and transformers.

use std::path::Path;

use newt_model::merge::{MergeOptions, merge_lora};
use newt_model::tensors::Dtype;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 {
        return Err("usage: merge_apply BASE_DIR ADAPTER_DIR OUT_DIR [bf16|f16|f32]".into());
    }
    let out_dtype = match args.get(3).map(String::as_str) {
        None => None,
        Some(d) => {
            Some(Dtype::from_torch(d).or_else(|| Dtype::from_safetensors(&d.to_uppercase())).ok_or("bad dtype")?)
        }
    };
    let opts = MergeOptions { out_dtype, ..Default::default() };
    let s = merge_lora(Path::new(&args[0]), Path::new(&args[1]), Path::new(&args[2]), opts)?;
    println!(
        "merged {} tensors ({} with LoRA, {} replaced), vocab {:?}, untied {}, scale {}",
        s.n_tensors, s.n_lora, s.n_replaced, s.vocab_size, s.untied, s.scale
    );
    Ok(())
}
