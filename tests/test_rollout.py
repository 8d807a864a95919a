"""Rollout: a scripted model (no weights) checks forced observations, masks, stopping, tool
budget, failing tools and that every token is fed once; the tiny Llama checks cache == no-cache,
that packed, left-padded rows give the logits of each sequence alone, and that those are the logits
each token was sampled from. Shapes (`grpo/__init__.py`): B, G, N = B*G rows, P, C, L new tokens of
a step, V."""
import time
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from envs.protocol import BUDGET_OBSERVATION
from grpo.kvcache import position_ids_from_mask
from grpo.rollout import OBS_CHARS_PER_TOKEN, inverse_cdf_sample, rollout, sample_next
from models.loading import load_model_and_tokenizer
from models.tokenizer import ByteTokenizer
from tests.fakes import ENV_TEXT, Biased

pytestmark = pytest.mark.usefixtures("one_thread")

TOK = ByteTokenizer()
EOS = "<|im_end|>"

# --------------------------------------------------------------------------------------- scripted model


class FakeLayer:
    """One layer of FakeCache: `keys` and `values` (R, 1, W, 4) hold, for every cached column,
    (token, position, row, real): the rollout moves them like real keys and values (rows leave,
    holes are squeezed out, groups are split off and put back), and the model checks them."""

    def __init__(self, keys: torch.Tensor):
        self.keys, self.values = keys, keys.clone()


class FakeCache:
    def __init__(self, keys: torch.Tensor):
        self.layers = [FakeLayer(keys)]

    def batch_repeat_interleave(self, g: int):  # in place, like transformers' Cache; row b -> rows b*g .. b*g+g-1
        layer = self.layers[0]
        layer.keys = layer.keys.repeat_interleave(g, dim=0)
        layer.keys[:, :, :, 2] = torch.arange(len(layer.keys))[:, None, None]
        layer.values = layer.keys.clone()


class ScriptedLM(nn.Module):
    """Mimics the HF causal-LM call of `rollout`. Row n's next token is scripts[n][k], where k counts
    the tokens it was fed after its prompt outside <obs>...</obs> (the ones it sampled); EOS once
    the script is exhausted. The G rows of a group share the prefill, so they share scripts[b*G][0].

    What a row was fed is read back from the cache the rollout passes in, which must hold exactly
    the (token, position) pairs fed to that row so far, in order (`fed[n]`): rows and columns moved
    by the rollout's cache surgery must keep their row, their order, and no column may be lost or
    made up. Every fed token must sit at its row's next position (holes do not count)."""

    def __init__(self, scripts: list[str], group_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))  # rollout reads the device from here
        self.scripts = [TOK.encode(s) for s in scripts]
        self.G, self.calls = group_size, []
        self.fed: dict[int, list[tuple[int, int]]] = {}  # row -> (token, position) pairs, in the order fed
        self.prompt_lens: dict[int, int] = {}
        self.obs_open, self.obs_close = TOK.convert_tokens_to_ids("<obs>"), TOK.convert_tokens_to_ids("</obs>")

    def _num_sampled(self, fed: list[int]) -> int:
        n, inside = 0, False
        for t in fed:
            inside = (inside or t == self.obs_open) and t != self.obs_close
            n += not inside and t != self.obs_close
        return n

    def forward(self, input_ids, attention_mask, position_ids, cache=None, use_cache=False, logits_to_keep=0):
        assert use_cache and logits_to_keep == 1
        R, L = input_ids.shape
        prefill = cache is None
        if prefill:  # one row per prompt; FakeCache.batch_repeat_interleave gives rows b*G+j their ids
            cache = FakeCache(torch.zeros(R, 1, 0, 4, dtype=torch.long))
            row_ids = list(range(R))
        else:
            keys = cache.layers[0].keys                                                  # (R, 1, W, 4)
            assert torch.equal(keys, cache.layers[0].values), "keys and values must move together"
            real = keys[:, 0, :, 3].bool()                                               # (R, W)
            row_ids = [int(k[0, m, 2][0]) for k, m in zip(keys, real)]  # holes made by the rollout hold zeros
            assert all((k[0, m, 2] == n).all() for k, m, n in zip(keys, real, row_ids)), "a cache row mixes two rows"
        W = cache.layers[0].keys.shape[2]
        assert attention_mask.shape == (R, W + L), "mask must cover the cache and the new tokens"
        assert torch.equal(attention_mask[:, :W], cache.layers[0].keys[:, 0, :, 3]), "mask of the cached columns"
        self.calls.append(SimpleNamespace(ids=input_ids.clone(), mask=attention_mask[:, -L:].clone(),
                                          prefill=prefill, rows=list(row_ids)))
        new = torch.stack([input_ids, position_ids, torch.tensor(row_ids)[:, None].expand(R, L),
                           attention_mask[:, -L:]], dim=-1)[:, None]                      # (R, 1, L, 4)
        layer = cache.layers[0]
        layer.keys = torch.cat([layer.keys, new], dim=2)
        layer.values = torch.cat([layer.values, new], dim=2)
        logits = torch.zeros(R, 1, len(TOK))                                           # (R, 1, V)
        for i, n in enumerate(row_ids):
            fed = [(int(t), int(p)) for t, p, _, m in layer.keys[i, 0].tolist() if m]
            new_fed = [(int(t), int(p)) for t, p, m in zip(input_ids[i], position_ids[i], attention_mask[i, -L:]) if m]
            before = [] if prefill else self.fed[n]
            assert fed == before + new_fed, f"row {n}: the cache lost, reordered or made up a column"
            assert [p for _, p in new_fed] == list(range(len(before), len(fed))), "positions must skip holes"
            for g in range(self.G if prefill else 1):
                self.fed[n * self.G + g if prefill else n] = list(fed)
                if prefill:
                    self.prompt_lens[n * self.G + g] = len(fed)
            script = self.scripts[n * self.G if prefill else n]
            k = self._num_sampled([t for t, _ in fed[self.prompt_lens[n * self.G if prefill else n]:]])
            logits[i, -1, script[k] if k < len(script) else TOK.eos_token_id] = 1e4
        return SimpleNamespace(logits=logits, cache=cache)


class ScriptedEnv:
    """Records the queries; returns ENV_TEXT, or raises on the query "boom"."""

    def __init__(self):
        self.queries = []

    def __call__(self, query: str) -> str:
        self.queries.append(query)
        if query == "boom":
            raise RuntimeError("tool down")
        return ENV_TEXT


def run(scripts, prompts, group_size, max_new_tokens=64, **kwargs):
    model, env = ScriptedLM(scripts, group_size), ScriptedEnv()
    r = rollout(model, TOK, prompts, env, group_size=group_size, max_new_tokens=max_new_tokens,
                generator=torch.Generator().manual_seed(0), **kwargs)
    return r, model, env


def pieces(*parts: tuple[str, int]) -> tuple[list[int], list[int]]:
    """Expected completion ids and completion mask from (text, sampled) pieces."""
    ids, mask = [], []
    for text, sampled in parts:
        enc = TOK.encode(text)
        ids, mask = ids + enc, mask + [sampled] * len(enc)
    return ids, mask


def obs(text: str) -> tuple[str, int]:  # a forced observation piece
    return f"<obs>{text}</obs>", 0


def completion(r, i: int) -> list[int]:
    n = int(r.attention_mask[i, r.prompt_length:].sum())
    return r.completion_ids[i, :n].tolist()

# --------------------------------------------------------------------------------------- scripted tests


def test_forced_observations_masks_and_stopping():
    """Obs tokens forced with mask 0 right after </call>; masks from lengths (EOS == pad keeps
    attention 1); stops at </answer>, EOS and the budget; group ids and texts."""
    prompts = ["Capital of France?", "Hi"]
    scripts = ["<thought>a</thought><call>capital of France</call><answer>Paris</answer>junk",
               "<thought>b</thought><answer>Rome</answer>junk",
               f"<thought>c{EOS}junk",
               "<thought>" + "z" * 50]
    r, _, env = run(scripts, prompts, group_size=2, max_new_tokens=32)
    expected = [pieces(("<thought>a</thought><call>capital of France</call>", 1), obs(ENV_TEXT),
                       ("<answer>Paris</answer>", 1)),
                pieces(("<thought>b</thought><answer>Rome</answer>", 1)),
                pieces((f"<thought>c{EOS}", 1)),
                pieces(("<thought>" + "z" * 31, 1))]
    prompt_ids = [TOK.encode(p) for p in prompts]
    P, C = max(map(len, prompt_ids)), max(len(ids) for ids, _ in expected)
    pad = TOK.pad_token_id
    for i, (ids, mask) in enumerate(expected):
        p = prompt_ids[i // 2]
        assert r.input_ids[i].tolist() == [pad] * (P - len(p)) + p + ids + [pad] * (C - len(ids))
        assert r.attention_mask[i].tolist() == [0] * (P - len(p)) + [1] * (len(p) + len(ids)) + [0] * (C - len(ids))
        assert r.completion_mask[i].tolist() == mask + [0] * (C - len(ids))
        assert r.texts[i] == TOK.decode(ids)
    assert r.prompt_length == P and r.input_ids.shape == (4, P + C)
    assert r.completion_ids[2, len(expected[2][0]) - 1] == TOK.eos_token_id   # the sampled EOS is kept
    assert r.num_generated.tolist() == [sum(m) for _, m in expected] and r.num_generated[3] == 32
    assert r.truncated.tolist() == [False, False, False, True]
    assert r.group_ids.tolist() == [0, 0, 1, 1] and r.group_size == 2
    assert r.num_calls.tolist() == [1, 0, 0, 0] and r.queries == [["capital of France"], [], [], []]
    assert env.queries == ["capital of France"]
    assert r.num_calls_no_obs.sum() == r.incomplete_calls.sum() == r.tool_errors.sum() == 0


def test_sampled_ids_are_kept_not_re_encoded():
    """The rollout keeps the ids it sampled; decoding and encoding again is not the identity (BPE drift),
    and the loss would then score tokens π_old never sampled. The script spells "<answer>Paris</answer>"
    byte by byte (22 ids), which encodes again to 7 ids (each tag is one special token)."""
    text = "<answer>Paris</answer>"
    spelled = list(text.encode())
    assert len(spelled) == 22 and len(TOK.encode(text)) == 7
    model = ScriptedLM([text], group_size=1)
    model.scripts = [spelled]
    r = rollout(model, TOK, ["Q"], ScriptedEnv(), group_size=1, max_new_tokens=64,
                generator=torch.Generator().manual_seed(0))
    assert r.stop_reasons == ["answer"] and int(r.num_generated[0]) == 22   # the closing bytes stop it
    n = int(r.attention_mask[0, r.prompt_length:].sum())
    assert n == 22 and r.completion_ids[0, :n].tolist() == spelled
    assert r.completion_mask[0, :n].tolist() == [1] * 22 and r.texts[0] == text


def test_each_token_fed_once():
    """Prompts are prefilled once per group (B rows, not N); afterwards each forward feeds only new
    tokens at the row's next position, never padding: no token is fed again after a tool turn, a row
    that adds an observation goes through a forward of rows adding as many tokens. All rows sample 10
    tokens, so only the last sampled token of each row is never fed."""
    prompts = ["Which city?", "Why?"]
    scripts = ["<thought><call>ab</call><answer>xyz</answer>",
               "<thought>abc<call>d</call><answer>e</answer>",
               "<thought>abcdef<answer>g</answer>",
               "<thought><call>q</call><call>rs</call><answer></answer>",
               f"<thought>abcdefgh{EOS}",
               "<thought>abcdefghijklmnop"]
    r, model, _ = run(scripts, prompts, group_size=3, max_new_tokens=10, max_tool_wait=0)  # no batched turns
    assert r.num_generated.tolist() == [10] * 6 and r.num_calls.tolist() == [1, 1, 0, 2, 0, 0]  # the set-up
    prompt_ids = [TOK.encode(p) for p in prompts]
    prefill, decode = model.calls[0], model.calls[1:]
    assert prefill.prefill and prefill.ids.shape[0] == 2 and all(not c.prefill and len(c.ids) <= 6 for c in decode)
    assert any(c.ids.shape[1] > 1 for c in decode)  # a tool turn happened
    assert all(c.mask.all() for c in decode), "no padded position is ever fed (no row waits here)"
    fed = sum(int(c.mask.sum()) for c in model.calls)
    assert fed == sum(map(len, prompt_ids)) + int(r.attention_mask[:, r.prompt_length:].sum()) - 6
    for i in range(6):
        full = prompt_ids[i // 3] + completion(r, i)
        assert [t for t, _ in model.fed[i]] == full[:-1]
        assert [p for _, p in model.fed[i]] == list(range(len(full) - 1))  # positions skip the holes


def test_finished_rows_leave_the_batch():
    """A row that stopped is in no later forward; each forward holds each running row once."""
    scripts = ["<answer>a</answer>", "<answer>bb</answer>", "<thought><call>c</call><answer>c</answer>",
               f"<thought>{EOS}"]
    r, model, _ = run(scripts, ["Q", "Why?"], group_size=2, max_tool_wait=0)
    sampled = r.num_generated.tolist()
    for c in model.calls[1:]:
        assert len(set(c.rows)) == len(c.rows)
    for n in range(4):  # row n is fed in its forwards 1 .. sampled[n] - 1 (the last sampled token never)
        forwards = [c for c in model.calls[1:] if n in c.rows]
        assert sum(c.ids.shape[1] for c in forwards) == len(completion(r, n)) - 1
    assert len(model.calls[-1].rows) == 1 and model.calls[-1].rows == [2]  # the longest row, alone at the end


def test_rows_that_stop_early_are_not_fed_again():
    """Ragged stops: each row was fed a prefix of its sequence, in order, missing at most its last token."""
    scripts = ["<thought><answer>a</answer>", "<thought><call>x</call><answer>bbbbbb</answer>"]
    r, model, _ = run(scripts, ["Q"], group_size=2)
    for i, row in model.fed.items():
        full = TOK.encode("Q") + completion(r, i)
        assert [t for t, _ in row] == full[:len(row)] and len(full) - len(row) in (0, 1)
        assert [p for _, p in row] == list(range(len(row)))


def test_tool_budget():
    """Past max_tool_calls the call gets the budget observation and the env is not called."""
    script = "<thought><call>q1</call><call>q2</call><answer>a</answer>"
    r, _, env = run([script], ["Q"], group_size=1, max_tool_calls=1)
    ids, mask = pieces(("<thought><call>q1</call>", 1), obs(ENV_TEXT), ("<call>q2</call>", 1),
                       obs(BUDGET_OBSERVATION), ("<answer>a</answer>", 1))
    assert completion(r, 0) == ids and r.completion_mask[0].tolist() == mask
    assert (r.num_calls.item(), r.num_calls_no_obs.item(), r.incomplete_calls.item()) == (1, 1, 0)
    assert env.queries == ["q1"] and r.queries == [["q1"]]


def test_unclosed_call_at_budget():
    """A `<call>` still open when the token budget runs out is incomplete and got no observation."""
    r, _, env = run(["<thought><call>never closed"], ["Q"], group_size=1, max_new_tokens=8)
    assert completion(r, 0) == TOK.encode("<thought><call>never ")
    assert (r.incomplete_calls.item(), r.num_calls_no_obs.item(), r.num_calls.item()) == (1, 1, 0)
    assert r.truncated.item() and env.queries == []


def test_env_error_only_affects_its_sample():
    """A tool that raises gives that sample an error observation; the other sample is unaffected."""
    scripts = ["<thought><call>boom</call><answer>a</answer>", "<thought><call>fine</call><answer>b</answer>"]
    r, _, env = run(scripts, ["Q"], group_size=2)
    ids, mask = pieces(("<thought><call>fine</call>", 1), obs(ENV_TEXT), ("<answer>b</answer>", 1))
    assert completion(r, 1) == ids and r.completion_mask[1, :len(mask)].tolist() == mask
    assert r.texts[0].startswith("<thought><call>boom</call><obs>") and r.texts[0].endswith("</obs><answer>a</answer>")
    error_obs = r.texts[0].split("<obs>")[1].split("</obs>")[0]
    assert "error" in error_obs.lower() and ENV_TEXT not in error_obs
    n_obs = len(TOK.encode(error_obs)) + 2
    assert r.completion_mask[0, :len(completion(r, 0))].tolist() == [1] * 7 + [0] * n_obs + [1] * 3
    assert r.tool_errors.tolist() == [1, 0] and r.num_calls.tolist() == [1, 1] and env.queries == ["boom", "fine"]

def test_one_env_per_prompt():
    """`env` may be one tool per prompt: the G samples of prompt b all call envs[b] (GRPO's tool outages);
    a list of another length than the prompts is refused."""
    scripts = ["<thought><call>x</call><answer>a</answer>", "<thought><call>y</call><answer>a</answer>"] * 2
    envs = [lambda q: f"A saw {q}", lambda q: f"B saw {q}"]
    r = rollout(ScriptedLM(scripts, 2), TOK, ["Q1", "Q2"], envs, group_size=2, max_new_tokens=64,
                generator=torch.Generator().manual_seed(0))
    observations = [t.split("<obs>")[1].split("</obs>")[0] for t in r.texts]
    assert observations == ["A saw x", "A saw y", "B saw x", "B saw y"]
    with pytest.raises(ValueError, match="3 envs for 2 prompts"):
        rollout(ScriptedLM(scripts, 2), TOK, ["Q1", "Q2"], envs + envs[:1], group_size=2, max_new_tokens=64)


class CountingTokenizer(ByteTokenizer):
    """Records the length of every text it encodes."""

    def __init__(self):
        super().__init__()
        self.lengths = []

    def encode(self, text, add_special_tokens=False):
        self.lengths.append(len(text))
        return super().encode(text, add_special_tokens)


def test_failing_tools_only_affect_their_own_samples(faulty_env):
    """B=2 prompts, G=3: samples 0, 1, 2 call a tool that raises, hangs, floods; samples 3-5 are the
    same with a healthy tool. Each faulty sample gets a short observation, is counted in
    tool_errors and goes on to its answer; samples 3-5 are token for token what a rollout with a
    healthy env gives; no megabyte string is ever tokenized."""
    scripts = [f"<thought><call>{q}</call><answer>a{i}</answer>" for i, q in enumerate(["boom", "hang", "huge"])]
    scripts += ["<thought><call>fine</call><answer>b</answer>", "<thought><answer>c</answer>",
                "<thought><call>also fine</call><call>again</call><answer>d</answer>"]
    max_obs_tokens = 32

    def run(env, tokenizer):
        return rollout(ScriptedLM(scripts, 3), tokenizer, ["Q1", "Q2"], env, group_size=3, max_new_tokens=64,
                       max_obs_tokens=max_obs_tokens, generator=torch.Generator().manual_seed(0), tool_timeout=0.3)

    tok = CountingTokenizer()
    t0 = time.perf_counter()
    r = run(faulty_env, tok)
    assert time.perf_counter() - t0 < 10
    healthy = run(lambda q: ENV_TEXT, TOK)

    assert r.tool_errors.tolist() == [1, 1, 1, 0, 0, 0]
    assert r.num_calls.tolist() == healthy.num_calls.tolist() == [1, 1, 1, 1, 0, 2]
    observations = [t.split("<obs>")[1].split("</obs>")[0] for t in r.texts[:3]]
    assert observations == ["Tool error: ConnectionError", "Tool error: timeout", "x" * max_obs_tokens]
    for i in range(3):
        assert r.texts[i].endswith(f"</obs><answer>a{i}</answer>"), "the faulty sample must go on to its answer"
    for i in range(3, 6):
        assert completion(r, i) == completion(healthy, i) and r.texts[i] == healthy.texts[i]
        n = len(completion(r, i))
        assert torch.equal(r.completion_mask[i, :n], healthy.completion_mask[i, :n])
    assert max(tok.lengths) <= OBS_CHARS_PER_TOKEN * max_obs_tokens

# --------------------------------------------------------------------------------------- tiny Llama


class ToolBiased(Biased):
    """The tiny random model with the tag logits raised, so that calls and answers happen. It
    records the last-position logits of every call: the distributions the rollout sampled from."""

    def __init__(self, model, bias: dict[str, float]):
        super().__init__(model, bias)
        self.step_logits = []

    def forward(self, **kwargs):
        out = super().forward(**kwargs)
        self.step_logits.append(out.logits[:, -1].clone())                          # (rows, V)
        return out


@pytest.fixture(scope="module")
def tiny_rollouts():
    """The same seeded rollout (B=2 prompts of different lengths, G=3), with and without the cache."""
    model, tokenizer = load_model_and_tokenizer("tiny")
    out = {}
    for use_cache in (True, False):
        biased = ToolBiased(model.eval(), {"<call>": 3.0, "</call>": 3.5, "<answer>": 1.5, "</answer>": 2.0})
        r = rollout(biased, tokenizer, ["What is the capital of France?", "Hi"], lambda q: f"result for {q}",
                    group_size=3, max_new_tokens=40, generator=torch.Generator().manual_seed(1), use_cache=use_cache)
        out[use_cache] = r, biased, list(biased.step_logits)
    return out


def test_cache_matches_no_cache_with_tool_turns(tiny_rollouts):
    """The cached loop (ragged tool steps, holes, one shared prefill) samples the same tokens from the
    same logits as re-feeding the whole sequence at every step."""
    (cached, _, steps_c), (reference, _, steps_r) = tiny_rollouts[True], tiny_rollouts[False]
    lengths = cached.attention_mask[:, cached.prompt_length:].sum(-1)
    first_obs = {t.index("<obs>") for t in cached.texts if "<obs>" in t}
    assert len(first_obs) >= 2 and len(set(lengths.tolist())) > 1  # tool turns at different steps: ragged
    assert torch.equal(cached.input_ids, reference.input_ids)
    assert torch.equal(cached.attention_mask, reference.attention_mask)
    assert torch.equal(cached.completion_mask, reference.completion_mask)
    assert cached.texts == reference.texts and cached.num_calls.tolist() == reference.num_calls.tolist()
    assert len(steps_c) == len(steps_r) and steps_c[0].shape[0] == 2                 # prefill: B rows
    torch.testing.assert_close(steps_c[0].repeat_interleave(3, dim=0), steps_r[0], atol=1e-5, rtol=1e-4)
    for c, ref in zip(steps_c[1:], steps_r[1:]):
        torch.testing.assert_close(c, ref, atol=1e-5, rtol=1e-4)                     # (N, V)


def test_packed_logits_match_each_sequence_alone(tiny_rollouts):
    """The packed rollout (left-padded prompt | completion | right padding, positions from the mask)
    gives each real token the logits of its sequence run alone; and every sampled token was drawn from
    exactly those logits (what the loss will recompute), holes and tool turns notwithstanding."""
    r, biased, step_logits = tiny_rollouts[True]
    P, G = r.prompt_length, 3
    with torch.no_grad():
        packed = biased(input_ids=r.input_ids, attention_mask=r.attention_mask,
                        position_ids=position_ids_from_mask(r.attention_mask)).logits     # (N, P+C, V)
        for i in range(len(r.input_ids)):
            real = r.attention_mask[i].bool()
            alone = biased(input_ids=r.input_ids[i][real][None]).logits[0]            # (T_i, V)
            torch.testing.assert_close(packed[i][real], alone, atol=1e-5, rtol=1e-4)
    steps = [step_logits[0].repeat_interleave(G, dim=0)] + step_logits[1:]  # each (rows of that forward, V)
    for i in range(len(r.input_ids)):
        sampled_at = r.completion_mask[i].nonzero().squeeze(-1)                      # (num_generated,)
        assert len(sampled_at) == r.num_generated[i]
        t = 0  # forwards hold the running rows only, in any order: match a row of each, in order
        for c in sampled_at.tolist():
            want = packed[i, P + c - 1]
            while t < len(steps) and not any(torch.allclose(row, want, atol=1e-5, rtol=1e-4) for row in steps[t]):
                t += 1
            assert t < len(steps), f"row {i}: token {c} was not sampled from its packed logits"
            t += 1

# --------------------------------------------------------------------------------------- sample_next


def test_sample_next_greedy_and_top_p():
    """Temperature 0 is argmax; a tiny top_p keeps only the argmax token."""
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0))           # (N, V)
    assert torch.equal(sample_next(logits, 0.0, 1.0), logits.argmax(-1))
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        assert torch.equal(sample_next(logits, 1.0, 1e-3, generator=g), logits.argmax(-1))


@pytest.mark.parametrize("temperature, top_p, expected", [
    (1.0, 1.0, [0.5, 0.3, 0.2]),
    (2.0, 1.0, [x / 1.7346 for x in (0.7071, 0.5477, 0.4472)]),  # p^(1/2) renormalized
    (1.0, 0.6, [0.625, 0.375, 0.0]),  # 0.5 + 0.3 reach 0.6: keep two, renormalize by 0.8
])
def test_sample_next_distribution(temperature, top_p, expected):
    """Empirical frequencies of 20k draws match the tempered, top-p truncated distribution."""
    logits = torch.tensor([0.5, 0.3, 0.2]).log().expand(20_000, 3)                   # (N, V)
    draws = sample_next(logits, temperature, top_p, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=3).float() / len(draws)
    assert torch.allclose(freq, torch.tensor(expected), atol=0.015)


def test_inverse_cdf_sample_by_hand():
    """probs [0.5, 0.3, 0.2] in blocks of 2 (the last block padded): u below 0.5 gives token 0, between
    0.5 and 0.8 token 1, above 0.8 token 2; with leading and trailing zeros, u = 0 and u -> 1 still
    land on mass."""
    probs = torch.tensor([[0.5, 0.3, 0.2]]).expand(7, 3)
    u = torch.tensor([0.0, 0.49, 0.51, 0.79, 0.81, 0.95, 1 - 2**-53], dtype=torch.float64)
    assert inverse_cdf_sample(probs, block=2, u=u).tolist() == [0, 0, 1, 1, 2, 2, 2]
    holed = torch.tensor([[0.0, 0.0, 0.0, 0.25, 0.0, 0.75, 0.0]]).expand(4, 7)
    u = torch.tensor([0.0, 0.2, 0.26, 1 - 2**-53], dtype=torch.float64)
    for block in (1, 2, 3, 8):
        assert inverse_cdf_sample(holed, block=block, u=u).tolist() == [3, 3, 5, 5], block


def test_inverse_cdf_sample_keeps_the_tail_of_a_large_vocabulary():
    """SmolLM2's vocabulary size, 0.99995 of the mass on token 0 and 1e-9 on each of the other 49,151:
    the fp32 values of one cumsum over the row are ~1, spaced by their ulp (6e-8), so tail tokens are
    picked ~60 at a time and off by tens; the blocked sums pick what a float64 cumsum picks, give or take
    one token (only the 255 tail tokens in token 0's block share its rounding)."""
    V = 49_152
    probs = torch.full((1, V), 1e-9)
    probs[0, 0] = 1.0 - 1e-9 * (V - 1)
    u = torch.tensor([0.5, 1 - 4e-5, 1 - 2.5e-5, 1 - 1e-5, 1 - 1e-6], dtype=torch.float64)
    cdf = probs.double().cumsum(-1)                                                    # (1, V)
    want = (cdf <= u[:, None] * cdf[:, -1:]).sum(-1)                                   # (5,) first index above
    one_fp32_sum = torch.searchsorted(probs.cumsum(-1).double().repeat(5, 1), (u * cdf[0, -1])[:, None],
                                      right=True).squeeze(-1).clamp(max=V - 1)
    assert want[0] == 0 and (want[1:] < 48_500).all() and (one_fp32_sum - want).abs().max() > 10
    got = inverse_cdf_sample(probs.expand(5, V), u=u)
    assert (got - want).abs().max() <= 1, (got, want)


def test_inverse_cdf_sample_refuses_rows_without_mass():
    """NaN logits (or an all-zero row) are an error naming the row, not a silent draw past the vocabulary."""
    probs = torch.softmax(torch.randn(3, 300), -1)
    probs[1] = float("nan")
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        inverse_cdf_sample(probs, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"rows \[0\]"):
        inverse_cdf_sample(torch.zeros(1, 10), torch.Generator().manual_seed(0))


@pytest.mark.parametrize("block", [1, 7, 64, 4096])
def test_inverse_cdf_sample_is_the_float64_inverse_cdf(block):
    """Blocked fp32/fp64 sums pick the token a float64 cumsum over the whole row picks, for the same
    uniforms (the generator's): peaked, flat and zero-holed rows, a vocabulary not a multiple of the block."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(300, 1000, generator=g) * torch.tensor([0.1, 3.0, 12.0]).repeat(100)[:, None]
    probs = torch.softmax(logits, -1)                                                  # (N, V)
    probs[::4, 100:900] = 0.0                                                          # whole blocks empty
    got = inverse_cdf_sample(probs, torch.Generator().manual_seed(1), block=block)
    u = torch.rand(300, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cdf = probs.double().cumsum(-1)                                                    # (N, V)
    assert torch.equal(got, (cdf <= u[:, None] * cdf[:, -1:]).sum(-1))                 # first index above u
    assert (probs.gather(-1, got[:, None]) > 0).all()

# --------------------------------------------------------------------------------------- π_old


@pytest.fixture(scope="module")
def tempered_rollout():
    """A seeded rollout at T = 0.7 (B=2 prompts of different lengths, G=3, tool turns): the sampled ids,
    what the rollout recorded as π_old, and the logits of every decode step."""
    model, tokenizer = load_model_and_tokenizer("tiny", seed=3)
    biased = ToolBiased(model.eval(), {"<call>": 3.0, "</call>": 3.5, "<answer>": 1.5, "</answer>": 2.0})
    r = rollout(biased, tokenizer, ["What is the capital of France?", "Hi"], lambda q: f"result for {q}",
                group_size=3, max_new_tokens=40, temperature=0.7, generator=torch.Generator().manual_seed(2))
    return r, biased, list(biased.step_logits)


def test_scored_logprobs_are_the_sampling_distribution(tempered_rollout):
    """The loss's log π(o_t) (`completion_logprobs`, one packed forward) equals, token for token, the
    log-softmax at temperature T of the very decode step that sampled o_t (`sample_logp`, π_old).

    Catches: scoring token t with the logits of t+1 (or t-1), scoring without the temperature, the
    prefill logits or cache tiled in the wrong order (rows of a group sampled from another prompt),
    observation or padding positions counted as sampled."""
    from grpo.logprobs import completion_logprobs

    r, biased, _ = tempered_rollout
    assert (r.completion_mask == 0).any(1).sum() >= 2, "tool turns expected in the set-up"
    assert len(set(r.attention_mask.sum(1).tolist())) > 1
    with torch.no_grad():
        scored = completion_logprobs(biased, r, temperature=0.7)                   # (N, C)
    m = r.completion_mask.bool()
    assert int(m.sum()) == int(r.num_generated.sum())
    torch.testing.assert_close(scored[m], r.sample_logp[m], atol=1e-4, rtol=1e-4)
    assert (r.sample_logp[~m] == 0).all()
    assert (r.sample_logp[m] < 0).all() and (r.sample_logp[m] > -30).all()
    with torch.no_grad():  # the wrong temperature is told apart
        at_t1 = completion_logprobs(biased, r, temperature=1.0)
    assert (at_t1[m] - r.sample_logp[m]).abs().max() > 1e-2


def test_sample_logp_is_the_step_log_softmax(tempered_rollout):
    """Independently of the loss code: each recorded π_old is log softmax(step logits / T)[token] of a
    row of a forward, in the order of the forwards (the prefill's B rows tiled with repeat_interleave:
    row n is prompt n // G; later forwards hold only the running rows)."""
    r, _, step_logits = tempered_rollout
    G = 3
    steps = [step_logits[0].repeat_interleave(G, dim=0)] + step_logits[1:]        # each (rows of that forward, V)
    for i in range(len(r.input_ids)):
        t = 0
        for c in r.completion_mask[i].nonzero().squeeze(-1).tolist():
            tok = r.completion_ids[i, c]
            want = float(r.sample_logp[i, c])
            while t < len(steps) and (torch.log_softmax(steps[t].float() / 0.7, -1)[:, tok] - want).abs().min() > 1e-4:
                t += 1
            assert t < len(steps), f"row {i}: π_old of token {c} is no decode step's log-softmax"
            t += 1


def test_budget_note_is_the_same_in_rollout_and_sft():
    """With show_budget, executed calls end their observation with the searches left; a refused call
    gets the budget notice alone; SFT tokenizes the same completion to the same ids."""
    from data.traces import Trace
    from envs.protocol import budget_note
    from grpo.sft import tokenize_trace

    script = "<call>q1</call><call>q2</call><call>q3</call><answer>a</answer>"
    r, _, env = run([script], ["Q"], group_size=1, max_tool_calls=2, show_budget=True)
    ids, mask = pieces(("<call>q1</call>", 1), obs(ENV_TEXT + " [1 search left]"), ("<call>q2</call>", 1),
                       obs(ENV_TEXT + " [0 searches left]"), ("<call>q3</call>", 1), obs(BUDGET_OBSERVATION),
                       ("<answer>a</answer>", 1))
    assert completion(r, 0) == ids and r.completion_mask[0].tolist() == mask
    assert budget_note(1) == " [1 search left]" and env.queries == ["q1", "q2"]
    trace = Trace(id="search/x", question="Q", answers=("a",), kind="lookup", style="search",
                  segments=(("model", "<call>q1</call>"), ("obs", ENV_TEXT), ("model", "<call>q2</call>"),
                            ("obs", ENV_TEXT), ("model", "<answer>a</answer>")))
    sft_ids, _ = tokenize_trace(TOK, trace, max_tool_calls=2)
    expected = pieces(("<call>q1</call>", 1), obs(ENV_TEXT + " [1 search left]"), ("<call>q2</call>", 1),
                      obs(ENV_TEXT + " [0 searches left]"), ("<answer>a</answer>", 1))[0]
    assert sft_ids[-len(expected) - 1:-1] == expected and sft_ids[-1] == TOK.eos_token_id
    off = run([script], ["Q"], group_size=1, max_tool_calls=2)[0]  # the option is off by default
    assert "searches left" not in off.texts[0] and "search left" not in off.texts[0]


def test_refused_call_is_well_formed_and_charged():
    """Over the budget the env answers with the budget observation: the text parses as well-formed,
    and the refused call is charged through num_calls_no_obs (VOI: 1.0 + 0.1 - 0.05 - 0.2 = 0.85)."""
    from envs.protocol import parse_completion
    from grpo.rewards import judge, voi_reward

    r, _, _ = run(["<call>q1</call><call>q2</call><answer>a</answer>"], ["Q"], group_size=1, max_tool_calls=1)
    assert parse_completion(r.texts[0]).well_formed
    total = voi_reward(*judge(r.texts[0], ["a"]), int(r.num_calls[0]), int(r.num_calls_no_obs[0]))["total"]
    assert total == pytest.approx(0.85)

# --------------------------------------------------------------------------------------- closing tags


class PieceTokenizer:
    """Tokens are the strings of `pieces` (BPE-like: a tag may be split, its '>' may sit in a bigger token)."""

    pieces = ["<", "</", "call", "answer", ">", "></", ">.", "a", " ", "x", "c", "all", "</c", "\n"]

    def __len__(self):
        return len(self.pieces)

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids)

    def batch_decode(self, batch):
        return [self.decode(ids) for ids in batch]

    def ids(self, *pieces):
        return [self.pieces.index(p) for p in pieces]


def test_tag_closed_across_token_boundaries():
    """A closing tag split over tokens is found at the token that ends it, also when its '>' is part of
    a bigger token; the byte tokenizer's one-token tags too."""
    from grpo.rollout import tag_closed

    tok = PieceTokenizer()
    cases = [(("</", "call", ">"), "call"), (("x", "</", "answer", ">."), "answer"),
             (("a", "</c", "all", "></"), "call"), (("<", "call", ">"), None), (("x", ">"), None)]
    for pieces, want in cases:
        ids = tok.ids(*pieces)
        assert tag_closed(tok, ids) == want, pieces
        assert all(tag_closed(tok, ids[:k]) is None for k in range(1, len(ids))), pieces
    for tag in ("call", "answer"):
        assert tag_closed(TOK, TOK.encode(f"ab</{tag}>")) == tag and tag_closed(TOK, TOK.encode(f"ab<{tag}>")) is None


def test_tag_closed_agrees_with_decoding_every_step():
    """On random token streams, the first step at which `tag_closed` fires is the first step at which the
    decoded tail (what the rollout used to decode at every step) holds a closing tag, and it is the same tag."""
    import random

    from grpo.rollout import ANSWER_CLOSE, CALL_CLOSE, TAIL_TOKENS, tag_closed

    tok, rng = PieceTokenizer(), random.Random(0)
    fired = 0
    for _ in range(2000):
        seq = [rng.randrange(len(tok)) for _ in range(12)]
        want = got = None
        for k in range(1, len(seq) + 1):
            tail = tok.decode(seq[:k][-TAIL_TOKENS:])
            want = want or ("answer" if ANSWER_CLOSE.search(tail) else "call" if CALL_CLOSE.search(tail) else None) \
                and (k, "answer" if ANSWER_CLOSE.search(tail) else "call")
            got = got or ((k, tag_closed(tok, seq[:k])) if tag_closed(tok, seq[:k]) else None)
        assert want == got, [tok.pieces[i] for i in seq]
        fired += want is not None
    assert fired > 50  # the streams do close tags


def test_growing_layer_matches_dynamic_layer():
    """GrowingLayer (in-place writes into spare columns) returns what DynamicLayer (torch.cat) returns,
    across reallocations and after its tensors are replaced (the rollout's cache surgery)."""
    from transformers.cache_utils import DynamicLayer

    from grpo.kvcache import GrowingLayer

    g = torch.Generator().manual_seed(0)
    ref = DynamicLayer()
    k0 = torch.randn(3, 2, 5, 4, generator=g)                                    # (R, h, T, d)
    ref.update(k0, -k0)
    grow = GrowingLayer.of(ref)
    for step, L in enumerate([1, 1, 70, 1, 3, 1]):
        if step == 3:  # rows leave: both get the same selection
            ref.keys, ref.values = ref.keys[[0, 2]], ref.values[[0, 2]]
            grow.keys, grow.values = grow.keys[[0, 2]], grow.values[[0, 2]]
        k = torch.randn(len(ref.keys), 2, L, 4, generator=g)
        want, got = ref.update(k, 2 * k), grow.update(k, 2 * k)
        assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
        assert grow.get_seq_length() == ref.get_seq_length()


def test_stop_checks_stop_rows_with_their_reason():
    """A stop check is asked after each running row's step; its reason stops that row only."""
    def long_thought(row):
        return "too long" if len(row.segment) >= 8 else None

    scripts = ["<thought>abcdefgh</thought><answer>a</answer>", "<thought>a</thought><answer>b</answer>"]
    r, _, _ = run(scripts, ["Q"], group_size=2, stop_checks=[long_thought])
    assert r.stop_reasons == ["too long", "answer"] and r.num_generated.tolist() == [8, 6]
    assert r.truncated.tolist() == [False, False]


@pytest.mark.parametrize("max_tool_wait", [0, 2])
def test_cache_matches_no_cache_when_tool_turns_go_in_at_once(max_tool_wait):
    """As test_cache_matches_no_cache_with_tool_turns, with each tool turn fed at once (rows split into
    forwards by how many tokens they add) or after a short wait."""
    model, tokenizer = load_model_and_tokenizer("tiny", seed=5)
    out = {}
    for use_cache in (True, False):
        biased = ToolBiased(model.eval(), {"<call>": 3.0, "</call>": 3.5, "<answer>": 1.0, "</answer>": 2.0})
        out[use_cache] = rollout(biased, tokenizer, ["Capital of Peru?", "Hi there"], lambda q: f"r {q}" * (len(q) % 4),
                                 group_size=4, max_new_tokens=48, generator=torch.Generator().manual_seed(3),
                                 use_cache=use_cache, max_tool_wait=max_tool_wait), biased.step_logits
    (cached, steps_c), (reference, steps_r) = out[True], out[False]
    assert cached.num_calls.sum() >= 3 and len(set(cached.num_generated.tolist())) > 2  # ragged set-up
    assert torch.equal(cached.input_ids, reference.input_ids) and cached.texts == reference.texts
    assert torch.equal(cached.completion_mask, reference.completion_mask)
    assert len(steps_c) == len(steps_r)
    for c, ref in zip(steps_c[1:], steps_r[1:]):
        torch.testing.assert_close(c, ref, atol=1e-5, rtol=1e-4)                     # (rows, V)


def test_tool_turn_runs_the_last_call_of_the_segment_or_an_empty_query():
    """`observation`: the query is the last well-formed `<call>…</call>` since the last observation;
    a `</call>` without one (`<call Angola>Angola</call>`, seen in run RS-L) runs the empty query, is
    charged as a call, and its completion is malformed for the reward (`parse_completion`)."""
    from envs.protocol import parse_completion
    from grpo.rollout import RowState, observation

    asked = []

    def env(query: str) -> str:
        asked.append(query)
        return f"found {query}"

    row = RowState()
    row.segment = TOK.encode("<thought>t</thought><call>Kenya</call> <call>Chad </call>")
    obs = TOK.decode(observation(row, TOK, env, max_tool_calls=3, max_obs_tokens=50, tool_timeout=None,
                                 show_budget=False))
    assert (asked, row.queries, row.num_calls, row.segment) == (["Chad"], ["Chad"], 1, [])
    assert obs == "<obs>found Chad</obs>"

    text = "<thought>t</thought><call Angola>Angola</call>"
    row.segment = TOK.encode(text)
    obs = TOK.decode(observation(row, TOK, env, 3, 50, None, False))
    assert (asked[-1], row.queries[-1], row.num_calls, row.num_calls_no_obs) == ("", "", 2, 0)
    assert obs == "<obs>found </obs>"
    assert not parse_completion(text + obs + "<answer>x</answer>").well_formed
