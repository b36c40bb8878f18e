"""Generate text from an artifact, with and without a SLOT delta fitted on the prompt, side by side.

The prompt is tokenized (SentencePiece, a BOS first as in the training documents) and run once through the
model. SLOT then fits one hidden-state delta on every prompt position (train_gpt.fit_delta: AdamW on the raw
logits, one group) and both continuations are decoded, the second with the delta added to the final hidden state
at every step. Sampling uses the same seed for both, so they differ only through the delta. Each step runs the
last --context tokens through the trunk (train_gpt.py has no KV cache: it would be code bytes in the artifact).

    python tools/generate.py --artifact logs/run.ptz --prompt "The kernel scheduler" --greedy
    python tools/generate.py --artifact logs/run.ptz --prompt "def main():" --temperature 0.8 --top-k 40 --seed 1 \\
        --slot-steps 30 --slot-lr 0.02 --max-new-tokens 80

Exit status 0, or 2 on bad input (missing artifact or tokenizer, vocabulary mismatch).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import textwrap
import time

import torch
import torch.nn.functional as F

from _cli import Parser
from _common import ToolError, tg


@torch.no_grad()
def last_hidden(model, ids: list[int]) -> torch.Tensor:
    """(T, D) fp32 final hidden states of one pass over ids."""
    return model.forward_hidden(torch.tensor(ids, dtype=torch.long)[None])[0].float()


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
    after = F.cross_entropy(model.softcap(z + delta @ W.T), y).item()
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
             temperature: float = 1.0, top_k: int = 0, seed: int = 0, context: int = 1024, stop: tuple = (),
             h: torch.Tensor | None = None) -> list[int]:
    """New token ids after `prompt`. The delta (1, D) is added to the final hidden state at every step (None: no
    SLOT). `h`: the prompt's last hidden state, when already computed."""
    W = model.head_weight().float()
    u = (delta.float() @ W.T)[0] if delta is not None else None
    gen = torch.Generator().manual_seed(seed)
    seq, out = list(prompt), []
    if h is None:
        h = last_hidden(model, seq[-context:])[-1]
    for _ in range(max_new):
        z = model.raw_logits(h)
        tok = pick(model.softcap(z + u if u is not None else z), greedy, temperature, top_k, gen)
        out.append(tok)
        seq.append(tok)
        if tok in stop:
            break
        h = last_hidden(model, seq[-context:])[-1]
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
    stop = tuple(i for i in (sp.bos_id(), sp.eos_id()) if i >= 0)
    ids = ids[-context:]
    t = time.perf_counter()
    h = last_hidden(model, ids)
    delta, before, after = fit_prompt_delta(model, ids, h, cfg, args.slot_steps, args.slot_lr)
    fit_s = time.perf_counter() - t
    kw = dict(greedy=args.temperature is None, temperature=args.temperature or 1.0, top_k=args.top_k,
              seed=args.seed, context=context, stop=stop, h=h[-1])
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
          f"(context {context})")
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
