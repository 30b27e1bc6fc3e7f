//! Convert between GGUF and Hugging Face folders with newt's importer/exporter.
//!
//!     cargo run -p newt-model --example gguf_convert -- import MODEL.gguf OUT_DIR
//!     cargo run -p newt-model --example gguf_convert -- export HF_DIR OUT.gguf q8_0|f16|f32

use std::path::Path;
use std::time::Instant;

use newt_model::gguf::{GgufType, export_gguf, import_to_hf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let t = Instant::now();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["import", gguf, out] => {
            let s = import_to_hf(Path::new(gguf), Path::new(out))?;
            println!(
                "imported {} ({} tensors, {} params, vocab {}, source types {:?}) into {out} in {:.1}s",
                s.arch,
                s.n_tensors,
                s.n_params,
                s.vocab_size,
                s.source_types,
                t.elapsed().as_secs_f64()
            );
        }
        ["export", dir, out, ty] => {
            let ty = GgufType::parse(ty).ok_or(format!("unknown GGUF type `{ty}` (f32, f16, q8_0)"))?;
            export_gguf(Path::new(dir), Path::new(out), ty)?;
            let size = std::fs::metadata(out)?.len();
            println!("exported {dir} to {out} ({size} bytes) in {:.1}s", t.elapsed().as_secs_f64());
        }
        _ => return Err("usage: gguf_convert import FILE.gguf OUT_DIR | export HF_DIR OUT.gguf f32|f16|q8_0".into()),
    }
    Ok(())
}
