#!/usr/bin/env python3
"""The peer of newt's tokenize + pack benchmark: transformers + `datasets.map`, doing what
Axolotl does with a chat_template dataset, on the same generated conversations.

    cargo run -p newt-data --example bench_tokenize_pack -- --rows 20000 --generate-only
    python3 scripts/data_bench_peer.py --data /tmp/newt-bench/chats.jsonl [--num-proc N]

Work measured (as newt's tokenize + pack):
- tokenize: `Dataset.map(batched=True, num_proc=N)` with Axolotl's ChatTemplateStrategy
  algorithm (the per-turn find_turn re-rendering; code in scripts/data_goldens.py, which the
  golden tests check newt against), then Axolotl's length and no-trainable-token filters;
- pack: shuffle (seed 42), split off 1% for evaluation, first-fit-decreasing bins of
  sequence_len (a segment tree, as newt's), and write packed rows (input_ids, labels,
  position_ids, seq_lens) to Parquet with pyarrow.
Loading the JSON file into a Dataset (newt's fetch) is timed apart.

`--algorithm single-render` swaps Axolotl's per-turn re-rendering for newt's algorithm written in
Python (one render, one batched tokenizer call with offsets per batch): a stronger peer.

Prints rows/s, tokens/s and peak memory (ru_maxrss of this process and its worker processes).
"""

import argparse
import math
import os
import resource
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data_goldens as golden  # noqa: E402

from datasets import disable_caching, load_dataset  # noqa: E402

CFG = {"sequence_len": 2048}
DS = {"type": "chat_template"}
_TOK = None


def tokenize_batch(batch):
    """Axolotl's batched tokenize_prompt: one row at a time through _tokenize_single_prompt."""
    global _TOK
    if _TOK is None:
        _TOK = golden.load_tokenizer("smollm2")
    template = _TOK.chat_template
    out = {"input_ids": [], "labels": []}
    for messages in batch["messages"]:
        s = golden.tokenize_chat(_TOK, template, CFG, DS, {"messages": messages})
        out["input_ids"].append(s["input_ids"])
        out["labels"].append(s["labels"])
    return out


def tokenize_batch_single_render(batch):
    """A faster peer than Axolotl: newt's algorithm in Python. Render each conversation once,
    tokenize once with offsets (a batched fast-tokenizer call), label each assistant turn's
    content span and the EOS after it. Gives Axolotl's labels on these conversations."""
    global _TOK
    if _TOK is None:
        _TOK = golden.load_tokenizer("smollm2")
    texts = [_TOK.apply_chat_template(m, tokenize=False) for m in batch["messages"]]
    enc = _TOK(texts, add_special_tokens=False, return_offsets_mapping=True)
    eos = _TOK.eos_token_id
    out = {"input_ids": [], "labels": []}
    for messages, text, ids, offsets in zip(batch["messages"], texts, enc["input_ids"], enc["offset_mapping"]):
        labels = [-100] * len(ids)
        cursor, t = 0, 0
        for m in messages:
            start = text.find(m["content"], cursor)
            end = start + len(m["content"])
            cursor = end
            if m["role"] != "assistant" or start < 0:
                continue
            while t < len(ids) and offsets[t][1] <= start:
                t += 1
            while t < len(ids) and offsets[t][0] < end:
                labels[t] = ids[t]
                t += 1
            if t < len(ids) and ids[t] == eos:
                labels[t] = eos
        out["input_ids"].append(ids)
        out["labels"].append(labels)
    return out


def keep(sample):
    """Axolotl's drop_long_seq (min 2, max sequence_len) and drop_no_trainable_tokens."""
    n = len(sample["input_ids"])
    return 2 <= n <= CFG["sequence_len"] and any(label != -100 for label in sample["labels"])


def first_fit_decreasing(lengths, capacity):
    n = len(lengths)
    order = sorted(range(n), key=lambda i: (-lengths[i], i))
    size = 1
    while size < n:
        size *= 2
    tree = np.zeros(2 * size, dtype=np.int64)
    tree[size:size + n] = capacity
    for node in range(size - 1, 0, -1):
        tree[node] = max(tree[2 * node], tree[2 * node + 1])
    bins = []
    for item in order:
        length = lengths[item]
        node = 1
        while node < size:
            node = 2 * node if tree[2 * node] >= length else 2 * node + 1
        b = node - size
        tree[node] -= length
        node //= 2
        while node >= 1:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
        while b >= len(bins):
            bins.append([])
        bins[b].append(item)
    return bins


def write_packed(path, bins, ids_flat, labels_flat, offsets):
    writer = None
    for start in range(0, len(bins), 1024):
        chunk = bins[start:start + 1024]
        ids, labels, pos, lens, row_off, len_off = [], [], [], [], [0], [0]
        for b in chunk:
            for s in b:
                a, e = offsets[s], offsets[s + 1]
                ids.append(ids_flat[a:e])
                labels.append(labels_flat[a:e])
                pos.append(np.arange(e - a, dtype=np.int32))
                lens.append(e - a)
            row_off.append(row_off[-1] + sum(offsets[s + 1] - offsets[s] for s in b))
            len_off.append(len_off[-1] + len(b))
        off = pa.array(row_off, pa.int32())
        table = pa.table({
            "input_ids": pa.ListArray.from_arrays(off, pa.array(np.concatenate(ids), pa.int32())),
            "labels": pa.ListArray.from_arrays(off, pa.array(np.concatenate(labels), pa.int32())),
            "position_ids": pa.ListArray.from_arrays(off, pa.array(np.concatenate(pos), pa.int32())),
            "seq_lens": pa.ListArray.from_arrays(pa.array(len_off, pa.int32()), pa.array(lens, pa.int32())),
        })
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema, compression="snappy")
        writer.write_table(table)
    if writer is not None:
        writer.close()


def cpu_seconds():
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def peak_rss_mib():
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return own, children


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="/tmp/newt-bench/chats.jsonl")
    ap.add_argument("--num-proc", type=int, default=os.cpu_count())
    ap.add_argument("--sequence-len", type=int, default=2048)
    ap.add_argument("--algorithm", choices=["axolotl", "single-render"], default="axolotl")
    args = ap.parse_args()
    CFG["sequence_len"] = args.sequence_len
    disable_caching()
    out = tempfile.mkdtemp(prefix="newt-peer-")

    t = time.perf_counter()
    ds = load_dataset("json", data_files=args.data, split="train", cache_dir=os.path.join(out, "cache"))
    load_s = time.perf_counter() - t
    rows = len(ds)

    t = time.perf_counter()
    cpu0 = cpu_seconds()
    fn = tokenize_batch if args.algorithm == "axolotl" else tokenize_batch_single_render
    tok = ds.map(fn, batched=True, num_proc=args.num_proc, remove_columns=ds.column_names)
    tok = tok.filter(keep, num_proc=args.num_proc)
    tok_s = time.perf_counter() - t
    tokens = int(sum(len(x) for x in tok["input_ids"]))

    t = time.perf_counter()
    tok = tok.shuffle(seed=42)
    n = len(tok)
    n_val = math.ceil(0.01 * n)
    table = tok.flatten_indices().data.table
    ids_col, labels_col = table.column("input_ids").combine_chunks(), table.column("labels").combine_chunks()
    offsets = ids_col.offsets.to_numpy()
    ids_flat = ids_col.flatten().to_numpy().astype(np.int32)
    labels_flat = labels_col.flatten().to_numpy().astype(np.int32)
    lengths = np.diff(offsets).tolist()
    train = list(range(n - n_val))
    val = list(range(n - n_val, n))
    bins = [[train[i] for i in b] for b in first_fit_decreasing([lengths[i] for i in train], args.sequence_len)]
    val_bins = [[val[i] for i in b] for b in first_fit_decreasing([lengths[i] for i in val], args.sequence_len)]
    write_packed(os.path.join(out, "train.parquet"), bins, ids_flat, labels_flat, offsets)
    write_packed(os.path.join(out, "val.parquet"), val_bins, ids_flat, labels_flat, offsets)
    pack_s = time.perf_counter() - t
    cpu = cpu_seconds() - cpu0
    packed_tokens = sum(lengths[i] for i in train)

    own, children = peak_rss_mib()
    total = tok_s + pack_s
    print(f"peer        transformers + datasets.map, num_proc {args.num_proc}, algorithm {args.algorithm}")
    print(f"load        {load_s:.2f} s  {rows / load_s:.0f} rows/s")
    print(f"tokenize    {tok_s:.2f} s  {rows / tok_s:.0f} rows/s  {tokens / tok_s:.0f} tokens/s  ({n} samples, {tokens} tokens)")
    print(f"pack        {pack_s:.2f} s  ({len(bins)} rows, efficiency {packed_tokens / (len(bins) * args.sequence_len):.3f}, {len(val_bins)} val rows)")
    print(f"tokenize+pack {total:.2f} s  {rows / total:.0f} rows/s  {tokens / total:.0f} tokens/s")
    print(f"cpu time    {cpu:.2f} s for tokenize+pack (this process and its workers)  {rows / cpu:.0f} rows per CPU-second")
    print(f"peak RSS    {own:.0f} MiB main process, {children:.0f} MiB largest worker (ru_maxrss)")


if __name__ == "__main__":
    main()
