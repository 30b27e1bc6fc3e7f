"""newt's outputs after training with a token new to the vocabulary, read by transformers and
PEFT: the merged folder's tokenizer gives the token one id (the new last row); the merged model
and base+adapter (PEFT, after resize_token_embeddings(len(tokenizer))) give the same logits;
the new token's trained embedding differs from the mean row it started at."""
import sys

import peft
import torch
import transformers

base, out = sys.argv[1], sys.argv[2]
tok = transformers.AutoTokenizer.from_pretrained(f"{out}/merged")
text = "<|newt_tool|> Final answer: 6"
ids = tok(text, add_special_tokens=False).input_ids
print(f"transformers {transformers.__version__}, peft {peft.__version__}")
print(f"merged tokenizer: len {len(tok)}; {text!r} -> {ids} ({tok.convert_ids_to_tokens(ids)[:2]} ...)")
merged = transformers.AutoModelForCausalLM.from_pretrained(f"{out}/merged", dtype=torch.float32).eval()
print(f"merged model: vocab_size {merged.config.vocab_size}, embed {tuple(merged.get_input_embeddings().weight.shape)}")
model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
old = model.get_input_embeddings().weight.detach().clone()
model.resize_token_embeddings(len(tok))
tuned = peft.PeftModel.from_pretrained(model, out).eval()
x = torch.tensor([ids])
with torch.no_grad():
    a = merged(x).logits
    b = tuned(x).logits
print(f"max |merged - PEFT(base resized + adapter)| logits: {(a - b).abs().max().item():.3g}")
new_row = merged.get_input_embeddings().weight[len(tok) - 1].detach()
print(f"new token's embedding vs the old rows' mean: max |diff| {(new_row - old.mean(0)).abs().max().item():.3g} (trained away from it)")
# The pipeline's template (chatml), written out.
prompt = "<|im_start|>user\nWhat is 2 times 3?<|im_end|>\n<|im_start|>assistant\n"
p = tok(prompt, return_tensors="pt", add_special_tokens=False)
with torch.no_grad():
    g = merged.generate(**p, max_new_tokens=6, do_sample=False)
new = g[0, p.input_ids.shape[1]:].tolist()
with torch.no_grad():
    first = merged(**p).logits[0, -1].softmax(-1)
rank = int((first > first[len(tok) - 1]).sum())
print(f"first answer token: p(<|newt_tool|>) = {first[len(tok) - 1].item():.3f}, rank {rank} of {len(tok)}")
print(f"greedy answer ids {new}: {tok.decode(new)!r}; emits the new token first: {new[:1] == [len(tok) - 1]}")
