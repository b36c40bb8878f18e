"""CTW mixing at evaluation (CTW_WEIGHT, CTW_DEPTH): the vectorised ctw_log_probs against a slow sequential
reference, normalisation, causality (directly and through score_stream), and CTW_WEIGHT=0 being bit-identical."""
import dataclasses
import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_run  # noqa: E402


class RefCTW:
    """Sequential multi-alphabet CTW, one target at a time, with plain dicts (the definition, not fast)."""

    def __init__(self, vocab: int, depth: int, alpha: float = 0.0):
        self.V, self.D, self.a = vocab, depth, alpha or 1.0 / vocab  # 0: 1/vocab, as in train_gpt
        self.n_ctx, self.n_sym, self.log_beta = {}, {}, {}

    def path(self, prefix):
        pad = [self.V] * self.D + list(prefix)
        return [(j, tuple(pad[len(pad) - j:])) for j in range(self.D + 1)]  # node j: previous j tokens

    def kt(self, node, y):
        return (self.n_sym.get((node, y), 0) + self.a) / (self.n_ctx.get(node, 0) + self.V * self.a)

    def dists(self, prefix, ys):
        """p_j(y) for y in ys at every order j of prefix's path (leaf first)."""
        nodes = self.path(prefix)
        p = {self.D: [self.kt(nodes[self.D], y) for y in ys]}
        for j in range(self.D - 1, -1, -1):
            w = 1.0 / (1.0 + math.exp(-self.log_beta.get(nodes[j], 0.0)))
            p[j] = [w * self.kt(nodes[j], y) + (1 - w) * q for y, q in zip(ys, p[j + 1])]
        return nodes, p

    def observe(self, prefix, y):
        """Return log p_ctw(y | prefix), then update counts and weights with y."""
        nodes, p = self.dists(prefix, [y])
        for j in range(self.D):
            self.log_beta[nodes[j]] = self.log_beta.get(nodes[j], 0.0) + math.log(self.kt(nodes[j], y)) - \
                math.log(p[j + 1][0])
        for node in nodes:
            self.n_ctx[node] = self.n_ctx.get(node, 0) + 1
            self.n_sym[(node, y)] = self.n_sym.get((node, y), 0) + 1
        return math.log(p[0][0])


def ref_log_probs(tokens, vocab, depth, alpha=0.0):
    ref, toks = RefCTW(vocab, depth, alpha), tokens.tolist()
    return torch.tensor([ref.observe(toks[:t], toks[t]) for t in range(1, len(toks))], dtype=torch.float64)


def repetitive_stream(n, vocab, seed):
    """Random tokens with copied spans, so deep contexts recur and the weights move away from 1/2."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, vocab, (n,), generator=g)
    for _ in range(n // 20):
        a, b = torch.randint(0, n - 12, (2,), generator=g).tolist()
        if a < b:
            t[b: b + 10] = t[a: a + 10].clone()
    return t


@pytest.mark.parametrize("vocab,depth,n,alpha", [(7, 3, 400, 0.5), (5, 4, 300, 0.0), (16, 2, 300, 0.1),
                                                 (1024, 4, 200, 0.0), (1024, 4, 200, 0.5), (3, 6, 250, 0.5),
                                                 (5, 0, 50, 0.0)])
def test_matches_reference(tg, vocab, depth, n, alpha):
    toks = repetitive_stream(n, vocab, seed=vocab * 10 + depth)
    got = tg.ctw_log_probs(toks, vocab, depth, alpha)
    want = ref_log_probs(toks, vocab, depth, alpha)
    assert got.dtype == torch.float64 and got.shape == (n - 1,)
    assert torch.allclose(got, want, rtol=0, atol=1e-12), (got - want).abs().max()
    assert (got < 0).all()


def test_edge_lengths(tg):
    assert tg.ctw_log_probs(torch.tensor([3]), 8, 4).numel() == 0
    lp = tg.ctw_log_probs(torch.tensor([3, 5]), 8, 4)
    assert torch.allclose(lp, torch.tensor([-math.log(8.0)], dtype=torch.float64))  # fresh tree: uniform


def test_learns_repetition(tg):
    """A periodic stream becomes nearly deterministic: the CTW must learn it (guards a silently-broken model)."""
    toks = torch.arange(50).repeat(40) * 7 % 1024
    lp = tg.ctw_log_probs(toks, 1024, 4)
    assert lp[-200:].exp().mean() > 0.5
    assert lp[:49].exp().max() < 0.01  # first period: nothing seen yet


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_normalised(tg, alpha):
    vocab, depth = 6, 3
    toks = repetitive_stream(300, vocab, seed=1).tolist()
    ref = RefCTW(vocab, depth, alpha)
    model = torch.softmax(torch.randn(vocab, dtype=torch.float64), 0)
    w = 0.3
    for t in range(1, len(toks)):
        if t in (1, 2, 50, 151, 299):
            _, p = ref.dists(toks[:t], list(range(vocab)))
            assert abs(sum(p[0]) - 1) < 1e-12
            nll_mix = tg.ctw_mix(-model.log(), torch.tensor(p[0], dtype=torch.float64).log(), w)
            assert abs(torch.exp(-nll_mix).sum().item() - 1) < 1e-12
        ref.observe(toks[:t], toks[t])


def test_ctw_mix(tg):
    nll = torch.tensor([0.5, 3.0, 40.0], dtype=torch.float64)
    lp = torch.tensor([-2.0, -0.1, -700.0], dtype=torch.float64)
    got = tg.ctw_mix(nll, lp, 0.2)
    want = -torch.log(0.8 * torch.exp(-nll) + 0.2 * torch.exp(lp))
    assert torch.allclose(got, want, rtol=1e-14, atol=0)
    assert torch.isfinite(tg.ctw_mix(torch.tensor([1e4], dtype=torch.float64), torch.tensor([-1e4]), 0.1)).all()


def test_causal(tg):
    """Changing token u never changes log p of a target before u; it does change later ones."""
    vocab, depth, n = 9, 4, 500
    toks = repetitive_stream(n, vocab, seed=3)
    base = tg.ctw_log_probs(toks, vocab, depth)
    for u in (1, 37, 250, n - 1):
        t2 = toks.clone()
        t2[u] = (t2[u] + 1) % vocab
        lp = tg.ctw_log_probs(t2, vocab, depth)
        assert torch.equal(lp[: u - 1], base[: u - 1])  # entry i is target tokens[i+1]: targets < u are i < u-1
        assert not torch.equal(lp[u - 1:], base[u - 1:])


def test_names_and_compliance(tg):
    cfg = tg.Config()
    assert tg.final_variant(dataclasses.replace(cfg, slot_enabled=False)) == "plain"
    assert tg.final_variant(dataclasses.replace(cfg, slot_enabled=False, ctw_weight=0.1)) == "ctw"
    assert tg.final_variant(dataclasses.replace(cfg, slot_enabled=True, ctw_weight=0.1)) == "slot_ctw"
    batch, causal = dataclasses.replace(cfg, slot_mode="batch"), dataclasses.replace(cfg, slot_mode="causal")
    assert tg.stage_compliance("slot_ctw", batch) == "non-causal"
    assert tg.stage_compliance("slot_ctw", causal) == "causal"
    assert tg.stage_compliance("ctw", batch) == "causal"


def tiny(tg, **kw):
    cfg = dataclasses.replace(tg.Config(), vocab_size=64, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1,
                              rope_dims=8, ve_layers=(1,), xsa_last_n=1, bigram_vocab_size=32, bigram_dim=16,
                              ve_dim=16, eval_seq_len=32, eval_stride=8, eval_batch_seqs=4, ttt_chunk_tokens=64,
                              ttt_enabled=False, slot_enabled=False, amp=False, compile_head=False, ctw_weight=0.2)
    cfg = dataclasses.replace(cfg, **kw)
    torch.manual_seed(0)
    model = tg.GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return cfg, model.double()


def stream(n=200, vocab=64):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("kw", [{}, {"slot_enabled": True, "slot_mode": "causal", "slot_steps": 2},
                                {"ctw_depth": 2, "ctw_weight": 0.5}])
def test_score_stream_causal(tg, kw):
    cfg, model = tiny(tg, **kw)
    toks = stream()
    base = tg.score_stream(model, toks, cfg)
    assert torch.isfinite(base).all() and base.numel() == toks.numel() - 1
    for u in (40, 131, 199):
        t2 = toks.clone()
        t2[u] = (t2[u] + 1) % cfg.vocab_size
        got = tg.score_stream(model, t2, cfg)
        assert torch.equal(got[: u - 1], base[: u - 1])  # bit-identical for every earlier target
        assert not torch.equal(got[u - 1:], base[u - 1:])


def test_score_stream_mixture(tg):
    """The ctw variant is exactly the linear mixture of the plain NLL and the CTW of the stream."""
    cfg, model = tiny(tg)
    toks = stream()
    plain = tg.score_stream(model, toks, dataclasses.replace(cfg, ctw_weight=0.0))
    mixed = tg.score_stream(model, toks, cfg)
    lp = tg.ctw_log_probs(toks, cfg.vocab_size, cfg.ctw_depth)
    want = tg.ctw_mix(plain, lp, cfg.ctw_weight)  # to the last bits: SIMD logaddexp rounds by lane
    assert (mixed - want).abs().max() <= 4e-16 * want.abs().max(), (mixed - want).abs().max()
    assert not torch.equal(mixed, plain)


def test_weight_zero_is_bit_identical(tg, monkeypatch):
    """CTW_WEIGHT=0: same NLLs, same variants, and the CTW code is never called."""
    cfg, model = tiny(tg, ctw_weight=0.0, slot_enabled=True, slot_mode="causal", slot_steps=2)
    toks = stream()
    rt = tg.Runtime(device=torch.device("cpu"), amp=False, compile=False)
    val = tg.ValData(toks, None)
    kw = dict(seq_len=cfg.eval_seq_len, stride=cfg.eval_stride, batch_seqs=cfg.eval_batch_seqs, slot=True, ttt=False,
              collect=True)
    calls = []
    monkeypatch.setattr(tg, "ctw_log_probs", lambda *a, **k: calls.append(1))
    out = tg.eval_pass(model, val, cfg, rt, **kw)
    assert set(out) == {"plain", "slot"} and not calls
    monkeypatch.undo()
    on = tg.eval_pass(model, val, dataclasses.replace(cfg, ctw_weight=0.3), rt, **kw)
    assert set(on) == {"plain", "slot", "ctw", "slot_ctw"}
    for v in ("plain", "slot"):  # the base variants are untouched by CTW being on
        assert torch.equal(on[v]["nll_stream"], out[v]["nll_stream"])
        assert on[v]["nll"] == out[v]["nll"]
    assert torch.equal(tg.score_stream(model, toks, cfg), out["slot"]["nll_stream"])


def test_config(tg):
    c = tg.Config.from_env({"PRESET": "cpu"})
    assert (c.ctw_weight, c.ctw_depth, c.ctw_alpha) == (0.0, 4, 0.0)
    c = tg.Config.from_env({"PRESET": "cpu", "CTW_WEIGHT": "0.1", "CTW_DEPTH": "3", "CTW_ALPHA": "0.5"})
    assert (c.ctw_weight, c.ctw_depth, c.ctw_alpha) == (0.1, 3, 0.5)
    for bad in ({"CTW_ALPHA": "-1"}, {"CTW_WEIGHT": "1"}, {"CTW_DEPTH": "0"}):
        with pytest.raises(tg.UserError, match=next(iter(bad))):
            tg.Config.from_env({"PRESET": "cpu", **bad})


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_run_stages(tg, tmp_path, one_thread):
    """tg.run end to end with CTW on: stage names, compliance, final stage, the ctw log line, and each *_ctw
    stage scoring lower than its base (the 1-step model has learnt little; the CTW learns the stream's words)."""
    data, tok = tiny_run.make_tiny_data(tmp_path / "data", tg)
    env = tiny_run.tiny_env(data, tok, tmp_path / "out", ITERATIONS=1, SLOT_MODE="causal", CTW_WEIGHT=0.3)
    s = tg.run(env)
    assert list(s["stages"]) == ["post_ema", "roundtrip", "sliding", "sliding_slot", "sliding_ctw", "sliding_slot_ctw",
                                 "ttt", "ttt_slot", "ttt_ctw", "ttt_slot_ctw"]
    assert all(st["compliance"] == "causal" for st in s["stages"].values())
    assert s["final_stage"] == s["final_compliant_stage"] == "ttt_slot_ctw"
    for base in ("sliding", "sliding_slot", "ttt", "ttt_slot"):
        ctw = "sliding_ctw" if base == "sliding" else "ttt_ctw" if base == "ttt" else base + "_ctw"
        assert s["stages"][ctw]["val_bpb"] < s["stages"][base]["val_bpb"], base
        assert s["stages"][ctw]["seconds"] == s["stages"][base]["seconds"]  # one pass scores both
    log = (tmp_path / "out" / "tiny.txt").read_text()
    assert log.count("ctw: depth=4 alpha=0.003125 weight=0.3 mix=linear(fixed) tokens=639") == 2
    assert json.loads((tmp_path / "out" / "tiny.json").read_text())["final_stage"] == "ttt_slot_ctw"
