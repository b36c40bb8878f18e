"""Generate text from an artifact, with and without a SLOT delta fitted on the prompt, side by side.

The prompt is tokenized (SentencePiece, a BOS first as in the training documents) and run once through the
model, filling a KV cache. SLOT then fits one hidden-state delta on every prompt position (train_gpt.fit_delta:
AdamW on the cached raw logits, one group) and both continuations are decoded from copies of that cache, the
second with the delta added to the final hidden state at every step. Sampling uses the same seed for both, so
they differ only through the delta. Each step costs one token through the trunk (KV cache), not the whole
context; when the context reaches --context tokens the cache is rebuilt from its last half.

    python tools/generate.py --artifact logs/run.ptz --prompt "The kernel scheduler" --greedy
    python tools/generate.py --artifact logs/run.ptz --prompt "def main():" --temperature 0.8 --top-k 40 --seed 1 \\
        --slot-steps 30 --slot-lr 0.02 --max-new-tokens 80

Exit status 0, or 2 on bad input (missing artifact or tokenizer, vocabulary mismatch).
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import shutil
import sys
import textwrap
import time

import torch
import torch.nn.functional as F

from _cli import Parser
from _common import ToolError, tg


def has_kv_cache(model) -> bool:
    return "cache" in inspect.signature(model.forward_hidden).parameters


def clone_cache(cache: dict) -> dict:
    """Caches are only ever extended by torch.cat (never written in place): copying the dicts is enough."""
    out = dict(cache)
    if "layers" in cache:
        out["layers"] = [dict(layer) for layer in cache["layers"]]
    return out


@torch.no_grad()
def prompt_hidden(model, ids: list[int], rope_len: int = 0, use_cache: bool = True) -> tuple[dict | None, torch.Tensor]:
    """One pass over the prompt: (KV cache or None, (T, D) fp32 final hidden states)."""
    x = torch.tensor(ids, dtype=torch.long)[None]
    if use_cache and has_kv_cache(model):
        cache = {"rope_len": rope_len}
        return cache, model.forward_hidden(x, cache)[0].float()
    return None, model.forward_hidden(x)[0].float()


@torch.no_grad()
def fit_prompt_delta(model, ids: list[int], h: torch.Tensor, cfg, steps: int, lr: float
                     ) -> tuple[torch.Tensor, float, float]:
    """One SLOT delta (1, D) fitted on every next-token target of the prompt (h: its (T, D) hidden states);
    returns (delta, prompt loss before, after)."""
    W = model.head_weight().float()
    if len(ids) < 2 or steps == 0:
        return torch.zeros(1, W.size(1)), float("nan"), float("nan")
    y = torch.tensor(ids[1:], dtype=torch.long)
    z = model.raw_logits(h[:-1])
    wt = torch.full((1, y.numel()), 1 / y.numel())
    delta = tg.fit_delta(z[None], y[None], wt, W, dataclasses.replace(cfg, slot_steps=steps, slot_lr=lr))
    before = F.cross_entropy(model.softcap(z), y).item()
    after = F.cross_entropy(model.softcap(z + tg.slot_shift(delta, W)), y).item()
    return delta, before, after


def pick(logits: torch.Tensor, greedy: bool, temperature: float, top_k: int, gen: torch.Generator) -> int:
    if greedy or temperature <= 0:
        return int(logits.argmax())
    logits = logits / temperature
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))


@torch.no_grad()
def generate(model, prompt: list[int], delta: torch.Tensor | None, max_new: int, *, greedy: bool = True,
             temperature: float = 1.0, top_k: int = 0, seed: int = 0, context: int = 1024, rope_len: int = 0,
             stop: tuple = (), use_cache: bool = True, prefill: tuple | None = None) -> list[int]:
    """New token ids after `prompt`. The delta (1, D) is added to the final hidden state at every step (None: no
    SLOT). `prefill` = (cache, last hidden) from an earlier call on the same prompt skips the prompt pass."""
    W = model.head_weight().float()
    u = (delta.float() @ W.T)[0] if delta is not None else None
    gen = torch.Generator().manual_seed(seed)
    seq, out = list(prompt), []
    use_cache = use_cache and has_kv_cache(model)

    def run_full(tokens):
        c = {"rope_len": rope_len} if use_cache else None
        x = torch.tensor(tokens, dtype=torch.long)[None]
        h = model.forward_hidden(x, c) if use_cache else model.forward_hidden(x)
        return c, h[0, -1].float()

    if use_cache and prefill is not None:
        cache, h = clone_cache(prefill[0]), prefill[1]
    else:
        cache, h = run_full(seq[-context:])
    for _ in range(max_new):
        z = model.raw_logits(h)
        tok = pick(model.softcap(z + u if u is not None else z), greedy, temperature, top_k, gen)
        out.append(tok)
        seq.append(tok)
        if tok in stop:
            break
        if not use_cache:
            _, h = run_full(seq[-context:])
        elif cache["layers"][0]["k"].size(1) >= context:  # full: rebuild from the last half (amortised O(1))
            cache, h = run_full(seq[-max(context // 2, 1):])
        else:
            h = model.forward_hidden(torch.tensor([[tok]]), cache)[0, -1].float()
    return out


def decode_continuation(sp, prompt: list[int], new: list[int]) -> str:
    """The text the new tokens add to the prompt's text (decoding them alone would drop a leading space)."""
    full, head = sp.decode(prompt + new), sp.decode(prompt)
    return full[len(head):] if full.startswith(head) else sp.decode(new)


def side_by_side(left: str, right: str, titles: tuple[str, str], width: int) -> str:
    col = max((width - 3) // 2, 20)
    wrap = lambda s: sum((textwrap.wrap(p, col, replace_whitespace=False, drop_whitespace=False) or [""]
                          for p in s.split("\n")), [])
    a, b = wrap(left), wrap(right)
    rows = [f"{titles[0][:col]:<{col}} | {titles[1][:col]}", f"{'-' * col}-+-{'-' * col}"]
    for i in range(max(len(a), len(b))):
        rows.append(f"{(a[i] if i < len(a) else ''):<{col}} | {b[i] if i < len(b) else ''}")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = Parser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", required=True, help="a saved .ptz artifact (logs/<RUN_ID>.ptz)")
    ap.add_argument("--prompt", required=True, help="the prompt text")
    ap.add_argument("--tokenizer", help="SentencePiece model (default: TOKENIZER_PATH of the config)")
    ap.add_argument("--slot-steps", type=int, default=20, help="AdamW steps on the prompt (default 20; 0: no SLOT)")
    ap.add_argument("--slot-lr", type=float, default=0.01, help="SLOT learning rate (default 0.01)")
    ap.add_argument("--greedy", action="store_true", help="argmax decoding (the default unless --temperature)")
    ap.add_argument("--temperature", type=float, help="sample at this temperature")
    ap.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed, the same for both continuations")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    ap.add_argument("--context", type=int, help="most tokens the model sees (default TRAIN_SEQ_LEN of the config)")
    ap.add_argument("--no-bos", action="store_true", help="do not start the prompt with BOS")
    ap.add_argument("--no-cache", action="store_true", help="recompute the whole context every step (slow; a check)")
    ap.add_argument("--width", type=int, help="output width (default: the terminal's)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: one-token steps are too small "
                    "to gain from more, and lose badly on a busy machine)")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(args.threads, 1))
    try:
        if args.greedy and args.temperature is not None:
            raise ToolError("--greedy and --temperature exclude each other")
        if args.max_new_tokens < 1 or args.slot_steps < 0:
            raise ToolError("--max-new-tokens must be >= 1 and --slot-steps >= 0")
        env = dict(os.environ)
        cfg = tg.Config.from_env(env)
        model, cfg = tg.load_artifact(args.artifact, cfg)
        model = model.float().eval()
        import sentencepiece as spm
        path = args.tokenizer or cfg.tokenizer_path
        if not os.path.isfile(path):
            raise ToolError(f"tokenizer {path} does not exist (pass --tokenizer or set TOKENIZER_PATH)")
        sp = spm.SentencePieceProcessor()
        try:
            sp.load(path)
        except (OSError, RuntimeError) as e:
            raise ToolError(f"{path}: not a SentencePiece model ({e})") from None
        if sp.vocab_size() != cfg.vocab_size:
            raise ToolError(f"tokenizer {path} has {sp.vocab_size()} pieces but the artifact's vocabulary is "
                            f"{cfg.vocab_size}: pass the tokenizer the model was trained with")
    except (ToolError, tg.UserError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ids = ([sp.bos_id()] if sp.bos_id() >= 0 and not args.no_bos else []) + sp.encode(args.prompt)
    context = args.context or cfg.train_seq_len
    rope_len = context if context > tg.Rotary.NTK_LEN else 0  # the RoPE base the model was trained with
    stop = tuple(i for i in (sp.bos_id(), sp.eos_id()) if i >= 0)
    use_cache = not args.no_cache and has_kv_cache(model)
    if not args.no_cache and not use_cache:
        print("note: this train_gpt.py has no KV cache (forward_hidden(ids, cache)); recomputing every step")
    ids = ids[-context:]
    t = time.perf_counter()
    cache, h = prompt_hidden(model, ids, rope_len, use_cache)
    delta, before, after = fit_prompt_delta(model, ids, h, cfg, args.slot_steps, args.slot_lr)
    fit_s = time.perf_counter() - t
    prefill = (cache, h[-1]) if cache is not None else None
    kw = dict(greedy=args.temperature is None, temperature=args.temperature or 1.0, top_k=args.top_k,
              seed=args.seed, context=context, rope_len=rope_len, stop=stop, use_cache=use_cache, prefill=prefill)
    t = time.perf_counter()
    plain = generate(model, ids, None, args.max_new_tokens, **kw)
    slotted = generate(model, ids, delta, args.max_new_tokens, **kw)
    gen_s = time.perf_counter() - t
    diverge = next((i for i, (a, b) in enumerate(zip(plain, slotted)) if a != b), None)
    mode = "greedy" if kw["greedy"] else \
        f"temperature {kw['temperature']}, top-k {args.top_k or 'all'}, seed {args.seed}"
    print(f"artifact: {args.artifact} ({cfg.num_layers}x{cfg.model_dim}, {tg.count_params(model):,} params); "
          f"tokenizer: {path}")
    print(f"prompt: {len(ids)} tokens; decoding: {mode}; {len(plain) + len(slotted)} tokens in {gen_s:.1f}s "
          f"({'KV cache' if use_cache else 'no cache'}, context {context})")
    if args.slot_steps and len(ids) >= 2:
        print(f"SLOT: {args.slot_steps} AdamW steps at lr {args.slot_lr} on {len(ids) - 1} prompt targets in "
              f"{fit_s:.2f}s: prompt loss {before:.4f} -> {after:.4f} nats/token, |delta| = {delta.norm():.4f}")
    else:
        print("SLOT: no delta (the prompt needs >= 2 tokens and --slot-steps >= 1)")
    print("first difference at new token " + (str(diverge) if diverge is not None else "- (none)"))
    print()
    print("PROMPT: " + args.prompt)
    print()
    width = args.width or shutil.get_terminal_size((160, 24)).columns
    print(side_by_side(decode_continuation(sp, ids, plain), decode_continuation(sp, ids, slotted),
                       ("without SLOT", f"with SLOT (delta fitted on the prompt, {args.slot_steps} steps)"), width))
    return 0


if __name__ == "__main__":
    sys.exit(main())
