"""The official `openai` client against `newt serve`: models, chat (plain and streamed), text
completions, model switching, errors, and a client that leaves mid-stream.

usage: openai_client.py URL ADAPTER_MODEL BASE_MODEL
"""
import json
import sys
import time
import urllib.request

import openai

url, adapter, base = sys.argv[1], sys.argv[2], sys.argv[3]
client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def health():
    with urllib.request.urlopen(url + "/health") as r:
        return json.load(r)


ids = [m.id for m in client.models.list().data]
assert ids == [adapter, base], ids

messages = [{"role": "user", "content": "What is the capital of France?"}]
extra = {"ignore_eos": True}
full = client.chat.completions.create(model=adapter, messages=messages, temperature=0, max_tokens=20, extra_body=extra)
assert full.object == "chat.completion", full
assert full.model == adapter
assert full.choices[0].message.role == "assistant"
assert full.choices[0].finish_reason == "length"
assert full.usage.completion_tokens == 20, full.usage
text = full.choices[0].message.content
assert text, full

# Streaming: the same greedy text, in pieces, usage last.
pieces, finish, usage = [], None, None
stream = client.chat.completions.create(
    model=adapter, messages=messages, temperature=0, max_tokens=20, stream=True,
    stream_options={"include_usage": True}, extra_body=extra,
)
for chunk in stream:
    if chunk.usage:
        usage = chunk.usage
    for c in chunk.choices:
        if c.delta.content:
            pieces.append(c.delta.content)
        finish = c.finish_reason or finish
assert "".join(pieces) == text, (pieces, text)
assert len(pieces) > 3, pieces
assert finish == "length" and usage.completion_tokens == 20, (finish, usage)

# A second turn carries the first: its prompt is longer.
turn2 = messages + [{"role": "assistant", "content": text}, {"role": "user", "content": "And of Italy?"}]
second = client.chat.completions.create(model=adapter, messages=turn2, temperature=0, max_tokens=8, extra_body=extra)
assert second.usage.prompt_tokens > full.usage.prompt_tokens, (second.usage, full.usage)

# Switching models: the base model answers, differently.
b = client.chat.completions.create(model=base, messages=messages, temperature=0, max_tokens=20, extra_body=extra)
assert b.model == base and b.choices[0].message.content != text, (b, text)

# Seeded sampling repeats itself.
s1 = client.chat.completions.create(model=adapter, messages=messages, temperature=1.0, top_p=0.9, seed=7, max_tokens=12, extra_body=extra)
s2 = client.chat.completions.create(model=adapter, messages=messages, temperature=1.0, top_p=0.9, seed=7, max_tokens=12, extra_body=extra)
assert s1.choices[0].message.content == s2.choices[0].message.content

# Text completions.
c = client.completions.create(model=base, prompt="The capital of France is", max_tokens=6, temperature=0, extra_body=extra)
assert c.object == "text_completion" and c.usage.completion_tokens == 6, c

# Errors come back as the client's exception types.
try:
    client.chat.completions.create(model="no-such-model", messages=messages)
    raise AssertionError("unknown model accepted")
except openai.NotFoundError as e:
    assert e.status_code == 404 and "no-such-model" in str(e), e
try:
    client.chat.completions.create(model=adapter, messages=messages, temperature=9)
    raise AssertionError("temperature 9 accepted")
except openai.BadRequestError as e:
    assert e.status_code == 400 and "temperature" in str(e), e
try:
    client.chat.completions.create(model=adapter, messages=[{"role": "user", "content": "Paris " * 9000}])
    raise AssertionError("a prompt longer than the context accepted")
except openai.BadRequestError as e:
    assert "maximum context length" in str(e), e

# A client that leaves mid-stream stops its generation.
before = health()
stream = client.chat.completions.create(
    model=adapter, messages=messages, temperature=0, max_tokens=100000, stream=True, extra_body=extra
)
got = 0
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        got += 1
        if got == 3:
            break
stream.close()
deadline = time.time() + 30
while health()["cancelled"] <= before["cancelled"]:
    assert time.time() < deadline, health()
    time.sleep(0.05)
after = health()
generated = after["tokens"] - before["tokens"]
assert generated < 1500, f"generation went on after the client left: {generated} tokens"
# The server still answers.
again = client.chat.completions.create(model=adapter, messages=messages, temperature=0, max_tokens=20, extra_body=extra)
assert again.choices[0].message.content == text
print(f"openai {openai.__version__}: models, chat, stream, completions, errors, disconnect after {generated} tokens: ok")
