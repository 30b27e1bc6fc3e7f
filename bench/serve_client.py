#!/usr/bin/env python3
"""Clients of `newt serve` (stdlib only): N concurrent streamed /v1/completions requests, each
generating exactly --new tokens (ignore_eos) after a --prompt-len prompt of random token text;
time to first token and tokens/s per client and in all."""
import argparse, json, random, threading, time, urllib.request

p = argparse.ArgumentParser()
p.add_argument("url")
p.add_argument("--clients", type=int, default=1)
p.add_argument("--new", type=int, default=128)
p.add_argument("--prompt-words", type=int, default=24)
p.add_argument("--model", default=None)
a = p.parse_args()


def one(i, out):
    r = random.Random(i)
    prompt = " ".join(f"w{r.randrange(3000)}" for _ in range(a.prompt_words))
    body = {"prompt": prompt, "max_tokens": a.new, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    if a.model:
        body["model"] = a.model
    req = urllib.request.Request(a.url + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
    t0 = time.perf_counter()
    first = None
    usage = None
    with urllib.request.urlopen(req, timeout=600) as resp:
        for line in resp:
            line = line.decode().strip()
            if not line.startswith("data:") or line.endswith("[DONE]"):
                continue
            chunk = json.loads(line[5:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter() - t0
    total = time.perf_counter() - t0
    n = usage["completion_tokens"]
    out[i] = {"first_token_s": first, "total_s": total, "tokens": n, "prompt_tokens": usage["prompt_tokens"],
              "decode_tokens_per_s": (n - 1) / (total - first)}


# Warm-up (kernel compilation, caches).
one(-1, {})
res = {}
t0 = time.perf_counter()
threads = [threading.Thread(target=one, args=(i, res)) for i in range(a.clients)]
for t in threads:
    t.start()
for t in threads:
    t.join()
wall = time.perf_counter() - t0
rows = [res[i] for i in range(a.clients)]
print(json.dumps({"system": "newt serve", "clients": a.clients, "new_tokens": a.new,
                  "first_token_s": [round(r["first_token_s"], 4) for r in rows],
                  "per_client_decode_tokens_per_s": [round(r["decode_tokens_per_s"], 1) for r in rows],
                  "aggregate_tokens_per_s": round(sum(r["tokens"] for r in rows) / wall, 1),
                  "prompt_tokens": rows[0]["prompt_tokens"], "wall_s": round(wall, 3)}))
