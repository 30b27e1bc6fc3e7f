"""The chat page of `newt serve` in headless Chromium (Debian's package, driven by Playwright):
load it, chat two turns, watch an answer stream in, stop it, switch to the base model, compare
both side by side.

usage: browser.py URL ADAPTER_MODEL BASE_MODEL [SCREENSHOT.png]
"""
import json
import sys
import time
import urllib.request

from playwright.sync_api import expect, sync_playwright

url, adapter, base = sys.argv[1:4]
shot = sys.argv[4] if len(sys.argv) > 4 else None


def health():
    with urllib.request.urlopen(url + "/health") as r:
        return json.load(r)


def assistant_texts(page):
    return page.eval_on_selector_all(".msg.assistant", "els => els.map(e => e.textContent)")


with sync_playwright() as pw:
    browser = pw.chromium.launch(
        executable_path="/usr/bin/chromium",
        args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
              "--disable-component-update", "--disable-sync"],
    )
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    sent = []

    # The tiny model may end a turn at once; the test asks it to go on (vLLM's ignore_eos) so
    # that every answer has text to show.
    def go_on(route):
        body = json.loads(route.request.post_data)
        body["ignore_eos"] = True
        sent.append(body)
        route.continue_(post_data=json.dumps(body))

    page.route("**/v1/chat/completions", go_on)
    page.goto(url + "/")
    expect(page.locator("#status")).to_have_text("ready")
    expect(page.locator(".pane h2")).to_have_text([adapter])
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "16")

    def turn(text):
        n = len(sent)
        page.fill("#prompt", text)
        page.press("#prompt", "Enter")
        t0 = time.time()
        while len(sent) == n:
            assert time.time() - t0 < 30, "no request sent"
            page.wait_for_timeout(20)
        page.wait_for_function("document.body.dataset.state === 'idle'", timeout=120_000)

    # Two turns: the second request carries the first exchange.
    turn("What is the capital of France?")
    turn("And of Italy?")
    texts = assistant_texts(page)
    assert len(texts) == 2 and all(t.strip() for t in texts), texts
    msgs = sent[-1]["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"], msgs
    assert msgs[1]["content"] and texts[0].startswith(msgs[1]["content"]), (msgs, texts)
    assert sent[-1]["stream"] is True and sent[-1]["model"] == adapter, sent[-1]

    # A long answer streams in (its text grows while the page says it is generating) and stops.
    # The tiny model is fast: if the server finished the whole answer before the Stop reached it
    # (the page may still be drawing buffered text), there was nothing to cancel; ask again.
    page.fill("#max_tokens", "100000")
    for attempt in range(3):
        before = health()
        last = len(assistant_texts(page))
        page.fill("#prompt", "Tell me more.")
        page.press("#prompt", "Enter")
        grow = ("document.body.dataset.state === 'generating' && "
                f"(document.querySelectorAll('.msg.assistant')[{last}]?.textContent.length || 0) > {{}}")
        page.wait_for_function(grow.format(10), timeout=60_000)
        seen = len(assistant_texts(page)[last])
        page.wait_for_function(grow.format(seen), timeout=60_000)
        # Clicked in the page's own thread, so the answer cannot end between the check and the
        # click; a Stop that is already disabled means the answer ended (an end-of-text token
        # well before max_tokens): nothing to cancel, ask again.
        clicked = page.evaluate("() => { const b = document.querySelector('#stop');"
                                " if (b.disabled) return false; b.click(); return true; }")
        page.wait_for_function("document.body.dataset.state === 'idle'", timeout=30_000)
        if not clicked:
            print(f"the answer ended before Stop was clicked (attempt {attempt + 1})")
            continue
        stopped = page.locator(".msg.assistant").nth(last).inner_text()
        assert "(stopped)" in stopped, stopped
        t0 = time.time()
        while True:
            now = health()
            if now["cancelled"] > before["cancelled"] or now["completed"] > before["completed"]:
                break
            assert time.time() - t0 < 30, "the server went on generating after Stop"
            time.sleep(0.05)
        if now["cancelled"] > before["cancelled"]:
            break
        print(f"the server had finished the answer before Stop reached it (attempt {attempt + 1})")
    else:
        raise AssertionError("three answers in a row ended before Stop was clicked or reached the server")
    turns = len(assistant_texts(page))

    # Switch to the base model: the conversation stays, the next answer is the base model's.
    page.select_option("#model", base)
    expect(page.locator(".pane h2")).to_have_text([base])
    page.fill("#max_tokens", "16")
    turn("What is the capital of Spain?")
    assert sent[-1]["model"] == base, sent[-1]["model"]
    assert len(sent[-1]["messages"]) == 2 * turns + 1, [m["role"] for m in sent[-1]["messages"]]
    assert assistant_texts(page)[-1].strip()

    # Side by side: one question, both models answer in their own pane.
    page.select_option("#model", index=2)
    expect(page.locator(".pane h2")).to_have_text([adapter, base])
    page.click("#clear")
    n = len(sent)
    turn("What is the capital of France?")
    while len(sent) < n + 2:
        page.wait_for_timeout(20)
    page.wait_for_function("document.body.dataset.state === 'idle'", timeout=120_000)
    assert sorted(b["model"] for b in sent[-2:]) == sorted([adapter, base]), [b["model"] for b in sent[-2:]]
    panes = page.eval_on_selector_all(".pane", "ps => ps.map(p => p.querySelector('.msg.assistant')?.textContent || '')")
    assert len(panes) == 2 and all(p.strip() for p in panes), panes
    if shot:
        page.screenshot(path=shot, full_page=True)
    assert not errors, errors
    browser.close()
print(f"chromium: two turns, streaming, stop, base model, side by side: ok ({len(sent)} requests)")
