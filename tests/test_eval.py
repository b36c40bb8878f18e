"""Evaluation: window bookkeeping and the causality suite for sliding / score-first TTT / SLOT (slot.md 5.7).

Everything runs the production code (`score_stream`, `eval_pass`, `score_batch`, `fit_delta`, `ttt_train_chunk`) on a
tiny random GPT in float64 with one thread, so "unchanged" means bit-identical. The positive controls (SLOT_MODE=batch
and deliberately broken variants patched in with monkeypatch) prove the harness can fail.
"""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

V = 64
N_TOKENS = 361  # 360 targets: 42 windows of 32 at stride 8; TTT chunks of 64 -> 6 chunks, the last one 40 tokens
PROBES = (1, 9, 33, 40, 63, 64, 65, 127, 130, 200, 257, 330, 360)  # perturbed stream indices u (tokens[u] changes)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def base(tg):
    cfg = dataclasses.replace(
        tg.Config(), vocab_size=V, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, rope_dims=8,
        ve_layers=(1,), xsa_last_n=1, bigram_vocab_size=32, bigram_dim=16, ve_dim=16, eval_seq_len=32, eval_stride=8,
        eval_batch_seqs=4, ttt_chunk_tokens=64, ttt_batch_seqs=2, ttt_epochs=1, ttt_lr=0.005, amp=False,
        compile=False, compile_head=False, slot_enabled=False, ttt_enabled=False, slot_mode="causal", slot_lr=0.05, slot_steps=4)
    cfg.validate()
    return cfg


@pytest.fixture(scope="module")
def model(tg, base):
    torch.manual_seed(0)
    m = tg.GPT(base)
    with torch.no_grad():  # out-proj / down banks start at zero: perturb everything so no path is degenerate
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m.double().eval()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, V, (N_TOKENS,), generator=torch.Generator().manual_seed(1))


def cfg_of(base, **kw):
    cfg = dataclasses.replace(base, **kw)
    cfg.validate()
    return cfg


def runtime(tg):
    return tg.Runtime(device=torch.device("cpu"), amp=False, compile=False)


def run_pass(tg, model, tokens, cfg, *, slot, ttt, batch_seqs=None, rank=None, world=None):
    return tg.eval_pass(model, tg.ValData(tokens, None), cfg, runtime(tg), seq_len=cfg.eval_seq_len,
                        stride=cfg.eval_stride, batch_seqs=batch_seqs or cfg.eval_batch_seqs, slot=slot, ttt=ttt,
                        collect=True, rank=rank, world=world)


def perturbed(tokens, u, k=1):
    t = tokens.clone()
    t[u] = (t[u] + k) % V
    return t


def leaks(tg, model, tokens, cfg, probes=PROBES):
    """Perturb tokens[u] for each probe; return {u: number of targets tokens[1..u-1] whose NLL changed at all}."""
    ref = tg.score_stream(model, tokens, cfg)
    assert not ref.isnan().any()
    out = {}
    for u in probes:
        new = tg.score_stream(model, perturbed(tokens, u), cfg)
        assert not new.isnan().any()
        assert new[u - 1] != ref[u - 1]  # the perturbed target itself must move (the probe is live)
        out[u] = int((new[: u - 1] != ref[: u - 1]).sum())
    return out


# ---- window bookkeeping ----
@pytest.mark.parametrize("seq,stride", [(1, 1), (4, 1), (8, 3), (8, 8), (16, 4), (32, 8), (32, 5), (7, 7)])
def test_window_plan_covers_every_position_once(tg, seq, stride):
    for n in list(range(1, 3 * seq + 2 * stride + 3)) + [97, 360]:
        plan = tg.window_plan(n, seq, stride)
        hits = torch.zeros(n, dtype=torch.long)
        prev_end = 0
        for i, (ws, length, lo) in enumerate(plan):
            assert ws >= 0 and ws + length <= n and 0 <= lo < length
            assert length == (seq if n >= seq else n)  # every window has full length when the stream allows it
            assert ws + lo == prev_end  # scored left to right, contiguous
            prev_end = ws + length
            hits[ws + lo: ws + length] += 1
            if i > 0:
                assert lo >= seq - stride  # every later window gives its scored tokens >= seq-stride of context
        assert prev_end == n and bool((hits == 1).all()), (n, seq, stride)
        assert plan[0] == (0, min(n, seq), 0)


def test_window_chunks_and_ttt_rows(tg):
    n, seq, stride = 360, 32, 8
    plan = tg.window_plan(n, seq, stride)
    for C in (8, 16, 64, 72, 128, 1000):
        ch = tg.window_chunks(plan, C)
        assert ch == sorted(ch) and ch[0] == 0
        for (ws, length, lo), c in zip(plan, ch):
            assert c == (ws + lo) // C
            if lo > 0 and C % stride == 0:  # every later window's scored positions lie in a single chunk
                assert (ws + length - 1) // C == c
    for lo, hi, s in ((0, 64, 32), (64, 128, 32), (320, 360, 32), (5, 6, 32), (0, 100, 7), (3, 3, 8)):
        rows = tg.ttt_rows(lo, hi, s)
        cover = [p for start, length in rows for p in range(start, start + length)]
        assert cover == list(range(lo, hi))
        assert all(1 <= length <= s for _, length in rows)


def test_slot_weights(tg):
    los = torch.tensor([0, 24, 12, 30, 32])  # the last: a padding window
    wt = tg.slot_weights(los, 32, "causal", 0, 8)  # causal: the first T - stride = 24 rows of each window
    fit = wt > 0
    assert wt.shape == (5, 24) and fit.sum(1).tolist() == [0, 24, 12, 24, 0]
    assert not bool((fit & (torch.arange(24)[None] >= los[:, None])).any())  # never a scored row
    torch.testing.assert_close(wt.sum(1), torch.tensor([0.0, 1, 1, 1, 0]))  # each window's mean loss
    fit = tg.slot_weights(los, 32, "causal", 5, 8) > 0
    assert fit.sum(1).tolist() == [0, 5, 5, 5, 0] and bool(fit[3, 19:24].all()) and bool(fit[2, 7:12].all())
    assert tg.slot_weights(los, 32, "causal", 0, 32).shape == (5, 0)  # stride >= T: every window lo = 0
    wt = tg.slot_weights(los, 32, "batch", 0, 8)
    fit = wt.view(5, 32) > 0
    assert wt.shape == (1, 5 * 32) and float(wt.sum()) == pytest.approx(1.0)  # one group: the whole batch
    assert bool(fit[:4, :31].all()) and not bool(fit[:, 31].any()) and not bool(fit[4].any())
    assert int(fit.sum()) == 4 * 31  # the seed's rows: every position but the last (padding windows: none)


# ---- C4: every target scored exactly once ----
@pytest.mark.parametrize("ttt", [False, True])
@pytest.mark.parametrize("mode", ["causal", "batch"])
def test_every_target_scored_once(tg, model, tokens, base, ttt, mode):
    n = tokens.numel() - 1
    cfg = cfg_of(base, slot_enabled=True, ttt_enabled=ttt, slot_mode=mode)
    out = run_pass(tg, model, tokens, cfg, slot=True, ttt=ttt)
    for v in ("plain", "slot"):
        assert out[v]["tokens"] == n
        s = out[v]["nll_stream"]
        assert s.shape == (n,) and s.dtype == torch.float64 and not s.isnan().any()
        assert out[v]["nll"] == pytest.approx(float(s.sum()), rel=1e-12)
    assert not torch.equal(out["slot"]["nll_stream"], out["plain"]["nll_stream"])  # SLOT does something
    assert torch.equal(tg.score_stream(model, tokens, cfg), out["slot"]["nll_stream"])


def test_weights_unchanged_after_ttt_and_slot(tg, model, tokens, base):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tg.score_stream(model, tokens, cfg_of(base, slot_enabled=True, ttt_enabled=True, ttt_freeze_blocks=1))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in model.parameters())


# ---- T1: SLOT off is bit-identical to the plain variant of a SLOT pass ----
@pytest.mark.parametrize("ttt", [False, True])
@pytest.mark.parametrize("mode", ["causal", "batch"])
def test_slot_off_is_bit_identical(tg, model, tokens, base, ttt, mode):
    cfg = cfg_of(base, slot_mode=mode, ttt_enabled=ttt)
    off = run_pass(tg, model, tokens, cfg, slot=False, ttt=ttt)
    on = run_pass(tg, model, tokens, cfg, slot=True, ttt=ttt)
    assert list(off) == ["plain"]
    assert torch.equal(off["plain"]["nll_stream"], on["plain"]["nll_stream"])
    assert off["plain"]["nll"] == on["plain"]["nll"]
    assert torch.equal(tg.score_stream(model, tokens, cfg), off["plain"]["nll_stream"])  # SLOT_ENABLED=0 -> plain


# ---- T2: stream perturbation (C1): no scored NLL depends on a later token ----
@pytest.mark.parametrize("name,kw", [
    ("sliding", dict()),
    ("slot_causal", dict(slot_enabled=True)),
    ("slot_causal_context", dict(slot_enabled=True, slot_context=5)),
    ("ttt", dict(ttt_enabled=True)),
    ("slot_causal_ttt", dict(slot_enabled=True, ttt_enabled=True)),
    ("slot_causal_context_ttt_freeze", dict(slot_enabled=True, slot_context=12, ttt_enabled=True, ttt_freeze_blocks=1)),
])
def test_stream_perturbation_is_causal(tg, model, tokens, base, name, kw):
    cfg = cfg_of(base, **kw)
    assert leaks(tg, model, tokens, cfg) == {u: 0 for u in PROBES}


def test_ttt_and_slot_are_live(tg, model, tokens, base):
    """The causal suite is only meaningful if TTT and SLOT change the scores."""
    plain = tg.score_stream(model, tokens, base)
    ttt = tg.score_stream(model, tokens, cfg_of(base, ttt_enabled=True))
    slot = tg.score_stream(model, tokens, cfg_of(base, slot_enabled=True))
    first_chunk = base.ttt_chunk_tokens
    assert torch.equal(ttt[:first_chunk], plain[:first_chunk])  # chunk 0 is scored before any training
    assert (ttt[first_chunk:] != plain[first_chunk:]).float().mean() > 0.9
    assert torch.equal(slot[: base.eval_seq_len], plain[: base.eval_seq_len])  # window 0 has no context: delta 0
    assert (slot[base.eval_seq_len:] != plain[base.eval_seq_len:]).float().mean() > 0.9
    assert (slot - plain).abs().max() > 1e-3


def test_distribution_at_probe_is_normalised_and_causal(tg, model, base):
    """C1+C2 at one position: with SLOT and TTT, sweeping tokens[u] over the whole vocabulary gives the NLLs of one
    fixed distribution p_{u-1}: it sums to 1 and everything before u stays bit-identical."""
    toks = torch.randint(0, V, (129,), generator=torch.Generator().manual_seed(2))
    cfg = cfg_of(base, slot_enabled=True, ttt_enabled=True)
    u = 97  # target 96: the first scored row of its window (second TTT chunk, 24 context rows)
    probs, prefix = [], None
    for tok in range(V):
        t = toks.clone()
        t[u] = tok
        s = tg.score_stream(model, t, cfg)
        probs.append(torch.exp(-s[u - 1]))
        prefix = s[: u - 1] if prefix is None else prefix
        assert torch.equal(s[: u - 1], prefix)
    assert float(sum(probs)) == pytest.approx(1.0, abs=1e-12)


def target_sweep(tg, model, cfg, los):
    """Sum over v of p(v) at each scored row of one window whose scored targets are all set to v."""
    g = torch.Generator().manual_seed(5)
    x, y = torch.randint(0, V, (1, 32), generator=g), torch.randint(0, V, (1, 32), generator=g)
    total = {"plain": 0.0, "slot": 0.0}
    for v in range(V):
        y[:, los:] = v
        scored, out = tg.score_batch(model, model.forward_hidden, x, y, torch.tensor([los]), cfg, runtime(tg), True)
        for k in total:
            total[k] = total[k] + torch.exp(-out[k][scored])
    return total


@pytest.mark.parametrize("mode,los", [("causal", 24), ("causal", 0), ("batch", 24)])
def test_scored_distributions_ignore_scored_targets(tg, model, base, mode, los):
    """#1240-style target sweep through score_batch: the window's scored targets are all set to v (inputs
    unchanged), for every v. Distributions that ignore the scored targets give probabilities summing to 1 over v
    at every scored row (C1 for the row's own target, and C2); the seed's delta, fitted on them, does not."""
    for k, t in target_sweep(tg, model, cfg_of(base, slot_enabled=True, slot_mode=mode), los).items():
        if k == "slot" and mode == "batch":
            assert (t - 1).abs().max() > 1e-3
        else:
            torch.testing.assert_close(t, torch.ones_like(t), rtol=0, atol=1e-12)


# ---- positive controls: the harness detects leaks ----
def test_positive_control_batch_mode_leaks(tg, model, tokens, base):
    found = leaks(tg, model, tokens, cfg_of(base, slot_enabled=True, slot_mode="batch"))
    assert sum(found.values()) > 100 and sum(1 for c in found.values() if c) >= len(PROBES) - 2
    assert tg.stage_compliance("slot", cfg_of(base, slot_mode="batch")) == "non-causal"


def test_positive_control_batch_shared_causal_delta_leaks(tg, model, tokens, base, monkeypatch):
    """Causal (context-only) rows but ONE delta shared by the batch, as in PRs #1217/#1333: must be caught."""
    real = tg.fit_delta

    def shared(z, y, wt, W, cfg, rows=None):  # the real rows are grouped per window
        G, V = z.size(0), z.size(-1)
        return real(z.reshape(1, -1, V), y.reshape(1, -1), wt.reshape(1, -1) / G, W, cfg).expand(G, -1)

    monkeypatch.setattr(tg, "fit_delta", shared)
    found = leaks(tg, model, tokens, cfg_of(base, slot_enabled=True))
    assert sum(found.values()) > 0


def test_positive_control_fit_on_scored_rows_leaks(tg, model, tokens, base, monkeypatch):
    """Per-window delta whose fit rows include the window's scored rows: must be caught."""
    monkeypatch.setattr(tg, "slot_weights", lambda los, T, mode, context, stride: torch.full((los.numel(), T), 1 / T))
    found = leaks(tg, model, tokens, cfg_of(base, slot_enabled=True))
    assert sum(found.values()) > 0


def test_positive_control_fit_on_first_scored_row_leaks(tg, model, base, monkeypatch):
    """Off by one: the fit rows include the window's first scored row. Only that row's own prediction leaks (later
    ones may depend on it), which the perturbation test cannot see; the target sweep does."""
    def off_by_one(los, T, mode, context, stride):
        fit = torch.arange(T)[None, :] <= los[:, None]
        return fit / fit.sum(1, keepdim=True)

    monkeypatch.setattr(tg, "slot_weights", off_by_one)
    t = target_sweep(tg, model, cfg_of(base, slot_enabled=True), 24)["slot"]
    assert (t[0] - 1).abs() > 1e-3


def test_positive_control_train_before_score_leaks(tg, model, tokens, base, monkeypatch):
    """TTT that scores each chunk only after training on it (windows moved one chunk later): must be caught."""
    real = tg.window_chunks
    monkeypatch.setattr(tg, "window_chunks", lambda plan, C: [c + 1 for c in real(plan, C)])
    found = leaks(tg, model, tokens, cfg_of(base, ttt_enabled=True), probes=(70, 127, 200, 300))
    assert sum(found.values()) > 0


# ---- T5: invariance to batch composition and rank split ----
@pytest.mark.parametrize("ttt", [False, True])
def test_causal_slot_invariant_to_batch_size(tg, model, tokens, base, ttt):
    cfg = cfg_of(base, slot_enabled=True, ttt_enabled=ttt)
    ref = run_pass(tg, model, tokens, cfg, slot=True, ttt=ttt, batch_seqs=4)
    for bs in (1, 3):
        out = run_pass(tg, model, tokens, cfg, slot=True, ttt=ttt, batch_seqs=bs)
        for v in ("plain", "slot"):
            torch.testing.assert_close(out[v]["nll_stream"], ref[v]["nll_stream"], rtol=0, atol=1e-12)


def test_batch_mode_depends_on_batch_size(tg, model, tokens, base):
    """Control for the test above: the batch-shared delta does change with the batch composition."""
    cfg = cfg_of(base, slot_enabled=True, slot_mode="batch")
    a = run_pass(tg, model, tokens, cfg, slot=True, ttt=False, batch_seqs=4)["slot"]["nll_stream"]
    b = run_pass(tg, model, tokens, cfg, slot=True, ttt=False, batch_seqs=1)["slot"]["nll_stream"]
    assert (a - b).abs().max() > 1e-6


@pytest.mark.parametrize("slot", [False, True])
def test_rank_split_union_equals_single_process(tg, model, tokens, base, slot):
    cfg = cfg_of(base, slot_enabled=slot)
    ref = run_pass(tg, model, tokens, cfg, slot=slot, ttt=False)
    parts = [run_pass(tg, model, tokens, cfg, slot=slot, ttt=False, rank=r, world=2) for r in (0, 1)]
    for v in ref:
        a, b = parts[0][v]["nll_stream"], parts[1][v]["nll_stream"]
        assert bool((a.isnan() ^ b.isnan()).all())  # each target scored by exactly one rank
        assert parts[0][v]["tokens"] > 0 and parts[1][v]["tokens"] > 0
        assert parts[0][v]["tokens"] + parts[1][v]["tokens"] == ref[v]["tokens"]
        torch.testing.assert_close(torch.where(a.isnan(), b, a), ref[v]["nll_stream"], rtol=0, atol=1e-12)


# ---- per-window independence inside a batch ----
def test_score_batch_windows_are_independent(tg, model, base):
    """Rewriting window j entirely (inputs and targets) leaves window i's causal-SLOT NLLs bit-identical."""
    cfg = cfg_of(base, slot_enabled=True)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randint(0, V, (4, 32), generator=g), torch.randint(0, V, (4, 32), generator=g)
    los = torch.tensor([0, 24, 24, 24])
    rt = runtime(tg)
    scored, ref = tg.score_batch(model, model.forward_hidden, x, y, los, cfg, rt, True)
    x2, y2 = x.clone(), y.clone()
    x2[2], y2[2] = torch.randint(0, V, (32,), generator=g), torch.randint(0, V, (32,), generator=g)
    _, new = tg.score_batch(model, model.forward_hidden, x2, y2, los, cfg, rt, True)
    win = torch.arange(4)[:, None].expand(-1, 32)[scored]
    ref, new = ({v: t[scored] for v, t in d.items()} for d in (ref, new))
    for v in ("plain", "slot"):
        assert torch.equal(new[v][win != 2], ref[v][win != 2])
        assert not torch.equal(new[v][win == 2], ref[v][win == 2])
    _, bat = tg.score_batch(model, model.forward_hidden, x, y, los, cfg_of(cfg, slot_mode="batch"), rt, True)
    _, bat2 = tg.score_batch(model, model.forward_hidden, x2, y2, los, cfg_of(cfg, slot_mode="batch"), rt, True)
    assert not torch.equal(bat["slot"][scored][win == 1], bat2["slot"][scored][win == 1])  # control: shared delta


def fit_problem(rows=(7, 0, 12, 3), D=16, seed=4, extra=2, dtype=torch.float64, vocab=V):
    """Dense fit inputs: group g has rows[g] fitted rows (weight 1/rows[g]) then rows of weight 0 up to N."""
    g = torch.Generator().manual_seed(seed)
    G, N = len(rows), max(rows) + extra
    W = torch.randn(vocab, D, generator=g, dtype=dtype) / D ** 0.5 * 4
    z = 20 * torch.randn(G, N, vocab, generator=g, dtype=dtype)  # wide: the softcap matters
    y = torch.randint(0, vocab, (G, N), generator=g)
    fit = torch.arange(N)[None, :] < torch.tensor(rows)[:, None]
    return z, y, fit / fit.sum(1, keepdim=True).clamp_min(1), W


def test_fit_delta_fits_only_the_first_rows(tg, base):
    """wt (G,F) fits each group's first F rows (causal SLOT's static slice): later rows are never read, and the
    delta is the one of zero weights there (to rounding: the row blocks of the sum differ)."""
    cfg = cfg_of(base, slot_steps=6)
    z, y, wt, W = fit_problem()
    part = tg.fit_delta(z, y, wt[:, :12], W, cfg)
    z2 = z.clone()
    z2[:, 12:] = float("nan")
    assert torch.equal(tg.fit_delta(z2, y, wt[:, :12], W, cfg), part) and bool(part.isfinite().all())
    torch.testing.assert_close(part, tg.fit_delta(z, y, wt, W, cfg), rtol=0, atol=1e-12)
    assert torch.equal(tg.fit_delta(z, y, wt[:, :0], W, cfg), torch.zeros_like(part))  # EVAL_STRIDE >= EVAL_SEQ_LEN


def test_fit_delta_groups_do_not_interact(tg, base):
    """Bit-exact: a group's delta does not depend on the other groups' rows, on its own zero-weight rows, or on the
    thread count (every sum runs over one group's rows or one delta's entries); fitted alone, to rounding."""
    for dt in (torch.float64, torch.float32):
        cfg = cfg_of(base, slot_steps=6)
        z, y, wt, W = fit_problem(dtype=dt)
        ref = tg.fit_delta(z, y, wt, W, cfg)
        assert ref.dtype == dt and ref.shape == (4, W.size(1))
        assert torch.equal(ref[1], torch.zeros_like(ref[1])) and ref[0].abs().min() > 0  # empty group: delta 0
        z2, y2 = z.clone(), y.clone()
        z2[2] += torch.randn_like(z2[2])
        y2[2] = (y2[2] + 1) % V
        z2[0, 7:] += 1.0  # group 0's rows of weight 0
        new = tg.fit_delta(z2, y2, wt, W, cfg)
        others = torch.arange(4) != 2
        assert torch.equal(new[others], ref[others]) and not torch.equal(new[2], ref[2])
        for g in (0, 3):  # alone: to rounding (the two small products are BLAS matmuls)
            torch.testing.assert_close(tg.fit_delta(z[g:g + 1], y[g:g + 1], wt[g:g + 1], W, cfg)[0], ref[g],
                                       rtol=0, atol=1e-12 if dt == torch.float64 else 1e-5)
        torch.set_num_threads(2)
        try:
            assert torch.equal(tg.fit_delta(z, y, wt, W, cfg), ref)
        finally:
            torch.set_num_threads(1)


def reference_adamw(z, y, wt, W, cfg):
    c = cfg.logit_softcap
    delta = torch.zeros(z.size(0), W.size(1), dtype=z.dtype, requires_grad=True)
    opt = torch.optim.AdamW([delta], lr=cfg.slot_lr, betas=(cfg.slot_beta1, cfg.slot_beta2), eps=cfg.slot_eps,
                            weight_decay=cfg.slot_wd)
    for _ in range(cfg.slot_steps):
        opt.zero_grad()
        logits = c * torch.tanh((z + (delta @ W.T)[:, None, :]) / c)
        nll = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape)
        (nll * wt).sum().backward()  # sum over groups of each group's mean CE
        opt.step()
    return delta.detach()


@pytest.mark.parametrize("rows", [(40,), (7, 0, 12, 3), (5000, 0, 4500)])
@pytest.mark.parametrize("wd", [1e-8, 0.3])
def test_fit_delta_matches_torch_adamw(tg, base, rows, wd):
    cfg = cfg_of(base, slot_steps=5, slot_lr=0.05, slot_wd=wd)
    z, y, wt, W = fit_problem(rows=rows)
    got = tg.fit_delta(z, y, wt, W, cfg)
    want = reference_adamw(z, y, wt, W, cfg)
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    cfg3 = cfg_of(cfg, slot_beta1=0.3, slot_beta2=0.9, slot_eps=1e-3, logit_softcap=7.0)
    torch.testing.assert_close(tg.fit_delta(z, y, wt, W, cfg3), reference_adamw(z, y, wt, W, cfg3), rtol=0, atol=1e-10)


def test_fit_delta_extreme_and_nonfinite_logits(tg, base):
    """Logits of +-5000 (far past the clamp of P = exp(-2z/c)) give a finite delta equal to the autograd reference;
    a nan logit gives a nan delta for its own group only (the NaN guards see it), never for the others."""
    cfg = cfg_of(base, slot_steps=3, slot_lr=0.05)
    z, y, wt, W = fit_problem(dtype=torch.float32)
    z[:, ::7, ::3] = -5000.0
    z[:, ::11, 1::5] = 5000.0
    got = tg.fit_delta(z, y, wt, W, cfg)
    assert got.isfinite().all()
    torch.testing.assert_close(got, reference_adamw(z.double(), y, wt.double(), W.double(), cfg).float(),
                               rtol=0, atol=1e-4)
    z[2, 0, 5] = float("nan")
    bad = tg.fit_delta(z, y, wt, W, cfg)
    assert bad[2].isnan().all() and torch.equal(bad[[0, 1, 3]], got[[0, 1, 3]])


# ---- TTT legality ----
def test_ttt_trains_only_scored_chunks_and_never_the_last(tg, model, tokens, base, monkeypatch):
    calls = []
    real = tg.ttt_train_chunk

    def spy(model_, opt, params, frozen_banks, val, lo, hi, lr, cfg, rt):
        calls.append((lo, hi, lr))
        return real(model_, opt, params, frozen_banks, val, lo, hi, lr, cfg, rt)

    monkeypatch.setattr(tg, "ttt_train_chunk", spy)
    cfg = cfg_of(base, ttt_enabled=True)
    run_pass(tg, model, tokens, cfg, slot=False, ttt=True)
    n, C = tokens.numel() - 1, cfg.ttt_chunk_tokens
    n_chunks = -(-n // C)
    assert [(lo, hi) for lo, hi, _ in calls] == [(i * C, (i + 1) * C) for i in range(n_chunks - 1)]
    assert all(hi < n for _, hi, _ in calls)  # the last chunk [320, 360) is never trained on
    assert calls[0][2] == pytest.approx(cfg.ttt_lr) and all(a[2] > b[2] for a, b in zip(calls, calls[1:]))
    plan = tg.window_plan(n, cfg.eval_seq_len, cfg.eval_stride)
    for ci, (lo, hi, _) in enumerate(calls):  # every trained position was scored in chunk <= ci
        for (ws, length, wlo), ch in zip(plan, tg.window_chunks(plan, C)):
            if ws + wlo < hi:
                assert ch <= ci


def test_ttt_freeze_blocks_freezes_bank_slices(tg, model, tokens, base, monkeypatch):
    L = base.num_layers
    seen = []
    real = tg.ttt_train_chunk

    def spy(model_, opt, params, frozen_banks, val, lo, hi, lr, cfg, rt):
        before = {k: v.clone() for k, v in model_.state_dict().items()}
        real(model_, opt, params, frozen_banks, val, lo, hi, lr, cfg, rt)
        seen.append((before, {k: v.clone() for k, v in model_.state_dict().items()}))

    monkeypatch.setattr(tg, "ttt_train_chunk", spy)
    cfg = cfg_of(base, ttt_enabled=True, ttt_freeze_blocks=1)
    run_pass(tg, model, tokens, cfg, slot=False, ttt=True)
    assert len(seen) == 5
    frozen = {"qo_bank": (0, L), "kv_bank": (0, L), "mlp_up_bank": (0,), "mlp_down_bank": (0,)}
    for before, after in seen:
        for name, idx in frozen.items():
            live = [i for i in range(before[name].size(0)) if i not in idx]
            assert all(torch.equal(before[name][i], after[name][i]) for i in idx), name
            assert all(not torch.equal(before[name][i], after[name][i]) for i in live), name
        for k in before:
            if k.startswith("blocks.0."):
                assert torch.equal(before[k], after[k]), k
            elif k.startswith("blocks.1.") or k in ("tok_emb.weight", "smear"):
                assert not torch.equal(before[k], after[k]), k


def test_score_stream_uses_amp_like_the_run(tg, model, tokens, base):
    """score_stream decides AMP as setup_runtime does: on a CPU without fast bf16, AMP=1 is not autocast."""
    if tg.cpu_bf16_is_fast():
        pytest.skip("this CPU runs bf16 autocast in a real run too")
    model32 = tg.GPT(base)  # the fixture model in fp32
    model32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    model32.eval()
    a = tg.score_stream(model32, tokens[:100], cfg_of(base, amp=True, slot_enabled=True))
    b = tg.score_stream(model32, tokens[:100], cfg_of(base, amp=False, slot_enabled=True))
    assert torch.equal(a, b)


def test_stage_compliance(tg, base):
    for mode in ("causal", "batch"):
        cfg = cfg_of(base, slot_mode=mode, slot_enabled=True)
        assert tg.stage_compliance("plain", cfg) == "causal"
        assert tg.stage_compliance("slot", cfg) == ("non-causal" if mode == "batch" else "causal")
    assert tg.final_variant(cfg_of(base, slot_enabled=True)) == "slot"
    assert tg.final_variant(base) == "plain"




# ---- the compiled head (COMPILE_HEAD=1, the default of a run) ----
@pytest.fixture(scope="module")
def model32(tg, base, model):
    m = tg.GPT(base)
    m.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    return m.eval()


def test_compiled_head_matches_eager_and_keeps_windows_apart(tg, model32, base):
    """torch.compile'd head_nll scores as the eager one (fp32: to 2e-5), and a window's compiled delta fitted alone
    agrees with it fitted in a batch."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.randint(0, V, (4, 32), generator=g), torch.randint(0, V, (4, 32), generator=g)
    los = torch.tensor([0, 24, 24, 8])
    compiled = tg.Runtime(device=torch.device("cpu"), amp=False, compile_head=True)
    for mode in ("causal", "batch"):
        cfg = cfg_of(base, slot_enabled=True, slot_mode=mode)
        scored, want = tg.score_batch(model32, model32.forward_hidden, x, y, los, cfg, runtime(tg), True)
        _, got = tg.score_batch(model32, model32.forward_hidden, x, y, los, cfg, compiled, True)
        assert not bool(want["plain"][~scored].any())  # dense, 0 where not scored
        assert (want["slot"] - want["plain"]).abs().max() > 1e-3
        for v in ("plain", "slot"):
            torch.testing.assert_close(got[v], want[v], rtol=0, atol=2e-5)
    z, yy, wt, W = fit_problem(rows=(30, 0, 12, 25), dtype=torch.float32)
    fit = compiled.fn(tg.fit_delta)
    cfg = cfg_of(base, slot_steps=3, slot_lr=0.05)
    both = fit(z, yy, wt, W, cfg)
    torch.testing.assert_close(both, tg.fit_delta(z, yy, wt, W, cfg), rtol=0, atol=1e-5)
    torch.testing.assert_close(fit(z[3:], yy[3:], wt[3:], W, cfg)[0], both[3], rtol=0, atol=1e-5)


@pytest.mark.parametrize("kw", [dict(), dict(ttt_enabled=True)])
def test_compiled_path_is_causal(tg, model32, tokens, base, kw):
    """The perturbation test over the fp32 model through the compiled head (as a run scores); batch mode is the
    positive control."""
    cfg = cfg_of(base, slot_enabled=True, compile_head=True, **kw)
    assert leaks(tg, model32, tokens, cfg, probes=PROBES[::2]) == {u: 0 for u in PROBES[::2]}
    assert sum(leaks(tg, model32, tokens, cfg_of(cfg, slot_mode="batch"), probes=PROBES[::3]).values()) > 0


def test_causal_slot_with_stride_of_a_whole_window(tg, model, tokens, base):
    """EVAL_STRIDE = EVAL_SEQ_LEN: every window scores from 0, causal SLOT has no rows to fit (delta 0)."""
    cfg = cfg_of(base, slot_enabled=True, eval_stride=base.eval_seq_len)
    out = run_pass(tg, model, tokens, cfg, slot=True, ttt=False)
    assert out["slot"]["nll"] == out["plain"]["nll"] and out["slot"]["tokens"] == tokens.numel() - 1
