#!/usr/bin/env python3
"""A long prompt arriving while another answer streams (stdlib only): stream A decodes, then B
sends a prompt of --words words (streamed, --new tokens). Measures what A's client sees while
B's prompt is read: A's longest gap between two tokens, A's tokens between B's acceptance (its
response headers) and B's first token, and B's time to first token. One JSON line."""
import argparse, http.client, json, threading, time
from urllib.parse import urlparse

p = argparse.ArgumentParser()
p.add_argument("url")
p.add_argument("--words", type=int, default=400)
p.add_argument("--new", type=int, default=8)
a = p.parse_args()
u = urlparse(a.url)


def stream(body, on_text, on_headers=None):
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    c.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = c.getresponse()
    if on_headers:
        on_headers(time.perf_counter())
    usage = None
    for line in r:
        line = line.decode().strip()
        if not line.startswith("data:") or line.endswith("[DONE]"):
            continue
        chunk = json.loads(line[5:])
        usage = chunk.get("usage") or usage
        if chunk["choices"] and chunk["choices"][0]["text"]:
            if on_text(time.perf_counter()) is False:
                break
    c.close()
    return usage


def run_b():
    words = " ".join(f"word{i % 97}" for i in range(a.words))
    marks = {}
    usage = stream({"prompt": words, "max_tokens": a.new, "temperature": 0, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}},
                   lambda t: marks.setdefault("first", t), lambda t: marks.setdefault("accepted", t))
    return marks, usage


# Warm-up: a long prompt alone (compiles, sizes the caches), then the measured run.
run_b()
a_times, stop = [], threading.Event()
ta = threading.Thread(target=stream, args=(
    {"prompt": "Paris", "max_tokens": 100000, "temperature": 0, "ignore_eos": True, "stream": True},
    lambda t: (a_times.append(t), not stop.is_set())[1]))
ta.start()
while len(a_times) < 20:
    time.sleep(0.01)
sent = time.perf_counter()
marks, usage = run_b()
time.sleep(0.5)
stop.set()
ta.join()
window = [t for t in a_times if marks["accepted"] < t < marks["first"]]
gaps = [b - x for x, b in zip(a_times, a_times[1:]) if b > sent]
before = [b - x for x, b in zip(a_times, a_times[1:]) if b <= sent]
print(json.dumps({"prompt_tokens": usage["prompt_tokens"],
                  "b_first_token_s": round(marks["first"] - sent, 3),
                  "a_tokens_while_b_read": len(window),
                  "a_longest_gap_s": round(max(gaps), 3),
                  "a_median_gap_before_s": round(sorted(before)[len(before) // 2], 4)}))
